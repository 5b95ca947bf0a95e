"""The fleet as metrics: what every host of a caller says about its VMs, sampled at most once per
interval however many scrapers ask (``GET /metrics/vms``). Asynchronous (SSH).

Each host is asked with one ``virsh domstats`` for all of its VMs (plus ``nodeinfo`` and
``version --daemon`` now and then for the host's facts). A sample is kept per agent and shared
by every request of this process: a request that finds one younger than ``min_interval`` gets it,
one that finds a sample being taken waits for that one (single flight). A host that fails is a
sample with ``up`` false and its error, never a failed answer; a host slower than ``deadline``
is answered with its previous sample if it has one (the new one keeps coming in the background).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import ClassVar

import attrs

from core import virsh
from core.errors import CommandTimeout, PortalError
from core.model import Agent, AgentCredentials, Caller
from core.ports import NullObserver, Observer
from core.remote import RemoteCommands, parse_output
from core.virsh import NodeInfo, Versions, VmStats

MIN_INTERVAL = 10.0  # seconds between two asks of one host (MANAGEMENT_METRICS_MIN_INTERVAL)
FACTS_INTERVAL = 300.0  # seconds between two asks of a host's facts (processors, memory, versions)
DEADLINE = 8.0  # seconds an answer waits for hosts (below Prometheus's default 10 s scrape time-out)
PARALLELISM = 8  # hosts of one owner asked at once (each runs its commands one after the other)


@attrs.frozen
class HostSample:
    """What one agent's host said, and when: ``up`` false with ``error`` when it could not be
    asked (then ``vms`` is empty and ``node``/``versions`` None)."""

    agent_id: int
    agent_name: str
    up: bool
    duration_seconds: float  # how long asking the host took
    taken_at: float  # the monotonic clock when the sample was taken
    vms: tuple[VmStats, ...] = ()
    node: NodeInfo | None = None
    versions: Versions | None = None
    error: PortalError | None = attrs.field(default=None, eq=False)


@attrs.frozen
class FleetSample:
    """Every agent of the caller, sampled; ``age_seconds`` of each sample is ``now - taken_at``."""

    hosts: tuple[HostSample, ...]
    now: float


@attrs.define(eq=False)
class _Entry:
    """One agent's samples in this process: the latest (maybe still being taken) and the last done."""

    latest: asyncio.Future[HostSample]
    started: float
    loop: asyncio.AbstractEventLoop  # a sample being taken belongs to one event loop
    last_done: HostSample | None = None
    facts: tuple[float, NodeInfo | None, Versions | None] | None = None  # when asked, and what came


_Key = tuple[int, int, float, int]  # agent id, owner id, creation time, revision


class FleetMetrics:
    """Statistics of the caller's fleet for Prometheus, each host asked at most once per interval."""

    runs_on_event_loop: ClassVar[bool] = True

    def __init__(self, *, remote: RemoteCommands, min_interval: float = MIN_INTERVAL,
                 facts_interval: float = FACTS_INTERVAL, deadline: float = DEADLINE,
                 parallelism: int = PARALLELISM, monotonic: Callable[[], float] = time.monotonic,
                 observer: Observer | None = None) -> None:
        self.remote = remote
        self.min_interval = min_interval
        self.facts_interval = max(facts_interval, min_interval)
        self.deadline = deadline
        self.parallelism = parallelism
        self._monotonic = monotonic
        self._observer: Observer = observer if observer is not None else NullObserver()
        self._entries: dict[_Key, _Entry] = {}
        self._gates: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Semaphore]] = {}

    async def fleet_sample(self, caller: Caller) -> FleetSample:
        """Every agent of the caller with its latest sample: taken now if the last one is older than
        ``min_interval``, shared with concurrent requests, answered within ``deadline``."""
        targets = await asyncio.to_thread(self.remote.targets, caller, set())
        now = self._monotonic()
        self._forget_old(now)
        futures: list[asyncio.Future[HostSample]] = []
        for agent, target in targets:
            if isinstance(target, PortalError):
                futures.append(_done(_failed(agent, target, 0.0, now)))
                continue
            futures.append(self._sample(caller, agent, target, now))
        pending = [future for future in futures if not future.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.deadline)
        hosts = []
        for (agent, _target), future in zip(targets, futures, strict=True):
            if future.done():
                hosts.append(future.result())
                continue
            entry = self._entries.get(_key(agent))
            previous = entry.last_done if entry is not None else None
            hosts.append(previous if previous is not None else _failed(
                agent, CommandTimeout(f"the host did not answer within {self.deadline:g} s (still asking)"),
                self.deadline, now))
        return FleetSample(hosts=tuple(hosts), now=self._monotonic())

    def _sample(self, caller: Caller, agent: Agent, target: AgentCredentials, now: float) -> asyncio.Future[HostSample]:
        key = _key(agent)
        entry = self._entries.get(key)
        loop = asyncio.get_running_loop()
        if entry is not None and entry.loop is not loop and not entry.latest.done():
            entry = None  # left running on an event loop that is gone (a script's earlier asyncio.run)
        if entry is not None and (not entry.latest.done() or now - entry.started < self.min_interval):
            if entry.latest.done() and entry.loop is not loop:
                return _done(entry.latest.result())
            return entry.latest  # being taken, or fresh enough: shared
        for older in [k for k in self._entries if k[0] == agent.id and k != key]:
            del self._entries[older]  # the agent's settings changed: its old samples go
        task = asyncio.ensure_future(self._ask(caller, agent, target, key))
        if entry is None:
            previous = self._entries.get(key)
            entry = self._entries[key] = _Entry(latest=task, started=now, loop=loop)
            if previous is not None:
                entry.last_done, entry.facts = previous.last_done, previous.facts
        else:
            entry.latest, entry.started, entry.loop = task, now, loop
        return task

    async def _ask(self, caller: Caller, agent: Agent, target: AgentCredentials, key: _Key) -> HostSample:
        """Ask one host (never raises: a failure is the sample)."""
        loop = asyncio.get_running_loop()
        gated = self._gates.get(agent.owner_id)
        if gated is None or gated[0] is not loop:  # a semaphore serves one event loop
            gated = self._gates[agent.owner_id] = (loop, asyncio.Semaphore(max(1, self.parallelism)))
        async with gated[1]:
            started = self._monotonic()
            uri = agent.libvirt_uri
            entry = self._entries.get(key)
            try:
                result = await self.remote.run(caller, target, virsh.host_stats_command(uri))
                virsh.raise_for_failure(result)
                # Always off the loop: about 0.3 ms of CPU per VM, and a
                # scrape parses every host at once (docs/performance.md, "Fleet metrics").
                vms = await asyncio.to_thread(virsh.parse_host_stats, result.stdout)
                facts = entry.facts if entry is not None else None
                if facts is None or started - facts[0] >= self.facts_interval:
                    facts = (started, *await self._facts(caller, target, uri))
                    if entry is not None:
                        entry.facts = facts
            except PortalError as error:
                sample = _failed(agent, error, self._monotonic() - started, started)
                self._observer.fleet_host_sampled(error.code, sample.duration_seconds)
            else:
                sample = HostSample(agent_id=agent.id, agent_name=agent.name, up=True,
                                    duration_seconds=self._monotonic() - started, taken_at=started,
                                    vms=tuple(vms), node=facts[1], versions=facts[2])
                self._observer.fleet_host_sampled("ok", sample.duration_seconds)
        if entry is not None:
            entry.last_done = sample
        return sample

    async def _facts(self, caller: Caller, target: AgentCredentials,
                     uri: str) -> tuple[NodeInfo | None, Versions | None]:
        """The host's processors, memory and versions; a failure here leaves them unknown (the
        statistics already came)."""
        try:
            node = await self.remote.run(caller, target, virsh.nodeinfo_command(uri))
            version = await self.remote.run(caller, target, virsh.version_command(uri))
        except PortalError:
            return None, None
        return (await parse_output(virsh.parse_nodeinfo, node.stdout) if node.exit_status == 0 else None,
                await parse_output(virsh.parse_version, version.stdout) if version.exit_status == 0 else None)

    def _forget_old(self, now: float) -> None:
        """Drop samples of agents nobody asked about for a long time (deleted agents, gone users)."""
        horizon = max(600.0, 10 * self.facts_interval)
        for key in [k for k, e in self._entries.items() if e.latest.done() and now - e.started > horizon]:
            del self._entries[key]


def _key(agent: Agent) -> _Key:
    return agent.id, agent.owner_id, agent.created_at.timestamp(), agent.revision


def _failed(agent: Agent, error: PortalError, duration: float, at: float) -> HostSample:
    return HostSample(agent_id=agent.id, agent_name=agent.name, up=False, duration_seconds=duration, taken_at=at,
                      error=error)


def _done(sample: HostSample) -> asyncio.Future[HostSample]:
    future: asyncio.Future[HostSample] = asyncio.get_running_loop().create_future()
    future.set_result(sample)
    return future
