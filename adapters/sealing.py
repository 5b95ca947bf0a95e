"""Secrets sealed at rest with AES-256-GCM (``cryptography``).

The server key comes from ``MANAGEMENT_SECRET_KEY`` (32 bytes, urlsafe base64) or from a key file
created on first start beside the database with mode 0600. The file is created atomically: the key
is written to a private temporary file which is then hard-linked into place, so of several workers
starting at once exactly one wins and all read the same key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.errors import SecretUnreadable

_VERSION = "v1"
KEY_BYTES = 32


class SecretKeyError(ValueError):
    """The configured server key is unusable; the message says where it came from."""


def decode_key(text: str, *, source: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii") + b"==")
    except (binascii.Error, UnicodeEncodeError, ValueError) as error:
        raise SecretKeyError(f"{source} is not urlsafe base64") from error
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"{source} must encode exactly {KEY_BYTES} bytes (got {len(key)})")
    return key


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode("ascii").rstrip("=")


def generate_key() -> str:
    return encode_key(secrets.token_bytes(KEY_BYTES))


def load_or_create_key_file(path: Path) -> bytes:
    """Read the key file, creating it (0600, atomically, first writer wins) if it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(generate_key() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process got there first: use its key
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SecretKeyError(f"secret key file {path} is readable by others (mode {mode:o}); chmod 600 it")
    return decode_key(path.read_text(encoding="ascii"), source=f"secret key file {path}")


class AesGcmSecretBox:
    """Implements ``core.ports.SecretBox``: ``v1:<urlsafe base64 of nonce || ciphertext+tag>``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretKeyError(f"the secret key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, *, context: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return f"{_VERSION}:{base64.urlsafe_b64encode(nonce + sealed).decode('ascii')}"

    def unseal(self, sealed: str, *, context: str) -> str:
        version, _, body = sealed.partition(":")
        try:
            if version != _VERSION:
                raise ValueError(version)
            raw = base64.b64decode(body.encode("ascii"), altchars=b"-_", validate=True)
            if base64.urlsafe_b64encode(raw).decode("ascii") != body:
                raise ValueError("not the canonical encoding")  # any edit of the text is tampering
            plaintext = self._aead.decrypt(raw[:12], raw[12:], context.encode("utf-8"))
            return plaintext.decode("utf-8")
        except (InvalidTag, ValueError, binascii.Error, UnicodeError) as error:
            raise SecretUnreadable(
                "a stored secret cannot be unsealed with this server's secret key "
                "(was MANAGEMENT_SECRET_KEY or the key file changed?)"
            ) from error
