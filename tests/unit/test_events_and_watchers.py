"""Events, watcher leases and the live mirror, over the in-memory world: the history and its
filters, the portal's own actions as events, one lease per agent, the watcher's mirror and its
outage reports, and lists answered from a fresh mirror without running anything on the host."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest

from core.errors import AgentNotFound, ValidationFailed
from core.events import EventLog
from core.live import MirroredVm, WatchStatus
from core.model import Agent, Caller
from core.virsh import HostEvent, VmAction
from core.watch import WatchService, backoff_delay, differences, mirror_after, mirror_fresh
from tests.unit.world import World, ok, script

LIST = " Id   Name     State\n-------------------------\n 3    web      running\n -    db       shut off\n\n"
LIST_AFTER = " Id   Name     State\n-------------------------\n 3    web      paused\n 4    db       running\n\n"
EVENTS = (b"2026-12-01 06:16:37.638+0000: event 'lifecycle' for domain 'db': Started Booted\n"
          b"2026-12-01 06:16:39.006+0000: event 'lifecycle' for domain 'web': Suspended Paused\n")


def argv(agent: Agent, *words: str) -> tuple[str, ...]:
    return ("virsh", "--connect", agent.libvirt_uri, *words)


def service(world: World, *, resync_delay: float = 0.0) -> WatchService:
    watch = world.portal.watch
    return WatchService(storage=world.storage, keyring=watch.keyring, shell=world.shell, clock=world.clock,
                        events=world.portal.events, lease_seconds=6, renew_every=1, max_age=5,
                        resync_delay=resync_delay, backoff=lambda failures: 3600)


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (bounded) until ``condition`` holds: the watcher works in threads (storage)."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


def types_of(world: World, caller: Caller) -> list[str]:
    return [e.type for e in world.portal.events.list_events(caller)]


def test_portal_vm_actions_are_events_of_their_caller_with_the_outcome(world: World, alice: Caller, bob: Caller,
                                                                       agent: Agent) -> None:
    asyncio.run(world.portal.vms.vm_action(alice, agent.id, "web", VmAction.START))
    events = world.portal.events.list_events(alice)
    assert [(e.type, e.vm, e.agent_id) for e in events] == [("action.start", "web", agent.id)]
    assert events[0].detail.startswith("ok")
    assert world.portal.events.list_events(bob) == []


def test_events_page_after_an_id_and_filter_by_agent_vm_and_type(world: World, alice: Caller, agent: Agent) -> None:
    for vm in ("a", "b", "a"):
        asyncio.run(world.portal.vms.vm_action(alice, agent.id, vm, VmAction.START))
    asyncio.run(world.portal.vms.vm_action(alice, agent.id, "a", VmAction.FORCE_STOP))
    log = world.portal.events
    every = log.list_events(alice)
    assert [e.id for e in every] == sorted(e.id for e in every)
    assert [e.vm for e in log.list_events(alice, after=every[1].id)] == ["a", "a"]
    assert [e.type for e in log.list_events(alice, vm="a", types=["action.force-stop"])] == ["action.force-stop"]
    assert log.list_events(alice, agent_id=agent.id + 1) == []
    assert len(log.list_events(alice, limit=2)) == 2


@pytest.mark.parametrize("bad", [{"vm": "a;b"}, {"types": ["Started"]}, {"types": ["vm."]}, {"agent_id": 0},
                                 {"after": -1}, {"limit": 0}, {"limit": 501}])
def test_invalid_event_filters_are_refused_naming_the_field(world: World, alice: Caller,
                                                             bad: dict[str, object]) -> None:
    with pytest.raises(ValidationFailed):
        world.portal.events.list_events(alice, **bad)  # type: ignore[arg-type]


def test_retention_keeps_each_users_newest_events_only(world: World, alice: Caller, agent: Agent) -> None:
    log = EventLog(storage=world.storage, clock=world.clock, retention=5)
    with world.storage.transaction(write=True) as tx:
        for n in range(100):
            log.add(tx, log.new(alice.user.id, agent.id, f"vm{n}", "vm.started", ""))
    kept = log.list_events(alice, limit=500)
    assert len(kept) <= 5 + 32 and kept[-1].vm == "vm99"


def test_only_one_holder_gets_an_agents_lease_until_it_expires(world: World, agent: Agent) -> None:
    now = world.clock.now()
    with world.storage.transaction(write=True) as tx:
        assert tx.claim_watches("a", [agent.id], now, now + timedelta(seconds=6), []) == [agent.id]
        assert tx.claim_watches("b", [agent.id], now + timedelta(seconds=5), now + timedelta(seconds=11), []) == []
        assert tx.claim_watches("b", [agent.id], now + timedelta(seconds=7), now + timedelta(seconds=13), []) == [
            agent.id]
        assert tx.claim_watches("a", [agent.id], now + timedelta(seconds=8), now + timedelta(seconds=14), []) == []


def test_mirror_is_fresh_only_while_connected_confirmed_and_leased() -> None:
    now = __import__("datetime").datetime(2026, 1, 1, tzinfo=__import__("datetime").UTC)
    status = WatchStatus(agent_id=1, holder="a", expires_at=now + timedelta(seconds=3), connected=True,
                         alive_at=now - timedelta(seconds=2))
    assert mirror_fresh(status, now, 5)
    assert not mirror_fresh(status, now, 1)
    assert not mirror_fresh(None, now, 5)
    assert not mirror_fresh(WatchStatus(1, "a", now + timedelta(seconds=3), False, None), now, 5)
    assert not mirror_fresh(WatchStatus(1, "a", now - timedelta(seconds=1), True, now), now, 5)


def test_lifecycle_events_move_the_mirrored_state() -> None:
    started = HostEvent(at=None, vm="db", type="vm.started", detail="Booted")
    assert mirror_after(MirroredVm("db", "shut off", None), started) == (True, MirroredVm("db", "running", None))
    assert mirror_after(None, HostEvent(None, "new", "vm.defined", "Added")) == (True, MirroredVm("new", "shut off",
                                                                                                  None))
    assert mirror_after(MirroredVm("old", "shut off", None), HostEvent(None, "old", "vm.undefined", "")) == (True,
                                                                                                             None)
    assert mirror_after(MirroredVm("x", "running", 4), HostEvent(None, "x", "vm.reboot", "")) == (
        False, MirroredVm("x", "running", 4))
    assert differences([MirroredVm("a", "running", 1)], [MirroredVm("a", "shut off", None), MirroredVm("b", "x", 2)]
                       ) == [("a", "running", "shut off"), ("b", "absent", "x")]
    assert [backoff_delay(n) for n in range(7)] == [0, 1, 2, 4, 8, 16, 30]


def test_a_watcher_resyncs_mirrors_host_events_and_lists_come_from_the_mirror(
        world: World, alice: Caller, agent: Agent) -> None:
    world.shell.sequences[argv(agent, "list", "--all")] = [ok(argv(agent, "list", "--all"), LIST),
                                                           ok(argv(agent, "list", "--all"), LIST_AFTER)]
    world.shell.streams[argv(agent, "event", "--all", "--loop", "--timestamp")] = EVENTS
    watch = service(world)

    async def scenario() -> None:
        world.shell.hold = asyncio.Event()
        assert await watch.tick("worker-1") == []  # registered, never used: not watched
        watch.want([agent.id])  # used (a list, an action, a stream): watched from the next renewal
        assert await watch.tick("worker-1") == [agent.id]
        await until(lambda: types_of(world, alice)[:3] == ["agent.watching", "vm.started", "vm.suspended"])
        # the burst of lifecycle events is followed by one list (ids, transient VMs)
        await until(lambda: [c for _, c in world.shell.calls].count(argv(agent, "list", "--all")) == 2)
        # the stream is up: the list comes from the mirror, nothing runs on the host
        await watch.tick("worker-1")
        calls = len(world.shell.calls)
        world.portal.vms.live = watch
        vms = await world.portal.vms.list_vms(alice, agent.id)
        assert len(world.shell.calls) == calls
        assert {(vm.name, vm.state, vm.id, vm.source) for vm in vms} == {("db", "running", 4, "live"),
                                                                         ("web", "paused", 3, "live")}
        fresh = await world.portal.vms.list_vms(alice, agent.id, fresh=True)
        assert {vm.source for vm in fresh} == {"host"} and len(world.shell.calls) == calls + 1
        for _, task in watch.tasks.values():
            task.cancel()

    asyncio.run(scenario())
    types = [e.type for e in world.portal.events.list_events(alice)]
    assert types[:3] == ["agent.watching", "vm.started", "vm.suspended"]


def test_a_stream_that_ends_is_one_unreachable_event_and_lists_fall_back_to_the_host(
        world: World, alice: Caller, agent: Agent) -> None:
    script(world, argv(agent, "list", "--all"), stdout=LIST)
    watch = service(world)  # the scripted stream prints nothing and ends

    async def scenario() -> None:
        watch.want([agent.id])
        await watch.tick("worker-1")
        await until(lambda: "agent.unreachable" in types_of(world, alice))
        world.portal.vms.live = watch
        vms = await world.portal.vms.list_vms(alice, agent.id)
        assert {vm.source for vm in vms} == {"host"}
        for _, task in watch.tasks.values():
            task.cancel()

    asyncio.run(scenario())
    assert [e.type for e in world.portal.events.list_events(alice)] == ["agent.watching", "agent.unreachable"]


def test_the_mirror_of_another_users_agent_is_not_found(world: World, alice: Caller, bob: Caller,
                                                        agent: Agent) -> None:
    with pytest.raises(AgentNotFound):
        asyncio.run(world.portal.vms.list_vms(bob, agent.id))


def test_a_host_that_cannot_be_reached_is_one_unreachable_event_and_the_watcher_retries(
        world: World, alice: Caller, agent: Agent) -> None:
    from core.errors import AgentUnreachable

    class DeadHost(type(world.shell)):  # type: ignore[misc]
        def stream(self, target: object, argv: object, **_: object) -> object:
            self.calls.append((agent.id, ("stream",)))
            raise AgentUnreachable("192.0.2.15:22 refused the connection")

    world.shell.__class__ = DeadHost
    delays: list[int] = []

    async def no_wait(_seconds: float) -> None:
        await asyncio.sleep(0)

    watch = WatchService(storage=world.storage, keyring=world.portal.watch.keyring, shell=world.shell,
                         clock=world.clock, events=world.portal.events,
                         backoff=lambda failures: delays.append(failures) or 0.0, sleep=no_wait)

    async def scenario() -> None:
        watch.want([agent.id])
        await watch.tick("worker-1")
        await until(lambda: len(delays) >= 3)  # retried, with growing failure counts
        for _, task in watch.tasks.values():
            task.cancel()

    asyncio.run(scenario())
    assert delays[:3] == [1, 2, 3]
    unreachable = [e for e in world.portal.events.list_events(alice) if e.type == "agent.unreachable"]
    assert len(unreachable) == 1 and "agent_unreachable" in unreachable[0].detail


def test_an_agent_stops_being_watched_once_unused_for_the_idle_time(world: World, alice: Caller, agent: Agent) -> None:
    watch = WatchService(storage=world.storage, keyring=world.portal.watch.keyring, shell=None, clock=world.clock,
                         events=world.portal.events, idle=600)
    watch.want([agent.id])
    assert [a.id for a in watch._claim("w", [])[0]] == [agent.id]
    world.clock.current += timedelta(seconds=601)
    agents, held = watch._claim("w", [agent.id])
    assert agents == [] and held == set()
    with world.storage.transaction() as tx:
        assert tx.watch_status(agent.id) is None  # its lease was released: another worker need not wait


class _FedStream:
    """A watcher's event stream that prints what the test feeds it, when it feeds it."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[bytes] = asyncio.Queue()

    async def read(self, limit: int = 65536) -> bytes:
        return await self.chunks.get()

    async def read_stderr(self, limit: int = 65536) -> bytes:
        return b""

    async def write(self, data: bytes) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def wait_closed(self) -> int | None:
        return 0


def test_an_event_recorded_while_a_resync_lists_is_not_undone_by_that_older_list(
        world: World, alice: Caller, agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    # The lab's race: a VM started, then destroyed at once. The resync after "Started" lists while
    # the VM is being destroyed ("in shutdown"); "Stopped Destroyed" is recorded meanwhile; then
    # the older list is written. Another list must follow, or the mirror says "in shutdown" for good.
    listed = {"web": ["shut off", "in shutdown", "shut off"]}  # the host's answer to each list, in turn
    lists_run: list[str] = []
    second_list_asked, release = asyncio.Event(), asyncio.Event()
    stream = _FedStream()

    async def run(target: Any, argv: Any, **_options: Any) -> Any:
        state = listed["web"][min(len(lists_run), 2)]
        lists_run.append(state)
        if len(lists_run) == 2:  # the resync after "Started": slow, overtaken by "Stopped"
            second_list_asked.set()
            await release.wait()
        ident = "3" if state != "shut off" else "-"
        return ok(tuple(argv), f" Id   Name   State\n---------------------\n {ident}    web    {state}\n\n")

    @contextlib.asynccontextmanager
    async def fed(target: Any, argv: Any, **_options: Any) -> AsyncIterator[_FedStream]:
        yield stream

    monkeypatch.setattr(world.shell, "run", run)
    monkeypatch.setattr(world.shell, "stream", fed)
    watch = service(world)

    def mirrored() -> str | None:
        with world.storage.transaction() as tx:
            return next((vm.state for vm in tx.mirrored_vms(agent.id)), None)

    async def scenario() -> None:
        watch.want([agent.id])
        await watch.tick("worker-1")
        await until(lambda: mirrored() == "shut off")
        stream.chunks.put_nowait(b"2026-12-01 06:16:40.000+0000: event 'lifecycle' for domain 'web': "
                                 b"Started Booted\n")
        await asyncio.wait_for(second_list_asked.wait(), 10)
        stream.chunks.put_nowait(b"2026-12-01 06:16:40.100+0000: event 'lifecycle' for domain 'web': "
                                 b"Stopped Destroyed\n")
        await until(lambda: "vm.stopped" in types_of(world, alice))
        release.set()  # the older list ("in shutdown") is written now
        await until(lambda: len(lists_run) == 3 and mirrored() == "shut off")
        for _, task in watch.tasks.values():
            task.cancel()

    asyncio.run(scenario())
    assert lists_run == ["shut off", "in shutdown", "shut off"]
