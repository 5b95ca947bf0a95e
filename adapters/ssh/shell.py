"""The remote shell on asyncssh, with a connection pool per agent.

- Connections are opened lazily, reused across requests, kept alive with SSH keepalives and
  closed after ``idle_timeout`` seconds unused.
- One connection carries at most ``max_sessions`` (10, OpenSSH's default ``MaxSessions``)
  concurrent channels; past that another connection is opened. A request that finds a
  connection still being opened waits for it instead of opening its own, so a burst on a cold
  pool opens ceil(burst / 10) connections, not one per request.
- A connection belongs to one *revision* of its agent's settings. When the agent's address,
  user, key or host key change (the revision moves on), older connections are retired: closed as
  soon as their running commands finish. ``discard`` retires all of an agent's connections.
- Host keys: a pinned key is the only one accepted; with no pinned key a connection is refused
  unless the agent allows unknown hosts, in which case the key seen is reported back so the core
  pins it (trust on first use).
- The private key is unsealed by the core and imported here only in memory, once per revision:
  the parsed key outlives failed connections (importing an encrypted key runs its KDF, seconds of
  CPU), and is dropped when the revision moves on, the agent is discarded, or it sits unused for
  ``idle_timeout``.
- A pooled connection found dead when a command is about to start is replaced once, transparently:
  nothing had run yet, so retrying is safe for every command.
- Addresses (issue 14 item 4): the agent's name is resolved once per connection, every address it
  resolves to is checked against ``networks`` (``MANAGEMENT_AGENT_NETWORKS``), and the connection
  goes to a checked address, never to the name (no second lookup DNS could answer differently).
- Output (item 2): stdout and stderr are read as they come, at most ``max_output_bytes`` together;
  past that the channel is closed and the command is ``OutputTooLarge``.
- A host that accepts the connection but does not speak SSH is ``NotSsh`` (item 13).
- At most ``max_operations_per_user`` commands per user run (or wait for a connection) at once;
  more is ``TooManyOperations`` (429) at once, so one user cannot take every channel (item 5).
  Commands run with ``counted=False`` (the fleet view's, bounded by its own parallelism) are not
  counted.
- At most ``max_connecting`` (32) connections are being opened at once per worker; the others
  wait their turn before their connect time-out starts (a handshake is CPU-bound).
- A host that could not be connected to (time-out, refused, not SSH) is remembered with its error
  for ``failure_ttl`` seconds (issue 22): until then its commands fail at once with the same error,
  so a silent host costs one connect time-out, not one per request. ``fresh=True`` (an agent check)
  tries again; a successful connection, ``discard`` or new agent settings (revision) forget it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncssh
import attrs

from adapters.ssh.addresses import refusal, resolve
from core.errors import (
    AgentAuthFailed,
    AgentConnectionLost,
    AgentConnectTimeout,
    AgentUnreachable,
    CommandTimeout,
    HostKeyMismatch,
    HostKeyUnknown,
    NotSsh,
    OutputTooLarge,
    PortalError,
    RemoteError,
    TooManyOperations,
    TunnelRefused,
)
from core.model import Agent, AgentCredentials, HostKey
from core.networks import AgentNetworks, IPAddress
from core.ports import CommandResult, NullObserver, Observer, PinHostKey, RemoteStream
from core.virsh import command_line, subcommand_of

OPENSSH_MAX_SESSIONS = 10
DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_OPERATIONS_PER_USER = 16
MAX_CONNECTING = 32  # SSH handshakes a worker runs at once (issue 22): see _connect_gated
_READ_CHUNK = 64 * 1024
# AES-GCM first: asyncssh's ChaCha20-Poly1305 builds six cipher contexts per packet in Python and
# was the largest cost of a warm command (issue 22); AES-GCM is one C call per packet (AES-NI).
# Every OpenSSH since 6.2 offers both; the rest is asyncssh's default order.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes256-ctr", "aes192-ctr", "aes128-ctr")

_T = TypeVar("_T")
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
_ClientKeyId = tuple[int, int, datetime, int]  # agent id, owner id, agent creation time, revision


@attrs.define(eq=False)
class _Slot:
    """One SSH connection of an agent's pool (possibly still connecting)."""

    agent_id: int
    owner: tuple[int, datetime]  # (owner id, creation time): which agent this really is
    revision: int
    opened: asyncio.Task[asyncssh.SSHClientConnection]
    capacity: int = OPENSSH_MAX_SESSIONS
    in_use: int = 0  # requests holding this slot (some may still wait for it to open)
    channels: int = 0  # channels actually open on the connection
    uses: int = 0
    last_used: float = 0.0
    retired: bool = False

    def connection(self) -> asyncssh.SSHClientConnection | None:
        if self.opened.done() and not self.opened.cancelled() and self.opened.exception() is None:
            return self.opened.result()
        return None

    def close(self) -> None:
        conn = self.connection()
        if conn is not None:
            conn.close()
        elif not self.opened.done():
            self.opened.cancel()


@attrs.define(eq=False)
class _ClientKey:
    """An agent's parsed private key (being imported while ``parsed`` is not done)."""

    parsed: asyncio.Future[asyncssh.SSHKey]
    last_used: float


# Client keys are decrypted (their KDF run) in this small pool of their own, never in the default
# executor where every database use case runs: a tenant whose agents hold costly keys waits behind
# its own imports, it does not stall everyone's storage calls.
_CLIENT_KEY_IMPORTS = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="client-key")


class _Probe(asyncssh.SSHClient):
    """Keeps its connection, so that a connection that failed can tell how far it got: a host that
    accepted TCP (``reached``) and one that also sent an SSH identification string (``spoke_ssh``)."""

    def __init__(self) -> None:
        self.conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    @property
    def reached(self) -> bool:
        return self.conn is not None

    @property
    def spoke_ssh(self) -> bool:
        return self.conn is not None and self.conn.get_extra_info("server_version") is not None


# What a host that could not be connected to raised: remembered for ``failure_ttl`` seconds.
_CONNECT_FAILURES = (AgentConnectTimeout, AgentUnreachable, NotSsh)


class _TooMuchOutput(Exception):
    """The command's output passed the cap."""


class _NotStarted(Exception):
    """The channel could not be opened: the command never ran, so it may be retried."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class AsyncsshShell:
    """Implements ``core.ports.RemoteShell``."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        command_timeout: float = 60.0,
        idle_timeout: float = 300.0,
        keepalive_interval: float = 15.0,
        max_sessions: int = OPENSSH_MAX_SESSIONS,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        max_operations_per_user: int = DEFAULT_MAX_OPERATIONS_PER_USER,
        networks: AgentNetworks | None = None,
        failure_ttl: float = 0.0,
        max_connecting: int = MAX_CONNECTING,
        resolver: Resolver = resolve,
        monotonic: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.idle_timeout = idle_timeout
        self.keepalive_interval = keepalive_interval
        self.max_sessions = max_sessions
        self.max_output_bytes = max_output_bytes
        self.max_operations_per_user = max_operations_per_user
        self.networks = networks if networks is not None else AgentNetworks()
        self.failure_ttl = failure_ttl
        self.max_connecting = max_connecting
        self._connecting: asyncio.Semaphore | None = None
        self._resolve = resolver
        self._now = monotonic
        self._pools: dict[int, list[_Slot]] = {}
        self._client_keys: dict[_ClientKeyId, _ClientKey] = {}
        self._operations: dict[int, int] = {}  # owner id -> operations running now
        # agent id -> (owner, revision, the connect error, until when it stands): a negative cache
        self._failures: dict[int, tuple[tuple[int, datetime], int, RemoteError, float]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections_opened = 0  # for tests and benchmarks
        # The pool's size for the portal's metrics (issue 21): channels counted as they open and
        # close, connections recounted when one is created, opened, retired or reaped.
        self._observer: Observer = observer if observer is not None else NullObserver()
        self._channels_in_use = 0
        self._connections = (0, 0)  # open, opening

    # ------------------------------------------------------------------ the port

    async def run(self, target: AgentCredentials, argv: Sequence[str], *,
                  pin: PinHostKey | None = None, stdin: bytes | None = None,
                  counted: bool = True, fresh: bool = False) -> CommandResult:
        if not fresh:
            self._raise_remembered_failure(target.agent)
        if not counted:
            deadline = asyncio.get_running_loop().time() + self.command_timeout
            async with self._channel(target, argv, pin, stdin=stdin is not None, pty=False) as (slot, conn, process):
                return await self._finish(slot, conn, process, tuple(argv), target.agent, deadline, stdin)
        owner = target.agent.owner_id
        running = self._operations.get(owner, 0)
        if running >= self.max_operations_per_user:
            raise TooManyOperations(
                f"you already have {running} SSH operations running (at most {self.max_operations_per_user} at once, "
                "MANAGEMENT_MAX_OPERATIONS_PER_USER); retry when some have finished", retry_after=1)
        self._operations[owner] = running + 1
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            deadline = asyncio.get_running_loop().time() + self.command_timeout
            async with self._channel(target, argv, pin, stdin=stdin is not None, pty=False) as (slot, conn, process):
                result = await self._finish(slot, conn, process, tuple(argv), target.agent, deadline, stdin)
            outcome = "ok" if result.exit_status == 0 else "failed"
            return result
        except PortalError as error:
            outcome = error.code
            raise
        finally:
            self._observer.ssh_command(subcommand_of(argv), outcome, time.perf_counter() - started)
            left = self._operations[owner] - 1
            if left:
                self._operations[owner] = left
            else:
                del self._operations[owner]

    @contextlib.asynccontextmanager
    async def stream(self, target: AgentCredentials, argv: Sequence[str], *, pin: PinHostKey | None = None,
                     pty: bool = False) -> AsyncIterator[RemoteStream]:
        self._raise_remembered_failure(target.agent)
        async with self._channel(target, argv, pin, stdin=True, pty=pty) as (_slot, _conn, process):
            stream = _Stream(process, target.agent)
            try:
                yield stream
            finally:
                process.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(process.wait_closed(), timeout=5)

    def _raise_remembered_failure(self, agent: Agent) -> None:
        remembered = self._failures.get(agent.id)
        if remembered is None:
            return
        owner, revision, error, until = remembered
        if owner == (agent.owner_id, agent.created_at) and revision == agent.revision and self._now() < until:
            raise copy.copy(error)
        del self._failures[agent.id]  # expired, or the agent's settings changed since

    def _note_connect(self, agent: Agent, opened: asyncio.Future[asyncssh.SSHClientConnection]) -> None:
        """Remember a host that could not be connected to; forget it once a connection opens."""
        if opened.cancelled():
            return
        error = opened.exception()
        if error is None:
            self._failures.pop(agent.id, None)
        elif self.failure_ttl > 0 and isinstance(error, _CONNECT_FAILURES):
            self._failures[agent.id] = ((agent.owner_id, agent.created_at), agent.revision, error,
                                        self._now() + self.failure_ttl)
    @contextlib.asynccontextmanager
    async def connect(self, target: AgentCredentials, host: str, port: int, *,
                      pin: PinHostKey | None = None) -> AsyncIterator[RemoteStream]:
        """A ``direct-tcpip`` channel of the pooled connection to ``host:port`` as seen from the
        agent (consoles, issue 17). A refusal by the server is ``TunnelRefused``: nothing was
        opened, and the caller may take another way (the restricted shell's relay)."""
        self._start_reaper()
        slot = self._acquire(target, pin)
        try:
            conn = await self._ready(slot)
            try:
                reader, writer = await asyncio.wait_for(conn.open_connection(host, port),
                                                        timeout=self.command_timeout)
            except TimeoutError:
                raise CommandTimeout(f"{target.agent.hostname} did not open a tunnel within "
                                     f"{self.command_timeout:g} s") from None
            except asyncssh.ChannelOpenError as error:
                if conn.is_closed():
                    raise _lost(target.agent, error) from None
                raise TunnelRefused(f"{target.agent.hostname} refused to forward to {host}:{port} "
                                    f"({_reason(error)})") from None
            except (asyncssh.DisconnectError, OSError) as error:
                raise _lost(target.agent, error) from None
            slot.channels += 1
            try:
                yield _Tunnel(reader, writer, target.agent)
            finally:
                slot.channels -= 1
                writer.close()
        finally:
            self._release(slot)

    def operations_running(self, owner_id: int) -> int:
        """How many commands of this user run (or wait for a connection) now (tests, metrics)."""
        return self._operations.get(owner_id, 0)

    @contextlib.asynccontextmanager
    async def _channel(self, target: AgentCredentials, argv: Sequence[str], pin: PinHostKey | None, *,
                       stdin: bool, pty: bool) -> AsyncIterator[tuple[_Slot, asyncssh.SSHClientConnection,
                                                                      asyncssh.SSHClientProcess[bytes]]]:
        """A channel running ``argv`` on a pooled connection, held until the block ends."""
        self._start_reaper()
        command = command_line(argv)
        refused = replaced = 0
        while True:
            slot = self._acquire(target, pin)
            try:
                conn = await self._ready(slot)
                try:
                    process = await self._open_channel(slot, conn, command, target.agent, stdin=stdin, pty=pty)
                    break
                except _NotStarted as failure:
                    if isinstance(failure.error, asyncssh.ChannelOpenError) and not conn.is_closed():
                        # The server allows fewer sessions than we assumed: this connection
                        # carries no more than it has open now; try another one.
                        slot.capacity = max(1, slot.channels)
                        refused += 1
                        retry = refused < self.max_sessions
                    else:
                        # A pooled connection that died while idle (sshd restarted, network
                        # blip): nothing ran, so one fresh connection is tried.
                        self._retire(slot)
                        replaced += 1
                        retry = replaced == 1 and slot.uses > 0
                    if not retry:
                        raise _lost(target.agent, failure.error) from None
            except BaseException:
                self._release(slot)
                raise
            self._release(slot)
        slot.channels += 1
        self._channels_in_use += 1
        self._report_pool()
        try:
            yield slot, conn, process
        finally:
            slot.channels -= 1
            self._channels_in_use -= 1
            self._release(slot)
            self._report_pool()

    def _release(self, slot: _Slot) -> None:
        slot.in_use -= 1
        slot.uses += 1
        slot.last_used = self._now()
        if slot.retired and slot.in_use == 0:
            slot.close()

    def discard(self, agent_id: int) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._discard_now(agent_id)
        else:  # called from a worker thread (the use cases run there)
            loop.call_soon_threadsafe(self._discard_now, agent_id)

    def _discard_now(self, agent_id: int) -> None:
        for slot in list(self._pools.get(agent_id, [])):
            self._retire(slot)
        self._pools.pop(agent_id, None)
        self._failures.pop(agent_id, None)
        for key in [k for k in self._client_keys if k[0] == agent_id]:
            del self._client_keys[key]

    async def close(self) -> None:
        """Close every connection (worker shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        slots = [slot for pool in self._pools.values() for slot in pool]
        self._pools.clear()
        self._client_keys.clear()
        self._recount_connections()
        for slot in slots:
            slot.close()
        for slot in slots:
            conn = slot.connection()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.wait_closed(), timeout=5)

    def open_connections(self, agent_id: int) -> int:
        """How many connections the pool holds for an agent (for tests and benchmarks)."""
        return len(self._pools.get(agent_id, []))

    # ------------------------------------------------------------------ pool

    def _acquire(self, target: AgentCredentials, pin: PinHostKey | None) -> _Slot:
        agent = target.agent
        owner = (agent.owner_id, agent.created_at)
        pool = self._pools.setdefault(agent.id, [])
        for slot in list(pool):
            failed = slot.opened.done() and (slot.opened.cancelled() or slot.opened.exception() is not None)
            closed = (conn := slot.connection()) is not None and conn.is_closed()
            # Older settings, another agent under a recycled id, or a dead connection: retire it.
            # (A slot of a *newer* revision is left alone: this request just read the agent first.)
            if slot.owner != owner or slot.revision < agent.revision or failed or closed:
                self._retire(slot)
        if (agent.id, *owner, agent.revision) not in self._client_keys:  # else older ones are gone already
            for key_id in [k for k in self._client_keys
                           if k[0] == agent.id and (k[1:3] != owner or k[3] < agent.revision)]:
                del self._client_keys[key_id]  # an older revision's key, or another agent's under a recycled id
        candidates = [s for s in pool if s.revision == agent.revision
                      and s.in_use < min(s.capacity, self.max_sessions)]
        if candidates:
            slot = max(candidates, key=lambda s: s.in_use)  # fill one connection before the next
        else:
            slot = _Slot(agent.id, owner, agent.revision, asyncio.ensure_future(self._connect_gated(target, pin)))
            slot.opened.add_done_callback(_consume_exception)
            slot.opened.add_done_callback(lambda _task: self._recount_connections())
            slot.opened.add_done_callback(functools.partial(self._note_connect, agent))
            pool.append(slot)
            self._recount_connections()
        slot.in_use += 1
        return slot

    def _retire(self, slot: _Slot) -> None:
        # The slot's client key stays cached: a connection that failed (host down, key refused)
        # must not make the next request run the key's KDF again. Keys go with their revision.
        slot.retired = True
        pool = self._pools.get(slot.agent_id)
        if pool is not None and slot in pool:
            pool.remove(slot)
        if slot.in_use == 0:
            slot.close()
        self._recount_connections()

    def _recount_connections(self) -> None:
        """Count the pool's connections (open, being opened) for the metrics: only when one is
        created, opened, retired or reaped, never per command."""
        open_now = opening = 0
        for pool in self._pools.values():
            for slot in pool:
                if not slot.opened.done():
                    opening += 1
                elif (conn := slot.connection()) is not None and not conn.is_closed():
                    open_now += 1
        self._connections = (open_now, opening)
        self._report_pool()

    def _report_pool(self) -> None:
        self._observer.ssh_pool(connections_open=self._connections[0], connections_opening=self._connections[1],
                                channels_in_use=self._channels_in_use)

    async def _ready(self, slot: _Slot) -> asyncssh.SSHClientConnection:
        try:
            return await asyncio.shield(slot.opened)
        except BaseException:
            # Retire only when opening failed; a waiter that was cancelled leaves the connection
            # to the other requests sharing it.
            if slot.opened.done():
                self._retire(slot)
            raise

    def _start_reaper(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.idle_timeout / 4))
            now = self._now()
            for pool in list(self._pools.values()):
                for slot in list(pool):
                    if slot.in_use == 0 and now - slot.last_used >= self.idle_timeout:
                        self._retire(slot)
            for key_id, key in list(self._client_keys.items()):
                if key.parsed.done() and now - key.last_used >= self.idle_timeout:
                    del self._client_keys[key_id]

    # ------------------------------------------------------------------ SSH

    async def _connect_observed(self, target: AgentCredentials,
                                pin: PinHostKey | None) -> asyncssh.SSHClientConnection:
        """``_connect``, told to the observer: ``ok`` or the error code, and how long it took."""
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            conn = await self._connect(target, pin)
            outcome = "ok"
            return conn
        except PortalError as error:
            outcome = error.code
            raise
        finally:
            self._observer.ssh_connect(outcome, time.perf_counter() - started)
    async def _connect_gated(self, target: AgentCredentials, pin: PinHostKey | None) -> asyncssh.SSHClientConnection:
        """``_connect``, at most ``max_connecting`` at once: a handshake is CPU (key exchange,
        signatures), and a cold fleet view of hundreds starting every handshake together would have
        each take hundreds of times longer and miss its connect time-out (then be remembered as
        failed). The time-out runs from the moment a connection gets its turn."""
        if self._connecting is None:
            self._connecting = asyncio.Semaphore(self.max_connecting)
        async with self._connecting:
            return await self._connect_observed(target, pin)

    async def _connect(self, target: AgentCredentials, pin: PinHostKey | None) -> asyncssh.SSHClientConnection:
        agent = target.agent
        addresses = await self._checked_addresses(agent)
        if agent.host_key is None and not agent.allow_unknown_hosts:
            offered = await self._offered_host_key(agent, addresses)
            raise HostKeyUnknown(
                f"no host key is pinned for {agent.hostname}:{agent.port} and allow_unknown_hosts is false; "
                f"pin the host's key with PATCH host_key{offered}")
        client_key = await self._client_key(target)
        known_hosts: tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]] | None = None
        if agent.host_key is not None:
            known_hosts = ([asyncssh.import_public_key(agent.host_key.openssh)], [], [])

        def attempt(address: IPAddress, probe: _Probe) -> Awaitable[asyncssh.SSHClientConnection]:
            return asyncssh.connect(
                str(address),  # the checked address, never the name: no second DNS answer
                agent.port,
                client_factory=lambda: probe,
                username=agent.username,
                client_keys=[client_key],
                known_hosts=known_hosts,
                config=[],  # never read ~/.ssh/config of the portal's user
                agent_path=None,  # never use an ssh-agent of the portal host
                password_auth=False,
                kbdint_auth=False,
                connect_timeout=self.connect_timeout,
                login_timeout=self.connect_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=3,
                encryption_algs=CIPHERS,
            )

        try:
            conn = await self._open(agent, addresses, attempt)
        except asyncssh.HostKeyNotVerifiable as error:
            raise HostKeyMismatch(
                f"the host key of {agent.hostname}:{agent.port} does not match the pinned key "
                f"{agent.host_key.fingerprint if agent.host_key else ''} ({error.reason}); if the host was "
                "really reinstalled, pin its new key with PATCH host_key") from None
        except asyncssh.PermissionDenied:
            raise AgentAuthFailed(
                f"{agent.hostname}:{agent.port} refused the key for user {agent.username!r} "
                "(is its public key in that user's authorized_keys?)") from None
        except (OSError, asyncssh.Error) as error:
            raise _unreachable(agent, error) from None
        if agent.host_key is None and pin is not None:
            await self._pin(conn, agent, pin)
        self.connections_opened += 1
        return conn

    async def _checked_addresses(self, agent: Agent) -> list[IPAddress]:
        """Resolve the agent's name once and check every address it resolves to: one refused
        address refuses the name (a rebinding name would otherwise pick it on a later try)."""
        try:
            addresses = await asyncio.wait_for(self._resolve(agent.hostname, agent.port), timeout=self.connect_timeout)
        except TimeoutError:
            raise AgentConnectTimeout(f"could not resolve {agent.hostname} within {self.connect_timeout:g} s") from None
        except UnicodeError:
            raise AgentUnreachable(f"cannot resolve {agent.hostname}: not a valid host name") from None
        except OSError as error:
            raise _unreachable(agent, error) from None
        if not addresses:
            raise AgentUnreachable(f"cannot resolve {agent.hostname}: no address")
        refused = refusal(agent.hostname, addresses, self.networks)
        if refused is not None:
            raise refused
        return addresses

    async def _open(self, agent: Agent, addresses: Sequence[IPAddress],
                    attempt: Callable[[IPAddress, _Probe], Awaitable[_T]]) -> _T:
        """Connect to the checked addresses in order, within one connect time-out: the next address
        is tried only when one refuses or is unreachable outright. Failures before the SSH
        handshake are mapped here: nothing listening (``AgentUnreachable``), nothing answering in
        time, even if it accepted TCP (``AgentConnectTimeout``), something answering but not in SSH
        (``NotSsh``). Errors of
        a host that did speak SSH are left to the caller."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout + 1
        where = f"{agent.hostname}:{agent.port}"
        for index, address in enumerate(addresses):
            probe = _Probe()
            try:
                return await asyncio.wait_for(attempt(address, probe), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                # Silence is not proof of "not SSH" (an overloaded sshd, a tarpit, a firewall that
                # accepts and drops): the host did not answer in time.
                raise AgentConnectTimeout(f"could not connect to {where} within {self.connect_timeout:g} s") from None
            except (OSError, asyncssh.Error) as error:
                if probe.reached and not probe.spoke_ssh:
                    raise NotSsh(f"{where} answered, but not in SSH ({_reason(error)} before any SSH "
                                 "identification); is this the host's SSH port?") from None
                if probe.reached or not isinstance(error, OSError) or index == len(addresses) - 1:
                    raise
        raise AssertionError("unreachable: addresses is never empty")  # pragma: no cover

    async def _pin(self, conn: asyncssh.SSHClientConnection, agent: Agent, pin: PinHostKey) -> None:
        """Trust on first use, safely under concurrency: every connection opened while no key was
        pinned is checked against the key that did get pinned (by it or by a concurrent one)
        before it carries a single command."""
        server_key = conn.get_server_host_key()
        try:
            if server_key is None:
                raise HostKeyUnknown("the host offered no host key")
            seen = _host_key(server_key)
            pinned = await pin(seen)
            if pinned.openssh != seen.openssh:
                raise HostKeyMismatch(
                    f"{agent.hostname}:{agent.port} offered {seen.fingerprint}, but {pinned.fingerprint} was "
                    "pinned for this agent on first use; refusing the connection")
        except BaseException:
            conn.close()
            raise

    async def _offered_host_key(self, agent: Agent, addresses: Sequence[IPAddress]) -> str:
        """The fingerprint the host offers, to help the operator pin it. A host that cannot be
        reached at all, or does not speak SSH, is reported as such (that is the first thing to fix)."""

        def attempt(address: IPAddress, probe: _Probe) -> Awaitable[asyncssh.SSHKey | None]:
            options = asyncssh.SSHClientConnectionOptions(client_factory=lambda: probe, config=[],
                                                          connect_timeout=self.connect_timeout)
            return asyncssh.get_server_host_key(str(address), agent.port, config=[], options=options)

        try:
            key = await self._open(agent, addresses, attempt)
        except OSError as error:
            raise _unreachable(agent, error) from None
        except asyncssh.Error:
            return ""  # an SSH server that would not show its key: the pinning advice stands alone
        return f" (the host offers {key.get_fingerprint('sha256')})" if key is not None else ""

    async def _client_key(self, target: AgentCredentials) -> asyncssh.SSHKey:
        """The agent's private key, imported once per revision of the agent (concurrent first
        connections share one import)."""
        agent = target.agent
        key_id = (agent.id, agent.owner_id, agent.created_at, agent.revision)
        entry = self._client_keys.get(key_id)
        if entry is None:
            # Decrypting an OpenSSH key runs bcrypt's KDF: seconds of CPU, so off the event loop,
            # and off the shared default executor too (``_CLIENT_KEY_IMPORTS``).
            parsed = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                _CLIENT_KEY_IMPORTS, asyncssh.import_private_key, target.private_key,
                target.private_key_passphrase))
            parsed.add_done_callback(_consume_exception)
            entry = self._client_keys[key_id] = _ClientKey(parsed, self._now())
        entry.last_used = self._now()
        try:
            return await asyncio.shield(entry.parsed)
        except (asyncssh.KeyImportError, ValueError) as error:
            raise AgentAuthFailed(f"the private key stored for {agent.hostname} cannot be loaded: {error}") from None

    async def _open_channel(self, slot: _Slot, conn: asyncssh.SSHClientConnection, command: str, agent: Agent, *,
                    stdin: bool, pty: bool) -> asyncssh.SSHClientProcess[bytes]:
        try:
            return await asyncio.wait_for(
                # LC_ALL=C asks for virsh's English output, which the core parses; sshd applies it
                # where AcceptEnv allows (Debian's default: LANG LC_*) and ignores it elsewhere.
                # Bytes, not text: the output is counted as it arrives (``_collect``).
                conn.create_process(command, stdin=asyncssh.PIPE if stdin else asyncssh.DEVNULL, encoding=None,
                                    env={"LC_ALL": "C"}, term_type="xterm" if pty else None,
                                    term_size=(80, 24) if pty else None),
                timeout=self.command_timeout,
            )
        except TimeoutError:
            self._retire(slot)  # a server that does not even open channels is not to be reused
            raise CommandTimeout(f"{agent.hostname} did not open a session within {self.command_timeout:g} s") from None
        except (asyncssh.ChannelOpenError, asyncssh.DisconnectError, OSError) as error:
            raise _NotStarted(error) from None

    async def _finish(self, slot: _Slot, conn: asyncssh.SSHClientConnection, process: asyncssh.SSHClientProcess[bytes],
                      argv: tuple[str, ...], agent: Agent, deadline: float, stdin: bytes | None) -> CommandResult:
        try:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            stdout, stderr = await asyncio.wait_for(self._collect(process, stdin), timeout=remaining)
        except TimeoutError:
            process.close()  # closing the channel makes sshd hang up on the command
            raise CommandTimeout(
                f"{argv[0] if argv else 'the command'} did not finish within {self.command_timeout:g} s "
                f"on {agent.hostname}") from None
        except _TooMuchOutput:
            process.close()  # the host stops being read from; the connection itself stays good
            raise OutputTooLarge(
                f"{argv[0] if argv else 'the command'} on {agent.hostname} wrote more than {self.max_output_bytes} "
                "bytes of output (MANAGEMENT_MAX_OUTPUT_BYTES); the portal stopped reading and closed the "
                "channel") from None
        except (asyncssh.DisconnectError, OSError) as error:
            raise _lost(agent, error) from None
        status = process.exit_status
        if status is None and process.exit_signal is None:
            # The channel closed without an exit status: the session (or sshd) died under it.
            self._retire(slot)
            raise AgentConnectionLost(f"the SSH session on {agent.hostname}:{agent.port} ended without an exit "
                              "status (was sshd or the session killed?)")
        if status is None or status < 0:
            status = 128 + _signal_number(process.exit_signal)
        server_key = conn.get_server_host_key()
        return CommandResult(
            command=argv,
            exit_status=status,
            stdout=stdout,
            stderr=stderr,
            host_key=_host_key(server_key) if server_key is not None else None,
        )

    async def _collect(self, process: asyncssh.SSHClientProcess[bytes], stdin: bytes | None) -> tuple[str, str]:
        """Read stdout and stderr as they arrive until the command ends, holding at most
        ``max_output_bytes`` of them together (``_TooMuchOutput`` past that). asyncssh reads from
        the network only as fast as this consumes, so nothing else buffers more than a window.
        ``stdin`` is written meanwhile (a command may answer before it read all of it)."""
        outputs = (bytearray(), bytearray())
        total = 0

        async def pump(stream: asyncssh.SSHReader[bytes], into: bytearray) -> None:
            nonlocal total
            while chunk := await stream.read(_READ_CHUNK):
                total += len(chunk)
                if total > self.max_output_bytes:
                    raise _TooMuchOutput()
                into += chunk

        async def feed(data: bytes) -> None:
            for start in range(0, len(data), _READ_CHUNK):
                process.stdin.write(data[start:start + _READ_CHUNK])
                await process.stdin.drain()
            process.stdin.write_eof()

        pumps = [asyncio.ensure_future(pump(process.stdout, outputs[0])),
                 asyncio.ensure_future(pump(process.stderr, outputs[1]))]
        if stdin is not None:
            pumps.append(asyncio.ensure_future(feed(stdin)))
        try:
            await asyncio.gather(*pumps)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        await process.wait_closed()
        return outputs[0].decode("utf-8", errors="replace"), outputs[1].decode("utf-8", errors="replace")


class _Stream:
    """Implements ``core.ports.RemoteStream`` over an asyncssh process; connection faults become
    ``RemoteError`` naming the agent."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes], agent: Agent) -> None:
        self._process = process
        self._agent = agent

    async def read(self, limit: int = _READ_CHUNK) -> bytes:
        return await self._guarded(self._process.stdout.read(limit))

    async def read_stderr(self, limit: int = _READ_CHUNK) -> bytes:
        return await self._guarded(self._process.stderr.read(limit))

    async def write(self, data: bytes) -> None:
        self._process.stdin.write(data)
        await self._guarded(self._process.stdin.drain())

    def write_eof(self) -> None:
        self._process.stdin.write_eof()

    def close(self) -> None:
        self._process.close()

    async def wait_closed(self) -> int | None:
        await self._guarded(self._process.wait_closed())
        return self._process.exit_status

    async def _guarded(self, step: Awaitable[_T]) -> _T:
        try:
            return await step
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError, BrokenPipeError, OSError) as error:
            raise _lost(self._agent, error) from None


class _Tunnel:
    """Implements ``core.ports.RemoteStream`` over a ``direct-tcpip`` channel (no stderr, no exit
    status)."""

    def __init__(self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes], agent: Agent) -> None:
        self._reader = reader
        self._writer = writer
        self._agent = agent

    async def read(self, limit: int = _READ_CHUNK) -> bytes:
        return await self._guarded(self._reader.read(limit))

    async def read_stderr(self, limit: int = _READ_CHUNK) -> bytes:
        return b""

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._guarded(self._writer.drain())

    def write_eof(self) -> None:
        self._writer.write_eof()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> int | None:
        with contextlib.suppress(Exception):
            await self._writer.channel.wait_closed()
        return None

    async def _guarded(self, step: Awaitable[_T]) -> _T:
        try:
            return await step
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError, BrokenPipeError, OSError) as error:
            raise _lost(self._agent, error) from None


def _host_key(key: asyncssh.SSHKey) -> HostKey:
    openssh = " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])
    return HostKey(openssh=openssh, fingerprint=key.get_fingerprint("sha256"))


def _lost(agent: Agent, error: BaseException) -> RemoteError:
    return AgentConnectionLost(f"the SSH connection to {agent.hostname}:{agent.port} was lost: {_reason(error)}")


def _unreachable(agent: Agent, error: OSError | asyncssh.Error) -> RemoteError:
    if isinstance(error, socket.gaierror):
        return AgentUnreachable(f"cannot resolve {agent.hostname}: {error.strerror}")
    if isinstance(error, ConnectionRefusedError):
        return AgentUnreachable(f"{agent.hostname}:{agent.port} refused the connection (is sshd running?)")
    return AgentUnreachable(f"cannot connect to {agent.hostname}:{agent.port}: {_reason(error)}")


def _reason(error: BaseException) -> str:
    return str(getattr(error, "reason", "") or error) or type(error).__name__


def _signal_number(exit_signal: tuple[str, bool, str, str] | None) -> int:
    names = {"HUP": 1, "INT": 2, "KILL": 9, "TERM": 15, "PIPE": 13}
    return names.get(exit_signal[0], 0) if exit_signal else 0


def _consume_exception(task: asyncio.Future[Any]) -> None:
    # A failed connect is reported to every waiting request; this only keeps asyncio from
    # warning about an exception nobody retrieved when no request is left waiting.
    if not task.cancelled():
        task.exception()
