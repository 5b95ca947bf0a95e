"""Consoles (issue 17): a VM's serial console or VNC server, relayed between a client (a browser's
WebSocket) and the agent's pooled SSH connection.

Opening one takes two steps, because a browser cannot put an API key on a WebSocket:

1. ``open_ticket`` (an authenticated request) checks that the VM runs and has that kind of
   console, then issues a one-time ticket: 256 random bits, stored only as a keyed digest, valid
   ``TICKET_SECONDS``, bound to the user, agent, VM and kind. The ticket lives in the database, so
   any worker of any instance can redeem it.
2. ``redeem`` marks the ticket used in one conditional update (unused and unexpired, or nothing),
   and ``relay`` carries bytes both ways until either side closes, the console stays idle for
   ``idle_timeout`` seconds, or it has lasted ``max_seconds``; closing one side closes the other
   and the SSH channel. Each console is audited once, when it ends (``vm.console``, with its kind,
   duration and bytes each way).

How the bytes reach the VM: ``serial`` runs ``virsh console --force`` on a terminal (sshd gives a
PTY for it); ``vnc`` asks ``virsh domdisplay`` for the VM's VNC port on the host's loopback and
opens a TCP tunnel to it over SSH (``direct-tcpip``); when the host's sshd refuses to forward (an
enrolled host, whose key is under ``restrict``) the restricted shell relays the socket itself
(``console-vnc``). See docs/consoles.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import ClassVar, Protocol

import attrs

from core import virsh
from core.errors import (
    ConsoleUnavailable,
    PortalError,
    TooManyConsoles,
    TunnelRefused,
    ValidationFailed,
    VirshFailed,
    VmNotRunning,
)
from core.model import AgentCredentials, AuditEvent, Caller, ConsoleKind, ConsoleTicket, Origin
from core.ports import Clock, CommandResult, RemoteStream, Storage, TicketDigests
from core.remote import RemoteCommands

TICKET_SECONDS = 30
DEFAULT_IDLE_TIMEOUT = 900.0
DEFAULT_MAX_SECONDS = 8 * 3600.0
DEFAULT_MAX_CONSOLES_PER_USER = 4
_CHUNK = 64 * 1024


def console_kind(kind: ConsoleKind | str) -> ConsoleKind:
    """``kind`` as a ``ConsoleKind``; ``ValidationFailed`` naming the field otherwise."""
    if isinstance(kind, ConsoleKind):
        return kind
    try:
        return ConsoleKind(kind)
    except ValueError:
        raise ValidationFailed.one("kind", "must be serial or vnc") from None


class ConsoleClient(Protocol):
    """The client's end of a console (the HTTP layer adapts a WebSocket to it)."""

    async def receive(self) -> bytes | None:
        """The next bytes the client sent; None once it closed."""
        ...

    async def send(self, data: bytes) -> None:
        """Send bytes to the client (raises once it is gone)."""
        ...


@attrs.frozen
class IssuedTicket:
    """A console ticket as handed to its owner, once: the secret itself and when it expires."""

    ticket: str = attrs.field(repr=False)
    kind: ConsoleKind
    agent_id: int
    vm: str
    expires_at: datetime


@attrs.frozen
class ConsoleRecord:
    """How a console ended (what ``vm.console`` records)."""

    kind: ConsoleKind
    seconds: float
    bytes_to_vm: int
    bytes_from_vm: int
    ended: str  # client_closed | vm_closed | idle_timeout | max_duration | the error's code


class ConsoleService:
    """Tickets for consoles, and the relay behind each one."""

    runs_on_event_loop: ClassVar[bool] = True

    def __init__(self, *, storage: Storage, clock: Clock, tickets: TicketDigests | None, remote: RemoteCommands,
                 max_per_user: int = DEFAULT_MAX_CONSOLES_PER_USER, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_seconds: float = DEFAULT_MAX_SECONDS, ticket_seconds: int = TICKET_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.storage = storage
        self.clock = clock
        self._tickets = tickets
        self.remote = remote
        self.max_per_user = max_per_user
        self.idle_timeout = idle_timeout
        self.max_seconds = max_seconds
        self.ticket_seconds = ticket_seconds  # 30 s (the contract); shorter only in tests
        self._monotonic = monotonic
        self._sleep = sleep  # the time-outs' clock is injectable: tests run hours of idleness at once

    @property
    def tickets(self) -> TicketDigests:
        if self._tickets is None:
            raise RuntimeError("this portal was built without console tickets")
        return self._tickets

    # ------------------------------------------------------------------ step 1: the ticket

    async def open_ticket(self, caller: Caller, agent_id: int, vm: str, kind: ConsoleKind | str) -> IssuedTicket:
        """A one-time ticket to open the VM's ``kind`` console within ``TICKET_SECONDS``.
        ``VmNotRunning`` (409) if the VM is not running, ``ConsoleUnavailable`` (409) if it has no
        serial console or no VNC display on the host's loopback, ``TooManyConsoles`` (429) if the
        caller already has ``max_per_user`` consoles open."""
        kind = console_kind(kind)
        virsh.require_vm_name(vm)
        await asyncio.to_thread(self._check_limit, caller.user.id)
        target = await self.remote.target(caller, agent_id)
        uri = target.agent.libvirt_uri
        state = await self.remote.run(caller, target, virsh.state_command(uri, vm))
        virsh.raise_for_failure(state, vm)
        if virsh.parse_state(state.stdout) != "running":
            raise VmNotRunning(f"VM {vm!r} is not running: start it before opening its console")
        if kind is ConsoleKind.SERIAL:
            tty = await self.remote.run(caller, target, virsh.ttyconsole_command(uri, vm))
            if tty.exit_status != 0 or not tty.stdout.strip():
                _raise_unless_unavailable(tty, vm)
                raise ConsoleUnavailable(f"VM {vm!r} has no serial console (add <serial type='pty'> and "
                                         "<console type='pty'> to its domain)")
        else:
            await self._vnc_address(caller, target, vm)
        ticket, digest = self.tickets.new_ticket()
        now = self.clock.now()
        stored = ConsoleTicket(id=0, user_id=caller.user.id, agent_id=agent_id, vm=vm, kind=kind, digest=digest,
                               created_at=now, expires_at=now + timedelta(seconds=self.ticket_seconds))
        await asyncio.to_thread(self._store, stored)
        return IssuedTicket(ticket=ticket, kind=kind, agent_id=agent_id, vm=vm, expires_at=stored.expires_at)

    def _check_limit(self, user_id: int) -> None:
        with self.storage.transaction() as tx:
            self._refuse_over_limit(tx.count_open_consoles(user_id, self._open_since()))

    def _open_since(self) -> datetime:
        # A console whose worker died without closing it counts until it would have timed out anyway.
        return self.clock.now() - timedelta(seconds=self.max_seconds + 60)

    def _refuse_over_limit(self, open_now: int) -> None:
        if open_now >= self.max_per_user:
            raise TooManyConsoles(f"you already have {open_now} consoles open (at most {self.max_per_user} at once, "
                                  "MANAGEMENT_MAX_CONSOLES_PER_USER); close one first", retry_after=5)

    def _store(self, ticket: ConsoleTicket) -> None:
        with self.storage.transaction(write=True) as tx:
            tx.add_console_ticket(ticket)

    async def _vnc_address(self, caller: Caller, target: AgentCredentials, vm: str) -> tuple[str, int]:
        display = await self.remote.run(caller, target, virsh.vnc_display_command(target.agent.libvirt_uri, vm))
        address = virsh.parse_vnc_display(display.stdout) if display.exit_status == 0 else None
        if address is None:
            _raise_unless_unavailable(display, vm)
            raise ConsoleUnavailable(f"VM {vm!r} has no VNC display on the host's loopback (add <graphics "
                                     "type='vnc' listen='127.0.0.1'/> to its domain)")
        return address

    # ------------------------------------------------------------------ step 2: the console

    def redeem(self, ticket: str) -> ConsoleTicket | None:
        """The ticket's console, now marked opened; None if the ticket is unknown, used or expired
        (the caller says no more than that), or if its user already has ``max_per_user`` consoles
        open (tickets issued concurrently cannot pass the limit together)."""
        if not 16 <= len(ticket) <= 128:
            return None
        digest = self.tickets.digest(ticket)
        with self.storage.transaction(write=True) as tx:
            redeemed = tx.redeem_console_ticket(digest, self.clock.now())
            if redeemed is None:
                return None
            if tx.count_open_consoles(redeemed.user_id, self._open_since()) > self.max_per_user:
                tx.close_console(redeemed.id, self.clock.now())
                return None
            return redeemed

    @contextlib.asynccontextmanager
    async def connected(self, console: ConsoleTicket, origin: Origin) -> AsyncIterator[RemoteStream]:
        """The VM's end of a redeemed console, open until the block ends. Raises what opening
        the SSH channel raises (the agent was deleted: ``AgentNotFound``); the console is then
        closed and the failure audited."""
        caller = await asyncio.to_thread(self._caller, console, origin)
        started = self._monotonic()
        try:
            target = await self.remote.target(caller, console.agent_id)
            uri = target.agent.libvirt_uri
            if console.kind is ConsoleKind.SERIAL:
                opened = self.remote.stream(caller, target, virsh.serial_console_command(uri, console.vm), pty=True)
                async with opened as stream:
                    yield stream
                return
            host, port = await self._vnc_address(caller, target, console.vm)
            try:
                async with self.remote.connect(caller, target, host, port) as stream:
                    yield stream
                return
            except TunnelRefused:
                pass  # an enrolled host: its restricted shell relays the socket itself
            async with self.remote.stream(caller, target, virsh.vnc_relay_command(uri, console.vm)) as stream:
                yield stream
        except PortalError as error:
            await asyncio.to_thread(self.finish, console, origin, ConsoleRecord(
                kind=console.kind, seconds=self._monotonic() - started, bytes_to_vm=0, bytes_from_vm=0,
                ended=error.code))
            raise

    def _caller(self, console: ConsoleTicket, origin: Origin) -> Caller:
        with self.storage.transaction() as tx:
            user = tx.get_user(console.user_id)
        if user is None:
            raise ConsoleUnavailable("the console's user no longer exists")
        return Caller(user=user, request_id=origin.request_id, client_address=origin.client_address)

    async def relay(self, console: ConsoleTicket, client: ConsoleClient, vm_end: RemoteStream) -> ConsoleRecord:
        """Carry bytes both ways until one side closes, the console is idle for ``idle_timeout``
        seconds or has lasted ``max_seconds``. Closes the VM's end (the SSH channel) before it
        answers; the caller closes the client's end and calls ``finish``."""
        started = last = self._monotonic()
        to_vm = from_vm = 0

        async def upstream() -> str:
            nonlocal to_vm, last
            while (data := await client.receive()) is not None:
                if data:
                    to_vm += len(data)
                    last = self._monotonic()
                    await vm_end.write(data)
            return "client_closed"

        async def downstream() -> str:
            nonlocal from_vm, last
            while data := await vm_end.read(_CHUNK):
                from_vm += len(data)
                last = self._monotonic()
                await client.send(data)
            return "vm_closed"

        async def clock() -> str:
            while True:
                now = self._monotonic()
                if now - started >= self.max_seconds:
                    return "max_duration"
                if now - last >= self.idle_timeout:
                    return "idle_timeout"
                await self._sleep(min(1.0, self.idle_timeout / 4, self.max_seconds / 4))

        tasks = [asyncio.ensure_future(job()) for job in (upstream, downstream, clock)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = next(iter(done))
            error = first.exception()
            if isinstance(error, PortalError):
                ended = error.code
            elif error is not None:
                ended = "client_closed" if first is tasks[1] else "vm_closed"  # the other end broke
            else:
                ended = first.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            vm_end.close()
        return ConsoleRecord(kind=console.kind, seconds=self._monotonic() - started, bytes_to_vm=to_vm,
                             bytes_from_vm=from_vm, ended=ended)

    def finish(self, console: ConsoleTicket, origin: Origin, record: ConsoleRecord) -> None:
        """Mark the console closed and audit it (``vm.console``), in one transaction."""
        detail = (f"kind={record.kind.value} seconds={record.seconds:.1f} bytes_to_vm={record.bytes_to_vm} "
                  f"bytes_from_vm={record.bytes_from_vm} ended={record.ended}")
        outcome = "ok" if record.ended in _ORDINARY_ENDINGS else record.ended
        with self.storage.transaction(write=True) as tx:
            tx.close_console(console.id, self.clock.now())
            if tx.get_user(console.user_id) is not None:
                tx.add_audit_event(_console_event(console, origin, self.clock.now(), outcome, detail))


_ORDINARY_ENDINGS = frozenset({"client_closed", "vm_closed", "idle_timeout", "max_duration"})


def _console_event(console: ConsoleTicket, origin: Origin, at: datetime, outcome: str, detail: str) -> AuditEvent:
    return AuditEvent(id=0, user_id=console.user_id, action="vm.console", outcome=outcome, agent_id=console.agent_id,
                      vm=console.vm, detail=detail, request_id=origin.request_id,
                      client_address=origin.client_address, created_at=at)


def _raise_unless_unavailable(result: CommandResult, vm: str) -> None:
    """A failed console check is ``ConsoleUnavailable`` (the caller raises it) only when virsh
    failed for a reason of its own; a VM that is gone or stopped in between, libvirt down or a
    host fault keep their own errors."""
    try:
        virsh.raise_for_failure(result, vm)
    except VirshFailed:
        return
