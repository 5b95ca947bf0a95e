"""Watchers and the live mirror: one ``virsh event --all --loop --timestamp`` per agent, across every
worker and instance, keeping a copy of each agent's VMs in the database.

- **Which agents**: those in use — listed, in a fleet view or followed by a stream within the last
  ``idle`` seconds (``want``) — whose host key is pinned (a watcher never pins a key itself: that
  is the owner's act).
- **Exactly one watcher per agent**: a lease row per agent (``watches``) with an expiry. Every
  worker runs ``WatchService.run``, which every ``renew_every`` seconds takes the leases that are
  free or expired and renews its own, in one write transaction (the database's write lock
  serialises claimants on SQLite and PostgreSQL alike). A worker that dies stops renewing; another
  takes its agents over once the lease expires (``lease_seconds``).
- **The mirror**: the watcher lists the VMs (``virsh list --all``) when its stream opens (so a
  reconnection resynchronises), applies each lifecycle event at once, and lists again shortly after
  a burst of lifecycle events (ids, transient VMs). Its lease row says whether the stream is up and
  when it last confirmed the mirror current (``alive_at``, stamped on each renewal while the
  stream is up). A list is answered from the mirror only while ``alive_at`` is at most
  ``max_age`` seconds old; otherwise the host is asked (``mirror_fresh``).
- **Faults**: a stream that cannot be opened or ends is an ``agent.unreachable`` event (once per
  outage), then retries after ``backoff_delay``; a reconnection is ``agent.watching``.
- **Hundreds per worker** (issue 22): at most ``start_limit`` watchers of a worker are starting
  at once (opening their stream and listing the VMs), so a worker that takes 500 leases does not
  open 500 streams in one burst; lease renewal is one write transaction of a few statements
  whatever the number of agents (``Transaction.claim_watches``).

The decisions (freshness, back-off, how an event changes the mirror) are pure functions below; the
service does the I/O through the ports (storage, remote shell) and is started by the HTTP
worker's lifespan (``entrypoints/http/middleware.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import ClassVar

from core import virsh
from core.credentials import Keyring
from core.errors import PortalError
from core.events import AGENT_UNREACHABLE, AGENT_WATCHING, EventLog
from core.live import MirroredVm, WatchStatus
from core.model import Agent, AgentCredentials
from core.ports import Clock, RemoteShell, RemoteStream, Storage, Transaction
from core.virsh import EventLines, HostEvent

LEASE_SECONDS = 6.0
RENEW_EVERY = 1.5
MAX_AGE = 5.0  # seconds a mirror may go unconfirmed and still answer lists
RESYNC_DELAY = 0.3  # seconds after a lifecycle event before the watcher lists the VMs again
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
START_LIMIT = 32  # watchers of one worker starting (stream + first list) at once: the SSH handshake gate's size
WATCH_IDLE = 600.0  # seconds an agent stays "in use" (watched) after it was last used
MARK_EVERY = 60.0  # a worker records an agent's use at most once a minute (a write each time)

log = logging.getLogger("manage_playrservers.watch")


# ---------------------------------------------------------------------- decisions (pure)


def mirror_fresh(status: WatchStatus | None, now: datetime, max_age: float) -> bool:
    """Whether an agent's mirror may answer a list: its watcher's stream is up and confirmed the
    mirror current at most ``max_age`` seconds ago (and holds a lease that has not expired)."""
    return (status is not None and status.connected and status.alive_at is not None
            and status.expires_at > now and now - status.alive_at <= timedelta(seconds=max_age))


def backoff_delay(failures: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait before the ``failures``-th retry: doubling from ``base``, at most ``cap``."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2.0 ** min(failures - 1, 30)))


def mirror_after(current: MirroredVm | None, event: HostEvent) -> tuple[bool, MirroredVm | None]:
    """How ``event`` changes one VM of the mirror: (changed, the VM's row afterwards; None: gone)."""
    kind = event.type
    if kind == "vm.undefined":
        if current is None or current.state == "shut off":
            return current is not None, None
        return False, current  # a running VM that is undefined keeps running (transient now)
    if kind == "vm.defined" and current is None:
        return True, MirroredVm(name=event.vm, state="shut off", id=None)
    state = event.state
    if state is None:
        return False, current
    domain_id = None if state == "shut off" else (current.id if current is not None else None)
    after = MirroredVm(name=event.vm, state=state, id=domain_id)
    return after != current, after


def differences(before: list[MirroredVm], after: list[MirroredVm]) -> list[tuple[str, str, str]]:
    """(VM, state before, state after) for every VM whose state differs between two lists ("absent"
    when missing from one)."""
    old = {vm.name: vm.state for vm in before}
    new = {vm.name: vm.state for vm in after}
    return [(name, old.get(name, "absent"), new.get(name, "absent")) for name in sorted(old.keys() | new.keys())
            if old.get(name) != new.get(name)]


class LeaseLost(Exception):
    """Another worker holds the agent's lease now: this watcher stops."""


# ---------------------------------------------------------------------- the service


class WatchService:
    """Runs this worker's share of the watchers, and answers whether an agent's mirror is fresh."""

    runs_on_event_loop: ClassVar[bool] = True

    def __init__(self, *, storage: Storage, keyring: Keyring, shell: RemoteShell | None, clock: Clock,
                 events: EventLog, lease_seconds: float = LEASE_SECONDS, renew_every: float = RENEW_EVERY,
                 max_age: float = MAX_AGE, resync_delay: float = RESYNC_DELAY,
                 backoff: Callable[[int], float] = backoff_delay,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, idle: float = WATCH_IDLE,
                 monotonic: Callable[[], float] = time.monotonic, start_limit: int = START_LIMIT) -> None:
        self.storage = storage
        self.start_limit = max(1, start_limit)
        self._starting: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self.idle = idle
        self._monotonic = monotonic
        self._marked: dict[int, float] = {}  # agent id -> when this worker last recorded its use
        self.keyring = keyring
        self.shell = shell
        self.clock = clock
        self.events = events
        self.lease_seconds = lease_seconds
        self.renew_every = renew_every
        self.max_age = max_age
        self.resync_delay = resync_delay
        self.backoff = backoff
        self._sleep = sleep
        self._connected: set[int] = set()  # agents whose stream (of this worker) is up
        self.tasks: dict[int, tuple[int, asyncio.Task[None]]] = {}  # agent id -> (revision, watcher)

    # ------------------------------------------------------------------ agents in use

    def want(self, agent_ids: list[int]) -> None:
        """The agents were just used (listed, acted on, streamed): keep a watcher on them for the
        next ``idle`` seconds. Recorded at most once per ``MARK_EVERY`` seconds per agent and
        worker, so a dashboard polling every second costs one small write a minute, not one each."""
        now = self._monotonic()
        due = [a for a in agent_ids if now - self._marked.get(a, -MARK_EVERY - 1) > MARK_EVERY]
        if not due:
            return
        with self.storage.transaction(write=True) as tx:
            tx.want_watch(due, self.clock.now() + timedelta(seconds=self.idle))
        for agent_id in due:
            self._marked[agent_id] = now

    def want_for_user(self, user_id: int, agent_id: int | None = None) -> None:
        """A user follows their events (a stream): their agents (or that one) are in use."""
        with self.storage.transaction() as tx:
            ids = [a.id for a in tx.list_agents(user_id) if agent_id is None or a.id == agent_id]
        self.want(ids)

    # ------------------------------------------------------------------ the read side

    def fresh_mirror(self, agent_id: int) -> tuple[list[MirroredVm], datetime] | None:
        """The agent's mirrored VMs and when they were last confirmed current, if the mirror is
        fresh (``mirror_fresh``); None: ask the host."""
        with self.storage.transaction() as tx:
            status = tx.watch_status(agent_id)
            if not mirror_fresh(status, self.clock.now(), self.max_age):
                return None
            assert status is not None and status.alive_at is not None
            return tx.mirrored_vms(agent_id), status.alive_at

    def fresh_mirrors(self, owner_id: int) -> dict[int, tuple[list[MirroredVm], datetime]]:
        """``fresh_mirror`` of every agent of an owner in one read (the fleet view's, issue 22): the
        agents whose mirror is fresh, each with its VMs and last confirmation; the others are missing."""
        with self.storage.transaction() as tx:
            mirrors = tx.mirrors(owner_id)
        now = self.clock.now()
        return {agent_id: (list(mirror.vms), mirror.status.alive_at) for agent_id, mirror in mirrors.items()
                if mirror.status.alive_at is not None and mirror_fresh(mirror.status, now, self.max_age)}

    # ------------------------------------------------------------------ the supervisor

    async def run(self, holder: str, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: keep this worker's leases, and a watcher running for each agent it
        holds. Its leases are released on the way out (another worker takes over at once)."""
        try:
            while not stop.is_set():
                try:
                    await self.tick(holder)
                except PortalError as error:  # the database is busy or gone: hold nothing we cannot prove
                    log.warning("watch leases not renewed: %s", error)
                    self._stop_all()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.renew_every)
        finally:
            held = list(self.tasks)
            self._stop_all()
            with contextlib.suppress(PortalError):
                await asyncio.to_thread(self._release, holder, held)

    async def tick(self, holder: str) -> list[int]:
        """One renewal: claim and renew leases, start and stop watchers; the agent ids held."""
        agents, held = await asyncio.to_thread(self._claim, holder, list(self.tasks))
        unwanted = [a for a in self.tasks if a not in held]
        for agent_id in unwanted:
            self._stop(agent_id)
        for agent in agents:
            if agent.id not in held:
                continue
            running = self.tasks.get(agent.id)
            if running is not None and (running[0] != agent.revision or running[1].done()):
                self._stop(agent.id)
                running = None
            if running is None:
                self.tasks[agent.id] = (agent.revision, asyncio.create_task(self.watch(agent, holder),
                                                                            name=f"watch-agent-{agent.id}"))
        return sorted(held)

    def _claim(self, holder: str, running: list[int]) -> tuple[list[Agent], set[int]]:
        now = self.clock.now()
        with self.storage.transaction(write=True) as tx:
            agents = [a for a in tx.watched_agents(now) if a.host_key is not None]
            wanted = {a.id for a in agents}
            tx.release_watches(holder, [a for a in running if a not in wanted])  # no longer in use
            held = tx.claim_watches(holder, sorted(wanted), now,
                                    now + timedelta(seconds=self.lease_seconds), sorted(self._connected))
        return agents, set(held)

    def _release(self, holder: str, agent_ids: list[int]) -> None:
        with self.storage.transaction(write=True) as tx:
            tx.release_watches(holder, agent_ids)

    def _stop(self, agent_id: int) -> None:
        _, task = self.tasks.pop(agent_id)
        task.cancel()
        self._connected.discard(agent_id)

    def _stop_all(self) -> None:
        for agent_id in list(self.tasks):
            self._stop(agent_id)

    # ------------------------------------------------------------------ one agent's watcher

    async def watch(self, agent: Agent, holder: str) -> None:
        """Watch one agent until cancelled (or its lease is lost): stream its events, resync on
        each (re)connection, retry with back-off, report each outage once."""
        failures = 0
        down = False
        while True:
            reason = "the event stream ended"
            try:
                async with contextlib.AsyncExitStack() as opened:
                    async with self._start_gate():  # a bounded number start at once (issue 22)
                        target = await asyncio.to_thread(self.keyring.open, agent)
                        assert self.shell is not None, "watchers need a remote shell"
                        stream = await opened.enter_async_context(
                            self.shell.stream(target, virsh.event_command(agent.libvirt_uri)))
                        await self._resync(agent, target, holder, reconnected=True, was_down=down)
                    self._connected.add(agent.id)
                    failures, down = 0, False
                    await self._follow(agent, target, holder, stream)
            except LeaseLost:
                self._connected.discard(agent.id)
                return
            except PortalError as error:
                reason = f"{error.code}: {error.detail}"
            except OSError as error:
                reason = f"{type(error).__name__}: {error}"
            self._connected.discard(agent.id)
            failures += 1
            try:
                await asyncio.to_thread(self._down, agent, holder, reason, not down)
            except LeaseLost:
                return
            except PortalError as error:
                log.warning("agent %s: could not record the outage: %s", agent.id, error)
            down = True
            await self._sleep(self.backoff(failures))

    def _start_gate(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._starting is None or self._starting[0] is not loop:
            self._starting = (loop, asyncio.Semaphore(self.start_limit))
        return self._starting[1]

    async def _follow(self, agent: Agent, target: AgentCredentials, holder: str, stream: RemoteStream) -> None:
        lines = EventLines()
        resync: asyncio.Task[None] | None = None
        again = asyncio.Event()  # events came while a resync was listing: it lists once more
        try:
            while True:
                chunk = await stream.read()
                if not chunk:
                    return
                host_events = lines.feed(chunk)
                if not host_events:
                    continue
                await asyncio.to_thread(self._record, agent, holder, host_events)
                if any(e.state is not None or e.type in ("vm.defined", "vm.undefined") for e in host_events):
                    if resync is None or resync.done():
                        resync = asyncio.create_task(self._resync_later(agent, target, holder, again))
                    else:
                        again.set()
        finally:
            if resync is not None:
                resync.cancel()

    async def _resync_later(self, agent: Agent, target: AgentCredentials, holder: str, again: asyncio.Event) -> None:
        """A list after a burst of events (ids, transient VMs). A list taken before an event that was
        recorded before the list is written would put the older state back (a VM being destroyed
        lists as "in shutdown" and stays so): events that come once the list is asked for make it
        list once more."""
        while True:
            await self._sleep(self.resync_delay)
            again.clear()  # events until now are in the list below
            with contextlib.suppress(PortalError):
                await self._resync(agent, target, holder, reconnected=False, was_down=False)
            if not again.is_set():
                return

    async def _resync(self, agent: Agent, target: AgentCredentials, holder: str, *, reconnected: bool,
                      was_down: bool) -> None:
        """List the VMs and make the mirror that list."""
        assert self.shell is not None
        result = await self.shell.run(target, virsh.list_command(agent.libvirt_uri))
        virsh.raise_for_failure(result)
        vms = [MirroredVm(name=vm.name, state=vm.state, id=vm.id) for vm in virsh.parse_list(result.stdout)]
        await asyncio.to_thread(self._replace, agent, holder, vms, reconnected, was_down)

    def _owned(self, tx: Transaction, agent: Agent, holder: str) -> None:
        status = tx.watch_status(agent.id)
        if status is None or status.holder != holder:
            raise LeaseLost()

    def _replace(self, agent: Agent, holder: str, vms: list[MirroredVm], reconnected: bool, was_down: bool) -> None:
        now = self.clock.now()
        with self.storage.transaction(write=True) as tx:
            self._owned(tx, agent, holder)
            before = tx.mirrored_vms(agent.id)
            tx.replace_mirror(agent.id, vms, now)
            if reconnected:
                tx.set_watch_connected(holder, agent.id, True, now)
                # (a first watch has nothing to compare with: every VM would read as changed)
                changed = differences(before, vms) if before else []
                for name, old, new in changed:
                    self.events.add(tx, self.events.new(agent.owner_id, agent.id, name, "vm.changed",
                                                        f"{old} -> {new} (seen when the watcher (re)connected)", now))
                self.events.add(tx, self.events.new(
                    agent.owner_id, agent.id, None, AGENT_WATCHING,
                    f"{'reconnected' if was_down else 'watching'}; resynchronised {len(vms)} VMs, "
                    f"{len(changed)} changed", now))

    def _record(self, agent: Agent, holder: str, host_events: list[HostEvent]) -> None:
        now = self.clock.now()
        with self.storage.transaction(write=True) as tx:
            self._owned(tx, agent, holder)
            mirror = {vm.name: vm for vm in tx.mirrored_vms(agent.id)}
            for host_event in host_events:
                changed, after = mirror_after(mirror.get(host_event.vm), host_event)
                if changed:
                    tx.mirror_vm(agent.id, after, host_event.vm, now)
                    if after is None:
                        mirror.pop(host_event.vm, None)
                    else:
                        mirror[host_event.vm] = after
                self.events.add(tx, self.events.new(agent.owner_id, agent.id, host_event.vm, host_event.type,
                                                    host_event.detail, host_event.at or now))

    def _down(self, agent: Agent, holder: str, reason: str, report: bool) -> None:
        now = self.clock.now()
        with self.storage.transaction(write=True) as tx:
            self._owned(tx, agent, holder)
            tx.set_watch_connected(holder, agent.id, False, now)
            if report:
                self.events.add(tx, self.events.new(agent.owner_id, agent.id, None, AGENT_UNREACHABLE, reason, now))
