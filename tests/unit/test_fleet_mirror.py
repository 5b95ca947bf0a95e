"""The fleet view from the live mirror (issue 22), over the in-memory world: the mirrors of every
agent with a healthy watcher are read in one query and nothing runs on their hosts; an agent whose
watcher is missing, down, or has not confirmed its mirror within ``max_age`` is asked on its host,
alone; ``fresh`` asks every host. Each row says where it comes from and when it was true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from adapters.memory import InMemoryTransaction
from core.live import MirroredVm
from core.model import Agent, Caller
from core.watch import WatchService
from tests.unit.world import World, register, script

LIST = " Id   Name     State\n-------------------------\n 7    web      running\n\n"


def watching(world: World) -> WatchService:
    world.clock.step = timedelta(0)  # the clock moves only when a test says so
    watch = world.portal.watch
    live = WatchService(storage=world.storage, keyring=watch.keyring, shell=world.shell, clock=world.clock,
                        events=world.portal.events, lease_seconds=6, max_age=5)
    world.portal.fleet.live = live
    return live


def healthy(world: World, agent: Agent, vms: list[MirroredVm], *, connected: bool = True,
            confirmed_ago: float = 1.0) -> None:
    """The agent's lease, held by a watcher whose stream is up (or not), which confirmed its
    mirror ``confirmed_ago`` seconds ago."""
    now = world.clock.now()
    confirmed = now - timedelta(seconds=confirmed_ago)
    with world.storage.transaction(write=True) as tx:
        tx.claim_watches("worker-1", [agent.id], confirmed, now + timedelta(seconds=6), [])
        tx.replace_mirror(agent.id, vms, confirmed)
        tx.set_watch_connected("worker-1", agent.id, connected, confirmed)


@pytest.fixture
def agents(world: World, alice: Caller) -> list[Agent]:
    made = [register(world, alice, name=f"hv{i}") for i in range(4)]
    for agent in made:
        script(world, ("virsh", "--connect", agent.libvirt_uri, "list", "--all"), stdout=LIST)
    return made


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the fleet view read a mirror: in one batch (``mirrors``) or one agent at a time."""
    counts = {"mirrors": 0, "watch_status": 0, "mirrored_vms": 0}

    def counting(name: str) -> Callable[..., Any]:
        original = getattr(InMemoryTransaction, name)

        def wrapper(self: InMemoryTransaction, *args: Any) -> Any:
            counts[name] += 1
            return original(self, *args)
        return wrapper

    for name in counts:
        monkeypatch.setattr(InMemoryTransaction, name, counting(name))
    return counts


def test_a_fleet_view_with_every_watcher_healthy_reads_all_mirrors_at_once_and_runs_nothing_on_the_hosts(
        world: World, alice: Caller, agents: list[Agent], reads: dict[str, int]) -> None:
    watching(world)
    for n, agent in enumerate(agents):
        healthy(world, agent, [MirroredVm("db", "shut off", None), MirroredVm("web", "running", n + 1)])
    entries = asyncio.run(world.portal.fleet.fleet(alice))
    assert world.shell.calls == []
    assert reads == {"mirrors": 1, "watch_status": 0, "mirrored_vms": 0}
    assert [(e.agent_id, e.error) for e in entries] == [(a.id, None) for a in agents]
    confirmed = world.clock.now() - timedelta(seconds=1)
    assert {(vm.name, vm.state, vm.source, vm.observed_at) for e in entries for vm in e.vms or []} == {
        ("db", "shut off", "live", confirmed), ("web", "running", "live", confirmed)}
    assert [vm.id for vm in entries[2].vms or []] == [None, 3]
    # the states filter applies to mirrored rows as to the host's
    running = asyncio.run(world.portal.fleet.fleet(alice, states=["running"]))
    assert [[vm.name for vm in e.vms or []] for e in running] == [["web"]] * len(agents)


def test_only_the_agents_whose_watcher_is_not_healthy_are_asked_on_their_host(
        world: World, alice: Caller, agents: list[Agent]) -> None:
    watching(world)
    no_lease, down, stale, fresh = agents
    healthy(world, down, [MirroredVm("old", "running", 1)], connected=False)
    healthy(world, stale, [MirroredVm("old", "running", 1)], confirmed_ago=5.5)  # past max_age (5 s)
    healthy(world, fresh, [MirroredVm("web", "running", 1)], confirmed_ago=4.5)
    entries = {e.agent_id: e for e in asyncio.run(world.portal.fleet.fleet(alice))}
    assert sorted(agent_id for agent_id, _ in world.shell.calls) == sorted([no_lease.id, down.id, stale.id])
    for agent in (no_lease, down, stale):
        assert [(vm.name, vm.id, vm.source, vm.observed_at) for vm in entries[agent.id].vms or []] == [
            ("web", 7, "host", world.clock.now())]
    assert [vm.source for vm in entries[fresh.id].vms or []] == ["live"]


def test_a_view_of_some_agents_asks_those_without_a_healthy_watcher_even_when_others_have_one(
        world: World, alice: Caller, agents: list[Agent]) -> None:
    """The mirrors are read for every agent of the owner; an agent of the view without one is still
    in the view (asked on its host), however many of the owner's other agents are mirrored."""
    watching(world)
    unwatched, *watched = agents
    for agent in watched:
        healthy(world, agent, [MirroredVm("web", "running", 1)])
    entries = asyncio.run(world.portal.fleet.fleet(alice, agent_ids=[unwatched.id]))
    assert [(e.agent_id, [(vm.name, vm.source) for vm in e.vms or []]) for e in entries] == [
        (unwatched.id, [("web", "host")])]
    assert [agent_id for agent_id, _ in world.shell.calls] == [unwatched.id]


def test_a_fresh_fleet_view_asks_every_host_even_with_healthy_watchers(
        world: World, alice: Caller, agents: list[Agent], reads: dict[str, int]) -> None:
    watching(world)
    for agent in agents:
        healthy(world, agent, [MirroredVm("web", "running", 1)])
    entries = asyncio.run(world.portal.fleet.fleet(alice, fresh=True))
    assert len(world.shell.calls) == len(agents) and reads["mirrors"] == 0
    assert {vm.source for e in entries for vm in e.vms or []} == {"host"}


def test_a_fleet_view_marks_its_agents_in_use_so_they_get_watchers(
        world: World, alice: Caller, agents: list[Agent]) -> None:
    watching(world)
    asyncio.run(world.portal.fleet.fleet(alice, agent_ids=[agents[0].id, agents[1].id]))
    with world.storage.transaction() as tx:
        assert [a.id for a in tx.watched_agents(world.clock.now())] == [agents[0].id, agents[1].id]


def test_a_worker_taking_many_leases_starts_a_bounded_number_of_watchers_at_once(
        world: World, alice: Caller, agents: list[Agent]) -> None:
    world.clock.step = timedelta(0)
    watch = world.portal.watch
    live = WatchService(storage=world.storage, keyring=watch.keyring, shell=world.shell, clock=world.clock,
                        events=world.portal.events, start_limit=2)
    list_all = ("virsh", "--connect", agents[0].libvirt_uri, "list", "--all")
    world.shell.hang_after[list_all] = 0  # every first list hangs: the watchers stay "starting"

    def opened() -> list[int]:
        return [agent_id for agent_id, argv in world.shell.calls if "event" in argv]

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):  # the keys are opened in threads: poll, bounded
            while not condition():
                await asyncio.sleep(0.01)

    async def scenario() -> None:
        live.want([a.id for a in agents])
        assert await live.tick("worker-1") == sorted(a.id for a in agents)
        await until(lambda: len(opened()) == 2)
        assert live._start_gate().locked()  # the other two wait at the gate, nothing opened for them
        first = opened()[0]
        live.tasks[first][1].cancel()  # one starting watcher goes away: the next one starts
        await until(lambda: len(opened()) == 3)
        for _, task in live.tasks.values():
            task.cancel()

    asyncio.run(scenario())
