"""The VM use cases past list, info and plain actions: waiting for a state, suspend/resume,
autostart, stats, snapshots, the fleet view, host facts and checks, against the in-memory world of
``tests/unit/world.py``. Waiting runs on its fake clock: the portal's ``sleep`` advances it, so
nothing here sleeps for real."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import attrs
import pytest

from core.commands import NewSnapshot
from core.errors import (
    AgentUnreachable,
    CommandTimeout,
    Conflict,
    NotFound,
    RemoteTimeout,
    ValidationFailed,
    WaitTimedOut,
    error_classes,
)
from core.model import DEFAULT_LIBVIRT_URI, Agent, AgentCredentials, Caller, HostKey
from core.ports import CommandResult, PinHostKey
from core.results import AgentCheck, Failure
from core.virsh import BlockStats, Snapshot, VmAction, VmSummary
from tests.unit.world import FakeShell, World, events, fail, make_caller, make_world, ok, register

LIST_OUTPUT = (" Id   Name         State\n"
               "-----------------------------\n"
               " 1    lab-guest1   running\n"
               " -    lab-disk     shut off\n"
               "\n")
SNAPSHOTS = (" Name    Creation Time               State     Parent\n"
             "-------------------------------------------------------\n"
             " s two   2026-11-26 15:48:22 +0000   running   s1\n"
             " s1      2026-11-26 15:48:22 +0000   shutoff   \n"
             "\n")
NODEINFO = ("CPU model:           x86_64\nCPU(s):              2\nCPU frequency:       2596 MHz\n"
            "CPU socket(s):       1\nCore(s) per socket:  2\nThread(s) per core:  1\nNUMA cell(s):        1\n"
            "Memory size:         5597400 KiB\n\n")
VERSION = ("Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\nUsing API: QEMU 9.0.0\n"
           "Running hypervisor: QEMU 7.2.22\nRunning against daemon: 9.0.0\n\n")
STATE_NUMBERS = {"running": 1, "paused": 3, "shut off": 5}
HOSTILE = ["--help", "-c", "$(id)", "a;b", "a\nb", "a'b", "a/b", ""]


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def world() -> World:
    return make_world(poll_interval=0.25, fleet_parallelism=3)


# ---------------------------------------------------------------------------------------- helpers


def argv(*args: str) -> tuple[str, ...]:
    return ("virsh", "--connect", DEFAULT_LIBVIRT_URI, *args)


def states(world: World, vm: str, *names: str) -> None:
    """The VM's state as successive polls will see it (the last one stays)."""
    command = argv("domstats", "--domain", vm, "--state")
    world.shell.sequences[command] = [
        ok(command, f"Domain: '{vm}'\n  state.state={STATE_NUMBERS[n]}\n  state.reason=1\n\n") for n in names]


def polls(world: World) -> int:
    return sum(1 for _, command in world.shell.calls if command[3] == "domstats")


# ---------------------------------------------------------------------------------------- waiting


def test_waiting_polls_until_the_target_state_and_answers_it(world: World, alice: Caller, agent: Agent) -> None:
    states(world, "lab-disk", "running", "running", "shut off")

    waited = asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "lab-disk", VmAction.SHUTDOWN, 30))

    assert (waited.state, waited.waited_seconds) == ("shut off", 0.5)
    assert waited.result.command == argv("shutdown", "--domain", "lab-disk")
    assert world.time.sleeps == [0.25, 0.25]
    assert [c for _, c in world.shell.calls] == [argv("shutdown", "--domain", "lab-disk")] + \
        [argv("domstats", "--domain", "lab-disk", "--state")] * 3


@pytest.mark.parametrize(("action", "seen"), [
    (VmAction.START, "running"), (VmAction.FORCE_STOP, "shut off"), (VmAction.REBOOT, "running"),
    (VmAction.SUSPEND, "paused"), (VmAction.RESUME, "running"),
], ids=lambda v: getattr(v, "value", v))
def test_a_state_reached_at_once_answers_after_one_poll(world: World, alice: Caller, agent: Agent, action: VmAction,
                                                        seen: str) -> None:
    states(world, "vm1", seen)
    waited = asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", action, 10))
    assert (waited.state, waited.waited_seconds, world.time.sleeps) == (seen, 0.0, [])
    assert waited.result.command == argv(action.subcommand, "--domain", "vm1")


def test_a_wait_that_runs_out_is_a_timeout_carrying_the_state_it_is_in(world: World, alice: Caller,
                                                                       agent: Agent) -> None:
    states(world, "lab-disk", "running")

    with pytest.raises(WaitTimedOut) as raised:
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "lab-disk", VmAction.SHUTDOWN, 1))

    assert (raised.value.code, raised.value.state, raised.value.target_state) == ("wait_timeout", "running", "shut off")
    assert isinstance(raised.value, RemoteTimeout)  # a 504
    assert world.time.sleeps == [0.25] * 4 and polls(world) == 5  # at 0, .25, .5, .75 and 1 s, then no more


def test_the_last_sleep_ends_at_the_deadline(world: World, alice: Caller, agent: Agent) -> None:
    world.portal.vms.poll_interval = 0.4
    states(world, "vm1", "running")
    with pytest.raises(WaitTimedOut):
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.SHUTDOWN, 1))
    assert world.time.sleeps == [0.4, 0.4, 0.2]


def test_wait_zero_looks_once(world: World, alice: Caller, agent: Agent) -> None:
    states(world, "vm1", "running")
    with pytest.raises(WaitTimedOut) as raised:
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.SHUTDOWN, 0))
    assert raised.value.state == "running"
    assert (polls(world), world.time.sleeps) == (1, [])


def test_progress_is_told_of_every_poll(world: World, alice: Caller, agent: Agent) -> None:
    states(world, "vm1", "running", "running", "shut off")
    seen: list[tuple[str | None, float]] = []
    asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.SHUTDOWN, 5,
                                                lambda state, elapsed: seen.append((state, elapsed))))
    assert seen == [("running", 0.0), ("running", 0.25), ("shut off", 0.5)]


@pytest.mark.parametrize("wait", [-1, 301, 10**6])
def test_an_invalid_wait_is_refused_before_anything_runs_and_audited(world: World, alice: Caller, agent: Agent,
                                                                     wait: int) -> None:
    before = len(events(world))
    with pytest.raises(ValidationFailed) as refused:
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.START, wait))
    assert [e.field for e in refused.value.errors] == ["wait"]
    assert world.shell.calls == []
    # refused like an invalid VM name: one event, with the error's code
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.vm, event.agent_id) == ("vm.start", "validation_failed", "vm1",
                                                                      agent.id)


def test_a_host_that_stops_answering_while_waited_for_ends_the_wait_at_its_deadline(world: World, alice: Caller,
                                                                                    agent: Agent) -> None:
    world.portal.vms.poll_interval, world.portal.vms.poll_grace = 5, 0.05
    states(world, "vm1", "running")
    world.shell.hang_after[argv("domstats", "--domain", "vm1", "--state")] = 1

    with pytest.raises(WaitTimedOut) as raised:
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.SHUTDOWN, 1))

    # the first look saw it running; the second never came back, and the wait did not wait for it
    assert (raised.value.state, raised.value.target_state) == ("running", "shut off")
    assert world.time.sleeps == [1]
    [event] = [e for e in events(world) if e.action == "vm.shutdown"]
    assert event.outcome == "ok"


def test_a_first_look_that_never_comes_back_is_a_timeout_in_an_unknown_state(world: World, alice: Caller,
                                                                             agent: Agent) -> None:
    world.portal.vms.poll_grace = 0.05
    world.shell.hang_after[argv("domstats", "--domain", "vm1", "--state")] = 0
    with pytest.raises(WaitTimedOut) as raised:
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.START, 0))
    assert (raised.value.code, raised.value.state) == ("wait_timeout", None)


def test_a_refused_action_is_not_waited_for(world: World, alice: Caller, agent: Agent) -> None:
    command = argv("start", "--domain", "vm1")
    world.shell.results[command] = fail(command, "error: Domain is already active")
    with pytest.raises(Conflict) as raised:
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.START, 30))
    assert raised.value.code == "vm_already_running"
    assert polls(world) == 0


def test_the_action_is_audited_once_even_when_the_wait_runs_out(world: World, alice: Caller, agent: Agent) -> None:
    states(world, "vm1", "running")
    before = len(events(world))
    with pytest.raises(WaitTimedOut):
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.SHUTDOWN, 1))
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.vm) == ("vm.shutdown", "ok", "vm1")


def test_a_transient_vm_that_disappears_while_stopping_has_reached_shut_off(world: World, alice: Caller,
                                                                             agent: Agent) -> None:
    command = argv("domstats", "--domain", "vm1", "--state")
    world.shell.results[command] = fail(command, "error: failed to get domain 'vm1'")
    result = asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.FORCE_STOP, 10))
    assert result.state == "shut off"


def test_a_vm_that_disappears_while_waited_for_to_run_is_not_found(world: World, alice: Caller,
                                                                   agent: Agent) -> None:
    command = argv("domstats", "--domain", "vm1", "--state")
    world.shell.results[command] = fail(command, "error: failed to get domain 'vm1'")
    with pytest.raises(NotFound) as raised:
        asyncio.run(world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.START, 10))
    assert raised.value.code == "vm_not_found"


# ---------------------------------------------------------------------------------------- suspend, resume, autostart


@pytest.mark.parametrize("action", [VmAction.SUSPEND, VmAction.RESUME], ids=lambda a: a.value)
def test_suspend_and_resume_run_their_subcommand_and_are_audited(world: World, alice: Caller, agent: Agent,
                                                                 action: VmAction) -> None:
    before = len(events(world))
    result = asyncio.run(world.portal.vms.vm_action(alice, agent.id, "lab disk", action))
    assert result.command == argv(action.value, "--domain", "lab disk")
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.vm) == (f"vm.{action.value}", "ok", "lab disk")


def test_resuming_a_running_vm_is_a_conflict(world: World, alice: Caller, agent: Agent) -> None:
    command = argv("resume", "--domain", "vm1")
    world.shell.results[command] = fail(command, "error: Failed to resume domain 'vm1'\n"
                                                 "error: Requested operation is not valid: domain is already running")
    with pytest.raises(Conflict) as raised:
        asyncio.run(world.portal.vms.vm_action(alice, agent.id, "vm1", VmAction.RESUME))
    assert raised.value.code == "vm_already_running"


@pytest.mark.parametrize(("enabled", "extra", "detail"), [(True, (), "enable"), (False, ("--disable",), "disable")])
def test_autostart_runs_virsh_autostart_and_is_audited(world: World, alice: Caller, agent: Agent, enabled: bool,
                                                       extra: tuple[str, ...], detail: str) -> None:
    before = len(events(world))
    result = asyncio.run(world.portal.vms.set_autostart(alice, agent.id, "vm1", enabled))
    assert result.command == argv("autostart", "--domain", "vm1", *extra)
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.vm, event.detail) == ("vm.autostart", "ok", "vm1", detail)


def test_autostart_of_an_unknown_vm_is_not_found_and_audited(world: World, alice: Caller, agent: Agent) -> None:
    command = argv("autostart", "--domain", "nosuch")
    world.shell.results[command] = fail(command, "error: failed to get domain 'nosuch'")
    before = len(events(world))
    with pytest.raises(NotFound):
        asyncio.run(world.portal.vms.set_autostart(alice, agent.id, "nosuch", True))
    [event] = events(world)[before:]
    assert (event.action, event.outcome) == ("vm.autostart", "vm_not_found")


# ---------------------------------------------------------------------------------------- stats


def test_stats_are_parsed_from_domstats_and_not_audited(world: World, alice: Caller, agent: Agent) -> None:
    command = argv("domstats", "--domain", "vm1", "--state", "--cpu-total", "--balloon", "--vcpu", "--interface",
                   "--block")
    world.shell.results[command] = ok(command, "Domain: 'vm1'\n  state.state=1\n  state.reason=1\n  cpu.time=5\n"
                                               "  block.count=1\n  block.0.name=vda\n  block.0.capacity=16\n\n")
    before = len(events(world))
    stats = asyncio.run(world.portal.vms.vm_stats(alice, agent.id, "vm1"))
    assert (stats.name, stats.state, stats.cpu.time_ns) == ("vm1", "running", 5)
    assert stats.block == [BlockStats("vda", None, None, None, None, None, None, None, 16, None)]
    assert events(world)[before:] == []


# ---------------------------------------------------------------------------------------- snapshots


def script_snapshots(world: World, vm: str, current: str | None) -> None:
    world.shell.results[argv("snapshot-list", "--domain", vm, "--parent")] = ok(
        argv("snapshot-list", "--domain", vm, "--parent"), SNAPSHOTS)
    command = argv("snapshot-current", "--domain", vm, "--name")
    world.shell.results[command] = ok(command, f"{current}\n") if current else \
        fail(command, f"error: domain '{vm}' has no current snapshot")


@pytest.mark.parametrize("current", ["s1", None])
def test_snapshots_are_listed_with_the_current_one_marked(world: World, alice: Caller, agent: Agent,
                                                          current: str | None) -> None:
    script_snapshots(world, "lab-disk", current)
    snapshots = asyncio.run(world.portal.snapshots.list_snapshots(alice, agent.id, "lab-disk"))
    assert [(s.name, s.state, s.parent, s.current) for s in snapshots] == [
        ("s two", "running", "s1", False), ("s1", "shutoff", None, current == "s1")]


def test_a_failing_snapshot_current_in_any_language_means_no_current_snapshot(world: World, alice: Caller,
                                                                              agent: Agent) -> None:
    script_snapshots(world, "lab-disk", None)
    command = argv("snapshot-current", "--domain", "lab-disk", "--name")
    world.shell.results[command] = fail(command, "Fehler: Domain 'lab-disk' hat keinen aktuellen Schnappschuss")
    snapshots = asyncio.run(world.portal.snapshots.list_snapshots(alice, agent.id, "lab-disk"))
    assert [(s.name, s.current) for s in snapshots] == [("s two", False), ("s1", False)]


def test_creating_a_snapshot_passes_name_and_description_and_answers_it(world: World, alice: Caller,
                                                                        agent: Agent) -> None:
    script_snapshots(world, "lab-disk", "s1")
    before = len(events(world))
    created = asyncio.run(world.portal.snapshots.create_snapshot(alice, agent.id, "lab-disk",
                                                       NewSnapshot(name="s1", description="--help; $(id)")))
    assert created == Snapshot("s1", created.created_at, "shutoff", None, current=True)
    assert world.shell.calls[0][1] == argv("snapshot-create-as", "--domain", "lab-disk", "--name", "s1",
                                           "--description", "--help; $(id)")
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.vm, event.detail) == ("vm.snapshot_create", "ok", "lab-disk",
                                                                     "snapshot s1")


def test_a_taken_snapshot_name_is_a_conflict_and_audited(world: World, alice: Caller, agent: Agent) -> None:
    command = argv("snapshot-create-as", "--domain", "lab-disk", "--name", "s1")
    world.shell.results[command] = fail(command, "error: operation failed: domain moment s1 already exists")
    before = len(events(world))
    with pytest.raises(Conflict) as raised:
        asyncio.run(world.portal.snapshots.create_snapshot(alice, agent.id, "lab-disk", NewSnapshot(name="s1")))
    assert raised.value.code == "snapshot_name_taken"
    [event] = events(world)[before:]
    assert (event.action, event.outcome) == ("vm.snapshot_create", "snapshot_name_taken")


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_snapshot_names_never_reach_the_shell_and_are_audited(world: World, alice: Caller, agent: Agent,
                                                                      name: str) -> None:
    before = len(events(world))
    calls: list[tuple[str, Any]] = [
        ("name", world.portal.snapshots.create_snapshot(alice, agent.id, "vm1", NewSnapshot(name=name))),
        ("snapshot", world.portal.snapshots.revert_snapshot(alice, agent.id, "vm1", name)),
        ("snapshot", world.portal.snapshots.delete_snapshot(alice, agent.id, "vm1", name)),
    ]
    for field, call in calls:
        with pytest.raises(ValidationFailed) as refused:
            asyncio.run(call)
        assert [e.field for e in refused.value.errors] == [field]
    assert world.shell.calls == []
    assert [(e.action, e.outcome) for e in events(world)[before:]] == [
        ("vm.snapshot_create", "validation_failed"), ("vm.snapshot_revert", "validation_failed"),
        ("vm.snapshot_delete", "validation_failed")]


def test_a_description_with_a_line_break_is_refused(world: World, alice: Caller, agent: Agent) -> None:
    with pytest.raises(ValidationFailed) as refused:
        asyncio.run(world.portal.snapshots.create_snapshot(alice, agent.id, "vm1",
                                                           NewSnapshot(name="s1", description="a\nb")))
    assert [e.field for e in refused.value.errors] == ["description"]
    assert world.shell.calls == []


@pytest.mark.parametrize("operation", ["revert", "delete"])
def test_revert_and_delete_of_a_missing_snapshot_are_not_found(world: World, alice: Caller, agent: Agent,
                                                               operation: str) -> None:
    command = argv(f"snapshot-{operation}", "--domain", "vm1", "--snapshotname", "nosuch")
    world.shell.results[command] = fail(
        command, "error: Domain snapshot not found: no domain snapshot with matching name 'nosuch'")
    before = len(events(world))
    call = world.portal.snapshots.revert_snapshot if operation == "revert" else world.portal.snapshots.delete_snapshot
    with pytest.raises(NotFound) as raised:
        asyncio.run(call(alice, agent.id, "vm1", "nosuch"))
    assert raised.value.code == "snapshot_not_found"
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.vm) == (f"vm.snapshot_{operation}", "snapshot_not_found", "vm1")


def test_revert_and_delete_are_audited_with_the_snapshot(world: World, alice: Caller, agent: Agent) -> None:
    before = len(events(world))
    asyncio.run(world.portal.snapshots.revert_snapshot(alice, agent.id, "vm1", "s1"))
    asyncio.run(world.portal.snapshots.delete_snapshot(alice, agent.id, "vm1", "s1"))
    assert [c for _, c in world.shell.calls] == [
        argv("snapshot-revert", "--domain", "vm1", "--snapshotname", "s1"),
        argv("snapshot-delete", "--domain", "vm1", "--snapshotname", "s1")]
    assert [(e.action, e.detail) for e in events(world)[before:]] == [
        ("vm.snapshot_revert", "snapshot s1"), ("vm.snapshot_delete", "snapshot s1")]


# ---------------------------------------------------------------------------------------- fleet


def fleet_world(world: World, alice: Caller, count: int) -> list[Agent]:
    agents = [register(world, alice, name=f"hv{i}") for i in range(count)]
    world.shell.results[argv("list", "--all")] = ok(argv("list", "--all"), LIST_OUTPUT)
    return agents


def test_the_fleet_lists_every_agent_and_a_dead_one_carries_its_error(world: World, alice: Caller) -> None:
    agents = fleet_world(world, alice, 3)
    world.shell.failures[agents[1].id] = AgentUnreachable("hv1 refused the connection")

    entries = asyncio.run(world.portal.fleet.fleet(alice))

    assert [(e.agent_id, e.agent_name) for e in entries] == [(a.id, a.name) for a in agents]
    assert entries[0].vms == [VmSummary("lab-guest1", "running", 1), VmSummary("lab-disk", "shut off", None)]
    assert (entries[1].vms, entries[1].error) == (None, Failure("agent_unreachable", "hv1 refused the connection"))
    assert entries[2].error is None


def test_the_fleet_filters_by_agent_and_state(world: World, alice: Caller) -> None:
    agents = fleet_world(world, alice, 3)
    entries = asyncio.run(world.portal.fleet.fleet(alice, agent_ids=[agents[2].id, 9999], states=["shut off"]))
    assert [(e.agent_id, e.vms) for e in entries] == [(agents[2].id, [VmSummary("lab-disk", "shut off", None)])]
    assert {agent_id for agent_id, _ in world.shell.calls} == {agents[2].id}


def test_the_fleet_asks_at_most_its_parallelism_of_agents_at_once(world: World, alice: Caller) -> None:
    fleet_world(world, alice, 10)
    entries = asyncio.run(world.portal.fleet.fleet(alice))
    assert len(entries) == 10 and all(e.vms for e in entries)
    assert world.shell.most_running == 3


def test_the_fleet_shows_only_the_callers_agents(world: World, alice: Caller) -> None:
    [alices] = fleet_world(world, alice, 1)
    bob = make_caller(world, "bob")
    assert asyncio.run(world.portal.fleet.fleet(bob)) == []
    assert asyncio.run(world.portal.fleet.fleet(bob, agent_ids=[alices.id])) == []  # asking by id changes nothing
    assert world.shell.calls == []


@pytest.mark.parametrize(("agent_ids", "states", "field"), [([0], [], "agent"), ([], ["shutoff"], "state"),
                                                            ([], ["Running"], "state")])
def test_the_fleet_refuses_bad_filters(world: World, alice: Caller, agent_ids: list[int], states: list[str],
                                       field: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        asyncio.run(world.portal.fleet.fleet(alice, agent_ids=agent_ids, states=states))
    assert [e.field for e in refused.value.errors] == [field]


# ---------------------------------------------------------------------------------------- host facts and checks


def test_host_facts_come_from_three_commands(world: World, alice: Caller, agent: Agent) -> None:
    for command, stdout in [(argv("nodeinfo"), NODEINFO), (argv("version", "--daemon"), VERSION),
                            (argv("hostname"), "hv1.example.com\n\n")]:
        world.shell.results[command] = ok(command, stdout)
    facts = asyncio.run(world.portal.fleet.host_facts(alice, agent.id))
    assert facts.hostname == "hv1.example.com"
    assert (facts.node.cpus, facts.node.memory_kib, facts.versions.libvirt, facts.versions.hypervisor_version) == (
        2, 5597400, "9.0.0", "7.2.22")
    assert sorted(c for _, c in world.shell.calls) == sorted([argv("nodeinfo"), argv("version", "--daemon"),
                                                              argv("hostname")])


def test_a_check_of_a_healthy_agent(world: World, alice: Caller, agent: Agent) -> None:
    before = len(events(world))
    check = asyncio.run(world.portal.fleet.check_agent(alice, agent.id))
    assert check == AgentCheck(reachable=True, authenticated=True, host_key_fingerprint=agent.host_key.fingerprint
                               if agent.host_key else None, libvirt_reachable=True, round_trip_ms=0.0, error=None)
    assert world.shell.calls == [(agent.id, argv("uri"))]
    assert events(world)[before:] == []  # not audited


ERROR_OF_CODE = {cls.code: cls for cls in error_classes()}


@pytest.mark.parametrize(("code", "reachable", "authenticated"), [
    ("agent_unreachable", False, False), ("agent_connect_timeout", False, False),
    ("agent_auth_failed", True, False), ("host_key_unknown", True, False), ("host_key_mismatch", True, False),
    ("libvirt_unavailable", True, True), ("virsh_not_found", True, True), ("command_timeout", True, True),
    ("agent_connection_lost", True, True),
])
def test_a_failing_check_answers_with_the_reason(world: World, alice: Caller, agent: Agent, code: str,
                                                 reachable: bool, authenticated: bool) -> None:
    world.shell.failures[agent.id] = ERROR_OF_CODE[code]("why")
    check = asyncio.run(world.portal.fleet.check_agent(alice, agent.id))
    assert (check.reachable, check.authenticated, check.libvirt_reachable) == (reachable, authenticated, False)
    assert check.error == Failure(code, "why")
    assert (check.round_trip_ms is None) == (not reachable)


def test_libvirt_down_is_a_check_answer_not_an_error(world: World, alice: Caller, agent: Agent) -> None:
    world.shell.results[argv("uri")] = fail(argv("uri"), "error: failed to connect to the hypervisor")
    check = asyncio.run(world.portal.fleet.check_agent(alice, agent.id))
    assert (check.reachable, check.authenticated, check.libvirt_reachable) == (True, True, False)
    assert check.error is not None and check.error.code == "libvirt_unavailable"


def test_a_check_pins_the_first_key_seen_and_reports_it(world: World, alice: Caller) -> None:
    agent = register(world, alice, host_key=None, allow_unknown_hosts=True)
    seen = HostKey(openssh="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISeen", fingerprint="SHA256:Seen")
    world.shell.results[argv("uri")] = attrs.evolve(ok(argv("uri"), "qemu:///system\n"), host_key=seen)
    check = asyncio.run(world.portal.fleet.check_agent(alice, agent.id))
    assert check.host_key_fingerprint == "SHA256:Seen"
    assert world.portal.agents.get_agent(alice, agent.id).host_key == seen


def test_a_check_that_pinned_the_key_and_then_failed_still_reports_the_pinned_key(world: World,
                                                                                   alice: Caller) -> None:
    agent = register(world, alice, host_key=None, allow_unknown_hosts=True)
    seen = HostKey(openssh="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISeen", fingerprint="SHA256:Seen")

    class PinsThenTimesOut(FakeShell):
        async def run(self, target: AgentCredentials, argv: Sequence[str], *,
                      pin: PinHostKey | None = None, counted: bool = True,
                      fresh: bool = False) -> CommandResult:
            assert pin is not None
            await pin(seen)
            raise CommandTimeout("virsh did not finish within 60 s")

    world.portal.remote.shell = PinsThenTimesOut()
    check = asyncio.run(world.portal.fleet.check_agent(alice, agent.id))
    assert (check.reachable, check.authenticated, check.libvirt_reachable) == (True, True, False)
    assert check.host_key_fingerprint == "SHA256:Seen"
    assert [(e.action, e.detail) for e in events(world) if e.action == "agent.pin_host_key"] == [
        ("agent.pin_host_key", "trusted on first use: SHA256:Seen")]


def test_another_users_agent_is_not_found_everywhere(world: World, alice: Caller, agent: Agent) -> None:
    bob = make_caller(world, "bob")
    for call in (world.portal.fleet.check_agent(bob, agent.id), world.portal.fleet.host_facts(bob, agent.id),
                 world.portal.vms.vm_stats(bob, agent.id, "vm1"),
                 world.portal.snapshots.list_snapshots(bob, agent.id, "vm1"),
                 world.portal.vms.set_autostart(bob, agent.id, "vm1", True),
                 world.portal.vms.vm_action_and_wait(bob, agent.id, "vm1", VmAction.SUSPEND, 5)):
        with pytest.raises(NotFound) as raised:
            asyncio.run(call)
        assert raised.value.code == "agent_not_found"
    assert world.shell.calls == []
