#!/usr/bin/python3 -IS
"""playr-agent-shell: the only program the portal's SSH key may run on an enrolled hypervisor.

``scripts/agent-install.sh`` installs this file as /usr/local/libexec/playr-agent-shell and forces
it on the portal's key in ``authorized_keys`` (``restrict,command="…"``), so whoever holds that key
(the portal, or a thief of its database *and* secret key) can run exactly the virsh commands the
portal sends and nothing else: no shell, no file transfer, no forwarding.

sshd passes the client's command in ``SSH_ORIGINAL_COMMAND``. It is split like a POSIX shell
would (the portal shell-quotes each argument) but never given to one: the words must be
``virsh --connect URI SUBCOMMAND OPTION…`` with an allowed URI, an allowed subcommand, and only
that subcommand's options, each value checked (VM and snapshot names by the portal's own rules).
virsh then replaces this process (no shell, same exit status). Consoles (issue 17): ``console``
(the serial console) is the one command allowed on a terminal (the key's ``restrict,pty`` lets sshd
allocate one; any other command on a terminal is refused), and ``console-vnc`` is answered by this
shell itself: it relays the VM's VNC socket on loopback, since the key may not forward ports.
Every command, run or refused, is logged to syslog (auth facility) and to a log file. Refusals exit
126 with the reason on stderr.
virsh runs with a fixed environment (C locale, so its output is the English the portal parses).

Standard library only: it runs on the hypervisor, where the portal is not installed.
"""

from __future__ import annotations

import datetime
import os
import pwd
import re
import select
import shlex
import socket
import subprocess
import sys
import syslog
import unicodedata

CONFIG_FILE = "/etc/playr-agent/shell.conf"
DEFAULTS = {
    "libvirt_uris": "qemu:///system",
    "pools": "",  # storage pools the portal may create, upload, clone and delete volumes in (comma-separated)
    "log_file": "/var/log/playr-agent/commands.log",
    "virsh": "/usr/bin/virsh",
}
REFUSED = 126  # "command found but not executable": what a shell answers for a forbidden command
VIRSH_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}

VM_NAME_MAX = 200
# Kept equal to core/virsh.py's rule (tests/unit/test_agent_shell.py proves it for any text).
_VM_NAME = re.compile(r"^\w[\w .+:@,=%-]*$")
DESCRIPTION_MAX = 1000

FLAG, VM, SNAPSHOT, TEXT = "flag", "vm", "snapshot", "text"
# provisioning (issue 16): pools, volumes and networks are named by the snapshot-name rules; a
# pool that is written to (a new, uploaded, cloned or deleted volume) must be one of the pools
# configured in shell.conf; sizes are whole numbers of bytes; XML and uploads come on stdin.
POOL, WRITE_POOL, VOLUME, NETWORK, BYTES, FORMAT, STDIN, SOURCE = (
    "pool", "write-pool", "volume", "network", "bytes", "format", "stdin", "source")
VNC_TYPE = "vnc-type"  # consoles (issue 17): domdisplay --type, only ever "vnc"
_DOMAIN = {"--domain": VM}
# subcommand -> the options it may take and the kind of value each carries. This is every
# command the portal sends (core/virsh.py); tests/unit/test_agent_shell.py checks both agree.
COMMANDS: dict[str, dict[str, str]] = {
    "list": {"--all": FLAG},
    "dominfo": _DOMAIN,
    "start": _DOMAIN,
    "shutdown": _DOMAIN,
    "destroy": _DOMAIN,
    "reboot": _DOMAIN,
    "suspend": _DOMAIN,
    "resume": _DOMAIN,
    "autostart": {**_DOMAIN, "--disable": FLAG},
    "domstats": {**_DOMAIN, "--state": FLAG, "--cpu-total": FLAG, "--balloon": FLAG, "--vcpu": FLAG,
                 "--interface": FLAG, "--block": FLAG},
    "snapshot-list": {**_DOMAIN, "--parent": FLAG},
    "snapshot-current": {**_DOMAIN, "--name": FLAG},
    "snapshot-create-as": {**_DOMAIN, "--name": SNAPSHOT, "--description": TEXT},
    "snapshot-revert": {**_DOMAIN, "--snapshotname": SNAPSHOT},
    "snapshot-delete": {**_DOMAIN, "--snapshotname": SNAPSHOT},
    "nodeinfo": {},
    "version": {"--daemon": FLAG},
    "hostname": {},
    "uri": {},
    # provisioning (issue 16)
    "pool-list": {"--all": FLAG, "--name": FLAG},
    "pool-info": {"--pool": POOL, "--bytes": FLAG},
    "vol-list": {"--pool": POOL},
    "vol-dumpxml": {"--pool": POOL, "--vol": VOLUME},
    "net-list": {"--all": FLAG, "--name": FLAG},
    "net-info": {"--network": NETWORK},
    "vol-create-as": {"--pool": WRITE_POOL, "--name": VOLUME, "--capacity": BYTES, "--format": FORMAT,
                      "--backing-vol": VOLUME, "--backing-vol-format": FORMAT},
    "vol-upload": {"--pool": WRITE_POOL, "--vol": VOLUME, "--file": STDIN},
    "vol-clone": {"--pool": WRITE_POOL, "--vol": VOLUME, "--newname": VOLUME},
    "vol-delete": {"--pool": WRITE_POOL, "--vol": VOLUME},
    "define": {"--file": STDIN},
    "dumpxml": {**_DOMAIN, "--inactive": FLAG},
    "undefine": {**_DOMAIN, "--snapshots-metadata": FLAG, "--nvram": FLAG},
    "domifaddr": {**_DOMAIN, "--source": SOURCE},
    # --- consoles (issue 17): the serial console (the only command given a terminal), the checks
    # made before a ticket is issued, and console-vnc, which this shell answers itself (below)
    "console": {**_DOMAIN, "--force": FLAG},
    "ttyconsole": _DOMAIN,
    "domdisplay": {**_DOMAIN, "--type": VNC_TYPE},
    "console-vnc": _DOMAIN,
    # issue 18: the agent's watcher (one long-lived stream of every VM's events)
    "event": {"--all": FLAG, "--loop": FLAG, "--timestamp": FLAG},
}
# subcommand -> the options the portal always sends with it (core/virsh.py builds no command
# without them; tests/unit/test_agent_shell.py derives this from core/virsh.py and compares): a
# command missing one is not the portal's, so it is refused. A bare ``domstats`` would report on
# every VM of the host, a bare ``snapshot-current`` would print the snapshot's whole XML.
REQUIRED: dict[str, tuple[str, ...]] = {
    "list": ("--all",),
    "dominfo": ("--domain",),
    "start": ("--domain",),
    "shutdown": ("--domain",),
    "destroy": ("--domain",),
    "reboot": ("--domain",),
    "suspend": ("--domain",),
    "resume": ("--domain",),
    "autostart": ("--domain",),
    "domstats": ("--state",),  # and --domain, or else every group (WHOLE_HOST)
    "snapshot-list": ("--domain", "--parent"),
    "snapshot-current": ("--domain", "--name"),
    "snapshot-create-as": ("--domain", "--name"),
    "snapshot-revert": ("--domain", "--snapshotname"),
    "snapshot-delete": ("--domain", "--snapshotname"),
    "nodeinfo": (),
    "version": ("--daemon",),
    "hostname": (),
    "uri": (),
    "pool-list": ("--all", "--name"),
    "pool-info": ("--pool", "--bytes"),
    "vol-list": ("--pool",),
    "vol-dumpxml": ("--pool", "--vol"),
    "net-list": ("--all", "--name"),
    "net-info": ("--network",),
    "vol-create-as": ("--pool", "--name", "--capacity", "--format"),
    "vol-upload": ("--pool", "--vol", "--file"),
    "vol-clone": ("--pool", "--vol", "--newname"),
    "vol-delete": ("--pool", "--vol"),
    "define": ("--file",),
    "dumpxml": ("--domain",),
    "undefine": ("--domain", "--snapshots-metadata"),
    "domifaddr": ("--domain", "--source"),
    # --- consoles (issue 17)
    "console": ("--domain", "--force"),
    "ttyconsole": ("--domain",),
    "domdisplay": ("--domain", "--type"),
    "console-vnc": ("--domain",),
    "event": ("--all", "--loop", "--timestamp"),
}
# subcommand -> the options it must carry when it names no --domain and so reports on every VM of
# the host: only the fleet's metrics (GET /metrics/vms, issue 21) ask that, always with every
# statistics group (core/virsh.py host_stats_command; tests/unit/test_agent_shell.py compares).
WHOLE_HOST: dict[str, tuple[str, ...]] = {
    "domstats": ("--state", "--cpu-total", "--balloon", "--vcpu", "--interface", "--block"),
}
# The one command that may run on a terminal (sshd allocates one only when the client asks, which
# the portal does for the serial console alone): anything else on a terminal is refused.
TERMINAL_COMMANDS = frozenset({"console"})
# console-vnc: the VNC server must be on the host's loopback (what ``virsh domdisplay`` prints for it)
VNC_LOOPBACK = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1", "[::1]": "::1"}
VNC_BASE_PORT = 5900
LOG_TEXT_MAX = 1024  # characters of a command or reason written to the logs (the rest is counted)


class Refused(Exception):
    """The command is not one the portal may run here; the message says why."""


def check_vm_name(name: str) -> str | None:
    """Why ``name`` is refused as a VM name, or None (the portal's rule): virsh tries a --domain
    value as an id, then a UUID, then a name, so digits-only and UUID-like names are refused."""
    problem = check_snapshot_name(name)
    digits = name.replace("-", "").replace(" ", "")  # virUUIDParse skips both
    if problem is None and name.isascii() and name.isdigit():
        return "must not be only digits (virsh would take it for a domain id)"
    if problem is None and len(digits) == 32 and all(char in "0123456789abcdefABCDEF" for char in digits):
        return "must not look like a UUID (virsh would take it for a domain UUID)"
    return problem


def check_snapshot_name(name: str) -> str | None:
    """Why ``name`` is refused as a snapshot name, or None (the portal's rule)."""
    if not 1 <= len(name) <= VM_NAME_MAX:
        return f"must be 1 to {VM_NAME_MAX} characters"
    if name.startswith("-"):
        return "must not start with '-'"
    if name != name.strip():
        return "must not start or end with whitespace"
    if not _VM_NAME.fullmatch(name):
        return "must start with a letter or digit and contain only letters, digits, spaces and . _ - + : @ , = %"
    return None


def check_text(text: str) -> str | None:
    if len(text) > DESCRIPTION_MAX:
        return f"must be at most {DESCRIPTION_MAX} characters"
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in text):
        return "must not contain control characters or line breaks"
    return None


def check_bytes(text: str) -> str | None:
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        return "must be a whole number of bytes"
    return None


def check_format(text: str) -> str | None:
    return None if text in ("qcow2", "raw") else "must be qcow2 or raw"


def check_stdin(text: str) -> str | None:
    return None if text == "/dev/stdin" else "must be /dev/stdin (the portal sends data on the channel)"


def check_source(text: str) -> str | None:
    return None if text in ("agent", "lease", "arp") else "must be agent, lease or arp"


def _checks(pools: frozenset[str]) -> dict[str, object]:
    def write_pool(name: str) -> str | None:
        problem = check_snapshot_name(name)
        if problem is None and name not in pools:
            configured = ", ".join(sorted(pools)) or "none"
            return f"is not a pool this host lets the portal write to (configured: {configured}; see {CONFIG_FILE})"
        return problem

    return {TEXT: check_text, VM: check_vm_name, SNAPSHOT: check_snapshot_name, POOL: check_snapshot_name,
            VOLUME: check_snapshot_name, NETWORK: check_snapshot_name, WRITE_POOL: write_pool, BYTES: check_bytes,
            FORMAT: check_format, STDIN: check_stdin, SOURCE: check_source, VNC_TYPE: check_vnc_type}


def check_vnc_type(value: str) -> str | None:
    return None if value == "vnc" else "must be vnc"


def check_terminal(words: list[str], on_terminal: bool) -> None:
    """A terminal only for the serial console: ``Refused`` for any other command given one."""
    if on_terminal and words[3] not in TERMINAL_COMMANDS:
        raise Refused(f"virsh {words[3]} may not run on a terminal (only the serial console may)")


def parse_vnc_display(stdout: str) -> tuple[str, int] | None:
    """The loopback address and port of ``virsh domdisplay --type vnc`` output, or None (the same
    rule as the portal's core/virsh.py; tests/unit/test_agent_shell.py proves it)."""
    line = stdout.strip().splitlines()[0].strip() if stdout.strip() else ""
    if not line.startswith("vnc://") or len(line) > 200:
        return None
    rest = line[len("vnc://"):].split("/", 1)[0].split("?", 1)[0]
    host, sep, display = rest.rpartition(":")
    if not sep or not display.isascii() or not display.isdigit() or len(display) > 5:
        return None
    address = VNC_LOOPBACK.get(host)
    port = VNC_BASE_PORT + int(display)
    if address is None or port > 65535:
        return None
    return address, port


def relay_vnc(config: dict[str, str], words: list[str], environment: dict[str, str]) -> int:
    """``console-vnc``: find the VM's VNC port (``virsh domdisplay``) and relay that TCP socket to
    this channel's stdin/stdout until either side closes. The portal's key cannot forward ports
    (``restrict``), so this is the only way it reaches a VNC server, and only a VM's, on loopback."""
    uri, vm = words[2], words[words.index("--domain") + 1]
    display = subprocess.run([config["virsh"], "--connect", uri, "domdisplay", "--domain", vm, "--type", "vnc"],  # noqa: S603
                             capture_output=True, text=True, env=environment, timeout=60, check=False)
    address = parse_vnc_display(display.stdout) if display.returncode == 0 else None
    if address is None:
        print(f"playr-agent-shell: VM {vm!r} has no VNC display on loopback {display.stderr.strip()[:200]}",
              file=sys.stderr)
        return 1
    try:
        return _relay(address)
    except (OSError, ValueError) as error:
        print(f"playr-agent-shell: VNC of {vm!r} at {address[0]}:{address[1]}: {error}", file=sys.stderr)
        return 1


def _relay(address: tuple[str, int]) -> int:
    with socket.create_connection(address, timeout=10) as vnc:
        vnc.settimeout(None)
        stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
        while True:
            ready, _, _ = select.select([stdin, vnc], [], [])
            if stdin in ready:
                data = os.read(stdin, 65536)
                if not data:
                    return 0
                vnc.sendall(data)
            if vnc in ready:
                data = vnc.recv(65536)
                if not data:
                    return 0
                view = memoryview(data)
                while view:
                    view = view[os.write(stdout, view):]


def parse(command: str | None, allowed_uris: frozenset[str], pools: frozenset[str] = frozenset()) -> list[str]:
    """The argv to run for ``command`` (sshd's SSH_ORIGINAL_COMMAND), or ``Refused``. ``pools``
    are the storage pools the portal may write to (create, upload, clone, delete volumes)."""
    if command is None:
        raise Refused("this key may only run the portal's virsh commands (no login shell, no file transfer)")
    try:
        words = shlex.split(command)
    except ValueError as error:
        raise Refused(f"cannot split the command ({error})") from None
    if len(words) < 4 or words[0] != "virsh" or words[1] != "--connect":
        raise Refused("only 'virsh --connect URI SUBCOMMAND ...' may run with this key")
    uri, subcommand, options = words[2], words[3], words[4:]
    if uri not in allowed_uris:
        raise Refused(f"libvirt URI {uri!r} is not allowed here (allowed: {', '.join(sorted(allowed_uris))})")
    spec = COMMANDS.get(subcommand)
    if spec is None:
        raise Refused(f"virsh {subcommand!r} is not a command the portal uses")
    checks = _checks(pools)
    seen: set[str] = set()
    position = 0
    while position < len(options):
        option = options[position]
        kind = spec.get(option)
        if kind is None:
            raise Refused(f"virsh {subcommand} does not take {option!r} from the portal")
        if option in seen:
            raise Refused(f"{option} given twice")
        seen.add(option)
        position += 1
        if kind == FLAG:
            continue
        if position == len(options):
            raise Refused(f"{option} needs a value")
        value = options[position]
        problem = checks[kind](value)  # type: ignore[operator]
        if problem is not None:
            raise Refused(f"{option} value {value!r} {problem}")
        position += 1
    required = REQUIRED[subcommand]
    if subcommand in WHOLE_HOST and "--domain" not in seen:
        required = WHOLE_HOST[subcommand]
    missing = [option for option in required if option not in seen]
    if missing:
        raise Refused(f"virsh {subcommand} from the portal always has {', '.join(missing)}")
    return words


# ---------------------------------------------------------------------- domain XML (issue 16)
# ``virsh define`` reads the XML from stdin; the shell reads it first (bounded), checks it here and
# hands virsh an in-memory copy. What passes can only describe a VM made of the configured pools'
# volumes: nothing that reads or writes a host file, runs a host program, passes a host device
# through, listens beyond loopback or drops the VM's confinement. Everything not listed is refused.

XML_MAX = 1024 * 1024
DOMAIN_CHILDREN = frozenset({
    "name", "uuid", "genid", "title", "description", "metadata", "maxMemory", "memory", "currentMemory", "vcpu",
    "vcpus", "iothreads", "cputune", "numatune", "resource", "os", "features", "cpu", "clock", "on_poweroff",
    "on_reboot", "on_crash", "on_lockfailure", "pm", "devices", "sysinfo", "memtune", "blkiotune", "keywrap",
    "perf", "iothreadids"})
OS_CHILDREN = frozenset({"type", "boot", "bootmenu", "smbios", "bios", "loader", "nvram", "firmware"})
DEVICES = frozenset({"emulator", "disk", "controller", "interface", "serial", "console", "channel", "graphics",
                     "video", "input", "sound", "memballoon", "rng", "watchdog", "panic", "tpm", "hub", "vsock",
                     "iommu", "audio"})
CHARDEV_TYPES = frozenset({"pty", "unix", "spicevmc"})
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
SERIAL_LOG_DIR = "/var/log/libvirt/qemu/"
_EMULATOR = re.compile(r"^/usr/(?:bin|libexec)/(?:qemu-system-[a-z0-9_]+|qemu-kvm)$")


def _safe_path(path: str, directory: str) -> bool:
    return path.startswith(directory) and "/../" not in path and not path.endswith("/..") and "\x00" not in path


def check_domain_xml(text: str, pools: frozenset[str]) -> None:
    """Raise ``Refused`` unless ``text`` is domain XML the portal may define (see above)."""
    import xml.etree.ElementTree as ElementTree  # only define needs it

    if len(text) > XML_MAX:
        raise Refused(f"the domain XML is longer than {XML_MAX} characters")
    upper = text.upper()
    if "<!DOCTYPE" in upper or "<!ENTITY" in upper:
        raise Refused("the domain XML must not have a DOCTYPE or entities")
    try:
        domain = ElementTree.fromstring(text)  # noqa: S314 - no DOCTYPE, so no entities
    except ElementTree.ParseError as error:
        raise Refused(f"the domain XML does not parse: {error}") from None
    if domain.tag != "domain":
        raise Refused("the XML is not a <domain>")
    if domain.get("type") not in ("kvm", "qemu"):
        raise Refused("the domain type must be kvm or qemu")
    in_metadata = {id(element) for meta in domain.findall("metadata") for element in meta.iter()}
    for element in domain.iter():
        if (not isinstance(element.tag, str) or "{" in element.tag) and id(element) not in in_metadata:
            raise Refused(f"element {element.tag!r} is not allowed (namespaced elements only inside <metadata>)")
    for child in domain:
        if child.tag not in DOMAIN_CHILDREN:
            raise Refused(f"<{child.tag}> is not allowed in the domain")
    os_element = domain.find("os")
    if os_element is not None:
        for child in os_element:
            if child.tag not in OS_CHILDREN:
                raise Refused(f"<os><{child.tag}> is not allowed (no host kernel, initrd, DTB or ACPI tables)")
        for loader in os_element.findall("loader"):
            if not _safe_path((loader.text or "").strip(), "/usr/share/"):
                raise Refused("the firmware <loader> must be a file under /usr/share/")
        for nvram in os_element.findall("nvram"):
            path = (nvram.text or "").strip()
            if path and not _safe_path(path, "/var/lib/libvirt/qemu/nvram/"):
                raise Refused("<nvram> must be under /var/lib/libvirt/qemu/nvram/")
            if nvram.get("template") and not _safe_path(nvram.get("template", ""), "/usr/share/"):
                raise Refused("the <nvram> template must be a file under /usr/share/")
            if len(nvram):
                raise Refused("<nvram> must not have a source")
    devices = domain.find("devices")
    for device in devices if devices is not None else []:
        _check_device(device, pools)


def _check_device(device: object, pools: frozenset[str]) -> None:
    tag = device.tag  # type: ignore[attr-defined]
    get = device.get  # type: ignore[attr-defined]
    find = device.find  # type: ignore[attr-defined]
    findall = device.findall  # type: ignore[attr-defined]
    if tag not in DEVICES:
        raise Refused(f"device <{tag}> is not allowed (no host devices, filesystems, shared memory or redirection)")
    if tag == "emulator" and not _EMULATOR.fullmatch((device.text or "").strip()):  # type: ignore[attr-defined]
        raise Refused("<emulator> must be the host's qemu-system binary")
    if tag == "disk":
        source = find("source")
        if get("type") == "volume":
            if source is None or source.get("pool") not in pools:
                raise Refused("a disk must be a volume of a pool configured for the portal "
                              f"({', '.join(sorted(pools)) or 'none configured'})")
            if check_snapshot_name(source.get("volume") or "") is not None:
                raise Refused("a disk's volume name is not valid")
        elif source is not None:
            raise Refused("a disk must be a volume of a configured pool (no host files or block devices)")
        elif get("device") not in ("cdrom", "floppy"):
            raise Refused("only a CD-ROM or floppy drive may be empty")
        if find("backingStore") is not None and len(find("backingStore")):
            raise Refused("a disk must not name its backing store")
    if tag == "interface":
        if get("type") not in ("network", "bridge"):
            raise Refused("an interface must be on a libvirt network or a bridge (no direct, hostdev, ethernet or "
                          "vhost-user)")
        if find("script") is not None or find("backend") is not None:
            raise Refused("an interface must not name a script or backend")
    if tag in ("serial", "console", "channel"):
        if get("type") not in CHARDEV_TYPES:
            raise Refused(f"<{tag}> must be a pty (or a unix socket libvirt names itself)")
        if get("type") == "unix" and find("source") is not None:
            raise Refused(f"<{tag}> unix sockets are named by libvirt, not the XML")
        for log in findall("log"):
            if not _safe_path(log.get("file") or "", SERIAL_LOG_DIR) or "/" in (log.get("file") or "")[
                    len(SERIAL_LOG_DIR):]:
                raise Refused(f"a console log must be a file directly in {SERIAL_LOG_DIR}")
    if tag == "graphics":
        if get("type") not in ("vnc", "spice"):
            raise Refused("graphics must be VNC or SPICE")
        if get("listen") is not None and get("listen") not in LOOPBACK:
            raise Refused("graphics may only listen on the host's loopback")
        listens = findall("listen")
        if get("listen") is None and not listens:
            raise Refused("graphics must say they listen on the host's loopback")
        for listen in listens:
            if listen.get("type") != "address" or listen.get("address", "127.0.0.1") not in LOOPBACK:
                raise Refused("graphics may only listen on the host's loopback address")
        if get("socket") is not None:
            raise Refused("graphics must not name a socket")
    if tag == "input" and (get("type") not in ("tablet", "mouse", "keyboard") or find("source") is not None):
        raise Refused("an input must be a virtual tablet, mouse or keyboard")
    if tag == "rng":
        backend = find("backend")
        if backend is None or backend.get("model") != "random" or \
                (backend.text or "/dev/urandom").strip() not in ("/dev/urandom", "/dev/random"):
            raise Refused("an RNG must read the host's /dev/urandom")
    if tag == "tpm":
        backend = find("backend")
        if backend is None or backend.get("type") != "emulator":
            raise Refused("a TPM must be emulated (no passthrough)")
    if tag == "audio" and get("type") not in ("none", "spice"):
        raise Refused("audio must be none or spice (no host files or sound servers)")
    for element in device.iter():  # type: ignore[attr-defined]
        if element.tag == "source" and tag != "disk" and any(
                key in element.attrib for key in ("path", "file", "dev", "dir", "socket")):
            raise Refused(f"<{tag}> must not name a host path")


def clip(text: str, limit: int = LOG_TEXT_MAX) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: a refused command can be as
    long as sshd allows (hundreds of KiB), and each one would otherwise be logged whole."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def read_config(path: str = CONFIG_FILE) -> dict[str, str]:
    config = dict(DEFAULTS)
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                name, sep, value = line.strip().partition("=")
                if sep and not name.startswith("#"):
                    config[name.strip()] = value.strip()
    except FileNotFoundError:
        pass
    return config


def log(config: dict[str, str], verdict: str, command: str | None, reason: str = "") -> None:
    client = (os.environ.get("SSH_CONNECTION") or "local").split(" ", 1)[0]
    shown = None if command is None else clip(command)
    line = f"{verdict} from={client} command={shown!r}" + (f" reason={clip(reason)!r}" if reason else "")
    syslog.openlog("playr-agent-shell", syslog.LOG_PID, syslog.LOG_AUTH)
    syslog.syslog(syslog.LOG_NOTICE if verdict == "run" else syslog.LOG_WARNING, line)
    try:
        # datetime.UTC is 3.11+; hypervisors may run an older python3
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")  # noqa: UP017
        with open(config["log_file"], "a", encoding="utf-8") as file:
            file.write(f"{stamp} pid={os.getpid()} {line}\n")
    except OSError as error:
        print(f"playr-agent-shell: cannot write {config['log_file']}: {error}", file=sys.stderr)


def _checked_definition(stream: object, pools: frozenset[str]) -> int:
    """Read the domain XML from ``stream`` (at most XML_MAX bytes), check it, and answer a file
    descriptor of an in-memory file holding it (``/dev/stdin`` for virsh once it is fd 0)."""
    data = stream.read(XML_MAX * 4 + 1)  # type: ignore[attr-defined]
    if len(data) > XML_MAX * 4:
        raise Refused("the domain XML is too long")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("the domain XML is not UTF-8") from None
    check_domain_xml(text, pools)
    fd = os.memfd_create("playr-domain-xml")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def main(args: list[str]) -> int:
    # The forced command in authorized_keys fixes the arguments: only "--config PATH" (tests) is read.
    config = read_config(args[1] if len(args) == 2 and args[0] == "--config" else CONFIG_FILE)
    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    allowed = frozenset(uri.strip() for uri in config["libvirt_uris"].split(",") if uri.strip())
    pools = frozenset(pool.strip() for pool in config["pools"].split(",") if pool.strip())
    # A terminal: sshd allocated one (the client asked; ``restrict,pty`` allows it for the console).
    on_terminal = os.isatty(0) or "SSH_TTY" in os.environ
    try:
        argv = parse(command, allowed, pools)
        check_terminal(argv, on_terminal)
        if argv[3] == "define":
            # virsh reads the XML from an in-memory file that holds exactly what was checked
            os.dup2(_checked_definition(sys.stdin.buffer, pools), 0)
    except Refused as refusal:
        log(config, "refused", command, str(refusal))
        print(f"playr-agent-shell: refused: {clip(str(refusal))}", file=sys.stderr)
        return REFUSED
    log(config, "run", command)
    try:
        # A fixed environment: nothing of the session's (PAM may set LANG from /etc/default/locale,
        # and translated virsh output would not parse in the portal).
        environment = {**VIRSH_ENVIRONMENT, "HOME": pwd.getpwuid(os.getuid()).pw_dir}
        if argv[3] == "console-vnc":
            return relay_vnc(config, argv, environment)
        if argv[3] == "console":
            environment["TERM"] = os.environ.get("TERM", "xterm")[:64]
        os.execve(config["virsh"], [config["virsh"], *argv[1:]], environment)  # noqa: S606 - no shell
    except OSError as error:
        print(f"playr-agent-shell: cannot run {config['virsh']}: {error}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
