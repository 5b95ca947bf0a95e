"""``GET /console/{ticket}``: the WebSocket end of a console (issue 17).

A browser cannot put an API key on a WebSocket, so this route is not authenticated by key: the
one-time ticket in its path is the credential (``POST /agents/{id}/vms/{vm}/console`` issues it).
A ticket that is unknown, used or expired is refused before the upgrade (HTTP 403, nothing said
about why). Once redeemed, the VM's end is opened over the agent's SSH connection first, then
the upgrade is accepted and ``ConsoleService.relay`` carries bytes both ways; the console is
audited when it ends. Bytes go to the client as binary messages; the client may send binary or
text messages (text is sent as UTF-8).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import falcon
import falcon.asgi
import structlog

from core.errors import PortalError
from core.model import Origin
from core.portal import Portal

log = structlog.get_logger("manage_playrservers.console")

VNC_SUBPROTOCOL = "binary"  # what noVNC asks for (websockify's name for raw RFB in binary messages)


def chosen_subprotocol(offered: tuple[str, ...] | list[str]) -> str | None:
    """The subprotocol the upgrade answers with: ``binary`` when the client offered it, for either kind
    (every message from the portal is binary), else none. A browser fails the handshake when it
    offered subprotocols and the answer names none (RFC 6455 4.1), so an offered ``binary`` is
    never ignored, whatever the console's kind."""
    return VNC_SUBPROTOCOL if VNC_SUBPROTOCOL in offered else None


_CLOSE_REASON_MAX = 120  # a WebSocket close reason is at most 123 bytes


class _WebSocketClient:
    """``core.consoles.ConsoleClient`` over a Falcon WebSocket."""

    def __init__(self, ws: falcon.asgi.WebSocket) -> None:
        self.ws = ws

    async def receive(self) -> bytes | None:
        try:
            # Falcon's receive_data/receive_text each refuse the other kind of message (and lose it);
            # a console takes both, so the event is read as it comes (Falcon pinned below 5).
            event: Mapping[str, Any] = await self.ws._receive()
        except falcon.WebSocketDisconnected:
            return None
        data = event.get("bytes")
        if data is not None:
            return bytes(data)
        text = event.get("text")
        return text.encode("utf-8", "surrogatepass") if text is not None else b""

    async def send(self, data: bytes) -> None:
        await self.ws.send_data(data)


class ConsoleResource:
    """The WebSocket of a console ticket."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_websocket(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket, ticket: str) -> None:
        started = time.perf_counter()
        origin = Origin(request_id=req.context.request_id, client_address=req.context.client_address)
        consoles = self.portal.consoles
        console = None
        if not getattr(req.context, "refused", False):
            console = await asyncio.to_thread(consoles.redeem, ticket)
        if console is None:
            log.info("console_refused", client=origin.client_address)
            await ws.close()  # before accept: the server answers the upgrade with 403
            return
        wanted = chosen_subprotocol(ws.subprotocols)
        try:
            async with consoles.connected(console, origin) as vm_end:
                await ws.accept(subprotocol=wanted)
                record = await consoles.relay(console, _WebSocketClient(ws), vm_end)
        except PortalError as error:  # the VM's end could not be opened (audited by ``connected``)
            log.info("console_failed", code=error.code, console_id=console.id)
            if ws.unaccepted:
                await ws.accept(subprotocol=wanted)
            await ws.close(1011, f"{error.code}: {error.detail}"[:_CLOSE_REASON_MAX])
            return
        await asyncio.to_thread(consoles.finish, console, origin, record)
        log.info("console_closed", console_id=console.id, user_id=console.user_id, agent_id=console.agent_id,
                 kind=record.kind.value, ended=record.ended, bytes_to_vm=record.bytes_to_vm,
                 bytes_from_vm=record.bytes_from_vm,
                 duration_ms=round((time.perf_counter() - started) * 1000, 2))
        await ws.close(1000 if record.ended in ("client_closed", "vm_closed") else 4408, record.ended)
