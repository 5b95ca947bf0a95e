"""Properties of ``adapters.sealing``: AES-GCM sealing of secrets at rest and the server key file."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adapters.sealing import (
    KEY_BYTES,
    AesGcmSecretBox,
    SecretKeyError,
    decode_key,
    encode_key,
    generate_key,
    load_or_create_key_file,
)
from core.errors import SecretUnreadable

BOX = AesGcmSecretBox(os.urandom(KEY_BYTES))
OTHER_BOX = AesGcmSecretBox(os.urandom(KEY_BYTES))
CONTEXTS = st.text(max_size=60)

crypto = settings(deadline=None)


@crypto
@given(st.text(), CONTEXTS)
def test_unseal_opens_what_seal_sealed(plaintext: str, context: str) -> None:
    assert BOX.unseal(BOX.seal(plaintext, context=context), context=context) == plaintext


@crypto
@given(st.text(), CONTEXTS, CONTEXTS)
def test_a_different_context_cannot_unseal(plaintext: str, context: str, other: str) -> None:
    assume(context != other)
    sealed = BOX.seal(plaintext, context=context)
    with pytest.raises(SecretUnreadable):
        BOX.unseal(sealed, context=other)


@crypto
@given(st.text(), CONTEXTS)
def test_a_different_key_cannot_unseal(plaintext: str, context: str) -> None:
    sealed = BOX.seal(plaintext, context=context)
    with pytest.raises(SecretUnreadable):
        OTHER_BOX.unseal(sealed, context=context)


def _raw(sealed: str) -> bytes:
    version, _, body = sealed.partition(":")
    assert version == "v1"
    return base64.urlsafe_b64decode(body)


@crypto
@given(st.text(max_size=200), st.data())
def test_any_tampered_byte_of_the_sealed_bytes_is_refused(plaintext: str, data: st.DataObject) -> None:
    sealed = BOX.seal(plaintext, context="ctx")
    raw = bytearray(_raw(sealed))
    where = data.draw(st.integers(min_value=0, max_value=len(raw) - 1), label="where")
    raw[where] ^= data.draw(st.integers(min_value=1, max_value=255), label="xor")
    tampered = "v1:" + base64.urlsafe_b64encode(bytes(raw)).decode("ascii")
    with pytest.raises(SecretUnreadable):
        BOX.unseal(tampered, context="ctx")


@crypto
@given(st.text(max_size=200), st.data())
def test_a_tampered_character_of_the_sealed_text_never_yields_a_wrong_plaintext(plaintext: str,
                                                                              data: st.DataObject) -> None:
    sealed = BOX.seal(plaintext, context="ctx")
    where = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="where")
    char = data.draw(st.characters(codec="utf-8"), label="char")
    assume(char != sealed[where])
    tampered = sealed[:where] + char + sealed[where + 1:]
    try:
        opened = BOX.unseal(tampered, context="ctx")
    except SecretUnreadable:
        return
    assert opened == plaintext


@crypto
@given(st.text(max_size=200), st.integers(min_value=0, max_value=10_000))
def test_truncated_or_mislabelled_sealed_text_is_refused(plaintext: str, cut: int) -> None:
    sealed = BOX.seal(plaintext, context="ctx")
    for broken in (sealed[: cut % len(sealed)], "v2" + sealed[2:], "x" + sealed, sealed[3:], ""):
        with pytest.raises(SecretUnreadable):
            BOX.unseal(broken, context="ctx")


def test_every_single_character_substitution_of_the_sealed_text_is_refused() -> None:
    # 3 bytes of plaintext + 12 nonce + 16 tag = 31 bytes: the last base64 character carries 4 unused bits.
    sealed = BOX.seal("abc", context="ctx")
    opened = []
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/="
    for where in range(len(sealed)):
        for char in alphabet:
            if char == sealed[where]:
                continue
            tampered = sealed[:where] + char + sealed[where + 1:]
            try:
                BOX.unseal(tampered, context="ctx")
            except SecretUnreadable:
                continue
            opened.append(tampered)
    assert opened == []


@pytest.mark.parametrize("suffix", ["AAAA", "!!", "*"])
def test_sealed_text_with_anything_appended_is_refused(suffix: str) -> None:
    sealed = BOX.seal("a", context="ctx")  # 29 bytes: the text ends in one '=' of padding
    with pytest.raises(SecretUnreadable):
        BOX.unseal(sealed + suffix, context="ctx")


@crypto
@given(st.text(min_size=8), CONTEXTS)
def test_sealed_text_never_contains_the_plaintext(plaintext: str, context: str) -> None:
    assert plaintext not in BOX.seal(plaintext, context=context)


@crypto
@given(st.text(), CONTEXTS)
def test_sealing_twice_gives_different_texts(plaintext: str, context: str) -> None:
    assert BOX.seal(plaintext, context=context) != BOX.seal(plaintext, context=context)


# ---------------------------------------------------------------------------------------- server key


@given(st.binary(max_size=100).filter(lambda raw: len(raw) != KEY_BYTES))
def test_decode_key_rejects_keys_of_the_wrong_length(raw: bytes) -> None:
    with pytest.raises(SecretKeyError, match="MANAGEMENT_SECRET_KEY"):
        decode_key(encode_key(raw), source="MANAGEMENT_SECRET_KEY")


@given(st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES))
def test_decode_key_reads_back_any_32_byte_key(raw: bytes) -> None:
    assert decode_key(encode_key(raw), source="test") == raw
    assert decode_key(encode_key(raw) + "\n", source="test") == raw


@pytest.mark.parametrize("text", ["", "\u00e9" * 43, "not base64 at all!"])
def test_decode_key_rejects_text_that_is_not_a_key(text: str) -> None:
    with pytest.raises(SecretKeyError):
        decode_key(text, source="test")


def test_generated_keys_are_usable_and_distinct() -> None:
    first, second = generate_key(), generate_key()
    assert first != second
    assert len(decode_key(first, source="test")) == KEY_BYTES


def test_a_box_refuses_a_key_of_the_wrong_length() -> None:
    with pytest.raises(SecretKeyError):
        AesGcmSecretBox(os.urandom(16))


def test_key_file_is_created_private_with_a_usable_key(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secret.key"
    key = load_or_create_key_file(path)
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert decode_key(path.read_text(), source="test") == key
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temporary file left behind


def test_key_file_second_call_returns_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    first = load_or_create_key_file(path)
    assert load_or_create_key_file(path) == first
    assert AesGcmSecretBox(load_or_create_key_file(path)).unseal(
        AesGcmSecretBox(first).seal("secret", context="c"), context="c") == "secret"


def test_an_existing_private_key_file_is_used_as_is(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    raw = os.urandom(KEY_BYTES)
    path.write_text(encode_key(raw) + "\n")
    path.chmod(0o600)
    assert load_or_create_key_file(path) == raw


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_file_readable_by_others_is_refused_naming_the_file(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret.key"
    load_or_create_key_file(path)
    path.chmod(mode)
    with pytest.raises(SecretKeyError) as refused:
        load_or_create_key_file(path)
    assert str(path) in str(refused.value)
