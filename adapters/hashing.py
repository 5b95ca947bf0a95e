"""API keys: 256 random bits from ``secrets``, stored only as an HMAC-SHA256 keyed with a pepper
derived from the server's secret key.

A slow password hash (bcrypt, PBKDF2) protects low-entropy passwords; a 256-bit random key cannot
be guessed, so a fast hash is as safe and keeps every authenticated request cheap. Keys are found
by their public prefix (an indexed column) and compared in constant time.

Why keyed: with a plain SHA-256, whoever can *write* the database (a restored backup, an SQL
injection elsewhere, a shared PostgreSQL role) could store the digest of a key of their own choosing
and log in as anyone. The pepper lives with the secret key, never in the database, so a digest
written without it matches nothing.

Digest schemes (the text before the first ``:``):

- ``hmac-sha256:<hex>`` — HMAC-SHA256(pepper, key): every key issued by this code.
- ``hmac-sha256-of-sha256:<hex>`` — HMAC-SHA256(pepper, "sha256:<hex SHA-256(key)>"): a key issued
  before digests were keyed, re-keyed by migration 4 (``adapters/sql/migrations.py``), which knows
  the old digest but never the key. Just as keyed; the key keeps working unchanged.
- ``sha256:<hex>`` — the old unkeyed form: never matches (anyone could have written it). Migration 4
  leaves none behind.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.model import API_KEY_PREFIX_HEX, API_KEY_SCHEME, IssuedApiKey

KEYED = "hmac-sha256:"
REKEYED_LEGACY = "hmac-sha256-of-sha256:"
LEGACY = "sha256:"
PEPPER_BYTES = 32
# HKDF's info: a key derived for this purpose only (domain separation from the sealing key, which
# is the server key itself), versioned so another pepper can be derived one day.
_PEPPER_INFO = b"manage-playrservers/api-key-digest/v1"


def api_key_pepper(server_key: bytes) -> bytes:
    """The pepper API-key digests are keyed with: HKDF-SHA256 of the server's secret key."""
    return HKDF(algorithm=hashes.SHA256(), length=PEPPER_BYTES, salt=None, info=_PEPPER_INFO).derive(server_key)


def legacy_digest(plaintext: str) -> str:
    """The unkeyed digest keys were stored as before migration 4 (to re-key and check them)."""
    return LEGACY + hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


class HmacKeyHasher:
    """Implements ``core.ports.KeyHasher`` with HMAC-SHA256 keyed by ``pepper``."""

    def __init__(self, pepper: bytes) -> None:
        if len(pepper) < 16:
            raise ValueError("the API-key pepper must be at least 16 bytes")
        self._pepper = pepper

    def _mac(self, text: str) -> str:
        return hmac.new(self._pepper, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def digest(self, plaintext: str) -> str:
        return KEYED + self._mac(plaintext)

    def issue(self) -> IssuedApiKey:
        prefix = f"{API_KEY_SCHEME}_{secrets.token_hex(API_KEY_PREFIX_HEX // 2)}"
        plaintext = f"{prefix}_{secrets.token_urlsafe(32)}"
        return IssuedApiKey(plaintext=plaintext, prefix=prefix, digest=self.digest(plaintext))

    def matches(self, plaintext: str, stored_digest: str) -> bool:
        scheme, separator, _ = stored_digest.partition(":")
        if not separator:
            return False
        if scheme + ":" == KEYED:
            expected = self.digest(plaintext)
        elif scheme + ":" == REKEYED_LEGACY:
            expected = REKEYED_LEGACY + self._mac(legacy_digest(plaintext))
        else:  # ``sha256:`` (unkeyed: forgeable without the secret) or unknown
            return False
        return hmac.compare_digest(expected.encode(), stored_digest.encode("utf-8", "surrogatepass"))

    def rekey(self, stored_digest: str) -> str:
        """The keyed form of a stored digest: an unkeyed ``sha256:`` one becomes
        ``hmac-sha256-of-sha256:``; a keyed one is returned unchanged (migration 4 calls this)."""
        if stored_digest.startswith(LEGACY):
            return REKEYED_LEGACY + self._mac(stored_digest)
        return stored_digest


# --- consoles (issue 17)
_TICKET_PEPPER_INFO = b"manage-playrservers/console-ticket-digest/v1"


def console_ticket_pepper(server_key: bytes) -> bytes:
    """The pepper console-ticket digests are keyed with: HKDF-SHA256 of the server's secret key
    (another ``info`` than API keys', so neither digest can stand for the other)."""
    return HKDF(algorithm=hashes.SHA256(), length=PEPPER_BYTES, salt=None, info=_TICKET_PEPPER_INFO).derive(server_key)


class HmacTicketDigests:
    """Implements ``core.ports.TicketDigests``: 256-bit tickets from ``secrets``, stored only as
    HMAC-SHA256 keyed with a pepper of the server key. Tickets are random and live 30 s, so a fast
    hash is enough; keyed so that whoever can write the database cannot mint a ticket."""

    def __init__(self, pepper: bytes) -> None:
        if len(pepper) < 16:
            raise ValueError("the console-ticket pepper must be at least 16 bytes")
        self._pepper = pepper

    def new_ticket(self) -> tuple[str, str]:
        ticket = secrets.token_urlsafe(32)
        return ticket, self.digest(ticket)

    def digest(self, ticket: str) -> str:
        return KEYED + hmac.new(self._pepper, ticket.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
