"""A fleet of fake hypervisors for the metrics tests and benchmarks (issue 21): one asyncssh server
on loopback, in a thread of its own, that answers the commands ``GET /metrics/vms`` sends
(``virsh domstats`` of the whole host, ``nodeinfo``, ``version --daemon``) for ``vms`` VMs whose
CPU time grows with every answer. Each agent logs in with its own user name, so the commands are
counted per agent (``count``)."""

from __future__ import annotations

import asyncio
import shlex
import threading
from collections import Counter
from typing import Any

import asyncssh

NODEINFO = ("CPU model:           x86_64\nCPU(s):              16\nCPU frequency:       2400 MHz\n"
            "CPU socket(s):       1\nCore(s) per socket:  8\nThread(s) per core:  2\nNUMA cell(s):        1\n"
            "Memory size:         65536000 KiB\n")
VERSION = ("Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\nUsing API: QEMU 9.0.0\n"
           "Running hypervisor: QEMU 7.2.0\nRunning against daemon: 9.0.0\n")


def domstats(vms: int, tick: int) -> str:
    """``virsh domstats`` of ``vms`` running VMs with a disk and an interface each."""
    blocks = []
    for index in range(vms):
        blocks.append(
            f"Domain: 'vm-{index:03d}'\n  state.state=1\n  state.reason=1\n  cpu.time={(tick + 1) * 1_000_000_000}\n"
            "  cpu.user=500000000\n  cpu.system=200000000\n  balloon.current=1048576\n  balloon.maximum=2097152\n"
            "  vcpu.current=2\n  vcpu.maximum=4\n  net.count=1\n  net.0.name=vnet0\n"
            f"  net.0.rx.bytes={tick * 1000}\n  net.0.rx.pkts={tick}\n  net.0.rx.errs=0\n  net.0.rx.drop=0\n"
            f"  net.0.tx.bytes={tick * 2000}\n  net.0.tx.pkts={tick}\n  net.0.tx.errs=0\n  net.0.tx.drop=0\n"
            "  block.count=1\n  block.0.name=vda\n  block.0.rd.reqs=10\n  block.0.rd.bytes=40960\n"
            "  block.0.wr.reqs=5\n  block.0.wr.bytes=20480\n  block.0.capacity=10737418240\n")
    return "\n".join(blocks) + "\n"


class FleetHypervisor:
    """Start with ``start()``, stop with ``stop()``; ``count(user, subcommand)`` says how many
    commands of that kind the agent logged in as ``user`` ran."""

    def __init__(self, vms: int = 10, ciphers: tuple[str, ...] = ()) -> None:
        self.vms = vms
        self.ciphers = ciphers  # the encryption algorithms the server offers (default: asyncssh's)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.port = 0
        self._commands: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fleet-hypervisor")
        self._server: asyncssh.SSHAcceptor | None = None

    @property
    def host_key_line(self) -> str:
        return self.host_key.export_public_key("openssh").decode().strip()

    @property
    def private_key(self) -> str:
        return self.client_key.export_private_key("openssh").decode()

    def count(self, user: str | None = None, subcommand: str = "domstats") -> int:
        with self._lock:
            return sum(n for (who, what), n in self._commands.items()
                       if what == subcommand and (user is None or who == user))

    def start(self) -> FleetHypervisor:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    async def _start(self) -> None:
        hypervisor = self

        class Server(asyncssh.SSHServer):
            def begin_auth(self, username: str) -> bool:
                return True

        async def handle(process: asyncssh.SSHServerProcess[str]) -> None:
            user = process.get_extra_info("username")
            argv = shlex.split(process.command or "")
            subcommand = argv[3] if len(argv) > 3 else ""
            with hypervisor._lock:
                hypervisor._commands[(user, subcommand)] += 1
                tick = hypervisor._commands[(user, subcommand)]
            if subcommand == "domstats":
                process.stdout.write(domstats(hypervisor.vms, tick))
            elif subcommand == "nodeinfo":
                process.stdout.write(NODEINFO)
            elif subcommand == "version":
                process.stdout.write(VERSION)
            else:
                process.stderr.write(f"error: unknown command '{subcommand}'\n")
                process.exit(1)
                return
            process.exit(0)

        options: dict[str, Any] = {"encryption_algs": list(self.ciphers)} if self.ciphers else {}
        self._server = await asyncssh.create_server(
            Server, "127.0.0.1", 0, server_host_keys=[self.host_key], process_factory=handle,
            authorized_client_keys=asyncssh.import_authorized_keys(
                self.client_key.export_public_key("openssh").decode()), **options,
        )
        self.port = self._server.sockets[0].getsockname()[1]
