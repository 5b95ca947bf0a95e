"""Ports: what the core needs from the outside world, as ``typing.Protocol`` classes.

Adapters implement them (``adapters/``); the composition root (``entrypoints/bootstrap.py``) picks
which. Every storage query that touches an agent or an audit event is scoped by its owner, so
isolation between users holds by construction, not by remembering to filter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime
from typing import Protocol

import attrs

from core.model import (
    Agent,
    AgentCredentials,
    ApiKey,
    AuditEvent,
    ClientKey,
    HostKey,
    IssuedApiKey,
    User,
    WebSession,
)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class KeyHasher(Protocol):
    """Issues API keys and checks them against stored digests."""

    def issue(self) -> IssuedApiKey:
        """A new random key (at least 256 bits), its public prefix and its digest."""
        ...

    def matches(self, plaintext: str, digest: str) -> bool:
        """Whether ``plaintext`` hashes to ``digest``, compared in constant time."""
        ...


class SecretBox(Protocol):
    """Authenticated encryption of secrets at rest with the server's key."""

    def seal(self, plaintext: str, *, context: str) -> str:
        """Encrypt ``plaintext``; ``context`` is bound to the ciphertext and needed to open it."""
        ...

    def unseal(self, sealed: str, *, context: str) -> str:
        """Decrypt; raises ``core.errors.SecretUnreadable`` if tampered with, or key/context differ."""
        ...


class SshKeys(Protocol):
    """Parses SSH key material supplied by users (never a file path)."""

    def inspect_private_key(self, text: str, passphrase: str | None) -> ClientKey:
        """Parse an OpenSSH or PEM private key; raise ``ValueError`` with a reason if unusable."""
        ...

    def parse_host_key(self, text: str) -> HostKey:
        """Parse one OpenSSH public key line; raise ``ValueError`` with a reason if it is not one."""
        ...

    def generate_private_key(self) -> str:
        """A new ed25519 private key as unencrypted OpenSSH text (the portal seals it at once)."""
        ...


@attrs.frozen
class CommandResult:
    """What a remote command did: the argv that ran, its exit status and output."""

    command: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str
    # The host key the connection was verified with (pinning on first use goes through ``pin``
    # on ``RemoteShell.run``; this only reports it).
    host_key: HostKey | None = None


# Called with the host key a new connection saw, for an agent with none pinned that trusts on first
# use; returns the key pinned for the agent (this one, or one a concurrent connection pinned first).
PinHostKey = Callable[[HostKey], Awaitable[HostKey]]


class RemoteStream(Protocol):
    """A command on an agent that runs for as long as both ends keep it open (a console, an event
    watcher), with its stdin and stdout as byte streams. Errors are ``core.errors.RemoteError``."""

    async def read(self, limit: int = 65536) -> bytes:
        """Up to ``limit`` bytes of the command's stdout as they arrive; ``b""`` once it ended."""
        ...

    async def read_stderr(self, limit: int = 65536) -> bytes:
        """Up to ``limit`` bytes of the command's stderr; ``b""`` once it ended."""
        ...

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin (waits while the channel's window is full)."""
        ...

    def write_eof(self) -> None:
        """Close the command's stdin."""
        ...

    def close(self) -> None:
        """Close the channel: sshd hangs up on the command (SIGHUP), which ends it."""
        ...

    async def wait_closed(self) -> int | None:
        """Until the channel is closed; the command's exit status (None: it gave none)."""
        ...


class RemoteShell(Protocol):
    """Runs argument vectors on an agent over SSH."""

    async def run(self, target: AgentCredentials, argv: Sequence[str], *,
                  pin: PinHostKey | None = None, stdin: bytes | None = None) -> CommandResult:
        """Run ``argv`` on the agent; raise ``core.errors.RemoteError`` subclasses on failure.
        A connection made without a pinned key calls ``pin`` before it runs anything and is
        refused (``host_key_mismatch``) unless the pinned key is the one it saw. Also raises
        ``AgentAddressRefused`` (the agent's address is outside the allowed networks: nothing is
        sent) and ``TooManyOperations`` (the agent's owner already runs the most commands allowed
        at once). ``stdin``, when given, is sent to the command's standard input, then end of
        file (e.g. ``virsh define /dev/stdin``, ``virsh vol-upload``): no file is written on the
        portal host and no second transfer channel is opened."""
        ...

    def stream(self, target: AgentCredentials, argv: Sequence[str], *, pin: PinHostKey | None = None,
               pty: bool = False) -> AbstractAsyncContextManager[RemoteStream]:
        """Start ``argv`` on a channel of the agent's pooled connection and hand over its streams
        until the ``async with`` block ends (which closes the channel). ``pty`` asks sshd for a
        terminal (``virsh console`` needs one). Not bounded by the command time-out nor the output
        cap (the caller reads as it goes) nor counted as an operation of the owner: callers bound
        their own streams (console limits, one watcher per agent). Opening raises what ``run``
        raises."""
        ...

    def discard(self, agent_id: int) -> None:
        """Drop every pooled connection to ``agent_id`` (deleted, or its settings changed).
        Safe to call from any thread; connections still running a command close when it ends."""
        ...

    async def close(self) -> None:
        """Close every connection (on shutdown)."""
        ...


class AgentAddresses(Protocol):
    """Where an agent may point (``MANAGEMENT_AGENT_NETWORKS``, ``core/networks.py``): checked
    when an agent is registered or its address changes, so a refused address is a 422 at once
    instead of at the first connection (which checks again: names may resolve elsewhere later)."""

    def check(self, hostname: str, port: int) -> None:
        """Raise ``core.errors.AgentAddressRefused`` if ``hostname`` is, or resolves to, an address
        outside the allowed networks. A name that does not resolve (yet) passes."""
        ...


class Transaction(Protocol):
    """One database transaction: everything inside commits together or not at all."""

    # users and keys
    def add_user(self, name: str, email: str | None, key: IssuedApiKey, at: datetime) -> User: ...
    def count_users(self) -> int: ...
    def get_user(self, user_id: int) -> User | None: ...
    def find_user_by_email(self, email: str) -> User | None: ...
    def list_users(self) -> list[User]: ...
    def find_api_key(self, prefix: str) -> ApiKey | None: ...
    def replace_api_key(self, user_id: int, key: IssuedApiKey, at: datetime) -> None: ...

    # agents, always scoped by owner
    def add_agent(self, agent: Agent) -> Agent: ...
    def list_agents(self, owner_id: int) -> list[Agent]: ...
    def count_agents(self, owner_id: int) -> int: ...
    def get_agent(self, owner_id: int, agent_id: int) -> Agent | None: ...
    def newest_agent(self) -> Agent | None:
        """The most recently registered agent of any owner (start-up checks the secret key on it)."""
        ...
    def agent_name_taken(self, owner_id: int, name: str, *, except_id: int = 0) -> bool: ...
    def update_agent(self, agent: Agent) -> None: ...
    def delete_agent(self, owner_id: int, agent_id: int) -> bool: ...

    # audit, scoped by owner
    def add_audit_event(self, event: AuditEvent) -> AuditEvent: ...
    def list_audit_events(self, user_id: int, limit: int, before: int | None) -> list[AuditEvent]: ...

    # --- web console sessions (issue 19), found by the digest of their token
    def add_web_session(self, user_id: int, digest: str, at: datetime, expires_at: datetime,
                        key_prefix: str) -> WebSession: ...
    def find_web_session(self, digest: str) -> WebSession | None: ...
    def touch_web_session(self, session_id: int, at: datetime) -> None: ...
    def delete_web_session(self, digest: str) -> bool: ...
    def delete_web_sessions_of(self, user_id: int) -> int: ...
    def delete_web_sessions_ended(self, expired_before: datetime, idle_since: datetime) -> int:
        """Forget sessions past their end or idle since before ``idle_since``; how many."""
        ...


class Storage(Protocol):
    """Opens transactions. ``write=True`` takes the write lock up front, so read-check-write
    sequences (the first-user sign-up, unique names) cannot interleave with another writer."""

    def transaction(self, *, write: bool = False) -> AbstractContextManager[Transaction]: ...
