"""``GET /events/stream``: the caller's events as Server-Sent Events (issue 18).

Every worker serves every event, whichever worker or instance observed it: the stream reads the
events table (``EventLog.read``) after the last id it sent, and waits between reads on a short
poll (``poll`` seconds). ``Last-Event-ID`` (or ``?after=``) resumes from the history; without
either the stream starts with the next event. A comment line is sent every ``heartbeat`` seconds
when nothing happens, so proxies keep the connection and clients notice a dead one.

Memory stays bounded whatever the client does: events are read ``BATCH`` at a time and only when
the previous batch was accepted by the server (the ASGI server's ``send`` waits while the socket's
buffer is full). A client that leaves the stream blocked for more than ``slow_reader`` seconds
is cut off (it resumes with ``Last-Event-ID``); one that disconnects ends it at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import falcon
import falcon.asgi

from core.errors import InsufficientScope, PortalError
from core.events import check_filter
from core.live import EventFilter
from core.model import Caller, Scope
from core.portal import Portal
from entrypoints.http.resources import _until_client_leaves, caller
from entrypoints.operations import _whole_number
from entrypoints.shapes import EventView, dump

log = logging.getLogger("manage_playrservers.events")

BATCH = 100
POLL = 0.25  # seconds between two reads of the events table while nothing happens (SQLite)
LISTENING_POLL = 2.0  # the same on PostgreSQL, where NOTIFY wakes the stream at each commit of events

# Starts a listener that calls its first argument on every commit of events until the event is set;
# False when the database has no such signal (``SqlStorage.listen_events``).
Listen = Callable[[Callable[[], None], threading.Event], bool]
HEARTBEAT = 15.0
SLOW_READER = 30.0


def _whole(name: str, raw: str | None) -> int | None:
    return None if raw is None else _whole_number(name, raw.strip())


def sse(event: EventView, *, named: bool = True) -> bytes:
    """One event in the text/event-stream format: its id, its type as the event name, JSON data.
    Unnamed (``named=False``, the web pages' stream) it is a plain ``message`` with its type in the
    data, so a page's ``EventSource.onmessage`` sees every type without listing them."""
    name = f"event: {event.type}\n" if named else ""
    return f"id: {event.id}\n{name}data: {json.dumps(dump(event))}\n\n".encode()


# Whether the credential behind a stream still holds (the web pages' session), asked at each heartbeat.
StillAllowed = Callable[[], Awaitable[bool]]


class EventStreamResource:
    """The stream, filtered like ``GET /events`` (``agent``, ``vm``, ``type`` repeatable)."""

    def __init__(self, portal: Portal, *, poll: float = POLL, heartbeat: float = HEARTBEAT,
                 slow_reader: float = SLOW_READER, listen: Listen | None = None) -> None:
        self.portal = portal
        self.poll = poll
        self.heartbeat = heartbeat
        self.slow_reader = slow_reader
        self._listen = listen
        self._listening: bool | None = None  # started on the first stream (it needs the running loop)
        self._woken: set[asyncio.Event] = set()
        self._stop_listening = threading.Event()

    def _start_listening(self) -> None:
        """PostgreSQL: wake this worker's streams on every commit of events (LISTEN/NOTIFY), so
        they need not poll often; SQLite has no such signal and keeps the short poll."""
        if self._listening is not None:
            return
        self._listening = False
        if self._listen is not None:
            loop = asyncio.get_running_loop()

            def wake() -> None:
                for woken in list(self._woken):
                    loop.call_soon_threadsafe(woken.set)

            self._listening = self._listen(wake, self._stop_listening)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        await self.respond(req, resp, caller(req))

    async def respond(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, who: Caller, *,
                      named: bool = True, still_allowed: StillAllowed | None = None) -> None:
        """The stream for ``who`` (the API's key holder, or a page's session: ``entrypoints.web``).
        ``still_allowed`` is asked every ``heartbeat`` seconds, busy or idle; the stream ends when it
        answers False."""
        if Scope.READ not in who.scopes:  # the stream is read like GET /events (issue 20)
            raise InsufficientScope(Scope.READ.value)
        user_id: int = who.user.id
        last_event_id = req.get_header("Last-Event-ID")
        after = _whole("Last-Event-ID", last_event_id) if last_event_id else _whole("after", req.get_param("after"))
        wanted = check_filter(after=after, agent_id=_whole("agent", req.get_param("agent")),
                              vm=req.get_param("vm"), types=req.get_param_as_list("type") or [])
        wanted = attrs.evolve(wanted, agent_ids=who.agent_ids)  # a key limited to agents sees only theirs
        if after is None:
            wanted = attrs.evolve(wanted, after=await asyncio.to_thread(self.portal.events.last_id, user_id))
        # the agents a stream follows are in use: they get (or keep) a watcher
        await asyncio.to_thread(self.portal.watch.want_for_user, user_id, wanted.agent_id)
        left = asyncio.Event()
        watcher = asyncio.create_task(_until_client_leaves(req, left))
        resp.content_type = "text/event-stream"
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on at once
        resp.stream = self._events(user_id, wanted, left, watcher, named=named, still_allowed=still_allowed)

    async def _events(self, user_id: int, wanted: EventFilter, left: asyncio.Event,
                      watcher: asyncio.Task[Any], *, named: bool = True,
                      still_allowed: StillAllowed | None = None) -> AsyncIterator[bytes]:
        cursor = wanted.after
        quiet_since = checked_at = time.monotonic()
        self._start_listening()
        woken = asyncio.Event()
        self._woken.add(woken)
        # woken by NOTIFY: poll only as a safety net (a lost listening connection)
        poll = LISTENING_POLL if self._listening else self.poll
        try:
            yield b": stream of events; resume with Last-Event-ID\nretry: 2000\n\n"
            while not left.is_set():
                if still_allowed is not None and time.monotonic() - checked_at >= self.heartbeat:
                    # every heartbeat interval, busy or idle: signed out, expired, key rotated ends the
                    # stream, and the client's reconnection is refused
                    if not await still_allowed():
                        return
                    checked_at = time.monotonic()
                woken.clear()  # before the read: a commit after it wakes the wait below
                events = await asyncio.to_thread(self.portal.events.read, user_id,
                                                 attrs.evolve(wanted, after=cursor), BATCH)
                if events:
                    cursor = events[-1].id
                    sent = time.monotonic()
                    yield b"".join(sse(EventView.of(e), named=named) for e in events)
                    if time.monotonic() - sent > self.slow_reader:
                        return  # the client let the stream block too long: it resumes from its last id
                    quiet_since = time.monotonic()
                    continue
                if time.monotonic() - quiet_since >= self.heartbeat:
                    await asyncio.to_thread(self.portal.watch.want_for_user, user_id, wanted.agent_id)
                    yield b": heartbeat\n\n"
                    quiet_since = time.monotonic()
                waits = [asyncio.ensure_future(left.wait()), asyncio.ensure_future(woken.wait())]
                await asyncio.wait(waits, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
        except PortalError as error:  # the database busy or gone: end the stream, the client resumes
            log.warning("event stream of user %s ended: %s", user_id, error.code)  # from its last id
        finally:
            self._woken.discard(woken)
            watcher.cancel()
