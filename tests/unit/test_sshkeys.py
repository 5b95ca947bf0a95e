"""Private keys are hostile until parsed (adapters/sshkeys.py, issue 14 item 1).

The KDF cost is read from exactly the block asyncssh would decrypt, every KDF is capped, and the
parse itself runs in a child process killed past a deadline. No test here waits on the clock: work
is counted (calls into asyncssh, children started and killed)."""

from __future__ import annotations

import binascii
import struct
import warnings
from collections.abc import Iterator
from typing import Any

import asyncssh
import pytest
from asyncssh.asn1 import der_decode, der_encode
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import sshkeys
from adapters.sshkeys import AsyncsshKeys, KeyParserPool
from core.errors import KeyParserBusy
from core.model import ClientKey

PASSPHRASE = "correct horse battery staple"
ED25519 = asyncssh.generate_private_key("ssh-ed25519")
PLAIN = ED25519.export_private_key("openssh").decode()
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*bcrypt.kdf.*")
    ENCRYPTED = ED25519.export_private_key("openssh", passphrase=PASSPHRASE, rounds=4).decode()
EXPECTED = ClientKey(public_key=" ".join(ED25519.export_public_key("openssh").decode().split()[:2]),
                     fingerprint=ED25519.get_fingerprint("sha256"))


def _pem(name: bytes, body: bytes, headers: bytes = b"") -> str:
    lines = [body[i:i + 48] for i in range(0, len(body), 48)]
    encoded = b"\n".join(binascii.b2a_base64(line, newline=False) for line in lines)
    return (b"-----BEGIN " + name + b"-----\n" + headers + encoded + b"\n-----END " + name + b"-----\n").decode()


def _openssh_body(text: str) -> bytes:
    lines = text.strip().splitlines()
    return binascii.a2b_base64("".join(lines[1:-1]))


def with_rounds(text: str, rounds: int) -> str:
    """The encrypted OpenSSH key ``text`` with its bcrypt rounds field set to ``rounds``."""
    body = _openssh_body(text)
    offset = len(b"openssh-key-v1\x00")
    for _ in range(2):  # cipher name, KDF name
        (length,) = struct.unpack(">I", body[offset:offset + 4])
        offset += 4 + length
    (options_length,) = struct.unpack(">I", body[offset:offset + 4])
    (salt_length,) = struct.unpack(">I", body[offset + 4:offset + 8])
    at = offset + 8 + salt_length
    patched = body[:at] + struct.pack(">I", rounds) + body[at + 4:]
    assert options_length == 4 + salt_length + 4
    return _pem(b"OPENSSH PRIVATE KEY", patched)


HIDDEN = with_rounds(ENCRYPTED, 2**31)


class NoImport:
    """Stands in for every way asyncssh could parse a key: any call is counted and fails."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        monkeypatch.setattr(asyncssh, "import_private_key", self.import_private_key)

    def import_private_key(self, *_args: Any, **_kwargs: Any) -> None:
        self.calls.append("import_private_key")
        raise AssertionError("a key past the cap reached asyncssh")

    def inspect(self, text: str, passphrase: str | None) -> dict[str, Any]:
        self.calls.append("child")
        raise AssertionError("a key past the cap reached a key parser")


@pytest.fixture
def pool() -> Iterator[KeyParserPool]:
    parsers = KeyParserPool(workers=1, deadline=60)
    yield parsers
    parsers.close()


# ---------------------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("text", [
    "my key for hv1\n" + HIDDEN,                                      # a line before the block
    "Comment: x\n" + HIDDEN,
    "\n\n" + HIDDEN,                                                   # blank lines are fine, rounds still read
    HIDDEN.replace("-----\n", "-----\nComment: hides the body from a naive decoder\n", 1),  # a PEM header
    HIDDEN,
])
def test_item1_a_key_hiding_2_31_bcrypt_rounds_is_refused_before_any_parsing(
        text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = NoImport(monkeypatch)
    keys = AsyncsshKeys(parsers=spy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"(2147483648 bcrypt rounds|one private key block)"):
        keys.inspect_private_key(text, PASSPHRASE)
    assert spy.calls == []


def test_item1_the_prefixed_key_is_refused_for_its_rounds_not_only_for_its_prefix() -> None:
    """What asyncssh would parse is read, so the message names the real cost."""
    with pytest.raises(ValueError, match="2147483648 bcrypt rounds"):
        sshkeys.check_kdf_cost(HIDDEN.replace("-----\n", "-----\nComment: x\n", 1))


@pytest.mark.parametrize("text", [
    PLAIN + PLAIN,                                         # two blocks: asyncssh would parse the first only
    PLAIN + "trailing text\n",
    "  " + PLAIN,                                          # asyncssh does not see an indented BEGIN line
    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" + PLAIN,
    PLAIN.replace("-----END", "-----BEGIN OPENSSH PRIVATE KEY-----\n-----END", 1),
])
def test_item1_exactly_one_key_block_is_accepted(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = NoImport(monkeypatch)
    with pytest.raises(ValueError, match=r"(one private key block|cannot be parsed)"):
        AsyncsshKeys(parsers=spy).inspect_private_key(text, None)  # type: ignore[arg-type]
    assert spy.calls == []


def _pkcs8(cipher: str, hash_name: str, version: int) -> str:
    return ED25519.export_private_key("pkcs8-pem", passphrase=PASSPHRASE, cipher_name=cipher,
                                      hash_name=hash_name, pbe_version=version).decode()


def with_count(text: str, count: int, key_length: int | None = None) -> str:
    """The encrypted PKCS#8 key ``text`` with its iteration count (and PBKDF2 key length) replaced."""
    lines = text.strip().splitlines()
    decoded: Any = der_decode(binascii.a2b_base64("".join(lines[1:-1])))
    (alg, params), data = decoded
    if isinstance(params[0], tuple):  # PBES2: ((PBKDF2, (salt, count, [prf])), cipher)
        kdf_oid, (salt, _count, *rest) = params[0]
        extra = ([key_length] if key_length is not None else []) + list(rest)
        params = ((kdf_oid, (salt, count, *extra)), params[1])
    else:  # PBES1 / PKCS#12: (salt, count)
        params = (params[0], count)
    return _pem(b"ENCRYPTED PRIVATE KEY", der_encode(((alg, params), data)))


PBES2 = _pkcs8("aes256-cbc", "sha256", 2)
PBES1 = _pkcs8("des-cbc", "md5", 1)
PKCS12 = _pkcs8("des3-cbc", "sha1", 1)


@pytest.mark.parametrize(("text", "message"), [
    (with_count(PBES2, 2**31), "2147483648 PBKDF2 iterations"),
    (with_count(PBES2, sshkeys.MAX_PBKDF2_ITERATIONS + 1), "1000001 PBKDF2 iterations"),
    (with_count(PBES2, 2048, key_length=2**30), "1073741824-byte key"),
    (with_count(PBES1, 2**31), "2147483648 PBES1 iterations"),
    (with_count(PKCS12, 2**31), "2147483648 PKCS#12 iterations"),
    (with_count(PKCS12, sshkeys.MAX_LEGACY_ITERATIONS + 1), "100001 PKCS#12 iterations"),
])
def test_item1_pkcs8_with_a_huge_iteration_count_is_refused_before_any_parsing(
        text: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = NoImport(monkeypatch)
    with pytest.raises(ValueError, match=message.replace("#", r"\#")):
        AsyncsshKeys(parsers=spy).inspect_private_key(text, PASSPHRASE)  # type: ignore[arg-type]
    assert spy.calls == []


@pytest.mark.parametrize("text", [
    with_count(PBES2, sshkeys.MAX_PBKDF2_ITERATIONS), with_count(PKCS12, sshkeys.MAX_LEGACY_ITERATIONS),
    with_rounds(ENCRYPTED, sshkeys.MAX_BCRYPT_ROUNDS), PBES2, PBES1, PKCS12, ENCRYPTED, PLAIN,
])
def test_item1_costs_up_to_the_caps_pass_the_check(text: str) -> None:
    sshkeys.check_kdf_cost(text)


def test_item1_a_parse_past_the_deadline_is_killed_and_refused(pool: KeyParserPool) -> None:
    assert pool.inspect(PLAIN, None)["ok"] is True  # the child is up (its start is not the parse's time)
    pool.deadline = 0.2
    with pytest.raises(ValueError, match=r"took longer than 0\.2 s"):
        pool.inspect(HIDDEN, PASSPHRASE)  # the pool itself does not check caps: days of bcrypt
    assert (pool.started, pool.killed) == (1, 1)
    pool.deadline = 60
    assert pool.inspect(PLAIN, None)["ok"] is True  # a new child takes the killed one's place
    assert (pool.started, pool.killed) == (2, 1)


def test_item1_a_caller_waits_for_a_free_parser_at_most_the_queue_timeout(pool: KeyParserPool) -> None:
    assert pool._slots.acquire(timeout=1)  # the only child is busy with another key
    pool.queue_timeout = 0.01
    try:
        with pytest.raises(KeyParserBusy):
            pool.inspect(PLAIN, None)
    finally:
        pool._slots.release()
    assert pool.parses == 0


def test_item1_keys_are_parsed_in_a_child_process(pool: KeyParserPool, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = NoImport(monkeypatch)  # asyncssh in this process is never asked
    keys = AsyncsshKeys(parsers=pool)
    assert keys.inspect_private_key(PLAIN, None) == EXPECTED
    assert keys.inspect_private_key(ENCRYPTED, PASSPHRASE) == EXPECTED
    with pytest.raises(ValueError, match="passphrase required"):
        keys.inspect_private_key(ENCRYPTED, None)
    with pytest.raises(ValueError, match="passphrase does not decrypt"):
        keys.inspect_private_key(ENCRYPTED, "wrong")
    with pytest.raises(ValueError, match="passphrase does not decrypt"):
        keys.inspect_private_key(PBES2, "wrong")
    assert keys.inspect_private_key(PBES2, PASSPHRASE) == EXPECTED
    assert keys.inspect_private_key(PKCS12, PASSPHRASE) == EXPECTED
    with pytest.raises(ValueError, match="cannot be parsed"):
        keys.inspect_private_key(_pem(b"OPENSSH PRIVATE KEY", b"openssh-key-v1\x00garbage"), None)
    assert spy.calls == [] and pool.started == 1 and pool.parses == 8


@settings(max_examples=60)
@given(st.text(alphabet=" \t\r\nab:-", max_size=12), st.text(alphabet=" \t\r\nab:-", max_size=12))
def test_item1_an_accepted_text_is_the_block_asyncssh_parses(before: str, after: str) -> None:
    """Whatever surrounds the block, either the text is refused or asyncssh reads this very key."""
    text = before + PLAIN + after
    try:
        sshkeys.key_block(text)
    except ValueError:
        return
    assert asyncssh.import_private_key(text).get_fingerprint("sha256") == EXPECTED.fingerprint
