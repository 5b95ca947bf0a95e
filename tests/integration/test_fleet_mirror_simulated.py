"""The fleet view from the live mirror against simulated hosts (issue 22), with the real asyncssh
shell and the real watchers (``virsh event`` answered by tests/simulator.py): once every watcher is
up, a fleet view runs nothing on any host; an agent whose watcher is down is asked directly; a VM
changed on its host shows in the next view without the view asking anyone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from adapters.clock import SystemClock
from adapters.memory import CountingKeyHasher, FakeSshKeys, InMemoryStorage, ReversibleSecretBox
from adapters.ssh import AsyncsshShell
from core.commands import NewAgent, NewUser
from core.model import Caller, Origin, SignupPolicy
from core.portal import assemble
from core.results import FleetEntry
from tests.simulator import SimulatedFleet
from tests.support import LOOPBACK_NETWORKS

HOSTS = 12
LIBVIRT_DOWN = ("error: failed to connect to the hypervisor\nerror: Failed to connect socket to "
                "'/var/run/libvirt/libvirt-sock': No such file or directory")


async def until(condition: Callable[[], bool], within: float = 30.0) -> None:
    async with asyncio.timeout(within):  # watchers work over SSH and in threads: poll, bounded
        while not condition():
            await asyncio.sleep(0.05)


def test_a_warm_fleet_view_with_healthy_watchers_runs_nothing_on_the_hosts_and_asks_an_unwatched_agent() -> None:
    async def scenario() -> None:
        fleet = await SimulatedFleet(HOSTS, latency=0.0).start()
        broken = fleet.hosts[-1]
        broken.state.event_failure = LIBVIRT_DOWN  # its watcher never stays up
        shell = AsyncsshShell(networks=LOOPBACK_NETWORKS, connect_timeout=5)
        portal = assemble(storage=InMemoryStorage(), hasher=CountingKeyHasher(), secrets=ReversibleSecretBox(),
                          ssh_keys=FakeSshKeys(), clock=SystemClock(), signup=SignupPolicy.OPEN, shell=shell,
                          renew_every=0.2, lease_seconds=2, mirror_max_age=1)
        portal.watch.backoff = lambda failures: 3600.0  # a watcher that failed stays down
        created = portal.users.create_user(NewUser(name="alice"), Origin("req", "127.0.0.1"))
        caller = Caller(user=created.user, request_id="req", client_address="127.0.0.1")
        ids = [portal.agents.register_agent(caller, NewAgent(
            name=f"hv{h.index}", hostname="127.0.0.1", port=h.port, username=fleet.username,
            private_key=fleet.client_private_key, host_key=h.host_key)).id for h in fleet.hosts]
        stop = asyncio.Event()
        watchers = asyncio.create_task(portal.watch.run("worker-1", stop))
        try:
            cold = await portal.fleet.fleet(caller)  # from the hosts; the agents are now in use
            assert {vm.source for e in cold for vm in e.vms or []} == {"host"}
            healthy = ids[:-1]
            await until(lambda: set(portal.watch.fresh_mirrors(caller.user.id)) == set(healthy))

            before = [h.commands_run for h in fleet.hosts]
            warm = await portal.fleet.fleet(caller)
            asked = [h.index for h, n in zip(fleet.hosts, before, strict=True) if h.commands_run != n]
            assert asked == [broken.index]  # only the agent whose watcher is down
            assert [e.error for e in warm] == [None] * HOSTS
            assert [{vm.source for vm in e.vms or []} for e in warm] == [{"live"}] * (HOSTS - 1) + [{"host"}]
            assert [sorted((vm.name, vm.state) for vm in e.vms or []) for e in warm] == [
                sorted((vm.name, vm.state) for vm in c.vms or []) for c in cold]

            # A VM started on the host itself: a later view sees it from the mirror (the watcher
            # applied libvirt's event), with nothing asked by the view
            fleet.hosts[0].state.on_host("virsh start --domain vm-0-1")

            async def seen_running() -> FleetEntry:
                async with asyncio.timeout(30):
                    while True:
                        entry = (await portal.fleet.fleet(caller, agent_ids=[ids[0]]))[0]
                        if any(vm.name == "vm-0-1" and vm.state == "running" for vm in entry.vms or []):
                            return entry
                        await asyncio.sleep(0.05)

            assert {vm.source for vm in (await seen_running()).vms or []} == {"live"}
        finally:
            stop.set()
            await watchers
            await shell.close()
            await fleet.close()
        assert all(h.state.listeners == 0 for h in fleet.hosts)  # every event stream ended with its channel

    asyncio.run(scenario())
