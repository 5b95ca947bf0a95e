"""Consoles end to end on the lab (issue 17), through an uploaded key: the portal under gunicorn,
the lab's sshd and libvirt, and ``console-guest`` (scripts/lab.sh), which has a busybox shell on
its serial port (a pty) and VNC graphics on 127.0.0.1. Tickets live 3 s here
(``MANAGEMENT_CONSOLE_TICKET_SECONDS``) so that expiry is seen without waiting 30 s."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
import websockets.asyncio.client
import websockets.exceptions

from entrypoints.console_client import Console, open_console, request_ticket, websocket_url
from tests.lab.conftest import LAB_AGENT_NETWORKS, Lab, register
from tests.support import Server

pytestmark = pytest.mark.lab

GUEST = "console-guest"
TICKET_SECONDS = 3


def console_processes(vm: str) -> list[int]:
    """Pids of ``virsh … console … VM`` processes on the host (the lab host is this machine)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"virsh") and b"console" in argv and vm.encode() in argv:
            found.append(int(proc.name))
    return found


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.1)  # polling a condition with a bound


@pytest.fixture(scope="module")
def guest(lab: Lab) -> Iterator[str]:
    """console-guest running for this module (started here, destroyed after)."""
    if lab.virsh("domstate", "--domain", GUEST).stdout.strip() != "running":
        started = lab.virsh("start", "--domain", GUEST)
        assert started.returncode == 0, started.stderr
    yield GUEST
    lab.virsh("destroy", "--domain", GUEST)


@pytest.fixture(scope="module")
def console_portal(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("console-portal"), MANAGEMENT_WORKERS="1",
                    MANAGEMENT_SIGNUP="open", MANAGEMENT_AGENT_NETWORKS=LAB_AGENT_NETWORKS,
                    MANAGEMENT_CONSOLE_TICKET_SECONDS=str(TICKET_SECONDS)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(console_portal: Server) -> str:
    status, user, _ = console_portal.request("POST", "/users", body={"name": "console-operator"})
    assert status == 201, user
    return str(user["api_key"])


@pytest.fixture(scope="module")
def agent_id(console_portal: Server, key: str, lab: Lab) -> int:
    return int(register(console_portal, key, lab, name="console-lab")["id"])


def base(portal: Server) -> str:
    return f"http://127.0.0.1:{portal.port}"


async def shell_prompt(console: Console) -> None:
    """Until the guest's shell answers (it may still be booting): press Enter, wait for "# "."""
    deadline = time.monotonic() + 60
    while True:
        await console.write(b"\r")
        try:
            await console.expect(b"# ", timeout=2)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


async def serial_echo(url: str, key: str, agent_id: int) -> bytes:
    marker = f"console-{uuid.uuid4().hex[:12]}".encode()
    async with await open_console(url, key, agent_id, GUEST, "serial") as console:
        await shell_prompt(console)
        await console.write(b"echo " + marker + b"\r")
        await console.expect(b"\n" + marker, timeout=30)  # the output line, not the echoed command
    return marker


def test_a_serial_console_over_a_websocket_runs_what_is_typed(console_portal: Server, key: str, agent_id: int,
                                                              guest: str) -> None:
    asyncio.run(serial_echo(base(console_portal), key, agent_id))

    def console_events() -> list[dict[str, Any]]:
        page = console_portal.request("GET", "/users/me/audit?limit=5", key)[1]
        return [e for e in page["events"] if e["action"] == "vm.console"]
    wait_for(console_events, 15, "no vm.console audit event")  # recorded as the portal sees the close
    event = console_events()[0]
    assert (event["vm"], event["outcome"]) == (GUEST, "ok")
    assert "kind=serial" in event["detail"] and "bytes_to_vm=" in event["detail"]


async def rfb_handshake(url: str, key: str, agent_id: int) -> tuple[bytes, bytes, int]:
    async with await open_console(url, key, agent_id, GUEST, "vnc") as console:
        assert console.connection.subprotocol == "binary"
        version = await console.expect(b"\n", timeout=30)
        await console.write(b"RFB 003.008\n")
        count = (await console.expect(re_any(1), timeout=10))[0]
        types = await console.expect(re_any(count), timeout=10)
        assert 1 in types, f"security type None not offered: {types!r}"
        await console.write(b"\x01")
        result = await console.expect(re_any(4), timeout=10)
        assert struct.unpack(">I", result)[0] == 0, "security handshake failed"
        await console.write(b"\x01")  # ClientInit: shared
        init = await console.expect(re_any(24), timeout=10)
        width, height = struct.unpack(">HH", init[:4])
        name_length = struct.unpack(">I", init[20:24])[0]
        await console.expect(re_any(name_length), timeout=10)
        # SetEncodings: Raw only; then ask for the whole screen
        await console.write(struct.pack(">BBHi", 2, 0, 1, 0))
        await console.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        header = await console.expect(re_any(4), timeout=30)
        while header[0] != 0:  # skip anything that is not a FramebufferUpdate (a bell, a cut text)
            header = await console.expect(re_any(4), timeout=30)
        rectangles = struct.unpack(">H", header[2:4])[0]
        assert rectangles >= 1
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", await console.expect(re_any(12), timeout=30))
        bits_per_pixel = init[4]
        pixels = await console.expect(re_any(w * h * bits_per_pixel // 8), timeout=60)
        assert encoding == 0
        return version, init, len(pixels)


def re_any(count: int) -> Any:
    import re
    return re.compile(b"(?s).{%d}" % count)


def test_a_vnc_console_completes_the_rfb_handshake_and_sends_pixels(console_portal: Server, key: str,
                                                                    agent_id: int, guest: str) -> None:
    version, _init, pixels = asyncio.run(rfb_handshake(base(console_portal), key, agent_id))
    assert version.startswith(b"RFB 003.")
    assert pixels > 0


async def connect(url: str, kind: str = "serial") -> websockets.asyncio.client.ClientConnection:
    return await websockets.asyncio.client.connect(url, subprotocols=None, open_timeout=30)


def refused_status(url: str) -> int | None:
    async def attempt() -> int | None:
        try:
            connection = await connect(url)
        except websockets.exceptions.InvalidStatus as error:
            return error.response.status_code
        await connection.close()
        return None
    return asyncio.run(attempt())


def test_a_used_an_expired_or_an_unknown_ticket_is_refused_with_403(console_portal: Server, key: str,
                                                                     agent_id: int, guest: str) -> None:
    url = base(console_portal)
    used = request_ticket(url, key, agent_id, GUEST, "serial")

    async def use_once() -> None:
        connection = await connect(websocket_url(url, used["url"]))
        await connection.close()
    asyncio.run(use_once())
    assert refused_status(websocket_url(url, used["url"])) == 403

    expired = request_ticket(url, key, agent_id, GUEST, "serial")
    wait_for(lambda: time.time() > time.mktime(time.strptime(expired["expires_at"][:19], "%Y-%m-%dT%H:%M:%S"))
             - time.timezone + 1, TICKET_SECONDS + 5, "the ticket did not expire")
    assert refused_status(websocket_url(url, expired["url"])) == 403
    assert refused_status(websocket_url(url, "/console/" + "A" * 43)) == 403


def test_closing_the_websocket_ends_virsh_console_on_the_host(console_portal: Server, key: str, agent_id: int,
                                                              guest: str, lab: Lab) -> None:
    async def open_and_close() -> None:
        async with await open_console(base(console_portal), key, agent_id, GUEST, "serial") as console:
            await shell_prompt(console)
            assert console_processes(GUEST), "virsh console is not running on the host"
    asyncio.run(open_and_close())
    wait_for(lambda: not console_processes(GUEST), 15, "virsh console still runs on the host")


def test_a_vm_that_is_not_running_gets_no_ticket(console_portal: Server, key: str, agent_id: int, lab: Lab) -> None:
    status, problem, _ = console_portal.request("POST", f"/agents/{agent_id}/vms/lab-disk/console", key,
                                                {"kind": "serial"})
    assert status == 409 and problem["code"] in ("vm_not_running", "console_unavailable"), problem


def test_the_command_line_attaches_a_terminal_to_the_serial_console_and_ctrl_bracket_detaches(
        console_portal: Server, key: str, agent_id: int, guest: str) -> None:
    import os
    import pty
    import select
    import sys

    marker = f"console-{uuid.uuid4().hex[:12]}".encode()
    env = {**os.environ, "MANAGEMENT_API_KEY": key, "MANAGEMENT_URL": base(console_portal)}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command line on a terminal, as an operator runs it
        os.execve(sys.executable, [sys.executable, "-m", "entrypoints.cli", "vms", "console", str(agent_id), GUEST],
                  env)
    seen = bytearray()

    def until(needle: bytes, timeout: float, poke: bytes = b"") -> None:
        deadline = time.monotonic() + timeout
        while needle not in seen:
            assert time.monotonic() < deadline, f"{needle!r} not seen: {bytes(seen[-500:])!r}"
            if poke:
                os.write(fd, poke)
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                seen.extend(os.read(fd, 65536))

    try:
        until(b"escape character is ^]", 60)
        until(b"# ", 60, poke=b"\r")
        os.write(fd, b"echo " + marker + b"\r")
        until(b"\n" + marker, 30)
        os.write(fd, b"\x1d")
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "Ctrl-] did not detach"
            with contextlib.suppress(OSError):
                if select.select([fd], [], [], 0.2)[0]:
                    seen.extend(os.read(fd, 65536))
        assert os.waitstatus_to_exitcode(status) == 0, bytes(seen[-500:])
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
