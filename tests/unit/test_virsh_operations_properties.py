"""Properties and examples of the ``core.virsh`` pieces for suspend/resume, autostart, stats,
snapshots and host facts: their argument vectors (every name and description refused or handed to
virsh as exactly one argument in its place) and the parsers of ``domstats``, ``snapshot-list``,
``nodeinfo`` and ``version``. List, dominfo and the plain actions are in ``test_virsh_properties.py``.

The samples marked *real* were recorded from libvirt 9.0.0 on the lab (``scripts/lab.sh``), run as
the lab's SSH user with the C locale."""

from __future__ import annotations

import shlex
import unicodedata
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core import virsh
from core.errors import Conflict, NotFound, RemoteError, ValidationFailed
from core.model import DEFAULT_LIBVIRT_URI
from core.ports import CommandResult
from core.virsh import (
    VM_NAME_MAX,
    BlockStats,
    NetStats,
    NodeInfo,
    Snapshot,
    Versions,
    VmAction,
)
from tests.virsh_tables import render_table

URIS = st.sampled_from([DEFAULT_LIBVIRT_URI, "qemu:///session", "qemu+ssh://root@hv2/system"])
ALNUM = st.characters(categories=("Lu", "Ll", "Lt", "Lm", "Lo", "Nd"))
ALLOWED_PUNCTUATION = " ._-+:@,=%"
ACCEPTED_NAMES = st.builds(lambda first, tail: (first + tail).rstrip(" "), ALNUM,
                           st.text(alphabet=st.one_of(ALNUM, st.sampled_from(ALLOWED_PUNCTUATION)), max_size=40))
NAME_ISH = st.text(alphabet="ab1é中 ._-+:@,=%$`;&|<>(){}[]*?!~#'\"\\/\t\n\x00\x1b\u200b", max_size=30)
NAMES = st.one_of(st.text(), NAME_ISH, ACCEPTED_NAMES)
HOSTILE = ["--help", "-c", ";id", "$(id)", "`id`", "a|b", "a\nb", "a'b", "a\x00b", "a/b", "", " a", "a" * 201]
DESCRIPTIONS = st.one_of(st.text(), st.text(alphabet="ab $`'\"\\;|&-\n\t\x00\u2028é", max_size=40),
                         st.text(min_size=990, max_size=1010, alphabet="ab"))


def fields_of(error: ValidationFailed) -> list[str]:
    return [e.field for e in error.errors]


def reaches_virsh_exactly(argv: tuple[str, ...]) -> None:
    assert shlex.split(virsh.command_line(argv)) == list(argv)


# ---------------------------------------------------------------------------------------- argv


VM_BUILDERS: list[tuple[str, Callable[[str, str], tuple[str, ...]], tuple[str, ...], tuple[str, ...]]] = [
    ("suspend", lambda uri, vm: virsh.action_command(uri, vm, VmAction.SUSPEND), ("suspend", "--domain"), ()),
    ("resume", lambda uri, vm: virsh.action_command(uri, vm, VmAction.RESUME), ("resume", "--domain"), ()),
    ("state", virsh.state_command, ("domstats", "--domain"), ("--state",)),
    ("stats", virsh.stats_command, ("domstats", "--domain"),
     ("--state", "--cpu-total", "--balloon", "--vcpu", "--interface", "--block")),
    ("autostart on", lambda uri, vm: virsh.autostart_command(uri, vm, True), ("autostart", "--domain"), ()),
    ("autostart off", lambda uri, vm: virsh.autostart_command(uri, vm, False), ("autostart", "--domain"),
     ("--disable",)),
    ("snapshot list", virsh.snapshot_list_command, ("snapshot-list", "--domain"), ("--parent",)),
    ("snapshot current", virsh.snapshot_current_command, ("snapshot-current", "--domain"), ("--name",)),
]


@given(NAMES, URIS)
@example("lab-disk", DEFAULT_LIBVIRT_URI)
@example("lab disk 2", DEFAULT_LIBVIRT_URI)
def test_every_vm_command_refuses_a_name_or_hands_it_to_virsh_right_after_domain(name: str, uri: str) -> None:
    for _, build, before, after in VM_BUILDERS:
        if virsh.check_vm_name(name) is not None:
            with pytest.raises(ValidationFailed) as refused:
                build(uri, name)
            assert fields_of(refused.value) == ["vm"]
            continue
        argv = build(uri, name)
        assert argv == ("virsh", "--connect", uri, *before, name, *after)
        reaches_virsh_exactly(argv)


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_vm_names_are_refused_by_every_new_command(name: str) -> None:
    for _, build, _, _ in VM_BUILDERS:
        with pytest.raises(ValidationFailed):
            build(DEFAULT_LIBVIRT_URI, name)
    for build_snapshot in (virsh.snapshot_revert_command, virsh.snapshot_delete_command):
        with pytest.raises(ValidationFailed) as refused:
            build_snapshot(DEFAULT_LIBVIRT_URI, name, "s1")
        assert fields_of(refused.value) == ["vm"]


@given(NAMES, URIS)
@example("before upgrade", DEFAULT_LIBVIRT_URI)
@example("2026-11-26 15:48:22 +0000", DEFAULT_LIBVIRT_URI)
def test_a_snapshot_name_is_refused_or_reaches_virsh_right_after_snapshotname(name: str, uri: str) -> None:
    for subcommand, build in (("snapshot-revert", virsh.snapshot_revert_command),
                              ("snapshot-delete", virsh.snapshot_delete_command)):
        if virsh.check_snapshot_name(name) is not None:
            with pytest.raises(ValidationFailed) as refused:
                build(uri, "lab-disk", name)
            assert fields_of(refused.value) == ["snapshot"]
            continue
        argv = build(uri, "lab-disk", name)
        assert argv == ("virsh", "--connect", uri, subcommand, "--domain", "lab-disk", "--snapshotname", name)
        reaches_virsh_exactly(argv)


@given(NAMES, st.one_of(st.none(), DESCRIPTIONS))
@example("s1", "--help")
@example("s1", "--name x; $(id) `id` 'quoted' \"double\" \\")
@example("s1", "line\nbreak")
@example("s1", "")
@example("--help", None)
@example("s1", "a" * 1000)
@example("s1", "a" * 1001)
def test_create_refuses_or_passes_name_and_description_as_exactly_their_arguments(name: str,
                                                                                  description: str | None) -> None:
    name_problem = virsh.check_snapshot_name(name)
    description_problem = virsh.check_description(description) if description else None
    if name_problem is not None or description_problem is not None:
        with pytest.raises(ValidationFailed) as refused:
            virsh.snapshot_create_command(DEFAULT_LIBVIRT_URI, "lab-disk", name, description)
        assert fields_of(refused.value) == ["name" if name_problem is not None else "description"]
        return
    argv = virsh.snapshot_create_command(DEFAULT_LIBVIRT_URI, "lab-disk", name, description)
    extra = ("--description", description) if description else ()
    assert argv == ("virsh", "--connect", DEFAULT_LIBVIRT_URI, "snapshot-create-as", "--domain", "lab-disk",
                    "--name", name, *extra)
    reaches_virsh_exactly(argv)


@given(st.text())
@example("\n")
@example("a\u2028b")
@example("\x1b[31mred")
def test_an_accepted_description_is_one_line_without_control_characters(text: str) -> None:
    if virsh.check_description(text) is not None:
        return
    assert len(text) <= virsh.SNAPSHOT_DESCRIPTION_MAX
    assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in text)


def test_host_commands_take_no_argument_from_the_caller() -> None:
    uri = DEFAULT_LIBVIRT_URI
    assert virsh.nodeinfo_command(uri) == ("virsh", "--connect", uri, "nodeinfo")
    assert virsh.version_command(uri) == ("virsh", "--connect", uri, "version", "--daemon")
    assert virsh.hostname_command(uri) == ("virsh", "--connect", uri, "hostname")
    assert virsh.check_command(uri) == ("virsh", "--connect", uri, "uri")


@given(st.integers(min_value=-10**6, max_value=10**6))
@example(0)
@example(300)
@example(301)
@example(-1)
def test_wait_is_between_0_and_300_seconds(seconds: int) -> None:
    assert (virsh.check_wait(seconds) is None) == (0 <= seconds <= 300)


@pytest.mark.parametrize(("action", "state"), [
    (VmAction.START, "running"), (VmAction.SHUTDOWN, "shut off"), (VmAction.FORCE_STOP, "shut off"),
    (VmAction.REBOOT, "running"), (VmAction.SUSPEND, "paused"), (VmAction.RESUME, "running"),
])
def test_each_action_waits_for_its_state(action: VmAction, state: str) -> None:
    assert action.target_state == state
    assert state in virsh.VM_STATES


# ---------------------------------------------------------------------------------------- domstats

REAL_STATS_RUNNING = """\
Domain: 'lab-disk'
  state.state=1
  state.reason=1
  cpu.time=562162000
  cpu.user=175694000
  cpu.system=386468000
  cpu.cache.monitor.count=0
  cpu.haltpoll.success.time=0
  cpu.haltpoll.fail.time=0
  balloon.current=131072
  balloon.maximum=131072
  balloon.rss=129240
  vcpu.current=1
  vcpu.maximum=1
  vcpu.0.state=1
  vcpu.0.time=240000000
  vcpu.0.wait=0
  vcpu.0.delay=4241078
  net.count=0
  block.count=1
  block.0.name=vda
  block.0.path=/var/tmp/playr-lab/lab-disk.qcow2
  block.0.backingIndex=1
  block.0.rd.reqs=1
  block.0.rd.bytes=512
  block.0.rd.times=82943
  block.0.wr.reqs=0
  block.0.wr.bytes=0
  block.0.wr.times=0
  block.0.fl.reqs=0
  block.0.fl.times=0
  block.0.allocation=0
  block.0.capacity=16777216
  block.0.physical=204800

"""
REAL_STATS_SHUT_OFF = """\
Domain: 'lab-guest1'
  state.state=5
  state.reason=0
  cpu.time=170000000
  cpu.user=70000000
  cpu.system=100000000
  balloon.current=131072
  balloon.maximum=131072
  vcpu.current=1
  vcpu.maximum=1
  block.count=0

"""
REAL_STATE_PAUSED = "Domain: 'lab-disk'\n  state.state=3\n  state.reason=1\n\n"


def test_the_real_running_stats_parse() -> None:
    stats = virsh.parse_stats(REAL_STATS_RUNNING, "lab-disk")
    assert (stats.name, stats.state, stats.state_reason) == ("lab-disk", "running", 1)
    assert (stats.cpu.time_ns, stats.cpu.user_ns, stats.cpu.system_ns) == (562162000, 175694000, 386468000)
    assert (stats.vcpus.current, stats.vcpus.maximum) == (1, 1)
    assert (stats.balloon.current_kib, stats.balloon.maximum_kib, stats.balloon.rss_kib) == (131072, 131072, 129240)
    assert stats.balloon.available_kib is None  # no balloon driver in the lab's guest
    assert stats.block == [BlockStats(name="vda", path="/var/tmp/playr-lab/lab-disk.qcow2", read_requests=1,
                                      read_bytes=512, write_requests=0, write_bytes=0, flush_requests=0,
                                      allocation=0, capacity=16777216, physical=204800)]
    assert stats.net == []
    assert stats.fields["vcpu.0.delay"] == "4241078" and len(stats.fields) == 33


def test_the_real_shut_off_stats_parse() -> None:
    stats = virsh.parse_stats(REAL_STATS_SHUT_OFF, "lab-guest1")
    assert (stats.state, stats.cpu.time_ns, stats.block, stats.net) == ("shut off", 170000000, [], [])


@pytest.mark.parametrize(("output", "state"), [
    (REAL_STATE_PAUSED, "paused"), (REAL_STATS_RUNNING, "running"), (REAL_STATS_SHUT_OFF, "shut off"),
    ("", None), ("\n", None), ("Domain: 'x'\n  state.reason=1\n", None), ("Domain: 'x'\n  state.state=9\n", "state 9"),
])
def test_parse_state_reads_the_state_number_as_virshs_word(output: str, state: str | None) -> None:
    assert virsh.parse_state(output) == state


def test_state_numbers_are_libvirts() -> None:
    # virDomainState: NOSTATE, RUNNING, BLOCKED (virsh prints "idle"), PAUSED, SHUTDOWN, SHUTOFF, CRASHED,
    # PMSUSPENDED; each word is one virsh list prints.
    assert [virsh.state_name(n) for n in range(8)] == ["no state", "running", "idle", "paused", "in shutdown",
                                                      "shut off", "crashed", "pmsuspended"]
    assert set(virsh.DOMAIN_STATES) <= set(virsh.VM_STATES)


def render_domstats(domain: str, fields: Sequence[tuple[str, str]]) -> str:
    return f"Domain: '{domain}'\n" + "".join(f"  {key}={value}\n" for key, value in fields) + "\n"


FIELD_KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=30)
FIELD_VALUES = st.text(alphabet=st.characters(exclude_categories=("Cc", "Zl", "Zp"), exclude_characters="\x85"),
                       max_size=40).map(str.strip)


@settings(max_examples=80)
@given(st.dictionaries(FIELD_KEYS, FIELD_VALUES, max_size=20), ACCEPTED_NAMES)
@example({"block.0.path": "/var/lib/a=b.qcow2"}, "lab-disk")
def test_parse_domstats_reads_back_every_field_of_the_first_domain(fields: dict[str, str], name: str) -> None:
    output = render_domstats(name, list(fields.items())) + render_domstats("other", [("state.state", "1")])
    assert virsh.parse_domstats(output) == fields


STAT_INTS = st.integers(min_value=0, max_value=2**64 - 1)


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["vda", "sda", "hdc"]), STAT_INTS, STAT_INTS, STAT_INTS), max_size=4),
       st.lists(st.tuples(st.sampled_from(["vnet0", "tap1", "eth0"]), STAT_INTS, STAT_INTS, STAT_INTS),
                max_size=4),
       st.integers(min_value=0, max_value=7))
def test_parse_stats_reads_back_disks_interfaces_and_state(disks: list[tuple[str, int, int, int]],
                                                          nics: list[tuple[str, int, int, int]], state: int) -> None:
    fields = [("state.state", str(state)), ("state.reason", "0"), ("block.count", str(len(disks))),
              ("net.count", str(len(nics)))]
    for i, (name, rd, wr, capacity) in enumerate(disks):
        fields += [(f"block.{i}.name", name), (f"block.{i}.rd.bytes", str(rd)), (f"block.{i}.wr.bytes", str(wr)),
                   (f"block.{i}.capacity", str(capacity))]
    for i, (name, rx, tx, drops) in enumerate(nics):
        fields += [(f"net.{i}.name", name), (f"net.{i}.rx.bytes", str(rx)), (f"net.{i}.tx.bytes", str(tx)),
                   (f"net.{i}.rx.drop", str(drops))]
    stats = virsh.parse_stats(render_domstats("vm", fields), "vm")
    assert stats.state == virsh.state_name(state)
    assert [(b.name, b.read_bytes, b.write_bytes, b.capacity) for b in stats.block] == disks
    assert [(n.name, n.rx_bytes, n.tx_bytes, n.rx_drops) for n in stats.net] == nics
    assert all(n == NetStats(n.name, n.rx_bytes, None, None, n.rx_drops, n.tx_bytes, None, None, None)
               for n in stats.net)


@given(st.text(max_size=300))
def test_parse_stats_never_fails_on_any_output(output: str) -> None:
    stats = virsh.parse_stats(output, "vm")
    assert stats.name == "vm"


NOT_COUNTERS = st.one_of(st.sampled_from(["", "-1", "12abc", "1.5", "0x10", " 7", "\u0661\u0662", "\u00b2", "NaN"]),
                         st.text(max_size=12).filter(lambda t: not (t.isascii() and t.isdigit()))
                         # one value on one line: "0\r" is the line "0" to any line splitter (and virsh)
                         .filter(lambda t: len((t + "x").splitlines()) == 1))


@settings(max_examples=80)
@given(st.sampled_from(["state.state", "state.reason", "cpu.time", "balloon.current", "vcpu.maximum",
                        "block.0.rd.bytes", "net.0.tx.pkts"]), NOT_COUNTERS, STAT_INTS)
def test_a_counter_that_is_not_a_whole_number_is_null_and_the_others_stay(key: str, bad: str, good: int) -> None:
    fields = [("block.count", "1"), ("net.count", "1"), ("cpu.user", str(good)), (key, bad)]
    stats = virsh.parse_stats(render_domstats("vm", fields), "vm")
    assert stats.cpu.user_ns == good
    read = {"state.state": stats.state, "state.reason": stats.state_reason, "cpu.time": stats.cpu.time_ns,
            "balloon.current": stats.balloon.current_kib, "vcpu.maximum": stats.vcpus.maximum,
            "block.0.rd.bytes": stats.block[0].read_bytes, "net.0.tx.pkts": stats.net[0].tx_packets}
    assert read[key] is None
    if key == "state.state":  # what ?wait= polls: "12abc" is no state, not state 12
        assert virsh.parse_state(render_domstats("vm", [("state.state", bad)])) is None


@pytest.mark.parametrize("count", ["99999999999999999999", "-3", "many"])
def test_an_absurd_disk_count_never_builds_more_than_1024_entries(count: str) -> None:
    stats = virsh.parse_stats(render_domstats("vm", [("block.count", count), ("net.count", count)]), "vm")
    assert len(stats.block) <= 1024 and len(stats.net) <= 1024


# ---------------------------------------------------------------------------------------- snapshot-list

REAL_SNAPSHOTS = (" Name    Creation Time               State     Parent\n"
                  "-------------------------------------------------------\n"
                  " s two   2026-11-26 15:48:22 +0000   running   s1\n"
                  " s1      2026-11-26 15:48:22 +0000   running   \n"
                  "\n")
REAL_NO_SNAPSHOTS = (" Name   Creation Time   State   Parent\n"
                     "----------------------------------------\n"
                     "\n")


def snapshot_row(snapshot: Snapshot) -> list[str]:
    assert snapshot.created_at is not None
    return [snapshot.name, snapshot.created_at.strftime("%Y-%m-%d %H:%M:%S +0000"), snapshot.state,
            snapshot.parent or ""]


def test_the_renderer_reproduces_real_snapshot_lists() -> None:
    when = datetime(2026, 11, 26, 15, 48, 22, tzinfo=UTC)
    rows = [Snapshot("s two", when, "running", "s1"), Snapshot("s1", when, "running", None)]
    assert render_table(("Name", "Creation Time", "State", "Parent"), [snapshot_row(r) for r in rows]) == \
        REAL_SNAPSHOTS
    assert render_table(("Name", "Creation Time", "State", "Parent"), []) == REAL_NO_SNAPSHOTS


def test_the_real_snapshot_lists_parse() -> None:
    when = datetime(2026, 11, 26, 15, 48, 22, tzinfo=UTC)
    assert virsh.parse_snapshot_list(REAL_SNAPSHOTS) == [Snapshot("s two", when, "running", "s1"),
                                                        Snapshot("s1", when, "running", None)]
    assert virsh.parse_snapshot_list(REAL_NO_SNAPSHOTS) == []


SNAPSHOT_STATES = ("running", "shutoff", "paused", "disk-snapshot", "crashed", "pmsuspended")
SHORT_NAMES = ACCEPTED_NAMES.filter(lambda n: len(n) <= VM_NAME_MAX)
TRICKY_NAMES = st.one_of(
    SHORT_NAMES,
    st.sampled_from(["2026-11-26 15:48:22 +0000", "running", "s1 running", "a  b", "虚拟机 快照", "shutoff x"]),
)
TIMES = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda t: t.replace(microsecond=0, tzinfo=UTC))


@settings(max_examples=80)
@given(st.lists(st.builds(Snapshot, name=TRICKY_NAMES, created_at=TIMES, state=st.sampled_from(SNAPSHOT_STATES),
                          parent=st.one_of(st.none(), TRICKY_NAMES)), max_size=6))
def test_parse_snapshot_list_reads_back_every_rendered_row(snapshots: list[Snapshot]) -> None:
    output = render_table(("Name", "Creation Time", "State", "Parent"), [snapshot_row(s) for s in snapshots])
    assert virsh.parse_snapshot_list(output) == snapshots


def test_a_localized_header_keeps_the_columns() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rows = [Snapshot("vor dem Upgrade", when, "shutoff", None), Snapshot("danach", when, "running", "vor dem Upgrade")]
    output = render_table(("Name", "Erstellungszeit", "Status", "Übergeordnet"), [snapshot_row(r) for r in rows])
    assert virsh.parse_snapshot_list(output) == rows


def test_a_time_zone_offset_is_turned_into_utc() -> None:
    output = render_table(("Name", "Creation Time", "State", "Parent"),
                          [["s1", "2026-11-26 17:48:22 +0200", "shutoff", ""]])
    [snapshot] = virsh.parse_snapshot_list(output)
    assert snapshot.created_at == datetime(2026, 11, 26, 15, 48, 22, tzinfo=UTC)
    assert snapshot.created_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("output", ["", "\n", "garbage\n", "-----\n", " Name\n----\n x\n"])
def test_odd_snapshot_lists_are_empty(output: str) -> None:
    assert virsh.parse_snapshot_list(output) == []


@given(st.text(max_size=300))
def test_parse_snapshot_list_never_fails_on_any_output(output: str) -> None:
    virsh.parse_snapshot_list(output)


def current(stdout: str = "", stderr: str = "", status: int = 0) -> CommandResult:
    return CommandResult(command=("virsh",), exit_status=status, stdout=stdout, stderr=stderr)


@pytest.mark.parametrize("stderr", [
    "error: domain 'lab-disk' has no current snapshot",  # real
    "Fehler: Domain 'lab-disk' hat keinen aktuellen Schnappschuss",  # a host in another language
    "",
])
def test_the_current_snapshot_is_read_and_none_is_not_an_error(stderr: str) -> None:
    assert virsh.parse_current_snapshot(current("s two\n")) == "s two"
    assert virsh.parse_current_snapshot(current("\n", stderr, 1)) is None


# ---------------------------------------------------------------------------------------- host facts

REAL_NODEINFO = """\
CPU model:           x86_64
CPU(s):              2
CPU frequency:       2596 MHz
CPU socket(s):       1
Core(s) per socket:  2
Thread(s) per core:  1
NUMA cell(s):        1
Memory size:         5597400 KiB

"""
REAL_VERSION = """\
Compiled against library: libvirt 9.0.0
Using library: libvirt 9.0.0
Using API: QEMU 9.0.0
Running hypervisor: QEMU 7.2.22
Running against daemon: 9.0.0

"""


def test_the_real_nodeinfo_parses() -> None:
    assert virsh.parse_nodeinfo(REAL_NODEINFO) == NodeInfo(
        cpu_model="x86_64", cpus=2, cpu_mhz=2596, cpu_sockets=1, cores_per_socket=2, threads_per_core=1,
        numa_cells=1, memory_kib=5597400)


def test_the_real_version_parses() -> None:
    assert virsh.parse_version(REAL_VERSION) == Versions(libvirt="9.0.0", daemon="9.0.0", hypervisor="QEMU",
                                                         hypervisor_version="7.2.22")


def test_the_real_hostname_parses() -> None:
    assert virsh.parse_hostname("vm\n\n") == "vm"
    assert virsh.parse_hostname("") is None


COUNTS = st.integers(min_value=0, max_value=10**12)


@given(COUNTS, COUNTS, COUNTS, COUNTS, st.sampled_from(["x86_64", "aarch64", "ppc64le"]))
def test_parse_nodeinfo_reads_back_any_numbers(cpus: int, mhz: int, memory: int, cells: int, model: str) -> None:
    output = (f"CPU model:           {model}\nCPU(s):              {cpus}\nCPU frequency:       {mhz} MHz\n"
              f"NUMA cell(s):        {cells}\nMemory size:         {memory} KiB\n\n")
    info = virsh.parse_nodeinfo(output)
    assert (info.cpu_model, info.cpus, info.cpu_mhz, info.numa_cells, info.memory_kib) == (model, cpus, mhz, cells,
                                                                                            memory)
    assert info.cpu_sockets is None


VERSIONS = st.builds(lambda *n: ".".join(map(str, n)), *[st.integers(min_value=0, max_value=99)] * 3)


@given(VERSIONS, VERSIONS, VERSIONS, st.sampled_from(["QEMU", "Xen", "Cloud Hypervisor"]))
def test_parse_version_reads_back_any_versions(library: str, daemon: str, hypervisor_version: str,
                                              hypervisor: str) -> None:
    output = (f"Compiled against library: libvirt {library}\nUsing library: libvirt {library}\n"
              f"Using API: {hypervisor} {library}\nRunning hypervisor: {hypervisor} {hypervisor_version}\n"
              f"Running against daemon: {daemon}\n\n")
    assert virsh.parse_version(output) == Versions(library, daemon, hypervisor, hypervisor_version)


@given(st.text(max_size=200))
def test_host_parsers_never_fail_on_any_output(output: str) -> None:
    virsh.parse_nodeinfo(output)
    virsh.parse_version(output)
    virsh.parse_hostname(output)


# ---------------------------------------------------------------------------------------- snapshot failures


def failed(stderr: str) -> CommandResult:
    return CommandResult(command=("virsh",), exit_status=1, stdout="\n", stderr=stderr)


@pytest.mark.parametrize(("stderr", "error_class", "code"), [
    ("error: operation failed: domain moment s1 already exists", Conflict, "snapshot_name_taken"),
    ("error: Domain snapshot not found: no domain snapshot with matching name 's1'", NotFound, "snapshot_not_found"),
    ("error: unsupported configuration: nothing selected for snapshot", Conflict, "snapshot_unsupported"),
    ("error: unsupported configuration: internal and full system snapshots require all disks to be selected for "
     "snapshot", Conflict, "snapshot_unsupported"),
    ("error: unsupported configuration: internal snapshot for disk vda unsupported for storage type raw", Conflict,
     "snapshot_unsupported"),
    ("error: failed to get domain 'lab-disk'", NotFound, "vm_not_found"),
    ("error: failed to connect to the hypervisor", RemoteError, "libvirt_unavailable"),
], ids=["exists", "not-found", "no-disk", "no-disk-running", "raw-disk", "no-vm", "no-libvirt"])
def test_real_snapshot_failures_map_to_their_errors(stderr: str, error_class: type[Exception], code: str) -> None:
    with pytest.raises(error_class) as raised:
        virsh.raise_for_snapshot_failure(failed(stderr), "lab-disk", "s1")
    assert raised.value.code == code  # type: ignore[attr-defined]


@given(SHORT_NAMES)
@example("already exists")
@example("failed to get domain")
@example("not found")
@example("snapshot not found")
@example("no domain snapshot with matching name x")
@example("nothing selected for snapshot")
@example("internal snapshot unsupported")
@example("domain is not running")
def test_the_snapshot_name_in_stderr_does_not_change_the_error(name: str) -> None:
    for stderr, code in [(f"error: operation failed: domain moment {name} already exists", "snapshot_name_taken"),
                         (f"error: Domain snapshot not found: no domain snapshot with matching name '{name}'",
                          "snapshot_not_found"),
                         ("error: failed to get domain 'lab-disk'", "vm_not_found")]:
        with pytest.raises((NotFound, Conflict)) as raised:
            virsh.raise_for_snapshot_failure(failed(stderr), "lab-disk", name)
        assert raised.value.code == code, stderr


def test_success_is_never_a_snapshot_error() -> None:
    virsh.raise_for_snapshot_failure(CommandResult(("virsh",), 0, "Domain snapshot s1 created", ""), "vm", "s1")
