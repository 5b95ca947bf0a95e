"""A pretend libvirt host for the provisioning use cases: it answers the virsh argument vectors the
portal sends (pools, volumes, networks, domains) from a small state, the way virsh prints, and can
be told to fail any one command, or to drop the connection there, so tests can prove that a
failure at each step leaves the host as it was."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence

import attrs

from adapters.memory import ScriptedShell
from core.errors import AgentConnectionLost
from core.model import AgentCredentials
from core.ports import CommandResult, PinHostKey

GIB = 1024**3


@attrs.define
class FakeVolume:
    path: str
    format: str
    capacity: int
    backing: str | None = None
    data: bytes = b""


@attrs.define
class FakeDomain:
    xml: str
    state: str = "shut off"
    autostart: bool = False


class FakeHost(ScriptedShell):
    """``pools[name][volume]``, ``networks``, ``domains``; ``fail_on`` makes the first command
    whose subcommand is that word fail (``"lost"``: the connection drops instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.pools: dict[str, dict[str, FakeVolume]] = {
            "images": {"debian-12.qcow2": FakeVolume("/var/lib/libvirt/images/debian-12.qcow2", "qcow2", 2 * GIB)}}
        self.available: dict[str, int] = {"images": 100 * GIB}
        self.networks: dict[str, str] = {"default": "virbr0"}
        self.domains: dict[str, FakeDomain] = {}
        self.cpus = 4
        self.memory_kib = 8 * 1024 * 1024
        self.fail_on: dict[str, str] = {}  # subcommand -> "error" | "lost"
        self.stdins: dict[str, bytes] = {}  # subcommand -> the last stdin it was given
        self.mutations: list[tuple[str, ...]] = []
        self._uuid = 0

    def snapshot(self) -> tuple[object, ...]:
        """The host's state, to compare before and after."""
        return ({p: dict(v) for p, v in self.pools.items()}, dict(self.domains))

    async def run(self, target: AgentCredentials, argv: Sequence[str], *,
                  pin: PinHostKey | None = None, stdin: bytes | None = None) -> CommandResult:
        command = tuple(argv)
        self.calls.append((target.agent.id, command))
        self.inputs.append(stdin)
        sub = command[3]
        if stdin is not None:
            self.stdins[sub] = stdin
        how = self.fail_on.pop(sub, None)
        if how == "lost":
            raise AgentConnectionLost("the connection to the agent was lost")
        if how == "error":
            return self._err(command, f"error: injected failure of {sub}")
        return self._answer(command, sub, self._options(command[4:]), stdin)

    @staticmethod
    def _options(words: Sequence[str]) -> dict[str, str]:
        options: dict[str, str] = {}
        index = 0
        while index < len(words):
            if index + 1 < len(words) and not words[index + 1].startswith("--"):
                options[words[index]] = words[index + 1]
                index += 2
            else:
                options[words[index]] = ""
                index += 1
        return options

    @staticmethod
    def _ok(command: tuple[str, ...], stdout: str = "") -> CommandResult:
        return CommandResult(command=command, exit_status=0, stdout=stdout, stderr="")

    @staticmethod
    def _err(command: tuple[str, ...], stderr: str) -> CommandResult:
        return CommandResult(command=command, exit_status=1, stdout="", stderr=stderr)

    def _pool(self, command: tuple[str, ...], name: str) -> dict[str, FakeVolume] | CommandResult:
        if name not in self.pools:
            return self._err(command, f"error: failed to get pool '{name}'\nerror: Storage pool not found: no "
                                      f"storage pool with matching name '{name}'")
        return self.pools[name]

    def _answer(self, command: tuple[str, ...], sub: str, o: dict[str, str], stdin: bytes | None) -> CommandResult:
        missing_domain = self._err(command, f"error: failed to get domain '{o.get('--domain')}'")
        if sub == "pool-list":
            return self._ok(command, "".join(f" {name}\n" for name in self.pools) + "\n")
        if sub == "pool-info":
            pool = self._pool(command, o["--pool"])
            if isinstance(pool, CommandResult):
                return pool
            used = sum(v.capacity for v in pool.values())
            return self._ok(command, f"Name:           {o['--pool']}\nState:          running\nPersistent:     yes\n"
                                     f"Autostart:      yes\nCapacity:       {used + self.available[o['--pool']]}\n"
                                     f"Allocation:     {used}\nAvailable:      {self.available[o['--pool']]}\n")
        if sub == "vol-list":
            pool = self._pool(command, o["--pool"])
            if isinstance(pool, CommandResult):
                return pool
            width = max([len("Name"), *map(len, pool)])  # virsh pads the columns to the widest cell
            rows = "".join(f" {name.ljust(width)}   {v.path}\n" for name, v in pool.items())
            return self._ok(command, f" {'Name'.ljust(width)}   Path\n" + "-" * 30 + "\n" + rows + "\n")
        if sub == "vol-dumpxml":
            pool = self._pool(command, o["--pool"])
            if isinstance(pool, CommandResult):
                return pool
            volume = pool.get(o["--vol"])
            if volume is None:
                return self._err(command, f"error: failed to get vol '{o['--vol']}'\nerror: Storage volume not "
                                          f"found: no storage vol with matching path '{o['--vol']}'")
            backing = f"<backingStore><path>{volume.backing}</path></backingStore>" if volume.backing else ""
            return self._ok(command, f"<volume type='file'><name>{o['--vol']}</name>"
                                     f"<capacity unit='bytes'>{volume.capacity}</capacity>"
                                     f"<allocation unit='bytes'>{len(volume.data)}</allocation>"
                                     f"<target><path>{volume.path}</path><format type='{volume.format}'/></target>"
                                     f"{backing}</volume>")
        if sub == "net-list":
            return self._ok(command, "".join(f" {name}\n" for name in self.networks) + "\n")
        if sub == "net-info":
            name = o["--network"]
            if name not in self.networks:
                return self._err(command, f"error: failed to get network '{name}'\nerror: Network not found: no "
                                          f"network with matching name '{name}'")
            return self._ok(command, f"Name:           {name}\nActive:         yes\nPersistent:     yes\n"
                                     f"Autostart:      no\nBridge:         {self.networks[name]}\n")
        if sub == "nodeinfo":
            return self._ok(command, f"CPU model:           x86_64\nCPU(s):              {self.cpus}\n"
                                     f"Memory size:         {self.memory_kib} KiB\n")
        if sub == "dominfo":
            domain = self.domains.get(o["--domain"])
            if domain is None:
                return missing_domain
            return self._ok(command, f"Id:             -\nName:           {o['--domain']}\nState:          "
                                     f"{domain.state}\nAutostart:      {'enable' if domain.autostart else 'disable'}\n")
        if sub == "domstats":
            domain = self.domains.get(o["--domain"])
            if domain is None:
                return missing_domain
            number = {"running": 1, "paused": 3, "shut off": 5}[domain.state]
            return self._ok(command, f"Domain: '{o['--domain']}'\n  state.state={number}\n  state.reason=1\n")
        if sub == "list":
            width = max([len("Name"), *map(len, self.domains)])
            rows = "".join(f" -    {name.ljust(width)}   {d.state}\n" for name, d in self.domains.items())
            return self._ok(command, f" Id   {'Name'.ljust(width)}   State\n" + "-" * 20 + "\n" + rows)
        if sub == "dumpxml":
            domain = self.domains.get(o["--domain"])
            return missing_domain if domain is None else self._ok(command, domain.xml)
        if sub == "domifaddr":
            domain = self.domains.get(o["--domain"])
            if domain is None:
                return missing_domain
            if domain.state != "running":
                return self._err(command, "error: Requested operation is not valid: domain is not running")
            if o["--source"] == "agent":
                return self._err(command, "error: Guest agent is not responding: QEMU guest agent is not connected")
            macs = [m.get("address") for m in ElementTree.fromstring(domain.xml).iter("mac")]
            rows = "".join(f" vnet{n}      {mac}    ipv4         192.168.123.{31 + n}/24\n"
                           for n, mac in enumerate(macs))
            return self._ok(command, " Name       MAC address          Protocol     Address\n" + "-" * 60 + "\n"
                            + rows + "\n")
        self.mutations.append(command)
        return self._mutate(command, sub, o, stdin)

    def _mutate(self, command: tuple[str, ...], sub: str, o: dict[str, str], stdin: bytes | None) -> CommandResult:
        missing_domain = self._err(command, f"error: failed to get domain '{o.get('--domain')}'")
        if sub == "vol-create-as":
            pool = self._pool(command, o["--pool"])
            if isinstance(pool, CommandResult):
                return pool
            if o["--name"] in pool:
                return self._err(command, f"error: Failed to create vol {o['--name']}\nerror: storage volume "
                                          f"'{o['--name']}' exists already")
            backing = pool[o["--backing-vol"]].path if "--backing-vol" in o else None
            pool[o["--name"]] = FakeVolume(f"/var/lib/libvirt/images/{o['--name']}", o["--format"],
                                           int(o["--capacity"]), backing)
            return self._ok(command, f"Vol {o['--name']} created\n")
        if sub == "vol-upload":
            volume = self.pools[o["--pool"]][o["--vol"]]
            volume.data = stdin or b""
            return self._ok(command)
        if sub == "vol-clone":
            pool = self.pools[o["--pool"]]
            source = pool[o["--vol"]]
            pool[o["--newname"]] = attrs.evolve(source, path=f"/var/lib/libvirt/images/{o['--newname']}")
            return self._ok(command)
        if sub == "vol-delete":
            pool = self._pool(command, o["--pool"])
            if isinstance(pool, CommandResult):
                return pool
            if pool.pop(o["--vol"], None) is None:
                return self._err(command, "error: Storage volume not found")
            return self._ok(command)
        if sub == "define":
            root = ElementTree.fromstring((stdin or b"").decode())
            name = root.findtext("name") or ""
            self._uuid += 1
            uuid = ElementTree.SubElement(root, "uuid")
            uuid.text = f"00000000-0000-0000-0000-{self._uuid:012d}"
            for number, interface in enumerate(root.findall("devices/interface")):
                mac = ElementTree.SubElement(interface, "mac")
                mac.set("address", f"52:54:00:00:{self._uuid:02x}:{number:02x}")
            self.domains[name] = FakeDomain(ElementTree.tostring(root, encoding="unicode"))
            return self._ok(command, f"Domain '{name}' defined from /dev/stdin\n")
        domain = self.domains.get(o.get("--domain", ""))
        if domain is None:
            return missing_domain
        if sub == "start":
            if domain.state == "running":
                return self._err(command, "error: Requested operation is not valid: domain is already running")
            domain.state = "running"
        elif sub == "destroy":
            domain.state = "shut off"
        elif sub == "autostart":
            domain.autostart = "--disable" not in o
        elif sub == "undefine":
            del self.domains[o["--domain"]]
        return self._ok(command)
