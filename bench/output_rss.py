"""Issue 14 item 2: a worker's memory while a hostile host answers ``virsh list`` with 300 MiB.

A fake hypervisor (an asyncssh server in this process, on 127.0.0.1) answers every command with
``--size`` MiB of 79-character lines as fast as the portal reads them. The portal of ``--repo``
runs under gunicorn with one worker; the figure is that worker's peak resident set (``VmHWM``)
before and after one ``GET /agents/{id}/vms``, with the status code and the time it took.

    .venv/bin/python bench/output_rss.py [--repo CHECKOUT] [--size 300]

Run it against an older checkout (``git archive <commit> | tar -x -C /tmp/old``) for "before".
Needs asyncssh (the project's virtual environment); touches nothing but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.support import REPO, Portal, proc_status_kib

LINE = "x" * 79 + "\n"


class Flood:
    """An SSH server whose every command writes ``size`` bytes of lines, then exits 0."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.port = 0
        self.sent = 0
        self.loop = asyncio.new_event_loop()

    def start(self) -> None:
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(timeout=30)

    async def _listen(self) -> None:
        async def handle(process: asyncssh.SSHServerProcess[str]) -> None:
            chunk = LINE * 820  # ~64 KiB
            left = self.size
            try:
                while left > 0:
                    piece = chunk[:left]
                    process.stdout.write(piece)
                    await process.stdout.drain()  # as fast as the client reads, no faster
                    left -= len(piece)
                    self.sent += len(piece)
                process.exit(0)
            except (OSError, asyncssh.Error):
                pass  # the portal closed the channel

        server = await asyncssh.create_server(
            None, "127.0.0.1", 0, server_host_keys=[self.host_key], process_factory=handle,
            authorized_client_keys=asyncssh.import_authorized_keys(
                self.client_key.export_public_key("openssh").decode()))
        self.port = server.sockets[0].getsockname()[1]


def call(port: int, method: str, path: str, key: str | None = None, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:  # noqa: S310 - loopback only
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose portal to run (default: this one)")
    parser.add_argument("--size", type=int, default=300, help="MiB the host answers with (default 300)")
    args = parser.parse_args()
    flood = Flood(args.size * 1024 * 1024)
    flood.start()
    with tempfile.TemporaryDirectory(prefix="output-rss-") as workdir:
        portal = Portal(args.repo.resolve(), Path(workdir), workers=1,
                        MANAGEMENT_SSH_COMMAND_TIMEOUT="600", MANAGEMENT_LOG_LEVEL="warning").start()
        try:
            status, user = call(portal.port, "POST", "/users", body={"name": "bench"})
            assert status == 201, user
            key = user["api_key"]
            host_key = flood.host_key.export_public_key("openssh").decode().strip()
            status, agent = call(portal.port, "POST", "/agents", key, {
                "name": "flood", "hostname": "127.0.0.1", "port": flood.port, "username": "bench",
                "private_key": flood.client_key.export_private_key("openssh").decode(), "host_key": host_key})
            assert status == 201, agent
            worker = portal.worker_pids()[0]
            before = proc_status_kib(worker, "VmHWM")
            started = time.monotonic()
            status, answer = call(portal.port, "GET", f"/agents/{agent['id']}/vms", key)
            elapsed = time.monotonic() - started
            after = proc_status_kib(worker, "VmHWM")
            code = answer.get("code") if isinstance(answer, dict) else f"{len(answer)} VMs"
            print(f"repo={args.repo} answer={args.size} MiB: status {status} ({code}) in {elapsed:.1f} s; "
                  f"worker peak RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB; "
                  f"host sent {flood.sent / 1024 / 1024:.1f} MiB before it was stopped or done")
        finally:
            portal.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
