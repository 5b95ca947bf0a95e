"""A VM's console from anywhere the portal's HTTP API is reachable (issue 17): only its base URL and
an API key are needed.

For automation, ``open_console`` answers a ``Console``: an async stream (``read``/``write``, async
iteration over what the VM prints) with ``expect`` to wait for a prompt::

    async with await open_console("https://portal.example.com", key, 7, "web1") as console:
        await console.write(b"\\r")
        await console.expect(b"login: ", timeout=60)
        await console.write(b"root\\r")

For people, ``attach_terminal`` puts the local terminal in raw mode and joins it to the serial
console until ``Ctrl-]`` (like ``virsh console``); ``manage-playrservers vms console`` calls it.

Self-contained on purpose (stdlib HTTP for the ticket, ``websockets`` for the console): it takes a
base URL and a key, not the portal's configuration, so any client can call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import websockets
import websockets.asyncio.client
import websockets.exceptions

DETACH = b"\x1d"  # Ctrl-]
VNC_SUBPROTOCOL = "binary"


class ConsoleError(Exception):
    """The portal refused the console (``code`` as in its problem details) or it could not be reached."""

    def __init__(self, code: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = status


def request_ticket(base_url: str, api_key: str, agent_id: int, vm: str, kind: str = "serial",
                   *, timeout: float = 90.0) -> dict[str, Any]:
    """``POST /agents/{agent_id}/vms/{vm}/console``: the ticket answer (``ticket``, ``url``,
    ``expires_at``, ``kind``), or ``ConsoleError`` with the portal's code."""
    path = f"/agents/{int(agent_id)}/vms/{urllib.parse.quote(vm, safe='')}/console"
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise ConsoleError("bad_url", f"the portal's URL must be http:// or https://, not {base_url!r}")
    request = urllib.request.Request(base_url.rstrip("/") + path, method="POST",  # noqa: S310 - checked above
                                     data=json.dumps({"kind": kind}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) URL of the portal
            return dict(json.loads(answer.read()))
    except urllib.error.HTTPError as error:
        try:
            problem = json.loads(error.read())
        except ValueError:
            problem = {}
        raise ConsoleError(str(problem.get("code", "http_error")), str(problem.get("detail", error.reason)),
                           error.code) from None
    except (urllib.error.URLError, OSError) as error:
        raise ConsoleError("portal_unreachable", f"cannot reach {base_url}: {error}") from None


def websocket_url(base_url: str, path: str) -> str:
    """The ``ws://``/``wss://`` URL of ``path`` under the portal's ``http://``/``https://`` base URL."""
    parts = urllib.parse.urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    prefix = parts.path.rstrip("/")
    return urllib.parse.urlunsplit((scheme, parts.netloc, prefix + path, "", ""))


class Console:
    """An open console: the VM's bytes in, the client's bytes out."""

    def __init__(self, connection: websockets.asyncio.client.ClientConnection, kind: str) -> None:
        self.connection = connection
        self.kind = kind
        self._buffer = bytearray()

    async def read(self) -> bytes:
        """The next bytes the VM sent (whatever ``expect`` left unread first); ``b""`` once closed."""
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            return data
        try:
            message = await self.connection.recv()
        except websockets.exceptions.ConnectionClosed:
            return b""
        return message if isinstance(message, bytes) else message.encode()

    async def write(self, data: bytes) -> None:
        await self.connection.send(data)

    async def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 30.0) -> bytes:
        """Read until ``pattern`` shows up; answers everything up to and including it and keeps
        the rest for the next read. ``TimeoutError`` if it does not within ``timeout`` seconds,
        ``EOFError`` if the console closes first."""
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, bytes) else pattern
        seen = bytearray()

        async def until_found() -> bytes:
            nonlocal seen
            while True:
                found = regex.search(seen)
                if found is not None:
                    self._buffer = seen[found.end():] + self._buffer
                    return bytes(seen[:found.end()])
                chunk = await self.read()
                if not chunk:
                    raise EOFError(f"the console closed before {regex.pattern!r} appeared")
                seen += chunk

        return await asyncio.wait_for(until_found(), timeout)

    async def close(self) -> None:
        await self.connection.close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    async def __aenter__(self) -> Console:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()


async def open_console(base_url: str, api_key: str, agent_id: int, vm: str, kind: str = "serial") -> Console:
    """Ask for a ticket and open the console with it (``ConsoleError`` if either is refused)."""
    answer = await asyncio.to_thread(request_ticket, base_url, api_key, agent_id, vm, kind)
    url = websocket_url(base_url, str(answer["url"]))
    try:
        connection = await websockets.asyncio.client.connect(
            url, subprotocols=[websockets.Subprotocol(VNC_SUBPROTOCOL)] if kind == "vnc" else None,
            max_size=None, open_timeout=60)
    except websockets.exceptions.InvalidStatus as error:
        raise ConsoleError("console_refused", f"the portal refused the console's WebSocket "
                                              f"({error.response.status_code})", error.response.status_code) from None
    except (OSError, websockets.exceptions.WebSocketException) as error:
        raise ConsoleError("portal_unreachable", f"cannot open {websocket_url(base_url, '/console/…')}: {error}") \
            from None
    return Console(connection, kind)


async def attach_terminal(base_url: str, api_key: str, agent_id: int, vm: str) -> str:
    """Join the local terminal (raw mode) to the VM's serial console until ``Ctrl-]`` or until the
    portal closes it; answers why it ended (``detached`` or the close reason)."""
    import termios
    import tty

    console = await open_console(base_url, api_key, agent_id, vm, "serial")
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()
    loop.add_reader(stdin, lambda: keys.put_nowait(os.read(stdin, 4096)))
    if saved is not None:
        tty.setraw(stdin)
    sys.stderr.write(f"Connected to {vm}'s serial console; escape character is ^]\r\n")

    async def typing() -> str:
        while True:
            data = await keys.get()
            if not data:
                return "end of input"
            if DETACH in data:
                before = data.split(DETACH, 1)[0]
                if before:
                    await console.write(before)
                return "detached"
            await console.write(data)

    async def printing() -> str:
        async for chunk in console:
            os.write(sys.stdout.fileno(), chunk)
        return f"closed by the portal ({console.connection.close_reason or 'console ended'})"

    tasks = [asyncio.ensure_future(typing()), asyncio.ensure_future(printing())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()
        loop.remove_reader(stdin)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(Exception):
            await console.close()
        sys.stderr.write("\r\n")
