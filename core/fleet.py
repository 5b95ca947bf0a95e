"""The fleet: every VM on every agent of a caller at once, what each host says about itself, and
whether the portal can reach, log in to and drive an agent. Asynchronous (SSH)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import ClassVar

import attrs

from core import virsh
from core.errors import AgentAddressRefused, PortalError, RemoteError, ValidationFailed
from core.live import MirroredVm
from core.model import Agent, AgentCredentials, Caller
from core.remote import RemoteCommands, parse_output
from core.results import AgentCheck, Failure, FleetEntry, HostFacts
from core.validation import collect
from core.virsh import VmSummary
from core.watch import WatchService

FLEET_PARALLELISM = 8  # agents asked at once by the fleet view, unless told (MANAGEMENT_FLEET_PARALLELISM)


class FleetService:
    """Views across the caller's agents, and the health of each."""

    runs_on_event_loop: ClassVar[bool] = True

    def __init__(self, *, remote: RemoteCommands, fleet_parallelism: int = FLEET_PARALLELISM,
                 monotonic: Callable[[], float] = time.monotonic, live: WatchService | None = None) -> None:
        self.remote = remote
        self.live = live
        self.fleet_parallelism = fleet_parallelism
        self._monotonic = monotonic

    async def fleet(self, caller: Caller, *, agent_ids: Sequence[int] = (),
                    states: Sequence[str] = (), fresh: bool = False) -> list[FleetEntry]:
        """Every VM on every agent of the caller (or on ``agent_ids`` of them). An agent whose
        watcher is healthy is answered from its live mirror (every agent's mirror in one read,
        nothing run on its host); the others, or all with ``fresh``, are asked on their host, at
        most ``fleet_parallelism`` agents at a time. An agent that fails is an entry with its
        error, so one dead host never fails the answer; ``states`` keeps only VMs in those states.
        Its commands are not counted one by one against the owner's operations: the parallelism
        bounds them (a fleet of hundreds would otherwise be refused past the per-user limit)."""
        errors = collect(*[("agent", None if 1 <= a <= 2**31 - 1 else "must be a positive agent id")
                           for a in agent_ids],
                         *[("state", None if s in virsh.VM_STATES
                            else "must be a state virsh prints: " + ", ".join(virsh.VM_STATES))
                           for s in states])
        if errors:
            raise ValidationFailed(errors)
        plan = await asyncio.to_thread(self._plan, caller, set(agent_ids), fresh, tuple(states))
        gate = asyncio.Semaphore(max(1, self.fleet_parallelism))

        async def one(agent: Agent, target: AgentCredentials | PortalError) -> FleetEntry:
            if isinstance(target, PortalError):
                return FleetEntry(agent.id, agent.name, None, Failure.of(target))
            try:
                async with gate:
                    result = await self.remote.run(caller, target, virsh.list_command(agent.libvirt_uri),
                                                   counted=False)
                virsh.raise_for_failure(result)
            except PortalError as error:
                return FleetEntry(agent.id, agent.name, None, Failure.of(error))
            now = self.remote.clock.now()
            vms = [attrs.evolve(vm, observed_at=now) for vm in await parse_output(virsh.parse_list, result.stdout)
                   if not states or vm.state in states]
            return FleetEntry(agent.id, agent.name, vms, None)

        # Agents answered from their mirror need no task of their own (hundreds of tasks cost more
        # than the whole read): only the hosts to ask are awaited, at most ``fleet_parallelism`` at once.
        asked = iter(await asyncio.gather(*(one(*item) for item in plan if not isinstance(item, FleetEntry))))
        return [item if isinstance(item, FleetEntry) else next(asked) for item in plan]

    def _plan(self, caller: Caller, only: set[int], fresh: bool, states: tuple[str, ...]) -> list[
            FleetEntry | tuple[Agent, AgentCredentials | PortalError]]:
        """For each agent of the view: its entry from its fresh mirror (every agent's mirror in one
        read), or else the agent and the key to ask its host with (or why it cannot be opened). One
        thread hop for the whole view, however many agents; the agents' full rows (and keys) are
        read only for those whose host is asked (issue 22)."""
        names = self.remote.agent_names(caller, only)
        ids = [agent_id for agent_id, _ in names]
        mirrored: dict[int, tuple[list[MirroredVm], datetime]] = {}
        if self.live is not None:  # the listed agents are in use: they get (or keep) a watcher
            self.live.want(ids)
            if not fresh:
                mirrored = self.live.fresh_mirrors(caller.user.id)  # (only ``names``' are used below)
        # ``mirrored`` holds every agent of the owner: which of *this view's* agents have none is
        # what decides (a view limited to some agents, or a key limited to them, reads fewer)
        missing = {i for i in ids if i not in mirrored}
        to_ask = {a.id: a for a in self.remote.agents(caller, missing)} if missing else {}
        plan: list[FleetEntry | tuple[Agent, AgentCredentials | PortalError]] = []
        for agent_id, name in names:
            found = mirrored.get(agent_id)
            if found is not None:
                vms, observed_at = found
                plan.append(FleetEntry(agent_id, name, [
                    VmSummary(name=vm.name, state=vm.state, id=vm.id, source="live", observed_at=observed_at)
                    for vm in vms if not states or vm.state in states], None))
            elif agent_id in to_ask:  # (an agent deleted meanwhile is gone from the view)
                plan.append((to_ask[agent_id], self.remote.open_key(to_ask[agent_id])))
        return plan

    async def host_facts(self, caller: Caller, agent_id: int) -> HostFacts:
        """The hypervisor's host name, ``virsh nodeinfo`` and ``virsh version --daemon``: three
        commands at once over the pooled connection."""
        target = await self.remote.target(caller, agent_id)
        uri = target.agent.libvirt_uri
        node, version, hostname = await asyncio.gather(
            *(self.remote.run(caller, target, argv)
              for argv in (virsh.nodeinfo_command(uri), virsh.version_command(uri), virsh.hostname_command(uri))))
        for result in (node, version, hostname):
            virsh.raise_for_failure(result)
        return HostFacts(hostname=await parse_output(virsh.parse_hostname, hostname.stdout),
                         node=await parse_output(virsh.parse_nodeinfo, node.stdout),
                         versions=await parse_output(virsh.parse_version, version.stdout))

    async def check_agent(self, caller: Caller, agent_id: int) -> AgentCheck:
        """Can the portal reach the agent, log in, and reach libvirt (``virsh uri``)? A failing host
        answers with the reason instead of raising. It always tries to connect, even to a host
        remembered as unreachable (``fresh``), and a success makes the portal forget that. Not
        audited: it changes nothing (except that a first connection may pin the host key, which is
        audited as ``agent.pin_host_key``)."""
        target = await self.remote.target(caller, agent_id)
        started = self._monotonic()
        error: RemoteError | AgentAddressRefused | None = None
        host_key = target.agent.host_key
        try:
            result = await self.remote.run(caller, target, virsh.check_command(target.agent.libvirt_uri), fresh=True)
            host_key = host_key or result.host_key
            virsh.raise_for_failure(result)
        except (RemoteError, AgentAddressRefused) as failed:  # a refused address: nothing was sent
            error = failed
        elapsed_ms = round((self._monotonic() - started) * 1000, 1)
        if host_key is None and target.agent.allow_unknown_hosts:
            # The connection may have pinned the key it saw before the check failed further on.
            host_key = await asyncio.to_thread(self.remote.pinned_host_key, caller, agent_id)
        # How far the connection got is a property of the error's class (core.errors.RemoteError).
        reachable = error is None or error.reached_host
        authenticated = reachable and (error is None or error.logged_in)
        return AgentCheck(
            reachable=reachable,
            authenticated=authenticated,
            host_key_fingerprint=host_key.fingerprint if host_key is not None else None,
            libvirt_reachable=error is None,
            round_trip_ms=elapsed_ms if reachable else None,
            error=Failure.of(error) if error is not None else None,
        )
