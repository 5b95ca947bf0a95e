"""virsh, as the portal uses it: VM-name rules, argument vectors, output parsers, failure mapping.

Pure functions, property-tested. Commands are argument vectors; the transport shell-quotes every
element, and every VM name goes after ``--domain`` so no name can be read as an option.
"""

from __future__ import annotations

import enum
import re
import shlex
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime

import attrs

from core.errors import (
    LibvirtUnavailable,
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
    f = parse_domstats(stdout)

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
