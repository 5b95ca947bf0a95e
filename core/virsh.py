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

import attrs

from core.errors import Conflict, NotFound, RemoteError, ValidationFailed
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

    @property
    def subcommand(self) -> str:
        return {"start": "start", "shutdown": "shutdown", "force-stop": "destroy", "reboot": "reboot"}[self.value]


@attrs.frozen
class VmSummary:
    """One row of ``virsh list --all``: ``id`` is None when the VM is not running."""

    name: str
    state: str
    id: int | None


def check_vm_name(name: str) -> str | None:
    """Why ``name`` is refused as a VM name, or None when it is acceptable."""
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


def command_line(argv: Sequence[str]) -> str:
    """The single string an SSH server hands to the remote shell: every argument quoted."""
    return " ".join(shlex.quote(arg) for arg in argv)


# ---------------------------------------------------------------------- parsing

_KNOWN_STATES = ("running", "idle", "paused", "in shutdown", "shut off", "crashed", "pmsuspended",
                 "blocked", "dying", "no state")
_ROW = re.compile(r"^\s*(?P<id>[0-9]{1,10}|-)\s+(?P<rest>.*?)\s*$")


def parse_list(stdout: str) -> list[VmSummary]:
    """Parse ``virsh list --all``. Rows are recognised by their leading id (a number, or '-' when
    not running); names may contain spaces. With the usual three columns the state is matched
    against libvirt's states at the end of the row; otherwise (localized states, extra columns such
    as ``--title``) rows are cut at the header's column positions, counted in display cells as
    virsh pads them (a wide CJK character takes two)."""
    lines = stdout.splitlines()
    separator = next((i for i, line in enumerate(lines) if line.strip() and set(line.strip()) == {"-"}), None)
    header = lines[separator - 1] if separator is not None and separator >= 1 else ""
    columns = [_width(header[: m.start()]) for m in re.finditer(r"\S+", header)]
    rows = lines[separator + 1:] if separator is not None else lines
    result: list[VmSummary] = []
    for line in rows:
        match = _ROW.match(line)
        if not line.strip() or match is None:
            continue
        vm_id = None if match.group("id") == "-" else int(match.group("id"))
        name, state = _split_name_state(line, match.group("rest"), columns)
        if name:
            result.append(VmSummary(name=name, state=state, id=vm_id))
    return result


def _split_name_state(line: str, rest: str, columns: list[int]) -> tuple[str, str]:
    if len(columns) <= 3:
        for state in _KNOWN_STATES:
            if rest.endswith(" " + state):
                return rest[: -len(state)].rstrip(), state
    if len(columns) >= 3:
        end = columns[3] if len(columns) >= 4 else None
        name = _cells(line, columns[1], columns[2]).strip()
        state = _cells(line, columns[2], end).strip()
        if name:
            return name, state
    name, _, state = rest.rpartition(" ")
    return name.strip(), state


def _width(text: str) -> int:
    """Terminal cells ``text`` takes (East Asian wide and full-width characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cells(line: str, start: int, end: int | None) -> str:
    """The characters of ``line`` between display cells ``start`` and ``end``."""
    out: list[str] = []
    cell = 0
    for char in line:
        if cell >= start and (end is None or cell < end):
            out.append(char)
        cell += _width(char)
    return "".join(out)


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
        info["id"] = int(raw_id) if isinstance(raw_id, str) and raw_id.isascii() and raw_id.isdigit() else None
    return info


def _snake(key: str) -> str:
    key = key.strip().lower().replace("(s)", "s")
    return re.sub(r"[^a-z0-9]+", "_", key).strip("_")


# ---------------------------------------------------------------------- failures


def raise_for_failure(result: CommandResult, vm: str | None = None) -> None:
    """Turn a failed virsh run into the domain error an operator expects (404, 409, 502)."""
    if result.exit_status == 0:
        return
    stderr = result.stderr.strip()
    # Match virsh's words, not the names it quotes: a VM called 'already active' must not look
    # like the error "already active". (VM names never contain a quote.)
    lowered = re.sub(r"'[^']*'", "''", stderr).lower()
    subject = f"VM {vm!r}" if vm is not None else "the request"
    if result.exit_status == 127 or "command not found" in lowered:
        raise RemoteError(f"virsh is not installed on the agent: {stderr}", code="virsh_not_found")
    if "domain not found" in lowered or "failed to get domain" in lowered:
        raise NotFound(f"no VM named {vm!r} on this agent", code="vm_not_found")
    if "already active" in lowered or "domain is already running" in lowered:
        raise Conflict(f"{subject} is already running", code="vm_already_running")
    if "not running" in lowered or "domain is not active" in lowered:
        raise Conflict(f"{subject} is not running", code="vm_not_running")
    if "operation is not valid" in lowered or "requested operation is not valid" in lowered:
        raise Conflict(f"{subject} cannot do that in its current state: {stderr}", code="vm_state_conflict")
    if "failed to connect" in lowered or "connect socket" in lowered or ("libvirt" in lowered and "connect" in lowered):
        raise RemoteError(f"libvirt is not reachable on the agent: {stderr}", code="libvirt_unavailable")
    raise RemoteError(f"virsh failed with exit status {result.exit_status}: {stderr or '(no output)'}",
                      code="virsh_failed")
