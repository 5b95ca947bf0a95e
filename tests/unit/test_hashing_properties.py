"""Properties of ``adapters.hashing.HmacKeyHasher``: how API keys are issued and checked."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from adapters.hashing import HmacKeyHasher, api_key_pepper, legacy_digest
from core.model import IssuedApiKey

SERVER_KEY = secrets.token_bytes(32)
HASHER = HmacKeyHasher(api_key_pepper(SERVER_KEY))
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


# ---------------------------------------------------------------------- item 8: keyed digests


def test_item8_digests_are_keyed_with_a_pepper_derived_from_the_server_key() -> None:
    pepper = api_key_pepper(SERVER_KEY)
    assert pepper != SERVER_KEY and len(pepper) == 32  # derived (HKDF), not the sealing key itself
    assert KEY.digest == "hmac-sha256:" + hmac.new(pepper, KEY.plaintext.encode(), hashlib.sha256).hexdigest()
    other = HmacKeyHasher(api_key_pepper(secrets.token_bytes(32)))
    assert not other.matches(KEY.plaintext, KEY.digest)  # another server's secret: no match


def test_item8_an_unkeyed_digest_written_without_the_secret_never_matches() -> None:
    # What someone able to write the database, but without the server key, could store.
    assert not HASHER.matches(KEY.plaintext, legacy_digest(KEY.plaintext))
    assert not HASHER.matches(KEY.plaintext, "hmac-sha256:" + hashlib.sha256(KEY.plaintext.encode()).hexdigest())
    assert not HASHER.matches(KEY.plaintext, "no scheme at all")


@settings(deadline=None)
@given(st.text(min_size=1))
def test_item8_a_rekeyed_old_digest_matches_its_key_and_nothing_else(text: str) -> None:
    old = HmacKeyHasher(api_key_pepper(SERVER_KEY))
    rekeyed = old.rekey(legacy_digest(KEY.plaintext))
    assert rekeyed.startswith("hmac-sha256-of-sha256:")
    assert HASHER.matches(KEY.plaintext, rekeyed)
    assert HASHER.rekey(rekeyed) == rekeyed and HASHER.rekey(KEY.digest) == KEY.digest  # idempotent
    assume(text != KEY.plaintext)
    assert not HASHER.matches(text, rekeyed)
