"""Domain values: users, API keys, agents (remote hypervisors), host keys, audit events.

Plain attrs classes with no framework behind them. Identifiers are assigned by storage, so a value
that has not been stored yet carries ``id=0``.
"""

from __future__ import annotations

import enum
from datetime import datetime

import attrs

DEFAULT_LIBVIRT_URI = "qemu:///system"
DEFAULT_SSH_PORT = 22

# API keys look like ``mgmt_<12 hex prefix>_<43 chars of urlsafe base64 = 256 bits>``.  The prefix is
# public (it is stored in clear and indexed, so a key is found in O(1)); the whole key is hashed.
API_KEY_SCHEME = "mgmt"
API_KEY_PREFIX_HEX = 12
_URLSAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class SignupPolicy(enum.Enum):
    """Who may create a user with an unauthenticated ``POST /users``."""

    OPEN = "open"  # anyone who reaches the portal
    FIRST = "first"  # only the very first user; later ones come from the host's command line
    CLOSED = "closed"  # nobody; users come from the host's command line


@attrs.frozen
class User:
    id: int
    name: str
    email: str | None
    api_key_prefix: str
    created_at: datetime


@attrs.frozen
class ApiKey:
    """The stored half of a user's API key: the public prefix and a hash of the whole key."""

    user_id: int
    prefix: str
    digest: str
    created_at: datetime


@attrs.frozen
class IssuedApiKey:
    """A freshly generated key: the plaintext is shown to its owner once and never stored."""

    plaintext: str = attrs.field(repr=False)
    prefix: str
    digest: str = attrs.field(repr=False)


@attrs.frozen
class HostKey:
    """An SSH host public key in OpenSSH one-line form, with its ``SHA256:`` fingerprint."""

    openssh: str
    fingerprint: str


@attrs.frozen
class ClientKey:
    """What the portal learns about an uploaded SSH private key without keeping it in clear."""

    public_key: str
    fingerprint: str


@attrs.frozen
class Agent:
    """A remote hypervisor the portal reaches over SSH, owned by exactly one user.

    The private key and its passphrase are held sealed (encrypted by the secret box); the core
    never sees them in clear except when the owner reads the credentials or a connection is made.
    """

    id: int
    owner_id: int
    name: str
    hostname: str
    port: int
    username: str
    allow_unknown_hosts: bool
    host_key: HostKey | None
    libvirt_uri: str
    client_key: ClientKey
    sealed_private_key: str = attrs.field(repr=False)
    sealed_passphrase: str | None = attrs.field(repr=False)
    created_at: datetime
    updated_at: datetime
    # Bumped whenever anything that affects a connection changes (address, user, key, host key),
    # so pooled SSH connections made with older settings can be recognised and dropped.
    revision: int = 1


@attrs.frozen
class AgentCredentials:
    """An agent's SSH key material in clear, for its owner only."""

    agent: Agent
    private_key: str = attrs.field(repr=False)
    private_key_passphrase: str | None = attrs.field(repr=False)


@attrs.frozen
class AuditEvent:
    """One recorded action: who did what to which agent/VM, how it ended, and from where."""

    id: int
    user_id: int
    action: str
    outcome: str
    agent_id: int | None
    vm: str | None
    detail: str | None
    request_id: str
    client_address: str
    created_at: datetime


@attrs.frozen
class Caller:
    """The authenticated user behind a request, plus where the request came from (for the audit)."""

    user: User
    request_id: str
    client_address: str


@attrs.frozen
class Origin:
    """Where an unauthenticated request came from (for the audit of sign-ups)."""

    request_id: str
    client_address: str


def api_key_prefix(text: str) -> str | None:
    """The public prefix of a well-formed API key, or None when ``text`` cannot be one of ours."""
    parts = text.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_SCHEME:
        return None
    prefix = parts[1]
    if len(prefix) != API_KEY_PREFIX_HEX or any(c not in "0123456789abcdef" for c in prefix):
        return None
    secret = parts[2]
    if not 40 <= len(secret) <= 64 or any(c not in _URLSAFE for c in secret):
        return None
    return f"{API_KEY_SCHEME}_{prefix}"
