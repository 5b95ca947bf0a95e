"""Ports: what the core needs from the outside world, as ``typing.Protocol`` classes.

Adapters implement them (``adapters/``); the composition root (``entrypoints/bootstrap.py``) picks
which. Every storage query that touches an agent or an audit event is scoped by its owner, so
isolation between users holds by construction, not by remembering to filter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime
from typing import Protocol

import attrs

from core.live import Delivery, DeliveryAttempt, Event, EventFilter, Mirror, MirroredVm, WatchStatus, Webhook
from core.model import (
    Agent,
    AgentCredentials,
    ApiKey,
    AuditEvent,
    ClientKey,
    ConsoleTicket,
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
                  pin: PinHostKey | None = None, stdin: bytes | None = None,
                  counted: bool = True, fresh: bool = False) -> CommandResult:
        """Run ``argv`` on the agent; raise ``core.errors.RemoteError`` subclasses on failure.
        A connection made without a pinned key calls ``pin`` before it runs anything and is
        refused (``host_key_mismatch``) unless the pinned key is the one it saw. Also raises
        ``AgentAddressRefused`` (the agent's address is outside the allowed networks: nothing is
        sent) and ``TooManyOperations`` (the agent's owner already runs the most commands allowed
        at once). ``stdin``, when given, is sent to the command's standard input, then end of
        file (e.g. ``virsh define /dev/stdin``, ``virsh vol-upload``): no file is written on the
        portal host and no second transfer channel is opened. ``counted=False``: not counted as an
        operation of the owner (the fleet view bounds its own parallelism). A host that could not
        be connected to may be remembered for a short while and its commands refused at once with
        the same error; ``fresh=True`` (an agent check) tries to connect again regardless."""
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

    def connect(self, target: AgentCredentials, host: str, port: int, *,
                pin: PinHostKey | None = None) -> AbstractAsyncContextManager[RemoteStream]:
        """A TCP connection from the agent to ``host:port`` (an SSH ``direct-tcpip`` channel of the
        pooled connection: the VM's VNC server on the host's loopback), as a stream until the
        ``async with`` block ends. ``TunnelRefused`` when the host's sshd does not forward (a key
        under ``restrict``); otherwise raises what ``stream`` raises. ``read_stderr`` answers
        ``b""``, ``wait_closed`` None."""
        ...

    def discard(self, agent_id: int) -> None:
        """Drop every pooled connection to ``agent_id`` (deleted, or its settings changed).
        Safe to call from any thread; connections still running a command close when it ends."""
        ...

    async def close(self) -> None:
        """Close every connection (on shutdown)."""
        ...


class TicketDigests(Protocol):
    """Console tickets (issue 17): random secrets the database only ever holds a keyed digest of."""

    def new_ticket(self) -> tuple[str, str]:
        """A new ticket (at least 128 random bits, URL-safe text) and its digest."""
        ...

    def digest(self, ticket: str) -> str:
        """The digest stored for ``ticket`` (deterministic: redeeming looks it up by digest)."""
        ...


@attrs.frozen
class WebhookResponse:
    """How one POST to a webhook ended: the receiver's status code and the start of its answer, or
    the reason there was none (``error``: time-out, connection refused, refused address…)."""

    status_code: int | None
    response: str | None
    error: str | None
    seconds: float


class WebhookSender(Protocol):
    """POSTs deliveries to webhook URLs within ``MANAGEMENT_WEBHOOK_ALLOW`` (issue 18)."""

    def check(self, url: str) -> None:
        """Raise ``core.errors.WebhookTargetRefused`` if the URL's host is, or resolves to, an address
        outside the allowed networks. A name that does not resolve (yet) passes: every delivery checks
        again."""
        ...

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> WebhookResponse:
        """POST ``body`` once: resolve the host, refuse it if any address is outside the allowed
        networks (an ``error`` naming ``webhook_target_refused``, nothing sent), connect to a checked
        address only, never follow a redirect, give up after the time-out, read a bounded part of the
        answer. Never raises for what the network or the receiver did: that is the answer's ``error``."""
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
    def replace_api_key(self, user_id: int, key: IssuedApiKey, at: datetime, *, key_id: int | None = None) -> None:
        """Give a key a new secret, keeping its name and powers: the key ``key_id`` of the user, or
        (None) the user's full key. The old secret stops working at once."""
        ...
    def add_api_key(self, key: ApiKey) -> ApiKey:
        """Store a (non-full) key; answers it with its id."""
        ...
    def list_api_keys(self, user_id: int) -> list[ApiKey]: ...
    def count_api_keys(self, user_id: int) -> int: ...
    def get_api_key(self, user_id: int, key_id: int) -> ApiKey | None: ...
    def delete_api_key(self, user_id: int, key_id: int) -> bool: ...
    def touch_api_key(self, key_id: int, at: datetime) -> None:
        """Set the key's ``last_used_at`` (never earlier than it is)."""
        ...

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
    def list_audit_events(self, user_id: int, limit: int, before: int | None, *,
                          agent_ids: frozenset[int] | None = None) -> list[AuditEvent]:
        """Newest first; with ``agent_ids``, only the events about those agents."""
        ...

    # consoles (issue 17)
    def add_console_ticket(self, ticket: ConsoleTicket) -> ConsoleTicket:
        """Store a new ticket (and forget tickets and consoles that ended long ago)."""
        ...

    def redeem_console_ticket(self, digest: str, at: datetime) -> ConsoleTicket | None:
        """Mark the ticket with this digest opened at ``at`` if it is unused and unexpired, in one
        conditional update (two redeemers cannot both win); the ticket, or None."""
        ...

    def count_open_consoles(self, user_id: int, opened_after: datetime) -> int:
        """The user's consoles opened after ``opened_after`` and not closed yet."""
        ...

    def close_console(self, ticket_id: int, at: datetime) -> None: ...

    # events, scoped by owner (issue 18): ids only grow, and become visible in id order (inserts
    # happen in write transactions, which take the database's write lock first)
    def add_event(self, event: Event) -> Event: ...
    def list_events(self, user_id: int, wanted: EventFilter, limit: int) -> list[Event]: ...
    def last_event_id(self, user_id: int) -> int: ...
    def prune_events(self, user_id: int, keep: int) -> None:
        """Delete the user's events older than their newest ``keep``."""
        ...

    # watchers and the live mirror (issue 18); not scoped by owner: the watchers serve every owner
    def watched_agents(self, now: datetime) -> list[Agent]:
        """The agents in use at ``now`` (``want_watch``'d until later): those that get a watcher."""
        ...
    def want_watch(self, agent_ids: list[int], until: datetime) -> None:
        """The agents are in use until ``until`` (never shortens a later time)."""
        ...
    def claim_watches(self, holder: str, agent_ids: list[int], now: datetime, until: datetime,
                      alive: list[int]) -> list[int]:
        """Take or renew the lease of each of ``agent_ids`` whose lease is free, expired or already
        ``holder``'s, until ``until``; the ids now held. Leases of agents ``holder`` holds and that
        are in ``alive`` get ``alive_at = now`` (their mirror is current as of now). A constant
        number of statements, whatever the number of agents (issue 22)."""
        ...
    def release_watches(self, holder: str, agent_ids: list[int]) -> None: ...
    def set_watch_connected(self, holder: str, agent_id: int, connected: bool, now: datetime) -> bool:
        """Mark the stream of ``holder``'s watcher up or down; False if the lease is not ``holder``'s."""
        ...
    def agent_names(self, owner_id: int) -> list[tuple[int, str]]:
        """(id, name) of each of the owner's agents, oldest first (``list_agents`` without the rest)."""
        ...
    def watch_status(self, agent_id: int) -> WatchStatus | None: ...
    def mirrored_vms(self, agent_id: int) -> list[MirroredVm]: ...
    def mirrors(self, owner_id: int) -> dict[int, Mirror]:
        """The lease and the mirrored VMs of each of the owner's agents that has a lease, in two
        queries whatever their number (issue 22: a fleet view reads hundreds of mirrors at once)."""
        ...
    def replace_mirror(self, agent_id: int, vms: list[MirroredVm], now: datetime) -> None: ...
    def mirror_vm(self, agent_id: int, vm: MirroredVm | None, name: str, now: datetime) -> None:
        """Set one VM of the mirror (``vm`` None: forget ``name``)."""
        ...

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

    # --- webhooks (issue 18), scoped by owner; the outbox is claimed by any worker (not scoped)
    def add_webhook(self, hook: Webhook) -> Webhook: ...
    def list_webhooks(self, user_id: int) -> list[Webhook]: ...
    def get_webhook(self, user_id: int, webhook_id: int) -> Webhook | None: ...
    def update_webhook(self, hook: Webhook) -> None: ...
    def delete_webhook(self, user_id: int, webhook_id: int) -> bool:
        """Delete the webhook with its outbox rows and their attempts."""
        ...
    def add_delivery(self, delivery: Delivery) -> Delivery: ...
    def next_delivery_at(self) -> datetime | None:
        """When the earliest pending delivery of an active webhook is due (lease or not); None: none pending."""
        ...
    def claim_deliveries(self, holder: str, now: datetime, until: datetime,
                         limit: int) -> list[tuple[Delivery, Webhook]]:
        """Lease up to ``limit`` pending deliveries of active webhooks that are due at ``now`` and not
        leased by a live holder, to ``holder`` until ``until`` (oldest due first), with their webhooks.
        Two claimants never get the same row: the update is conditional (and on PostgreSQL the rows
        are selected ``FOR UPDATE SKIP LOCKED``)."""
        ...
    def record_attempt(self, holder: str, attempt: DeliveryAttempt, status: str,
                       next_at: datetime | None) -> bool:
        """Store ``attempt`` and move its delivery to ``status`` (due again at ``next_at``), releasing
        the lease; only if ``holder`` still holds it (False: another worker took it over)."""
        ...
    def postpone_deliveries(self, webhook_id: int, until: datetime, now: datetime) -> None:
        """The webhook's pending deliveries that nobody holds and that are due before ``until`` become
        due at ``until`` (its receiver just failed an attempt)."""
        ...
    def release_deliveries(self, holder: str) -> None:
        """Give up ``holder``'s leases (a worker stopping): the rows are due again at once."""
        ...
    def list_deliveries(self, user_id: int, webhook_id: int, limit: int,
                        before: int | None) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
        """The webhook's deliveries, newest first (ids below ``before``), each with its attempts."""
        ...
    def prune_deliveries(self, finished_before: datetime) -> int:
        """Forget deliveries that finished before ``finished_before`` (with their attempts)."""
        ...


class Storage(Protocol):
    """Opens transactions. ``write=True`` takes the write lock up front, so read-check-write
    sequences (the first-user sign-up, unique names) cannot interleave with another writer."""

    def transaction(self, *, write: bool = False) -> AbstractContextManager[Transaction]: ...


# ---------------------------------------------------------------------- observability (issue 21)


class Observer(Protocol):
    """Told what the portal does, for its own metrics (``GET /metrics``). Implemented by the
    Prometheus adapter (``adapters/prometheus.py``); ``NullObserver`` does nothing. Every method is
    cheap, never blocks and never raises. Label values are bounded by construction: route templates,
    methods, error codes, virsh subcommands, never a raw path, a user, an agent or a VM."""

    def request_served(self, route: str, method: str, status: int, seconds: float) -> None:
        """An HTTP request ended: its route template (``/agents/{agent_id}``, or ``unmatched``)."""
        ...

    def authentication_failed(self, reason: str) -> None:
        """A request was refused for its key; ``reason`` is the error code (``invalid_api_key``, …)."""
        ...

    def rate_limited(self) -> None:
        """A request was refused because its address failed to authenticate too often (429)."""
        ...

    def ssh_connect(self, outcome: str, seconds: float) -> None:
        """An SSH connection attempt ended: ``ok`` or the error code that ended it."""
        ...

    def ssh_pool(self, *, connections_open: int, connections_opening: int, channels_in_use: int) -> None:
        """This process's SSH pool now holds these many connections and channels."""
        ...

    def ssh_command(self, subcommand: str, outcome: str, seconds: float) -> None:
        """A remote command ended: ``ok``, ``failed`` (non-zero exit) or the error code."""
        ...

    def database_transaction(self, kind: str, outcome: str, seconds: float) -> None:
        """A ``read`` or ``write`` transaction ended: ``committed``, ``rolled_back``, or the code of
        the database error (``database_busy``, ``database_unavailable``)."""
        ...

    def fleet_host_sampled(self, outcome: str, seconds: float) -> None:
        """``GET /metrics/vms`` asked a host for its statistics: ``ok`` or the error code."""
        ...


class NullObserver:
    """An ``Observer`` that records nothing (the default wherever no metrics are kept)."""

    def request_served(self, route: str, method: str, status: int, seconds: float) -> None:
        return None

    def authentication_failed(self, reason: str) -> None:
        return None

    def rate_limited(self) -> None:
        return None

    def ssh_connect(self, outcome: str, seconds: float) -> None:
        return None

    def ssh_pool(self, *, connections_open: int, connections_opening: int, channels_in_use: int) -> None:
        return None

    def ssh_command(self, subcommand: str, outcome: str, seconds: float) -> None:
        return None

    def database_transaction(self, kind: str, outcome: str, seconds: float) -> None:
        return None

    def fleet_host_sampled(self, outcome: str, seconds: float) -> None:
        return None


# ---------------------------------------------------------------------- provisioning (issue 16)


class SeedImages(Protocol):
    """Packs cloud-init NoCloud seeds, and checks the YAML the guest's cloud-init will read."""

    def iso(self, files: Mapping[str, bytes], label: str) -> bytes:
        """An ISO 9660 image (Joliet and Rock Ridge names) holding ``files`` under volume ``label``."""
        ...

    def yaml_problem(self, text: str) -> str | None:
        """Why ``text`` is not valid YAML (with the line), or None when it parses."""
        ...
