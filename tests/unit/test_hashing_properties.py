"""Properties of ``adapters.hashing.Sha256KeyHasher``: how API keys are issued and checked."""

from __future__ import annotations

import base64

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from adapters.hashing import Sha256KeyHasher
from core.model import IssuedApiKey

HASHER = Sha256KeyHasher()
KEY = HASHER.issue()


def secret_part(key: IssuedApiKey) -> str:
    return key.plaintext.split("_", 2)[2]


def test_issued_keys_carry_256_random_bits() -> None:
    for _ in range(200):
        secret = secret_part(HASHER.issue())
        assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) == 32


def test_issued_keys_are_prefix_underscore_secret() -> None:
    key = HASHER.issue()
    assert key.plaintext.startswith(key.prefix + "_")
    assert len(key.prefix) == len("mgmt_") + 12


def test_an_issued_key_matches_its_own_digest() -> None:
    for _ in range(50):
        key = HASHER.issue()
        assert HASHER.matches(key.plaintext, key.digest)


@settings(deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="mgt_0123456789abcdefABCDEF-", min_size=40, max_size=80)))
@example("")
@example(KEY.prefix)
@example(KEY.plaintext[:-1])
@example(KEY.plaintext + "A")
@example(KEY.plaintext.upper())
@example(" " + KEY.plaintext)
@example(KEY.digest)
def test_no_other_text_matches_a_keys_digest(text: str) -> None:
    assume(text != KEY.plaintext)
    assert not HASHER.matches(text, KEY.digest)


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=len(KEY.plaintext) - 1), st.characters(codec="utf-8"))
def test_changing_any_character_of_a_key_breaks_the_match(where: int, char: str) -> None:
    tampered = KEY.plaintext[:where] + char + KEY.plaintext[where + 1:]
    assume(tampered != KEY.plaintext)
    assert not HASHER.matches(tampered, KEY.digest)


def test_a_key_does_not_match_another_keys_digest() -> None:
    first, second = HASHER.issue(), HASHER.issue()
    assert not HASHER.matches(first.plaintext, second.digest)
    assert not HASHER.matches(second.plaintext, first.digest)


def test_prefixes_and_keys_of_many_issued_keys_are_distinct() -> None:
    keys = [HASHER.issue() for _ in range(2000)]
    assert len({k.prefix for k in keys}) == len(keys)
    assert len({k.plaintext for k in keys}) == len(keys)
    assert len({k.digest for k in keys}) == len(keys)


def test_the_digest_never_contains_the_plaintext_or_its_secret() -> None:
    for _ in range(200):
        key = HASHER.issue()
        assert key.plaintext not in key.digest
        assert secret_part(key) not in key.digest
        assert secret_part(key)[:16] not in key.digest


def test_the_plaintext_is_not_in_the_repr_of_an_issued_key() -> None:
    key = HASHER.issue()
    assert key.plaintext not in repr(key)
    assert secret_part(key) not in repr(key)
