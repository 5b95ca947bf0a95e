"""A VM's lifecycle on an agent: list, inspect, start, shut down, force-stop, reboot, suspend,
resume (optionally waiting for the state), autostart, statistics. Asynchronous: each use case runs
on the event loop and awaits the SSH command; storage is reached in a thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

import attrs

from core import virsh
from core.credentials import owned_agent
from core.errors import ValidationFailed, VmNotFound, WaitTimedOut
from core.model import AgentCredentials, Caller
from core.ports import CommandResult
from core.remote import RemoteCommands, parse_output
from core.results import VmInfo, WaitedAction
from core.virsh import VmAction, VmStats, VmSummary
from core.watch import WatchService

POLL_INTERVAL = 0.25  # seconds between two state polls while waiting
POLL_GRACE = 2.0  # seconds one state poll may run past the wait's deadline before the wait gives up

# Told of every poll while waiting: the state seen and the seconds since the wait began.
Progress = Callable[[str | None, float], None]


class VmService:
    """The lifecycle of the VMs on the caller's agents."""

    runs_on_event_loop: ClassVar[bool] = True

    def __init__(self, *, remote: RemoteCommands, poll_interval: float = POLL_INTERVAL,
                 poll_grace: float = POLL_GRACE, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, live: WatchService | None = None) -> None:
        self.remote = remote
        self.live = live
        # Waiting on a VM's state: how often to poll, and the clock and sleep to do it with
        # (injectable, so tests wait on a fake clock instead of the wall clock).
        self.poll_interval = poll_interval
        self.poll_grace = poll_grace
        self._monotonic = monotonic
        self._sleep = sleep

    async def list_vms(self, caller: Caller, agent_id: int, *, fresh: bool = False) -> list[VmSummary]:
        """Every VM the agent's libvirt knows: from the agent's live mirror while its watcher is
        healthy (``source="live"``, nothing runs on the host), otherwise or with ``fresh`` from
        ``virsh list --all`` (``source="host"``). Each row says when it was known true."""
        if self.live is not None:
            mirrored = await asyncio.to_thread(self._mirrored, caller, agent_id, fresh)
            if mirrored is not None:
                return mirrored
        target = await self.remote.target(caller, agent_id)
        result = await self.remote.run(caller, target, virsh.list_command(target.agent.libvirt_uri))
        virsh.raise_for_failure(result)
        now = self.remote.clock.now()
        return [attrs.evolve(vm, observed_at=now) for vm in await parse_output(virsh.parse_list, result.stdout)]

    def _mirrored(self, caller: Caller, agent_id: int, fresh: bool) -> list[VmSummary] | None:
        assert self.live is not None
        with self.remote.storage.transaction() as tx:
            owned_agent(tx, caller, agent_id)
        self.live.want([agent_id])  # the agent is in use: it gets (or keeps) a watcher
        return None if fresh else live_rows(self.live, agent_id)

    async def vm_info(self, caller: Caller, agent_id: int, vm: str) -> VmInfo:
        """``virsh dominfo`` for one VM; ``VmNotFound`` if the agent has no such VM."""
        virsh.require_vm_name(vm)
        target = await self.remote.target(caller, agent_id)
        result = await self.remote.run(caller, target, virsh.dominfo_command(target.agent.libvirt_uri, vm))
        virsh.raise_for_failure(result, vm)
        return VmInfo(dominfo=await parse_output(virsh.parse_dominfo, result.stdout), raw=result)

    async def vm_action(self, caller: Caller, agent_id: int, vm: str, action: VmAction) -> CommandResult:
        """Start, shut down, force-stop, reboot, suspend or resume a VM; audited whatever the outcome."""
        result, _ = await self._vm_action(caller, agent_id, vm, action)
        return result

    async def _vm_action(self, caller: Caller, agent_id: int, vm: str, action: VmAction,
                         wait: int | None = None) -> tuple[CommandResult, AgentCredentials]:
        def check_wait() -> None:
            problem = None if wait is None else virsh.check_wait(wait)
            if problem is not None:
                raise ValidationFailed.one("wait", problem)

        return await self.remote.audited(caller, f"vm.{action.value.replace('-', '_')}", agent_id, vm,
                                         lambda uri: virsh.action_command(uri, vm, action), None, check=check_wait)

    async def vm_action_and_wait(self, caller: Caller, agent_id: int, vm: str, action: VmAction, wait: int,
                                 progress: Progress | None = None,
                                 abandoned: asyncio.Event | None = None) -> WaitedAction:
        """Run ``action``, then poll the VM's state over the pooled connection every
        ``poll_interval`` seconds until it reaches ``action.target_state`` or ``wait`` seconds have
        passed (``WaitTimedOut``, carrying the state it is in). ``wait=0`` looks once; no look
        outlives the deadline by more than ``poll_grace``. The action is audited as it ends (a
        ``wait`` out of range is refused and audited like an invalid VM name), before the wait;
        nothing holds a transaction or a thread meanwhile. ``progress(state, elapsed)`` is told of
        every poll (the command line shows it). Once ``abandoned`` is set (the HTTP client went away),
        polling stops within one interval and the answer, which nobody will read, carries the state
        last seen: a client that leaves must not keep SSH commands running for minutes."""
        result, target = await self._vm_action(caller, agent_id, vm, action, wait)
        state, waited = await self._wait_for_state(caller, target, vm, action.target_state, wait, progress,
                                                   abandoned)
        return WaitedAction(result=result, state=state, waited_seconds=waited)

    async def _wait_for_state(self, caller: Caller, target: AgentCredentials, vm: str, wanted: str, wait: float,
                              progress: Progress | None, abandoned: asyncio.Event | None) -> tuple[str, float]:
        started = self._monotonic()
        deadline = started + wait
        state: str | None = None
        while True:
            # A host that stops answering must not hold the answer for a whole command time-out:
            # one look may outlive the deadline by ``poll_grace`` at most.
            budget = max(0.0, deadline - self._monotonic()) + self.poll_grace
            try:
                state = await asyncio.wait_for(self._state(caller, target, vm), timeout=budget)
            except VmNotFound:
                if wanted != "shut off":
                    raise
                state = wanted  # a transient VM ceases to exist when it stops: that is "shut off"
            except TimeoutError:
                raise WaitTimedOut(f"VM {vm!r} was last seen {state or 'in an unknown state'}, not {wanted}; the "
                                   f"host stopped answering and the {wait:g} s wait ran out", state=state,
                                   target_state=wanted) from None
            now = self._monotonic()
            if progress is not None:
                progress(state, now - started)
            if state == wanted or (abandoned is not None and abandoned.is_set()):
                return state or "unknown", now - started
            if now >= deadline:
                raise WaitTimedOut(f"VM {vm!r} is {state or 'in an unknown state'}, not {wanted}, after waiting "
                                   f"{wait:g} s", state=state, target_state=wanted)
            await self._sleep(min(self.poll_interval, deadline - now))

    async def _state(self, caller: Caller, target: AgentCredentials, vm: str) -> str | None:
        result = await self.remote.run(caller, target, virsh.state_command(target.agent.libvirt_uri, vm))
        virsh.raise_for_failure(result, vm)
        return await parse_output(virsh.parse_state, result.stdout)

    async def set_autostart(self, caller: Caller, agent_id: int, vm: str, enabled: bool) -> CommandResult:
        """Have libvirt start the VM with the host, or not (``virsh autostart [--disable]``); audited
        as ``vm.autostart`` with ``enable`` or ``disable`` in its detail."""
        result, _ = await self.remote.audited(caller, "vm.autostart", agent_id, vm,
                                              lambda uri: virsh.autostart_command(uri, vm, enabled),
                                              "enable" if enabled else "disable")
        return result

    async def vm_stats(self, caller: Caller, agent_id: int, vm: str) -> VmStats:
        """``virsh domstats`` of one VM: state, CPU time, vCPUs, balloon memory, disks, interfaces."""
        virsh.require_vm_name(vm)
        target = await self.remote.target(caller, agent_id)
        result = await self.remote.run(caller, target, virsh.stats_command(target.agent.libvirt_uri, vm))
        virsh.raise_for_failure(result, vm)
        return await parse_output(virsh.parse_stats, result.stdout, vm)

    async def wait_for_state(self, caller: Caller, target: AgentCredentials, vm: str, wanted: str, wait: float,
                             progress: Progress | None = None,
                             abandoned: asyncio.Event | None = None) -> tuple[str, float]:
        """Poll the VM's state until it is ``wanted`` (as ``vm_action_and_wait`` does after an
        action): the state reached and the seconds it took, or ``WaitTimedOut``. Used by
        provisioning (issue 16) after creating or cloning a VM."""
        return await self._wait_for_state(caller, target, vm, wanted, wait, progress, abandoned)


def live_rows(live: WatchService, agent_id: int) -> list[VmSummary] | None:
    """The agent's VMs from its fresh mirror, as list rows (None: the mirror is not fresh)."""
    mirrored = live.fresh_mirror(agent_id)
    if mirrored is None:
        return None
    vms, observed_at = mirrored
    return [VmSummary(name=vm.name, state=vm.state, id=vm.id, source="live", observed_at=observed_at) for vm in vms]
