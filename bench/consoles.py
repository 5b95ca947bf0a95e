"""Issue 17: how fast a console opens and answers, through the portal and without it.

On the lab (``scripts/lab.sh up`` first; as root) with ``console-guest`` running, the portal under
gunicorn (one worker) and the lab's sshd:

- ticket to first byte: ``POST …/console`` → WebSocket open → Enter sent → the first byte of the
  VM's answer (the SSH connection is warm: the ticket's checks opened it);
- echo round trip: one character typed on the serial console until the guest's echo of it
  comes back, over the WebSocket;
- the reference for both: the same through asyncssh straight to the lab's sshd (``virsh console``
  on a PTY, a connection made once), i.e. what the portal adds.

    .venv/bin/python bench/consoles.py [--rounds 50]

Prints medians and the ratio portal / reference (docs/performance.md records a run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entrypoints.console_client import Console, open_console
from tests.support import Server

GUEST = "console-guest"
LAB_ENV = Path("/var/tmp/playr-lab/lab.env")


def lab_env() -> dict[str, str]:
    values = {}
    for line in LAB_ENV.read_text().splitlines():
        name, _, value = line.partition("=")
        values[name] = value.strip("'")
    return values


async def prompt(console: Console) -> None:
    for _ in range(60):
        await console.write(b"\r")
        try:
            await console.expect(b"# ", timeout=2)
            return
        except TimeoutError:
            continue
    raise RuntimeError("no shell prompt on the guest's serial console")


async def through_portal(url: str, key: str, agent_id: int, rounds: int) -> tuple[list[float], list[float]]:
    async with await open_console(url, key, agent_id, GUEST) as console:  # boot, warm-up
        await prompt(console)
    first_bytes = []
    for _ in range(min(rounds, 20)):
        started = time.perf_counter()
        async with await open_console(url, key, agent_id, GUEST) as console:
            await console.write(b"\r")
            await console.read()
            first_bytes.append(time.perf_counter() - started)
    echoes = []
    async with await open_console(url, key, agent_id, GUEST) as console:
        await prompt(console)
        for _ in range(rounds):
            started = time.perf_counter()
            await console.write(b"x")
            await console.expect(b"x", timeout=10)
            echoes.append(time.perf_counter() - started)
        await console.write(b"\x15")  # Ctrl-U: leave the line empty
    return first_bytes, echoes


async def straight(env: dict[str, str], rounds: int) -> tuple[list[float], list[float]]:
    key = asyncssh.import_private_key(Path(env["LAB_KEY"]).read_text())
    async with asyncssh.connect("127.0.0.1", int(env["LAB_SSH_PORT"]), username=env["LAB_USER"],
                                client_keys=[key], known_hosts=None) as conn:
        command = f"virsh --connect qemu:///system console --domain {GUEST} --force"
        first_bytes = []
        for _ in range(min(rounds, 20)):
            started = time.perf_counter()
            process = await conn.create_process(command, encoding=None, term_type="xterm", term_size=(80, 24))
            process.stdin.write(b"\r")
            await asyncio.wait_for(process.stdout.read(65536), 30)
            first_bytes.append(time.perf_counter() - started)
            process.close()
            await asyncio.wait_for(process.wait_closed(), 30)
        echoes = []
        process = await conn.create_process(command, encoding=None, term_type="xterm", term_size=(80, 24))
        buffer = b""
        process.stdin.write(b"\r")
        while b"# " not in buffer:
            try:
                buffer += await asyncio.wait_for(process.stdout.read(65536), 2)
            except TimeoutError:
                process.stdin.write(b"\r")  # the shell may still be drawing: ask again
        for _ in range(rounds):
            started = time.perf_counter()
            process.stdin.write(b"x")
            seen = b""
            while b"x" not in seen:
                seen += await asyncio.wait_for(process.stdout.read(65536), 10)
            echoes.append(time.perf_counter() - started)
        process.stdin.write(b"\x15")
        process.close()
    return first_bytes, echoes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    env = lab_env()
    started_guest = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", GUEST], capture_output=True,
                                   text=True).stdout.strip() != "running"
    if started_guest:
        subprocess.run(["virsh", "-c", "qemu:///system", "start", GUEST], check=True, capture_output=True)
    server = Server(Path(tempfile.mkdtemp(prefix="bench-consoles-")), MANAGEMENT_WORKERS="1",
                    MANAGEMENT_SIGNUP="open", MANAGEMENT_AGENT_NETWORKS="127.0.0.0/8").start()
    try:
        key = server.request("POST", "/users", body={"name": "bench"})[1]["api_key"]
        agent = server.request("POST", "/agents", key, {
            "name": "lab", "hostname": "127.0.0.1", "port": int(env["LAB_SSH_PORT"]), "username": env["LAB_USER"],
            "private_key": Path(env["LAB_KEY"]).read_text(), "host_key": env["LAB_HOST_KEY"]})[1]
        url = f"http://127.0.0.1:{server.port}"
        portal_first, portal_echo = asyncio.run(through_portal(url, key, agent["id"], args.rounds))
        ssh_first, ssh_echo = asyncio.run(straight(env, args.rounds))
    finally:
        server.stop()
        if started_guest:
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", GUEST], capture_output=True)
    rows = [("ticket (or channel) to first byte", portal_first, ssh_first),
            ("echo round trip over serial", portal_echo, ssh_echo)]
    print(f"{'figure':<36} {'portal ms':>10} {'ssh ms':>10} {'ratio':>7}")
    for name, portal, ssh in rows:
        p, s = statistics.median(portal) * 1000, statistics.median(ssh) * 1000
        print(f"{name:<36} {p:>10.1f} {s:>10.1f} {p / s:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
