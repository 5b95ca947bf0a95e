"""API keys: 256 random bits from ``secrets``, stored only as a SHA-256 digest.

A slow password hash (bcrypt, PBKDF2) protects low-entropy passwords; a 256-bit random key cannot
be guessed, so a fast hash is as safe and keeps every authenticated request cheap. Keys are found
by their public prefix (an indexed column) and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from core.model import API_KEY_PREFIX_HEX, API_KEY_SCHEME, IssuedApiKey


def digest(plaintext: str) -> str:
    return "sha256:" + hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


class Sha256KeyHasher:
    """Implements ``core.ports.KeyHasher``."""

    def issue(self) -> IssuedApiKey:
        prefix = f"{API_KEY_SCHEME}_{secrets.token_hex(API_KEY_PREFIX_HEX // 2)}"
        plaintext = f"{prefix}_{secrets.token_urlsafe(32)}"
        return IssuedApiKey(plaintext=plaintext, prefix=prefix, digest=digest(plaintext))

    def matches(self, plaintext: str, stored_digest: str) -> bool:
        return hmac.compare_digest(digest(plaintext).encode(), stored_digest.encode())
