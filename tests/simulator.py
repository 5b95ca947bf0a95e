"""A simulated fleet: N fake hypervisors in one process, on loopback, for tests and benchmarks.

Each host is an asyncssh server of its own (its own host key, its own port) that accepts one
client key and answers the ``virsh --connect URI …`` commands the portal sends (``core/virsh.py``)
from a small state model: domains with their state, id, autostart and snapshots, and the host's
``nodeinfo``, ``version --daemon``, ``hostname`` and ``uri``. Output and failure texts are the real
lab's (libvirt 9.0.0, recorded with ``LC_ALL=C virsh -c qemu:///system …``), byte for byte, down to
the blank line virsh prints after most commands; ``tests/lab/test_simulator_fidelity.py`` runs the
same VM scenarios through the portal against the lab and against a simulated host and compares
the answers.

``virsh event --all --loop --timestamp`` (the watchers', issue 18) is answered as the lab's
libvirt answers it: one line per event, with the host's time, for every change the state model
makes (the portal's commands, a guest powering off after an ACPI press, or ``on_host`` — a
command typed on the host itself), the same events in the same order as libvirt 9.0.0 emits them
(recorded in ``tests/data/virsh-event-lab.txt`` and by the fidelity test); the stream stays open
until the client closes the channel.

Some hosts can be *silent*: they accept TCP and never say a word (a hung sshd, a tarpit), so a
client waits for its connect time-out. Every command waits ``latency`` seconds before answering
(what virsh takes on a real host). Counters (connections accepted and open, commands run) let a
test or a benchmark see what the portal cost the fleet.

    fleet = SimulatedFleet(hosts=100, silent=10, latency=0.02)
    await fleet.start()            # or, from synchronous code: ThreadedFleet(...).start()
    fleet.hosts[0].port, fleet.hosts[0].host_key, fleet.client_key   # what an agent needs
    await fleet.close()

Used by ``bench/fleet.py`` (cost curves), ``tests/lab/test_simulator_fidelity.py`` and
``tests/e2e/test_fleet_soak.py``. One listening socket per host, plus one per open connection:
``start`` raises the process's soft ``RLIMIT_NOFILE`` to its hard limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import resource
import shlex
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncssh
import attrs

from tests.virsh_tables import render_table

_T = TypeVar("_T")

# ---------------------------------------------------------------------------- recorded output

# What the lab's host prints (libvirt 9.0.0 on Debian 12, QEMU 7.2), recorded with LC_ALL=C.
NODEINFO = (
    "CPU model:           x86_64\n"
    "CPU(s):              2\n"
    "CPU frequency:       2445 MHz\n"
    "CPU socket(s):       1\n"
    "Core(s) per socket:  2\n"
    "Thread(s) per core:  1\n"
    "NUMA cell(s):        1\n"
    "Memory size:         7038712 KiB\n"
    "\n"
)
VERSION = (
    "Compiled against library: libvirt 9.0.0\n"
    "Using library: libvirt 9.0.0\n"
    "Using API: QEMU 9.0.0\n"
    "Running hypervisor: QEMU 7.2.22\n"
    "Running against daemon: 9.0.0\n"
    "\n"
)

# libvirt's state numbers (virDomainState) and the word ``virsh list`` prints for each.
STATE_NUMBERS = {"running": 1, "paused": 3, "shut off": 5}
# What ``snapshot-list`` prints for the state a snapshot was taken in.
SNAPSHOT_STATES = {"running": "running", "paused": "paused", "shut off": "shutoff"}
# virDomainShutoffReason / virDomainRunningReason / virDomainPausedReason, as virsh prints them.
REASON_UNKNOWN, REASON_BOOTED, REASON_SHUTDOWN, REASON_DESTROYED, REASON_USER = 0, 1, 1, 2, 1


def _failed_to_get(name: str) -> str:
    return f"error: failed to get domain '{name}'"


def _not_valid(verb: str, name: str, why: str) -> str:
    return f"error: Failed to {verb} domain '{name}'\nerror: Requested operation is not valid: domain is {why}"


# ---------------------------------------------------------------------------- the state model


@attrs.define
class SimSnapshot:
    name: str
    created_at: datetime
    state: str  # the domain's state when taken: running, paused, shut off
    parent: str | None
    description: str | None = None


@attrs.define
class SimDomain:
    """A domain as libvirt keeps it: a persistent definition, and a state."""

    name: str
    uuid: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    vcpus: int = 1
    memory_kib: int = 131072
    state: str = "shut off"
    reason: int = REASON_UNKNOWN
    id: int | None = None
    autostart: bool = False
    disk: str | None = None  # a qcow2 disk's path (internal snapshots need one)
    cpu_time_ns: int = 0
    snapshots: dict[str, SimSnapshot] = attrs.field(factory=dict)
    current_snapshot: str | None = None

    @property
    def active(self) -> bool:
        return self.state != "shut off"


@attrs.frozen
class EventRequest:
    """What ``virsh event`` was asked for: every event with its time, until the channel closes
    (``loop``), or only the first one."""

    timestamp: bool
    loop: bool


@attrs.define
class Reply:
    exit_status: int
    stdout: str
    stderr: str = ""
    follow: EventRequest | None = None  # ``virsh event``: the answer is a stream of events


# What libvirt 9.0.0 emits (``virsh event``'s words) as the state model changes, recorded on the
# lab: a start is "Resumed Unpaused" then "Started Booted"; a guest that powers off after an ACPI
# press is "Shutdown Finished after guest request" then "Stopped Shutdown"; a destroy of an active
# domain is "Shutdown Finished after host request" then "Stopped Destroyed"; a reboot (ACPI) is two
# ``reboot`` events from the lab's guest; a snapshot of an active domain saves its memory
# (``migration-iteration`` events, and a pause around it when running); a revert stops a running
# domain and starts the snapshot's ("... Snapshot"), and always redefines it ("Defined Snapshot").
# Autostart and deleting a snapshot emit nothing.
EVENTS_ON_START = ("Resumed Unpaused", "Started Booted")
EVENTS_ON_GUEST_POWER_OFF = ("Shutdown Finished after guest request", "Stopped Shutdown")
EVENTS_ON_DESTROY = ("Shutdown Finished after host request", "Stopped Destroyed")


def ok(text: str) -> Reply:
    return Reply(0, text)


def fail(stderr: str) -> Reply:
    return Reply(1, "\n", stderr + "\n")


class SimHost:
    """One hypervisor's libvirt: domains and the host's facts, and ``execute`` for one command line."""

    def __init__(self, hostname: str, *, domains: Iterable[SimDomain] = (), shutdown_delay: float = 0.2,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.hostname = hostname
        self.domains: dict[str, SimDomain] = {d.name: d for d in domains}
        self.shutdown_delay = shutdown_delay  # seconds a guest takes to power off on an ACPI press
        self.next_id = 1
        self._now = now
        self.commands: list[str] = []  # every command line received, in order
        self._listeners: list[Callable[[str], None]] = []  # open ``virsh event`` streams
        # When set, ``virsh event`` fails with these words (a host whose libvirt refuses event
        # streams): the portal's watcher of this host never stays up.
        self.event_failure: str | None = None

    # ------------------------------------------------------------------ events

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener`` with each event (a line, without its time stamp) until the returned
        function is called."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def event_time(self) -> str:
        """The host's time as ``virsh event --timestamp`` prints it (milliseconds, UTC)."""
        now = self._now().astimezone(UTC)
        return now.strftime("%Y-%m-%d %H:%M:%S.") + f"{now.microsecond // 1000:03d}+0000"

    def _emit(self, domain: str, kind: str, *details: str) -> None:
        """One event per detail (``lifecycle``), or one without detail (``reboot``)."""
        lines = ([f"event '{kind}' for domain '{domain}': {detail}" for detail in details] if details
                 else [f"event '{kind}' for domain '{domain}'"])
        for line in lines:
            for listener in list(self._listeners):
                listener(line)

    def _lifecycle(self, domain: SimDomain, *details: str) -> None:
        self._emit(domain.name, "lifecycle", *details)

    def on_host(self, command: str) -> Reply:
        """``command`` typed on the host itself (not through the portal): it changes the state and
        emits events like any other, but is not counted as a command the portal sent."""
        return self.execute(command, counted=False)

    def define(self, domain: SimDomain) -> SimDomain:
        """``virsh define`` on the host: a new persistent domain (shut off), "Defined Added"."""
        self.add_domain(domain)
        self._lifecycle(domain, "Defined Added")
        return domain

    def undefine(self, options: _Options, uri: str) -> Reply:
        """``virsh undefine`` of a shut-off domain (its snapshots' metadata too): "Undefined Removed"."""
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        if domain.active:  # libvirt would keep it running as a transient domain: not simulated
            return fail(f"error: the simulator cannot undefine the active domain '{domain.name}'")
        del self.domains[domain.name]
        self._lifecycle(domain, "Undefined Removed")
        return ok(f"Domain '{domain.name}' has been undefined\n\n")

    def add_domain(self, domain: SimDomain) -> SimDomain:
        self.domains[domain.name] = domain
        return domain

    # ------------------------------------------------------------------ dispatch

    def execute(self, command: str, *, counted: bool = True) -> Reply:
        """What a shell running ``command`` on this host answers (exit status, stdout, stderr)."""
        if counted:
            self.commands.append(command)
        try:
            argv = shlex.split(command)
        except ValueError as error:
            return Reply(2, "", f"bash: -c: line 1: {error}\n")
        if not argv:
            return Reply(0, "")
        if argv[0] != "virsh":
            return Reply(127, "", f"bash: line 1: {argv[0]}: command not found\n")
        args = argv[1:]
        uri = "qemu:///system"
        if args[:1] in (["--connect"], ["-c"]) and len(args) >= 2:
            uri, args = args[1], args[2:]
        if not args:
            return fail("error: no command given")
        sub, options = args[0], _Options.parse(args[1:])
        handler = _COMMANDS.get(sub)
        if handler is None:
            return fail(f"error: unknown command: '{sub}'")
        return handler(self, options, uri)

    def lookup(self, ref: str) -> SimDomain | None:
        """As virsh looks a ``--domain`` value up: an id, then a UUID, then a name."""
        if ref.isdigit():
            for domain in self.domains.values():
                if domain.id == int(ref):
                    return domain
        for domain in self.domains.values():
            if domain.uuid == ref.lower():
                return domain
        return self.domains.get(ref)

    # ------------------------------------------------------------------ commands

    def list_all(self, options: _Options, uri: str) -> Reply:
        running = sorted((d for d in self.domains.values() if d.active), key=lambda d: d.id or 0)
        stopped = sorted((d for d in self.domains.values() if not d.active), key=lambda d: d.name)
        rows = [(str(d.id) if d.id is not None else "-", d.name, d.state) for d in running + stopped]
        return ok(render_table(("Id", "Name", "State"), rows))

    def dominfo(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        lines = [("Id:", str(domain.id) if domain.id is not None else "-"), ("Name:", domain.name),
                 ("UUID:", domain.uuid), ("OS Type:", "hvm"), ("State:", domain.state),
                 ("CPU(s):", str(domain.vcpus))]
        if domain.active:
            lines.append(("CPU time:", f"{domain.cpu_time_ns / 1e9:.1f}s"))
        lines += [("Max memory:", f"{domain.memory_kib} KiB"), ("Used memory:", f"{domain.memory_kib} KiB"),
                  ("Persistent:", "yes"), ("Autostart:", "enable" if domain.autostart else "disable"),
                  ("Managed save:", "no"), ("Security model:", "none"), ("Security DOI:", "0")]
        return ok("".join(f"{key:<15} {value}\n" for key, value in lines) + "\n")

    def start(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        if domain.active:
            return fail("error: Domain is already active")
        self._boot(domain)
        self._lifecycle(domain, *EVENTS_ON_START)
        return ok(f"Domain '{domain.name}' started\n\n")

    def _boot(self, domain: SimDomain) -> None:
        domain.state, domain.reason, domain.id = "running", REASON_BOOTED, self.next_id
        domain.cpu_time_ns += 700_000_000
        self.next_id += 1

    def _power_off(self, domain: SimDomain, reason: int, events: tuple[str, ...] = ()) -> None:
        domain.state, domain.reason, domain.id = "shut off", reason, None
        if events:
            self._lifecycle(domain, *events)

    def shutdown(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        if domain.state != "running":
            return fail(_not_valid("shutdown", domain.name, "not running"))
        booted = domain.id

        def power_off() -> None:  # the guest handles the ACPI press a moment later
            if domain.id == booted and domain.state == "running":
                self._power_off(domain, REASON_SHUTDOWN, EVENTS_ON_GUEST_POWER_OFF)

        asyncio.get_running_loop().call_later(self.shutdown_delay, power_off)
        return ok(f"Domain '{domain.name}' is being shutdown\n\n")

    def destroy(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        if not domain.active:
            return fail(_not_valid("destroy", domain.name, "not running"))
        self._power_off(domain, REASON_DESTROYED, EVENTS_ON_DESTROY)
        return ok(f"Domain '{domain.name}' destroyed\n\n")

    def reboot(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        if not domain.active:
            return fail(_not_valid("reboot", domain.name, "not running"))
        self._emit(domain.name, "reboot")
        self._emit(domain.name, "reboot")
        return ok(f"Domain '{domain.name}' is being rebooted\n\n")

    def suspend(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        if not domain.active:
            return fail(_not_valid("suspend", domain.name, "not running"))
        if domain.state != "paused":  # suspending a paused domain succeeds too, and says nothing
            domain.state, domain.reason = "paused", REASON_USER
            self._lifecycle(domain, "Suspended Paused")
        return ok(f"Domain '{domain.name}' suspended\n\n")

    def resume(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        if not domain.active:
            return fail(_not_valid("resume", domain.name, "not running"))
        if domain.state == "running":
            return fail(_not_valid("resume", domain.name, "already running"))
        domain.state, domain.reason = "running", REASON_BOOTED
        self._lifecycle(domain, "Resumed Unpaused")
        return ok(f"Domain '{domain.name}' resumed\n\n")

    def autostart(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        domain.autostart = "--disable" not in options.flags
        marked = "marked" if domain.autostart else "unmarked"
        return ok(f"Domain '{domain.name}' {marked} as autostarted\n\n")

    def domstats(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        fields: list[tuple[str, object]] = []
        groups = options.flags
        if "--state" in groups:
            fields += [("state.state", STATE_NUMBERS[domain.state]), ("state.reason", domain.reason)]
        if "--cpu-total" in groups:
            fields += [("cpu.time", domain.cpu_time_ns), ("cpu.user", domain.cpu_time_ns // 2),
                       ("cpu.system", domain.cpu_time_ns - domain.cpu_time_ns // 2)]
            if domain.active:
                fields += [("cpu.cache.monitor.count", 0), ("cpu.haltpoll.success.time", 0),
                           ("cpu.haltpoll.fail.time", 0)]
        if "--balloon" in groups:
            fields += [("balloon.current", domain.memory_kib), ("balloon.maximum", domain.memory_kib)]
            if domain.active:
                fields.append(("balloon.rss", domain.memory_kib * 72 // 100))
        if "--vcpu" in groups:
            fields += [("vcpu.current", domain.vcpus), ("vcpu.maximum", domain.vcpus)]
            if domain.active:
                for i in range(domain.vcpus):
                    fields += [(f"vcpu.{i}.state", 1), (f"vcpu.{i}.time", domain.cpu_time_ns // 4),
                               (f"vcpu.{i}.wait", 0), (f"vcpu.{i}.delay", 407629683)]
        if "--interface" in groups and domain.active:
            fields.append(("net.count", 0))
        if "--block" in groups:
            disks = [domain.disk] if domain.disk else []
            fields.append(("block.count", len(disks)))
            for i, path in enumerate(disks):
                fields += [(f"block.{i}.name", "vda"), (f"block.{i}.path", path)]
                if domain.active:
                    fields += [(f"block.{i}.backingIndex", 1), (f"block.{i}.rd.reqs", 1),
                               (f"block.{i}.rd.bytes", 512), (f"block.{i}.rd.times", 125957),
                               (f"block.{i}.wr.reqs", 0), (f"block.{i}.wr.bytes", 0), (f"block.{i}.wr.times", 0),
                               (f"block.{i}.fl.reqs", 0), (f"block.{i}.fl.times", 0)]
                fields += [(f"block.{i}.allocation", 0 if domain.active else 200704),
                           (f"block.{i}.capacity", 16777216), (f"block.{i}.physical", 217088)]
        return ok(f"Domain: '{domain.name}'\n" + "".join(f"  {k}={v}\n" for k, v in fields) + "\n")

    def snapshot_list(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        rows = [(s.name, s.created_at.strftime("%Y-%m-%d %H:%M:%S +0000"), SNAPSHOT_STATES[s.state], s.parent or "")
                for s in sorted(domain.snapshots.values(), key=lambda s: s.name)]
        return ok(render_table(("Name", "Creation Time", "State", "Parent"), rows))

    def snapshot_current(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        if domain.current_snapshot is None:
            return fail(f"error: domain '{domain.name}' has no current snapshot")
        return ok(domain.current_snapshot + "\n")

    def snapshot_create(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        name = options.value("--name") or str(int(self._now().timestamp()))
        if name in domain.snapshots:
            return fail(f"error: operation failed: domain moment {name} already exists")
        if domain.disk is None:
            return fail("error: unsupported configuration: internal snapshot of a running VM must include the "
                        "memory state" if domain.active else
                        f"error: unsupported configuration: nothing selected for snapshot of domain '{domain.name}'")
        if domain.state == "running":
            self._lifecycle(domain, "Suspended Paused")
        if domain.active:  # the memory is saved as a migration to a file
            self._emit(domain.name, "migration-iteration", "iteration: '1'", "iteration: '2'")
        if domain.state == "running":
            self._lifecycle(domain, "Resumed Unpaused")
        domain.snapshots[name] = SimSnapshot(name, self._now(), domain.state, domain.current_snapshot,
                                             options.value("--description") or None)
        domain.current_snapshot = name
        return ok(f"Domain snapshot {name} created\n")

    def snapshot_revert(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        name = options.value("--snapshotname")
        snapshot = domain.snapshots.get(name)
        if snapshot is None:
            return fail(f"error: Domain snapshot not found: no domain snapshot with matching name '{name}'")
        if domain.active:  # libvirt stops the running QEMU whatever the snapshot's state
            self._power_off(domain, REASON_UNKNOWN, ("Stopped Snapshot",))
        if snapshot.state != "shut off":  # and starts one from the snapshot's memory
            self._boot(domain)
            domain.state = snapshot.state
            self._lifecycle(domain, "Started Snapshot",
                            "Resumed Snapshot" if snapshot.state == "running" else "Suspended Snapshot")
        self._lifecycle(domain, "Defined Snapshot")
        domain.current_snapshot = name
        return ok(f"Domain snapshot {name} reverted\n\n")

    def snapshot_delete(self, options: _Options, uri: str) -> Reply:
        domain = self.lookup(options.value("--domain"))
        if domain is None:
            return fail(_failed_to_get(options.value("--domain")))
        name = options.value("--snapshotname")
        snapshot = domain.snapshots.pop(name, None)
        if snapshot is None:
            return fail(f"error: Domain snapshot not found: no domain snapshot with matching name '{name}'")
        for child in domain.snapshots.values():
            if child.parent == name:
                child.parent = snapshot.parent
        if domain.current_snapshot == name:
            domain.current_snapshot = snapshot.parent
        return ok(f"Domain snapshot {name} deleted\n\n")

    def nodeinfo(self, options: _Options, uri: str) -> Reply:
        return ok(NODEINFO)

    def version(self, options: _Options, uri: str) -> Reply:
        return ok(VERSION if "--daemon" in options.flags else VERSION.replace("Running against daemon: 9.0.0\n", ""))

    def host_name(self, options: _Options, uri: str) -> Reply:
        return ok(f"{self.hostname}\n\n")

    def uri(self, options: _Options, uri: str) -> Reply:
        return ok(f"{uri}\n\n")

    def event(self, options: _Options, uri: str) -> Reply:
        if "--all" not in options.flags:  # (the simulator knows no --event TYPE, --domain or --list)
            return Reply(1, "", "error: one of --list, --all, or --event <type> is required\n")
        if self.event_failure is not None:
            return Reply(1, "", self.event_failure + "\n")
        return Reply(0, "", follow=EventRequest(timestamp="--timestamp" in options.flags,
                                                loop="--loop" in options.flags))


@attrs.frozen
class _Options:
    """``--option value`` pairs and bare ``--flags`` of one virsh subcommand."""

    values: dict[str, str]
    flags: frozenset[str]

    # The options that take a value, of the subcommands the simulator knows.
    TAKES_VALUE = frozenset({"--domain", "--name", "--description", "--snapshotname"})

    @classmethod
    def parse(cls, args: list[str]) -> _Options:
        values: dict[str, str] = {}
        flags: set[str] = set()
        i = 0
        while i < len(args):
            if args[i] in cls.TAKES_VALUE and i + 1 < len(args):
                values[args[i]] = args[i + 1]
                i += 2
            else:
                flags.add(args[i])
                i += 1
        return cls(values, frozenset(flags))

    def value(self, name: str) -> str:
        return self.values.get(name, "")


_COMMANDS: dict[str, Callable[[SimHost, _Options, str], Reply]] = {
    "list": SimHost.list_all, "dominfo": SimHost.dominfo, "start": SimHost.start, "shutdown": SimHost.shutdown,
    "destroy": SimHost.destroy, "reboot": SimHost.reboot, "suspend": SimHost.suspend, "resume": SimHost.resume,
    "autostart": SimHost.autostart, "domstats": SimHost.domstats, "snapshot-list": SimHost.snapshot_list,
    "snapshot-current": SimHost.snapshot_current, "snapshot-create-as": SimHost.snapshot_create,
    "snapshot-revert": SimHost.snapshot_revert, "snapshot-delete": SimHost.snapshot_delete,
    "nodeinfo": SimHost.nodeinfo, "version": SimHost.version, "hostname": SimHost.host_name, "uri": SimHost.uri,
    "event": SimHost.event, "undefine": SimHost.undefine,
}


# ---------------------------------------------------------------------------- the network side


@attrs.define(eq=False)
class SimulatedHost:
    """One host of the fleet as the portal sees it: where it listens and the key it offers."""

    index: int
    state: SimHost
    silent: bool
    port: int = 0
    host_key: str = ""  # the OpenSSH public key line to pin ("" for a silent host: it never shows one)
    connections: int = 0  # accepted so far
    open_connections: int = 0
    commands_run: int = 0


class SimulatedFleet:
    """N hosts on 127.0.0.1 in this process's event loop."""

    def __init__(self, hosts: int, *, silent: int = 0, latency: float = 0.02, domains_per_host: int = 3,
                 username: str = "playr", client_key: asyncssh.SSHKey | None = None,
                 shutdown_delay: float = 0.2) -> None:
        self.client_key = client_key or asyncssh.generate_private_key("ssh-ed25519")
        self.username = username
        self.latency = latency
        self.hosts: list[SimulatedHost] = []
        for i in range(hosts):
            domains = [SimDomain(f"vm-{i}-{j}", state="running" if j == 0 else "shut off", id=1 if j == 0 else None,
                                 reason=REASON_BOOTED if j == 0 else REASON_UNKNOWN,
                                 cpu_time_ns=700_000_000 if j == 0 else 0,
                                 disk=f"/var/lib/libvirt/images/vm-{i}-{j}.qcow2")
                       for j in range(domains_per_host)]
            state = SimHost(f"sim-host-{i}", domains=domains, shutdown_delay=shutdown_delay)
            state.next_id = 2
            self.hosts.append(SimulatedHost(i, state, silent=i >= hosts - silent))
        self._servers: list[asyncio.AbstractServer | asyncssh.SSHAcceptor] = []
        self._silent_sockets: list[asyncio.StreamWriter] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self.most_open = 0  # the most connections (silent hosts' included) open at once so far

    @property
    def client_private_key(self) -> str:
        """The private key (OpenSSH format) every host accepts, as an agent's ``private_key``."""
        return self.client_key.export_private_key("openssh").decode()

    @property
    def live(self) -> list[SimulatedHost]:
        return [h for h in self.hosts if not h.silent]

    def connections_open(self) -> int:
        return sum(h.open_connections for h in self.hosts)

    def connections_accepted(self) -> int:
        return sum(h.connections for h in self.hosts)

    def commands_run(self) -> int:
        return sum(h.commands_run for h in self.hosts)

    async def start(self) -> SimulatedFleet:
        raise_fd_limit()
        authorized = asyncssh.import_authorized_keys(self.client_key.export_public_key("openssh").decode())
        for host in self.hosts:
            if host.silent:
                server = await asyncio.start_server(functools.partial(self._stay_silent, host), "127.0.0.1", 0)
            else:
                key = asyncssh.generate_private_key("ssh-ed25519")
                host.host_key = " ".join(key.export_public_key("openssh").decode().split()[:2])
                server = await asyncssh.create_server(
                    lambda host=host: _Server(self, host), "127.0.0.1", 0, server_host_keys=[key],
                    authorized_client_keys=authorized, keepalive_interval=0, encoding=None,
                    allow_scp=False, agent_forwarding=False, x11_forwarding=False)
            host.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        return self

    def opened(self, host: SimulatedHost) -> None:
        host.connections += 1
        host.open_connections += 1
        self.most_open = max(self.most_open, self.connections_open())

    async def _stay_silent(self, host: SimulatedHost, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """Accept, never answer; counted open until the client hangs up (or ``close``)."""
        self.opened(host)
        self._silent_sockets.append(writer)
        try:
            while await reader.read(4096):
                pass
        except OSError:
            pass
        finally:
            host.open_connections -= 1

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in self._silent_sockets:
            writer.close()
        for task in list(self._sessions):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self._silent_sockets.clear()


class _Server(asyncssh.SSHServer):
    def __init__(self, fleet: SimulatedFleet, host: SimulatedHost) -> None:
        self.fleet = fleet
        self.host = host
        self.counted = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.fleet.opened(self.host)
        self.counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.host.open_connections -= 1
            self.counted = False

    def begin_auth(self, username: str) -> bool:
        return True  # public key authentication against the authorized key, always

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        return _Session(self.fleet, self.host)


class _Session(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """One exec channel: answer the command after the host's latency, then exit with its status."""

    def __init__(self, fleet: SimulatedFleet, host: SimulatedHost) -> None:
        self.fleet = fleet
        self.host = host
        self.command = ""
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def shell_requested(self) -> bool:
        return False

    def eof_received(self) -> bool:
        return True  # the client's stdin ended (the portal sends none): keep the channel to answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._unsubscribe is not None:  # a ``virsh event`` ends with its channel
            self._unsubscribe()
            self._unsubscribe = None

    def session_started(self) -> None:
        task = asyncio.ensure_future(self._answer())
        self.fleet._sessions.add(task)
        task.add_done_callback(self.fleet._sessions.discard)

    async def _answer(self) -> None:
        if self.fleet.latency:
            await asyncio.sleep(self.fleet.latency)
        assert self.chan is not None
        self.host.commands_run += 1
        reply = self.host.state.execute(self.command)
        if reply.follow is not None:
            self._follow(reply.follow)
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            if reply.stdout:
                self.chan.write(reply.stdout.encode())
            if reply.stderr:
                self.chan.write_stderr(reply.stderr.encode())
            self.chan.exit(reply.exit_status)


    def _follow(self, request: EventRequest) -> None:
        """Write each event of the host as a line until the channel closes (or, without ``loop``,
        the first one and the count, as virsh does)."""
        chan = self.chan
        assert chan is not None
        state = self.host.state

        def write(line: str) -> None:
            text = f"{state.event_time()}: {line}\n" if request.timestamp else f"{line}\n"
            with contextlib.suppress(OSError, asyncssh.Error):
                chan.write(text.encode())
                if not request.loop:
                    chan.write(b"events received: 1\n\n")
                    chan.exit(0)
            if not request.loop and self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None

        self._unsubscribe = state.subscribe(write)


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class ThreadedFleet:
    """A ``SimulatedFleet`` on an event loop of its own in a background thread, for synchronous
    tests (``Server.request``) and scripts. ``call`` runs a coroutine on the fleet's loop."""

    def __init__(self, hosts: int, **options: Any) -> None:
        self._options = options
        self._hosts = hosts
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="simulated-fleet", daemon=True)
        self.fleet: SimulatedFleet | None = None

    def start(self) -> SimulatedFleet:
        self._thread.start()
        self.fleet = self.call(self._make())
        return self.fleet

    async def _make(self) -> SimulatedFleet:
        return await SimulatedFleet(self._hosts, **self._options).start()

    def call(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 120) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def on_host(self, index: int, command: str) -> Reply:
        """``command`` typed on host ``index`` itself (``SimHost.on_host``), run on the fleet's loop."""
        assert self.fleet is not None
        state = self.fleet.hosts[index].state

        async def run() -> Reply:
            return state.on_host(command)

        return self.call(run())

    def stop(self) -> None:
        if self.fleet is not None:
            self.call(self.fleet.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
