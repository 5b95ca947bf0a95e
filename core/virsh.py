"""virsh, as the portal uses it: VM-name rules, argument vectors, output parsers, failure mapping.

Pure functions, property-tested. Commands are argument vectors; the transport shell-quotes every
element, and every VM name goes after ``--domain`` so no name can be read as an option.
"""

from __future__ import annotations

import enum
import re
import shlex
import unicodedata
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from core.errors import (
    LibvirtUnavailable,
    NetworkNotFound,
    PoolNotFound,
    SnapshotNameTaken,
    SnapshotNotFound,
    SnapshotUnsupported,
    ValidationFailed,
    VirshFailed,
    VirshNotFound,
    VmAlreadyRunning,
    VmNotFound,
    VmNotRunning,
    VmStateConflict,
    VolumeNameTaken,
    VolumeNotFound,
)
from core.ports import CommandResult

VM_NAME_MAX = 200
# libvirt itself forbids only '/' (and NUL) in names; the portal is stricter: no control
# characters, no leading '-' or space, and none of the shell's metacharacters ($ ` ; & | < > ( )
# { } [ ] * ? ! ~ # ' " \). Letters and digits of any script, spaces inside, and . _ - + : @ , = %
# are allowed.
_VM_NAME = re.compile(r"^\w[\w .+:@,=%-]*$")


class VmAction(enum.Enum):
    """A lifecycle action on a VM, named as the API names it, with the virsh subcommand it runs."""

    START = "start"
    SHUTDOWN = "shutdown"
    FORCE_STOP = "force-stop"
    REBOOT = "reboot"
    SUSPEND = "suspend"
    RESUME = "resume"

    @property
    def subcommand(self) -> str:
        return {"start": "start", "shutdown": "shutdown", "force-stop": "destroy", "reboot": "reboot",
                "suspend": "suspend", "resume": "resume"}[self.value]

    @property
    def target_state(self) -> str:
        """The state ``?wait=`` waits for. A reboot happens inside the running domain (same qemu
        process, same id: libvirt never reports it as anything but ``running``), so waiting on a
        reboot confirms the domain is running, not that the guest has finished booting."""
        return {"start": "running", "shutdown": "shut off", "force-stop": "shut off", "reboot": "running",
                "suspend": "paused", "resume": "running"}[self.value]


@attrs.frozen
class VmSummary:
    """One row of ``virsh list --all``: ``id`` is None when the VM is not running."""

    name: str
    state: str
    id: int | None
    # Where the row comes from (issue 18): "host" (virsh just ran) or "live" (the agent's watcher
    # mirror), and when it was known to be true (None: just parsed, not yet stamped).
    # (Not part of equality: two rows saying the same of a VM are equal whatever their origin.)
    source: str = attrs.field(default="host", eq=False)
    observed_at: datetime | None = attrs.field(default=None, eq=False)


def check_vm_name(name: str) -> str | None:
    """Why ``name`` is refused as a VM name, or None when it is acceptable.

    virsh looks a ``--domain`` value up as a domain id first, then as a UUID, and only then as a
    name: a VM called ``7`` (or named like a UUID) could be mistaken for another VM, so such names
    are refused."""
    problem = _check_name(name)
    if problem is None and name.isascii() and name.isdigit():
        return "must not be only digits: virsh would take it for a domain id (rename the VM)"
    if problem is None and _looks_like_uuid(name):
        return "must not look like a UUID: virsh would take it for a domain UUID (rename the VM)"
    return problem


def _looks_like_uuid(name: str) -> bool:
    """What libvirt's virUUIDParse accepts, and a little more: 32 hexadecimal digits once every
    '-' and ' ' is skipped (virUUIDParse skips both between digit pairs, so
    ``01234567 89ab cdef 0123 456789abcdef`` is a UUID to virsh)."""
    digits = name.replace("-", "").replace(" ", "")
    return len(digits) == 32 and all(char in "0123456789abcdefABCDEF" for char in digits)


def _check_name(name: str) -> str | None:
    if not 1 <= len(name) <= VM_NAME_MAX:
        return f"must be 1 to {VM_NAME_MAX} characters"
    if name.startswith("-"):
        return "must not start with '-'"
    if name != name.strip():
        return "must not start or end with whitespace"
    if not _VM_NAME.fullmatch(name):
        return "must start with a letter or digit and contain only letters, digits, spaces and . _ - + : @ , = %"
    return None


def require_vm_name(name: str) -> str:
    problem = check_vm_name(name)
    if problem is not None:
        raise ValidationFailed.one("vm", problem)
    return name


def _virsh(uri: str, *args: str) -> tuple[str, ...]:
    return ("virsh", "--connect", uri, *args)


def list_command(uri: str) -> tuple[str, ...]:
    return _virsh(uri, "list", "--all")


def dominfo_command(uri: str, vm: str) -> tuple[str, ...]:
    return _virsh(uri, "dominfo", "--domain", require_vm_name(vm))


def action_command(uri: str, vm: str, action: VmAction) -> tuple[str, ...]:
    return _virsh(uri, action.subcommand, "--domain", require_vm_name(vm))


# ---------------------------------------------------------------------- waits, autostart, stats, snapshots, hosts
# Every VM name goes after --domain, every snapshot name after --name (create) or --snapshotname,
# and the one free text (a snapshot's description) right after --description, which virsh always
# takes as that option's value, even when it starts with '-'.

WAIT_MAX = 300  # seconds ?wait= may ask for
SNAPSHOT_DESCRIPTION_MAX = 1000
# ``virsh domstats --state`` reports the state as libvirt's number; these are the words
# ``virsh list`` and ``virsh domstate`` print for each (VIR_DOMAIN_BLOCKED prints as "idle").
DOMAIN_STATES = ("no state", "running", "idle", "paused", "in shutdown", "shut off", "crashed", "pmsuspended")
STATS_GROUPS = ("--state", "--cpu-total", "--balloon", "--vcpu", "--interface", "--block")


def check_wait(seconds: int) -> str | None:
    """Why ``seconds`` is refused as a ``wait``, or None."""
    return None if 0 <= seconds <= WAIT_MAX else f"must be between 0 and {WAIT_MAX} seconds"


def check_snapshot_name(name: str) -> str | None:
    """Snapshot names follow the VM-name character rules (libvirt's own rules are looser); unlike
    a VM, a snapshot is only ever looked up by name, so ``1`` is a fine snapshot name."""
    return _check_name(name)


def require_snapshot_name(name: str, field: str = "snapshot") -> str:
    problem = check_snapshot_name(name)
    if problem is not None:
        raise ValidationFailed.one(field, problem)
    return name


def check_description(text: str) -> str | None:
    """A snapshot description: one line of at most 1000 characters, no control characters."""
    if len(text) > SNAPSHOT_DESCRIPTION_MAX:
        return f"must be at most {SNAPSHOT_DESCRIPTION_MAX} characters"
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in text):
        return "must not contain control characters or line breaks"
    return None


def state_command(uri: str, vm: str) -> tuple[str, ...]:
    """The VM's state as a number (locale-proof), cheap enough to poll."""
    return _virsh(uri, "domstats", "--domain", require_vm_name(vm), "--state")


def stats_command(uri: str, vm: str) -> tuple[str, ...]:
    return _virsh(uri, "domstats", "--domain", require_vm_name(vm), *STATS_GROUPS)


def autostart_command(uri: str, vm: str, enabled: bool) -> tuple[str, ...]:
    return _virsh(uri, "autostart", "--domain", require_vm_name(vm), *(() if enabled else ("--disable",)))


def snapshot_list_command(uri: str, vm: str) -> tuple[str, ...]:
    return _virsh(uri, "snapshot-list", "--domain", require_vm_name(vm), "--parent")


def snapshot_current_command(uri: str, vm: str) -> tuple[str, ...]:
    return _virsh(uri, "snapshot-current", "--domain", require_vm_name(vm), "--name")


def snapshot_create_command(uri: str, vm: str, name: str, description: str | None = None) -> tuple[str, ...]:
    require_vm_name(vm)
    require_snapshot_name(name, "name")
    extra: tuple[str, ...] = ()
    if description:
        problem = check_description(description)
        if problem is not None:
            raise ValidationFailed.one("description", problem)
        extra = ("--description", description)
    return _virsh(uri, "snapshot-create-as", "--domain", vm, "--name", name, *extra)


def snapshot_revert_command(uri: str, vm: str, snapshot: str) -> tuple[str, ...]:
    return _virsh(uri, "snapshot-revert", "--domain", require_vm_name(vm), "--snapshotname",
                  require_snapshot_name(snapshot))


def snapshot_delete_command(uri: str, vm: str, snapshot: str) -> tuple[str, ...]:
    return _virsh(uri, "snapshot-delete", "--domain", require_vm_name(vm), "--snapshotname",
                  require_snapshot_name(snapshot))


def nodeinfo_command(uri: str) -> tuple[str, ...]:
    return _virsh(uri, "nodeinfo")


def version_command(uri: str) -> tuple[str, ...]:
    return _virsh(uri, "version", "--daemon")


def hostname_command(uri: str) -> tuple[str, ...]:
    return _virsh(uri, "hostname")


def check_command(uri: str) -> tuple[str, ...]:
    """The cheapest command that needs libvirt: the URI it connected to."""
    return _virsh(uri, "uri")


def command_line(argv: Sequence[str]) -> str:
    """The single string an SSH server hands to the remote shell: every argument quoted."""
    return " ".join(shlex.quote(arg) for arg in argv)


# ---------------------------------------------------------------------- parsing

_KNOWN_STATES = ("running", "idle", "paused", "in shutdown", "shut off", "crashed", "pmsuspended",
                 "blocked", "dying", "no state")
VM_STATES = _KNOWN_STATES  # what the fleet view's state filter accepts
# The row's id and the space after it; the rest of the row is taken with str.rstrip, not a lazy
# ``.*?\s*$`` (which retried every position of a run of spaces: quadratic in the run's length).
_ROW = re.compile(r"\s*(?P<id>[0-9]{1,10}|-)\s+")


def parse_list(stdout: str) -> list[VmSummary]:
    """Parse ``virsh list --all``. Rows are recognised by their leading id (a number, or '-' when
    not running); names may contain spaces. With the usual three columns the state is matched
    against libvirt's states at the end of the row; otherwise (localized states, extra columns such
    as ``--title``) rows are cut at the header's column positions, counted in display cells as
    virsh pads them (a wide CJK character takes two)."""
    lines = stdout.splitlines()
    separator = _separator(lines)
    header = lines[separator - 1] if separator is not None and separator >= 1 else ""
    columns = _column_starts(header, _WORD)
    rows = lines[separator + 1:] if separator is not None else lines
    result: list[VmSummary] = []
    for line in rows:
        match = _ROW.match(line)
        if not line.strip() or match is None:
            continue
        vm_id = None if match.group("id") == "-" else int(match.group("id"))
        name, state = _split_name_state(line, line[match.end():].rstrip(), columns)
        if name:
            result.append(VmSummary(name=name, state=state, id=vm_id))
    return result


def _split_name_state(line: str, rest: str, columns: list[int]) -> tuple[str, str]:
    if len(columns) <= 3:
        for state in _KNOWN_STATES:
            if rest.endswith(" " + state):
                return rest[: -len(state)].rstrip(), state
    if len(columns) >= 3:
        _, name, state = (cell.strip() for cell in _cut(line, columns, 3))
        if name:
            return name, state
    name, _, state = rest.rpartition(" ")
    return name.strip(), state


# Every parser below is linear in its input (issue 14, item 3): each line is walked a bounded
# number of times, whatever its length or the header's number of columns
# (tests/unit/test_virsh_linearity.py counts the work; bench/parsers.py times size ladders).

_WORD = re.compile(r"\S+")


def _separator(lines: list[str]) -> int | None:
    """Index of the first line of only dashes (under a table's header), or None."""
    return next((i for i, line in enumerate(lines) if line.strip() and not line.strip().strip("-")), None)


def _width(text: str) -> int:
    """Terminal cells ``text`` takes (East Asian wide and full-width characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _column_starts(header: str, cell: re.Pattern[str]) -> list[int]:
    """The display cell at which each header cell (a match of ``cell``) starts, in one pass over
    the header (the width before each cell is carried on, never recounted from the start)."""
    starts: list[int] = []
    width = 0
    position = 0
    for match in cell.finditer(header):
        width += _width(header[position:match.start()])
        position = match.start()
        starts.append(width)
    return starts


def _cut(line: str, starts: list[int], count: int) -> list[str]:
    """The first ``count`` cells of ``line``: cell ``i`` holds the characters whose display cell is
    in ``[starts[i], starts[i + 1])`` (open-ended when ``starts`` ends there). One pass over the
    line, stopping once past cell ``count - 1``; the header's other columns cost nothing."""
    parts: list[list[str]] = [[] for _ in range(count)]
    column = -1  # characters before starts[0] belong to no cell
    cell = 0
    for char in line:
        while column + 1 < len(starts) and cell >= starts[column + 1]:
            column += 1
            if column >= count:
                return ["".join(part) for part in parts]
        if column >= 0:
            parts[column].append(char)
        cell += _width(char)
    return ["".join(part) for part in parts]


def parse_dominfo(stdout: str) -> dict[str, str | int | None]:
    """Parse ``virsh dominfo`` ``Key: value`` lines into snake_case keys (``CPU(s)`` → ``cpus``,
    ``Max memory`` → ``max_memory``). ``id`` is an int, or None for a VM that is not running."""
    info: dict[str, str | int | None] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            continue
        info[_snake(key)] = value.strip()
    if "id" in info:
        raw_id = info["id"]
        info["id"] = _whole_int(raw_id) if isinstance(raw_id, str) else None
    return info


def _snake(key: str) -> str:
    key = key.strip().lower().replace("(s)", "s")
    return re.sub(r"[^a-z0-9]+", "_", key).strip("_")


def _key_values(stdout: str) -> dict[str, str]:
    """``Key: value`` lines as they are (keys stripped, values stripped)."""
    values: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


INT_DIGITS_MAX = 20  # a 64-bit counter has at most 20 digits; int() of a longer run is quadratic


def _leading_int(value: str | None) -> int | None:
    """``"2596 MHz"`` → 2596; None when the value does not start with a number (of at most 20
    digits: nothing virsh prints is longer, and int() of a huge run of digits is quadratic)."""
    match = re.match(r"\s*([0-9]+)", value or "")
    return int(match.group(1)) if match and len(match.group(1)) <= INT_DIGITS_MAX else None


def _whole_int(value: str | None) -> int | None:
    """``"562162000"`` → 562162000; None for anything but ASCII digits (a counter virsh did not
    print, or printed as something else: ``-1``, ``12abc``, ``١٢``), or more than 20 of them."""
    ok = value is not None and len(value) <= INT_DIGITS_MAX and value.isascii() and value.isdigit()
    return int(value) if ok and value is not None else None


# ---------------------------------------------------------------------- domstats


def parse_domstats(stdout: str) -> dict[str, str]:
    """The ``key=value`` fields ``virsh domstats`` prints for the first domain in ``stdout``
    (the portal asks for one). Values keep everything after the first ``=``."""
    values: dict[str, str] = {}
    seen_header = False
    for line in stdout.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():  # "Domain: 'name'" opens a domain's block
            if seen_header or values:
                break
            seen_header = True
            continue
        key, sep, value = line.strip().partition("=")
        if sep and key:
            values[key] = value
    return values


def state_name(number: int) -> str:
    """The word virsh prints for libvirt's state number."""
    return DOMAIN_STATES[number] if 0 <= number < len(DOMAIN_STATES) else f"state {number}"


def parse_state(stdout: str) -> str | None:
    """The state in ``virsh domstats --state`` output, as virsh's word (``running``, ``shut off``)."""
    number = _whole_int(parse_domstats(stdout).get("state.state"))
    return None if number is None else state_name(number)


@attrs.frozen
class CpuStats:
    """Host CPU time the domain used, in nanoseconds."""

    time_ns: int | None
    user_ns: int | None
    system_ns: int | None


@attrs.frozen
class VcpuStats:
    current: int | None
    maximum: int | None


@attrs.frozen
class BalloonStats:
    """Guest memory as the balloon driver reports it, in KiB (most need a balloon device in the guest)."""

    current_kib: int | None
    maximum_kib: int | None
    rss_kib: int | None
    available_kib: int | None
    usable_kib: int | None
    unused_kib: int | None


@attrs.frozen
class BlockStats:
    """One disk: requests and bytes read, written and flushed; sizes in bytes."""

    name: str | None
    path: str | None
    read_requests: int | None
    read_bytes: int | None
    write_requests: int | None
    write_bytes: int | None
    flush_requests: int | None
    allocation: int | None
    capacity: int | None
    physical: int | None


@attrs.frozen
class NetStats:
    """One network interface: bytes, packets, errors and drops received and sent."""

    name: str | None
    rx_bytes: int | None
    rx_packets: int | None
    rx_errors: int | None
    rx_drops: int | None
    tx_bytes: int | None
    tx_packets: int | None
    tx_errors: int | None
    tx_drops: int | None


@attrs.frozen
class VmStats:
    """``virsh domstats`` of one VM, structured; ``fields`` keeps every field virsh printed."""

    name: str
    state: str | None
    state_reason: int | None
    cpu: CpuStats
    vcpus: VcpuStats
    balloon: BalloonStats
    block: list[BlockStats]
    net: list[NetStats]
    fields: dict[str, str]


def parse_stats(stdout: str, vm: str) -> VmStats:
    """Parse ``virsh domstats --state --cpu-total --balloon --vcpu --interface --block``."""
    return stats_of_fields(parse_domstats(stdout), vm)


def stats_of_fields(f: dict[str, str], vm: str) -> VmStats:
    """One domain's ``key=value`` fields of ``virsh domstats``, structured."""

    def num(key: str) -> int | None:
        return _whole_int(f.get(key))

    state = num("state.state")
    block = [
        BlockStats(name=f.get(f"block.{i}.name"), path=f.get(f"block.{i}.path"),
                   read_requests=num(f"block.{i}.rd.reqs"), read_bytes=num(f"block.{i}.rd.bytes"),
                   write_requests=num(f"block.{i}.wr.reqs"), write_bytes=num(f"block.{i}.wr.bytes"),
                   flush_requests=num(f"block.{i}.fl.reqs"), allocation=num(f"block.{i}.allocation"),
                   capacity=num(f"block.{i}.capacity"), physical=num(f"block.{i}.physical"))
        for i in range(min(num("block.count") or 0, 1024))
    ]
    net = [
        NetStats(name=f.get(f"net.{i}.name"),
                 rx_bytes=num(f"net.{i}.rx.bytes"), rx_packets=num(f"net.{i}.rx.pkts"),
                 rx_errors=num(f"net.{i}.rx.errs"), rx_drops=num(f"net.{i}.rx.drop"),
                 tx_bytes=num(f"net.{i}.tx.bytes"), tx_packets=num(f"net.{i}.tx.pkts"),
                 tx_errors=num(f"net.{i}.tx.errs"), tx_drops=num(f"net.{i}.tx.drop"))
        for i in range(min(num("net.count") or 0, 1024))
    ]
    return VmStats(
        name=vm,
        state=None if state is None else state_name(state),
        state_reason=num("state.reason"),
        cpu=CpuStats(time_ns=num("cpu.time"), user_ns=num("cpu.user"), system_ns=num("cpu.system")),
        vcpus=VcpuStats(current=num("vcpu.current"), maximum=num("vcpu.maximum")),
        balloon=BalloonStats(current_kib=num("balloon.current"), maximum_kib=num("balloon.maximum"),
                             rss_kib=num("balloon.rss"), available_kib=num("balloon.available"),
                             usable_kib=num("balloon.usable"), unused_kib=num("balloon.unused")),
        block=block,
        net=net,
        fields=f,
    )


# ---------------------------------------------------------------------- snapshots


@attrs.frozen
class Snapshot:
    """One row of ``virsh snapshot-list --parent``; ``current`` from ``virsh snapshot-current``.
    ``state`` is the VM's state when the snapshot was taken (``running``, ``shutoff``, ``paused``,
    ``disk-snapshot``); ``created_at`` is None if virsh printed a time it does not usually print."""

    name: str
    created_at: datetime | None
    state: str
    parent: str | None
    current: bool = False


_HEADER_CELL = re.compile(r"\S+(?: \S+)*")  # cells are 3+ spaces apart; words in a cell 1 space


def parse_snapshot_list(stdout: str) -> list[Snapshot]:
    """Parse ``virsh snapshot-list --parent`` (``Name  Creation Time  State  Parent``). Rows are cut
    at the header's column positions, counted in display cells, so names with spaces (or that look
    like times or states) and localized headers keep their columns."""
    lines = stdout.splitlines()
    separator = _separator(lines)
    if separator is None or separator == 0:
        return []
    header = lines[separator - 1]
    starts = _column_starts(header, _HEADER_CELL)
    if len(starts) < 3:
        return []
    result: list[Snapshot] = []
    for line in lines[separator + 1:]:
        if not line.strip():
            continue
        cells = [cell.strip() for cell in _cut(line, starts, min(len(starts), 4))]  # 4 columns are read
        if not cells[0]:
            continue
        parent = cells[3] if len(cells) > 3 and cells[3] else None
        result.append(Snapshot(name=cells[0], created_at=_snapshot_time(cells[1]), state=cells[2], parent=parent))
    return result


def _snapshot_time(text: str) -> datetime | None:
    if len(text) > 40:  # "2026-01-02 03:04:05 +0000" is 25
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S %z").astimezone(UTC)
    except ValueError:
        return None


def parse_current_snapshot(result: CommandResult) -> str | None:
    """The current snapshot's name from ``virsh snapshot-current --name``; None when the VM has
    none. virsh then fails ("has no current snapshot", in the host's language), so any failure
    reads as none: it is only asked together with ``snapshot-list``, whose own failure says what
    went wrong (no such VM, libvirt down)."""
    if result.exit_status != 0:
        return None
    return parse_hostname(result.stdout)


# ---------------------------------------------------------------------- the host


@attrs.frozen
class NodeInfo:
    """``virsh nodeinfo``: the host's processors and memory."""

    cpu_model: str | None
    cpus: int | None
    cpu_mhz: int | None
    cpu_sockets: int | None
    cores_per_socket: int | None
    threads_per_core: int | None
    numa_cells: int | None
    memory_kib: int | None


def parse_nodeinfo(stdout: str) -> NodeInfo:
    f = _key_values(stdout)
    return NodeInfo(cpu_model=f.get("CPU model") or None, cpus=_leading_int(f.get("CPU(s)")),
                    cpu_mhz=_leading_int(f.get("CPU frequency")), cpu_sockets=_leading_int(f.get("CPU socket(s)")),
                    cores_per_socket=_leading_int(f.get("Core(s) per socket")),
                    threads_per_core=_leading_int(f.get("Thread(s) per core")),
                    numa_cells=_leading_int(f.get("NUMA cell(s)")), memory_kib=_leading_int(f.get("Memory size")))


@attrs.frozen
class Versions:
    """``virsh version --daemon``: the libvirt library virsh uses, the daemon it talks to, and the
    hypervisor (``QEMU``) with its version."""

    libvirt: str | None
    daemon: str | None
    hypervisor: str | None
    hypervisor_version: str | None


def parse_version(stdout: str) -> Versions:
    f = _key_values(stdout)
    library = f.get("Using library", "").rpartition(" ")[2] or None
    hypervisor, _, hypervisor_version = f.get("Running hypervisor", "").rpartition(" ")
    return Versions(libvirt=library, daemon=f.get("Running against daemon") or None,
                    hypervisor=hypervisor.strip() or None, hypervisor_version=hypervisor_version or None)


def parse_hostname(stdout: str) -> str | None:
    """The first non-empty line, stripped (``virsh hostname``, ``virsh snapshot-current --name``)."""
    return next((line.strip() for line in stdout.splitlines() if line.strip()), None)


# ---------------------------------------------------------------------- failures


def raise_for_failure(result: CommandResult, vm: str | None = None) -> None:
    """Turn a failed virsh run into the domain error an operator expects (404, 409, 502)."""
    if result.exit_status == 0:
        return
    stderr, lowered = _failure_text(result)
    subject = f"VM {vm!r}" if vm is not None else "the request"
    if result.exit_status == 127 or "command not found" in lowered:
        raise VirshNotFound(f"virsh is not installed on the agent: {stderr}")
    if "domain not found" in lowered or "failed to get domain" in lowered:
        raise VmNotFound(f"no VM named {vm!r} on this agent")
    if "already active" in lowered or "domain is already running" in lowered:
        raise VmAlreadyRunning(f"{subject} is already running")
    if "not running" in lowered or "domain is not active" in lowered:
        raise VmNotRunning(f"{subject} is not running")
    if "operation is not valid" in lowered or "requested operation is not valid" in lowered:
        raise VmStateConflict(f"{subject} cannot do that in its current state: {stderr}")
    if "failed to connect" in lowered or "connect socket" in lowered or ("libvirt" in lowered and "connect" in lowered):
        raise LibvirtUnavailable(f"libvirt is not reachable on the agent: {stderr}")
    raise VirshFailed(f"virsh failed with exit status {result.exit_status}: {stderr or '(no output)'}")


def _failure_text(result: CommandResult) -> tuple[str, str]:
    """virsh's stderr, and the same lower-cased with every quoted name blanked out: virsh's words
    are matched, not the names it quotes (a VM called 'already active' must not look like the
    error "already active"; VM and snapshot names never contain a quote)."""
    stderr = result.stderr.strip()
    return stderr, re.sub(r"'[^']*'", "''", stderr).lower()


# virsh does not quote the snapshot's name in this one message, so it is matched as a whole line
# and before anything else: a snapshot called "snapshot not found" is still a taken name. It used
# to be the regex ``domain (?:moment|snapshot) .+ already exists\s*$`` (MULTILINE, searched): on
# text repeating "domain snapshot " each start re-scanned its line, quadratic. This is the same
# test, one pass per line (tests/unit/test_virsh_linearity.py compares both on any text).
_EXISTS_PREFIXES = ("domain moment ", "domain snapshot ")
_EXISTS_SUFFIX = " already exists"


def _says_snapshot_exists(lowered: str) -> bool:
    """Whether a line of ``lowered`` reads ``domain snapshot <something> already exists``."""
    for line in lowered.split("\n"):
        text = line.rstrip()  # str.isspace is exactly re's \s
        if not text.endswith(_EXISTS_SUFFIX):
            continue
        head = text[: -len(_EXISTS_SUFFIX)]
        for prefix in _EXISTS_PREFIXES:
            at = head.find(prefix)
            if at != -1 and at + len(prefix) < len(head):  # ".+": at least one character between
                return True
    return False



def raise_for_snapshot_failure(result: CommandResult, vm: str, snapshot: str | None = None) -> None:
    """``raise_for_failure``, knowing the snapshot errors first: the name is taken (409), no such
    snapshot (404), the VM cannot take internal snapshots (409)."""
    if result.exit_status == 0:
        return
    stderr, lowered = _failure_text(result)
    if _says_snapshot_exists(lowered):
        raise SnapshotNameTaken(f"VM {vm!r} already has a snapshot named {snapshot!r}")
    if "snapshot not found" in lowered or "no domain snapshot with matching name" in lowered:
        raise SnapshotNotFound(f"VM {vm!r} has no snapshot named {snapshot!r}")
    if "nothing selected for snapshot" in lowered or ("internal snapshot" in lowered and "unsupported" in lowered) \
            or "require all disks to be selected for snapshot" in lowered:  # a running VM with a raw disk
        raise SnapshotUnsupported(f"VM {vm!r} cannot take internal snapshots (it needs a qcow2 disk): {stderr}")
    raise_for_failure(result, vm)


# ---------------------------------------------------------------------- fleet metrics (issue 21)


def host_stats_command(uri: str) -> tuple[str, ...]:
    """``virsh domstats`` of every VM of the host at once (no ``--domain``: all of them, running or
    not), every statistics group: one command per host however many VMs it runs."""
    return _virsh(uri, "domstats", *STATS_GROUPS)


def parse_host_stats(stdout: str) -> list[VmStats]:
    """Every domain's block of ``virsh domstats`` (``Domain: 'name'`` then indented ``key=value``
    lines), in the order printed. One pass over the lines: linear in the output. A block whose
    name repeats an earlier one is dropped (virsh never prints one twice; a hostile host might)."""
    blocks: list[tuple[str, dict[str, str]]] = []
    fields: dict[str, str] | None = None
    for line in stdout.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            name = _domain_header_name(line)
            fields = None
            if name is not None:
                fields = {}
                blocks.append((name, fields))
            continue
        if fields is not None:
            key, sep, value = line.strip().partition("=")
            if sep and key:
                fields[key] = value
    seen: set[str] = set()
    stats: list[VmStats] = []
    for name, block in blocks:
        if name not in seen:
            seen.add(name)
            stats.append(stats_of_fields(block, name))
    return stats


def _domain_header_name(line: str) -> str | None:
    """The name in ``Domain: 'web 01'`` (virsh quotes it), or None for any other line."""
    head, sep, rest = line.partition(":")
    if not sep or head.strip() != "Domain":
        return None
    rest = rest.strip()
    if len(rest) >= 2 and rest[0] == rest[-1] == "'":
        rest = rest[1:-1]
    return rest or None


def subcommand_of(argv: Sequence[str]) -> str:
    """The virsh subcommand of a command the portal built (``domstats``), for metric labels:
    ``other`` for anything that is not ``virsh --connect URI SUBCOMMAND`` with a plain word."""
    if len(argv) >= 4 and argv[0] == "virsh" and argv[1] == "--connect":
        word = argv[3]
        if 0 < len(word) <= 32 and word.isascii() and all(c.islower() or c == "-" for c in word):
            return word
    return "other"


# ---------------------------------------------------------------------- provisioning (issue 16)
# Storage pools, volumes, networks, guest addresses, and the commands that create, clone and
# delete VMs. Pool, volume and network names follow the VM-name character rules (so none can be
# read as an option, and the agent's restricted shell checks them the same way); each goes after
# its option (--pool, --vol, --network). XML and seed images travel on the command's stdin
# (``--file /dev/stdin``), never as an argument or a file on the portal host.

STDIN = "/dev/stdin"
INTERFACE_SOURCES = ("agent", "lease", "arp")


@attrs.frozen
class Pool:
    """A storage pool (``virsh pool-info --bytes``); sizes in bytes, None when virsh printed none
    (an inactive pool)."""

    name: str
    state: str | None
    autostart: bool | None
    capacity_bytes: int | None
    allocation_bytes: int | None
    available_bytes: int | None


@attrs.frozen
class Volume:
    """A storage volume (``virsh vol-dumpxml``); ``backing_path`` is its qcow2 backing file."""

    name: str
    path: str | None
    format: str | None
    capacity_bytes: int | None
    allocation_bytes: int | None
    backing_path: str | None = None


@attrs.frozen
class Network:
    """A libvirt network (``virsh net-info``)."""

    name: str
    state: str | None
    autostart: bool | None
    bridge: str | None


@attrs.frozen
class GuestAddress:
    type: str
    address: str
    prefix: int | None


@attrs.frozen
class GuestInterface:
    """One row group of ``virsh domifaddr``: an interface of the guest and its addresses."""

    name: str
    mac: str | None
    network: str | None
    addresses: list[GuestAddress]


@attrs.frozen
class DiskDevice:
    """A disk of a domain: its target (``vda``), kind (``disk``, ``cdrom``) and source, either a
    pool volume or a file (None for an empty CD-ROM drive)."""

    target: str | None
    device: str
    pool: str | None = None
    volume: str | None = None
    file: str | None = None


@attrs.frozen
class InterfaceDevice:
    mac: str | None
    network: str | None
    bridge: str | None
    target: str | None  # the host-side device (vnetN) while the VM runs


@attrs.frozen
class DomainDevices:
    """What the portal reads from a domain's XML: its UUID, disks, interfaces, and whether it has
    a UEFI variables file (``--nvram`` on undefine)."""

    uuid: str | None
    disks: list[DiskDevice]
    interfaces: list[InterfaceDevice]
    nvram: bool = False


def check_object_name(name: str) -> str | None:
    """A pool, volume or network name: the snapshot-name rules (VM-name characters; a volume
    called ``1.qcow2`` is fine, nothing is looked up by id)."""
    return _check_name(name)


def require_object_name(name: str, field: str) -> str:
    problem = check_object_name(name)
    if problem is not None:
        raise ValidationFailed.one(field, problem)
    return name


def pool_names_command(uri: str) -> tuple[str, ...]:
    return _virsh(uri, "pool-list", "--all", "--name")


def pool_info_command(uri: str, pool: str) -> tuple[str, ...]:
    return _virsh(uri, "pool-info", "--pool", require_object_name(pool, "pool"), "--bytes")


def volume_names_command(uri: str, pool: str) -> tuple[str, ...]:
    return _virsh(uri, "vol-list", "--pool", require_object_name(pool, "pool"))


def volume_xml_command(uri: str, pool: str, volume: str) -> tuple[str, ...]:
    return _virsh(uri, "vol-dumpxml", "--pool", require_object_name(pool, "pool"),
                  "--vol", require_object_name(volume, "volume"))


def network_names_command(uri: str) -> tuple[str, ...]:
    return _virsh(uri, "net-list", "--all", "--name")


def network_info_command(uri: str, network: str) -> tuple[str, ...]:
    return _virsh(uri, "net-info", "--network", require_object_name(network, "network"))


def volume_create_command(uri: str, pool: str, volume: str, capacity_bytes: int, fmt: str,
                          backing: tuple[str, str] | None = None) -> tuple[str, ...]:
    """A new volume; with ``backing`` (volume name, its format) a qcow2 overlay on that volume."""
    if fmt not in ("qcow2", "raw"):
        raise ValidationFailed.one("format", "must be qcow2 or raw")
    extra: tuple[str, ...] = ()
    if backing is not None:
        if backing[1] not in ("qcow2", "raw"):
            raise ValidationFailed.one("base_volume", "must be a qcow2 or raw volume")
        extra = ("--backing-vol", require_object_name(backing[0], "base_volume"), "--backing-vol-format", backing[1])
    return _virsh(uri, "vol-create-as", "--pool", require_object_name(pool, "pool"),
                  "--name", require_object_name(volume, "volume"), "--capacity", str(int(capacity_bytes)),
                  "--format", fmt, *extra)


def volume_upload_command(uri: str, pool: str, volume: str) -> tuple[str, ...]:
    """Upload the command's stdin into the volume."""
    return _virsh(uri, "vol-upload", "--pool", require_object_name(pool, "pool"),
                  "--vol", require_object_name(volume, "volume"), "--file", STDIN)


def volume_clone_command(uri: str, pool: str, volume: str, new_name: str) -> tuple[str, ...]:
    return _virsh(uri, "vol-clone", "--pool", require_object_name(pool, "pool"),
                  "--vol", require_object_name(volume, "volume"), "--newname", require_object_name(new_name, "name"))


def volume_delete_command(uri: str, pool: str, volume: str) -> tuple[str, ...]:
    return _virsh(uri, "vol-delete", "--pool", require_object_name(pool, "pool"),
                  "--vol", require_object_name(volume, "volume"))


def define_command(uri: str) -> tuple[str, ...]:
    """Define a domain from the XML on the command's stdin."""
    return _virsh(uri, "define", "--file", STDIN)


def domain_xml_command(uri: str, vm: str, inactive: bool = True) -> tuple[str, ...]:
    """The VM's XML as defined (``--inactive``), or as it runs (with its vnet devices)."""
    return _virsh(uri, "dumpxml", "--domain", require_vm_name(vm), *(("--inactive",) if inactive else ()))


def undefine_command(uri: str, vm: str, nvram: bool) -> tuple[str, ...]:
    """Undefine with the snapshots' metadata (and the UEFI variables file when the VM has one:
    ``--nvram`` fails on a VM without)."""
    return _virsh(uri, "undefine", "--domain", require_vm_name(vm), "--snapshots-metadata",
                  *(("--nvram",) if nvram else ()))


def interfaces_command(uri: str, vm: str, source: str) -> tuple[str, ...]:
    if source not in INTERFACE_SOURCES:
        raise ValidationFailed.one("source", "must be one of " + ", ".join(INTERFACE_SOURCES))
    return _virsh(uri, "domifaddr", "--domain", require_vm_name(vm), "--source", source)


def parse_names(stdout: str) -> list[str]:
    """One name a line (``--name`` listings), blank lines skipped."""
    return [line.strip() for line in stdout.splitlines() if line.strip()]


def parse_pool_info(stdout: str, name: str) -> Pool:
    f = _key_values(stdout)
    return Pool(name=f.get("Name") or name, state=f.get("State") or None, autostart=_yes_no(f.get("Autostart")),
                capacity_bytes=_whole_int(f.get("Capacity")), allocation_bytes=_whole_int(f.get("Allocation")),
                available_bytes=_whole_int(f.get("Available")))


def parse_network_info(stdout: str, name: str) -> Network:
    f = _key_values(stdout)
    active = _yes_no(f.get("Active"))
    return Network(name=f.get("Name") or name, state=None if active is None else ("active" if active else "inactive"),
                   autostart=_yes_no(f.get("Autostart")), bridge=f.get("Bridge") or None)


def _yes_no(value: str | None) -> bool | None:
    return {"yes": True, "no": False}.get((value or "").strip().lower())


def parse_volume_list(stdout: str) -> list[tuple[str, str]]:
    """``(name, path)`` of each row of ``virsh vol-list`` (``Name  Path``), cut at the header's
    column positions (display cells), so names and paths with spaces keep their columns."""
    lines = stdout.splitlines()
    separator = _separator(lines)
    if separator is None or separator == 0:
        return []
    starts = _column_starts(lines[separator - 1], _HEADER_CELL)
    if not starts:
        return []
    rows = []
    for line in lines[separator + 1:]:
        cells = [cell.strip() for cell in _cut(line, starts, min(len(starts), 2))]
        if cells and cells[0]:
            rows.append((cells[0], cells[1] if len(cells) > 1 else ""))
    return rows


XML_MAX = 1024 * 1024  # characters of XML a host may answer with that the portal parses


def _xml_root(text: str) -> Any:
    """Parse XML from a host; None for anything with a DOCTYPE (entities), oversized or malformed."""
    if len(text) > XML_MAX or "<!DOCTYPE" in text.upper() or "<!ENTITY" in text.upper():
        return None
    try:
        # No DOCTYPE, so no entity can be declared (expat also bounds amplification itself).
        return ElementTree.fromstring(text)  # noqa: S314
    except ElementTree.ParseError:
        return None


def parse_volume_xml(stdout: str, name: str) -> Volume:
    root = _xml_root(stdout)
    if root is None:
        return Volume(name=name, path=None, format=None, capacity_bytes=None, allocation_bytes=None)
    fmt = root.find("target/format")
    backing = root.find("backingStore/path")
    path = (root.findtext("target/path") or "").strip() or None
    return Volume(name=(root.findtext("name") or name).strip(), path=path,
                  format=fmt.get("type") if fmt is not None else None,
                  capacity_bytes=_bytes(root.find("capacity")), allocation_bytes=_bytes(root.find("allocation")),
                  backing_path=(backing.text or "").strip() or None if backing is not None else None)


_UNITS = {"": 1, "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 10**6,
          "g": 1024**3, "gib": 1024**3, "gb": 10**9, "t": 1024**4, "tib": 1024**4, "tb": 10**12}


def _bytes(element: Any) -> int | None:
    if element is None:
        return None
    number = _whole_int((element.text or "").strip())
    scale = _UNITS.get((element.get("unit") or "").lower())
    return None if number is None or scale is None else number * scale


def parse_domain_xml(stdout: str) -> DomainDevices:
    """The disks and interfaces of ``virsh dumpxml`` output (nothing when it is not XML)."""
    root = _xml_root(stdout)
    if root is None:
        return DomainDevices(uuid=None, disks=[], interfaces=[])
    disks = []
    for disk in root.findall("devices/disk"):
        source = disk.find("source")
        target = disk.find("target")
        device = disk.get("device") or "disk"
        dev = target.get("dev") if target is not None else None
        if source is None:
            disks.append(DiskDevice(target=dev, device=device))
        elif disk.get("type") == "volume":
            disks.append(DiskDevice(target=dev, device=device, pool=source.get("pool"), volume=source.get("volume")))
        else:
            disks.append(DiskDevice(target=dev, device=device, file=source.get("file") or source.get("dev")))
    interfaces = []
    for interface in root.findall("devices/interface"):
        mac, source, target = interface.find("mac"), interface.find("source"), interface.find("target")
        interfaces.append(InterfaceDevice(mac=mac.get("address") if mac is not None else None,
                                          network=source.get("network") if source is not None else None,
                                          bridge=source.get("bridge") if source is not None else None,
                                          target=target.get("dev") if target is not None else None))
    return DomainDevices(uuid=(root.findtext("uuid") or "").strip() or None, disks=disks, interfaces=interfaces,
                         nvram=root.find("os/nvram") is not None)


def parse_domifaddr(stdout: str) -> list[GuestInterface]:
    """Parse ``virsh domifaddr``: `` Name  MAC address  Protocol  Address`` rows; a row with an
    empty name (``-``) continues the interface above (another address)."""
    lines = stdout.splitlines()
    separator = _separator(lines)
    rows = lines[separator + 1:] if separator is not None else []
    found: dict[str, GuestInterface] = {}
    last: GuestInterface | None = None
    for line in rows:
        cells = line.split()
        if len(cells) < 4:
            continue
        name, mac, kind, address = cells[0], cells[1], cells[2], cells[3]
        if name == "-" and last is not None:
            interface = last
        else:
            interface = found.setdefault(name, GuestInterface(name=name, mac=None if mac == "-" else mac, network=None,
                                                              addresses=[]))
        ip, _, prefix = address.partition("/")
        interface.addresses.append(GuestAddress(type=kind, address=ip, prefix=_whole_int(prefix) if prefix else None))
        last = interface
    return list(found.values())


def raise_for_provisioning_failure(result: CommandResult, *, vm: str | None = None, pool: str | None = None,
                                   volume: str | None = None, network: str | None = None) -> None:
    """``raise_for_failure``, knowing storage and network errors first."""
    if result.exit_status == 0:
        return
    _, lowered = _failure_text(result)
    if "storage pool not found" in lowered or "no storage pool with matching" in lowered:
        raise PoolNotFound(f"no storage pool named {pool!r} on this agent")
    if "storage volume not found" in lowered or "no storage vol with matching" in lowered:
        raise VolumeNotFound(f"no volume named {volume!r} in pool {pool!r}")
    if "network not found" in lowered or "no network with matching" in lowered:
        raise NetworkNotFound(f"no network named {network!r} on this agent")
    if ("storage volume" in lowered and "exists already" in lowered) or "volume already exists" in lowered:
        raise VolumeNameTaken(f"pool {pool!r} already has a volume named {volume!r}")
    raise_for_failure(result, vm)


# ---------------------------------------------------------------------- consoles (issue 17)

# The loopback names ``virsh domdisplay`` may print for a VNC server the host itself can reach
# (libvirt prints "localhost" for a server listening on every address).
_VNC_LOOPBACK = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1", "[::1]": "::1"}
VNC_BASE_PORT = 5900


def serial_console_command(uri: str, vm: str) -> tuple[str, ...]:
    """The VM's serial console; ``--force`` takes it over from another session (like the web
    consoles of every peer), which virsh ends."""
    return _virsh(uri, "console", "--domain", require_vm_name(vm), "--force")


def ttyconsole_command(uri: str, vm: str) -> tuple[str, ...]:
    """The pty of the VM's serial console: fails (or prints nothing) when it has none."""
    return _virsh(uri, "ttyconsole", "--domain", require_vm_name(vm))


def vnc_display_command(uri: str, vm: str) -> tuple[str, ...]:
    """The VM's VNC display as a URI (``vnc://127.0.0.1:0``); nothing when it has no VNC graphics."""
    return _virsh(uri, "domdisplay", "--domain", require_vm_name(vm), "--type", "vnc")


def vnc_relay_command(uri: str, vm: str) -> tuple[str, ...]:
    """Not a virsh command: the restricted shell of an enrolled host (scripts/agent_shell.py)
    answers it itself, finding the VM's VNC port with ``domdisplay`` and relaying that socket to
    the channel, because its key may not forward ports."""
    return _virsh(uri, "console-vnc", "--domain", require_vm_name(vm))


def parse_vnc_display(stdout: str) -> tuple[str, int] | None:
    """The loopback address and TCP port of a ``virsh domdisplay --type vnc`` answer, or None when
    there is no VNC display the host's loopback reaches (none, a socket, another address)."""
    line = stdout.strip().splitlines()[0].strip() if stdout.strip() else ""
    if not line.startswith("vnc://") or len(line) > 200:
        return None
    rest = line[len("vnc://"):].split("/", 1)[0].split("?", 1)[0]
    host, sep, display = rest.rpartition(":")
    if not sep or not display.isascii() or not display.isdigit() or len(display) > 5:
        return None
    address = _VNC_LOOPBACK.get(host)
    port = VNC_BASE_PORT + int(display)
    if address is None or port > 65535:
        return None
    return address, port


# ---------------------------------------------------------------------- events (issue 18)
# ``virsh event --all --loop --timestamp`` prints one line per event, e.g.
#   2026-12-01 06:16:37.638+0000: event 'lifecycle' for domain 'ev-probe': Started Booted
#   2026-12-01 06:16:40.001+0000: event 'reboot' for domain 'ev-probe'
# and a few event kinds (tunable, job-completed) continue on lines that start with a tab.

# libvirt's lifecycle events (the first word virsh prints) and the state a VM is in after each;
# None: the state does not follow from the event (a list tells).
LIFECYCLE_STATES: dict[str, str | None] = {
    "defined": None, "undefined": None, "started": "running", "suspended": "paused", "resumed": "running",
    "stopped": "shut off", "shutdown": None, "pmsuspended": "pmsuspended", "crashed": "crashed",
}
HOST_EVENT_MAX_DETAIL = 1000
_EVENT_LINE = re.compile(
    r"^(?:(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})?)(?P<tz>[+-]\d{4})?: )?"
    r"event '(?P<kind>[A-Za-z0-9_-]{1,40})' for domain '(?P<vm>[^'\n]{1,255}?)'(?::[ \t]?(?P<detail>.*))?$")


def event_command(uri: str) -> tuple[str, ...]:
    """Every event of every VM, one per line with the host's time, until the channel closes."""
    return _virsh(uri, "event", "--all", "--loop", "--timestamp")


@attrs.frozen
class HostEvent:
    """One event a host's libvirt reported: ``type`` is ``vm.<lifecycle event>`` (``vm.started``,
    ``vm.stopped``…) for lifecycle events and ``vm.<event>`` for the others (``vm.reboot``)."""

    at: datetime | None
    vm: str
    type: str
    detail: str

    @property
    def state(self) -> str | None:
        """The VM's state after this event, when the event says it."""
        if not self.type.startswith("vm."):
            return None
        return LIFECYCLE_STATES.get(self.type[3:])


def parse_event_line(line: str) -> HostEvent | None:
    """One line of ``virsh event --timestamp``; None for anything else (a continuation line, a
    banner, garbage). Linear in the line (one anchored regex without nested repeats)."""
    match = _EVENT_LINE.match(line.rstrip("\r"))
    if match is None:
        return None
    kind = match.group("kind").lower()
    detail = (match.group("detail") or "").strip()
    if kind == "lifecycle":
        first, _, rest = detail.partition(" ")
        event = first.lower()
        if event not in LIFECYCLE_STATES:
            event = "lifecycle"
        else:
            detail = rest.strip()
    else:
        event = kind.replace("_", "-")
    at = None
    if match.group("at"):
        try:
            at = datetime.strptime(match.group("at") + (match.group("tz") or "+0000"),
                                   "%Y-%m-%d %H:%M:%S.%f%z" if "." in match.group("at") else "%Y-%m-%d %H:%M:%S%z")
            at = at.astimezone(UTC)
        except ValueError:
            at = None
    return HostEvent(at=at, vm=match.group("vm"), type=f"vm.{event}", detail=detail[:HOST_EVENT_MAX_DETAIL])


class EventLines:
    """Cuts the bytes a ``virsh event`` stream delivers, in chunks of any size, into events.
    Continuation lines (tab-indented) are appended to the previous event's detail; a line longer
    than ``max_line`` is dropped whole (a hostile host cannot make the buffer grow)."""

    def __init__(self, max_line: int = 8192) -> None:
        self.max_line = max_line
        self._buffer = b""
        self._dropping = False
        self.skipped = 0  # lines that were no event

    def feed(self, chunk: bytes) -> list[HostEvent]:
        self._buffer += chunk
        events: list[HostEvent] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    self._buffer, self._dropping = b"", True
                return events
            raw, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            if self._dropping or len(raw) > self.max_line:
                self._dropping = False
                self.skipped += 1
                continue
            line = raw.decode("utf-8", "replace")
            if line.startswith("\t") and events:
                last = events[-1]
                events[-1] = attrs.evolve(last, detail=(last.detail + " " + line.strip())[:HOST_EVENT_MAX_DETAIL])
                continue
            event = parse_event_line(line)
            if event is None:
                self.skipped += 1
            else:
                events.append(event)
