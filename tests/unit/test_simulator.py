"""The simulated hosts (tests/simulator.py) print what the portal's parsers read back as the state
they hold, for any VM names and states; the network side is proven against the real lab by
tests/lab/test_simulator_fidelity.py."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from core import virsh
from core.ports import CommandResult
from tests.simulator import SimDomain, SimHost

NAMES = st.from_regex(r"[a-z][a-z0-9 ._-]{0,20}[a-z0-9]", fullmatch=True).filter(
    lambda n: virsh.check_vm_name(n) is None)


def run(host: SimHost, argv: tuple[str, ...]) -> CommandResult:
    reply = host.execute(virsh.command_line(argv))
    return CommandResult(command=argv, exit_status=reply.exit_status, stdout=reply.stdout, stderr=reply.stderr)


@given(st.dictionaries(NAMES, st.sampled_from(["running", "paused", "shut off"]), max_size=8))
def test_virsh_list_of_a_simulated_host_parses_to_its_domains(states: dict[str, str]) -> None:
    host = SimHost("h")
    for number, (name, state) in enumerate(states.items(), start=1):
        host.add_domain(SimDomain(name, state=state, id=None if state == "shut off" else number))
    parsed = virsh.parse_list(run(host, virsh.list_command("qemu:///system")).stdout)
    assert sorted((vm.name, vm.state, vm.id) for vm in parsed) == sorted(
        (d.name, d.state, d.id) for d in host.domains.values())


@given(NAMES, st.lists(NAMES, unique=True, max_size=5))
def test_snapshots_taken_on_a_simulated_host_list_with_their_parents(vm: str, snapshots: list[str]) -> None:
    host = SimHost("h", now=lambda: datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    host.add_domain(SimDomain(vm, disk="/d.qcow2"))
    for name in snapshots:
        assert run(host, virsh.snapshot_create_command("qemu:///system", vm, name)).exit_status == 0
    listed = virsh.parse_snapshot_list(run(host, virsh.snapshot_list_command("qemu:///system", vm)).stdout)
    parents = dict(zip(snapshots, [None, *snapshots], strict=False))
    assert {(s.name, s.parent, s.state, s.created_at) for s in listed} == {
        (name, parents[name], "shutoff", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) for name in snapshots}


def test_a_simulated_host_fails_as_virsh_does_for_an_unknown_vm_and_a_running_one() -> None:
    host = SimHost("h")
    host.add_domain(SimDomain("web", state="running", id=1))
    unknown = run(host, virsh.dominfo_command("qemu:///system", "nope"))
    again = run(host, virsh.action_command("qemu:///system", "web", virsh.VmAction.START))
    assert (unknown.exit_status, unknown.stderr) == (1, "error: failed to get domain 'nope'\n")
    assert (again.exit_status, again.stderr) == (1, "error: Domain is already active\n")


def events_of(host: SimHost, *commands: str) -> list[str]:
    seen: list[str] = []
    stop = host.subscribe(seen.append)
    for command in commands:
        assert host.execute(f"virsh --connect qemu:///system {command}").exit_status == 0, command
    stop()
    return seen


def test_a_simulated_host_emits_libvirts_lifecycle_events_as_its_state_changes() -> None:
    host = SimHost("h")
    host.define(SimDomain("web", disk="/d.qcow2"))
    seen = events_of(host, "start --domain web", "suspend --domain web", "suspend --domain web",
                     "resume --domain web", "snapshot-create-as --domain web --name s1", "destroy --domain web",
                     "snapshot-revert --domain web --snapshotname s1", "autostart --domain web",
                     "snapshot-delete --domain web --snapshotname s1")
    lifecycle = "event 'lifecycle' for domain 'web': "
    assert seen == [lifecycle + "Resumed Unpaused", lifecycle + "Started Booted",
                    lifecycle + "Suspended Paused",  # (suspending it again says nothing)
                    lifecycle + "Resumed Unpaused",
                    lifecycle + "Suspended Paused", "event 'migration-iteration' for domain 'web': iteration: '1'",
                    "event 'migration-iteration' for domain 'web': iteration: '2'", lifecycle + "Resumed Unpaused",
                    lifecycle + "Shutdown Finished after host request", lifecycle + "Stopped Destroyed",
                    lifecycle + "Started Snapshot", lifecycle + "Resumed Snapshot", lifecycle + "Defined Snapshot"]
    # and every line is one the portal's parser reads as the event it is
    parsed = [virsh.parse_event_line(f"{host.event_time()}: {line}") for line in seen]
    assert [e.type if e else None for e in parsed][:4] == ["vm.resumed", "vm.started", "vm.suspended", "vm.resumed"]


def test_a_simulated_host_changed_on_the_host_itself_tells_its_event_listeners_not_its_command_count() -> None:
    host = SimHost("h", now=lambda: datetime(2026, 12, 1, 6, 16, 37, 638_500, tzinfo=UTC))
    seen: list[str] = []
    stop = host.subscribe(seen.append)
    host.define(SimDomain("db"))
    host.on_host("virsh start --domain db")
    host.on_host("virsh destroy --domain db")
    host.on_host("virsh undefine --domain db")
    stop()
    host.define(SimDomain("db"))
    lifecycle = "event 'lifecycle' for domain 'db': "
    assert seen == [lifecycle + "Defined Added", lifecycle + "Resumed Unpaused", lifecycle + "Started Booted",
                    lifecycle + "Shutdown Finished after host request", lifecycle + "Stopped Destroyed",
                    lifecycle + "Undefined Removed"]
    assert host.commands == [] and host.listeners == 0
    assert host.event_time() == "2026-12-01 06:16:37.638+0000"  # as tests/data/virsh-event-lab.txt


def test_virsh_event_without_all_fails_as_virsh_does() -> None:
    reply = SimHost("h").execute("virsh --connect qemu:///system event --loop --timestamp")
    assert (reply.exit_status, reply.stderr, reply.follow) == (
        1, "error: one of --list, --all, or --event <type> is required\n", None)
