"""The event stream's generator (``entrypoints/http/stream.py``) over the in-memory world: a
client that keeps the stream blocked longer than ``slow_reader`` is cut off after the batch it
blocked on (it resumes with Last-Event-ID) instead of the portal reading on for it; a client that
leaves ends the stream."""

from __future__ import annotations

import asyncio
from typing import Any

from core.errors import DatabaseUnavailable
from core.live import EventFilter
from core.model import Caller
from entrypoints.http.stream import EventStreamResource
from tests.unit.world import World


def seed(world: World, caller: Caller, count: int) -> None:
    log = world.portal.events
    with world.storage.transaction(write=True) as tx:
        for n in range(count):
            log.add(tx, log.new(caller.user.id, 1, f"vm{n}", "vm.started", "Booted"))


async def chunks(resource: EventStreamResource, user_id: int, left: asyncio.Event, *, block: float) -> list[bytes]:
    async def idle() -> None:
        await asyncio.Event().wait()

    watcher = asyncio.create_task(idle())
    got: list[bytes] = []
    stream = resource._events(user_id, EventFilter(), left, watcher)
    async for chunk in stream:
        got.append(chunk)
        if len(got) >= 3:
            left.set()  # the client goes away
        await asyncio.sleep(block)  # the client reads slowly: the stream's send blocks this long
    return got


def test_a_reader_that_blocks_the_stream_too_long_is_cut_off_after_its_batch(world: World, alice: Caller) -> None:
    seed(world, alice, 3)
    resource = EventStreamResource(world.portal, poll=0.01, slow_reader=0.05)
    # bounded: a stream that was not cut off would wait for more events until the time-out
    got = asyncio.run(asyncio.wait_for(chunks(resource, alice.user.id, asyncio.Event(), block=0.1), 10))
    assert len(got) == 2 and got[1].count(b"\nevent: vm.started\n") == 3  # the opening comment, one batch, cut


def test_a_reader_that_keeps_up_gets_everything_until_it_leaves(world: World, alice: Caller, bob: Caller) -> None:
    seed(world, alice, 3)
    seed(world, bob, 2)
    resource = EventStreamResource(world.portal, poll=0.01, heartbeat=0.0, slow_reader=10)
    got = asyncio.run(asyncio.wait_for(chunks(resource, alice.user.id, asyncio.Event(), block=0), 10))
    assert b"".join(got).count(b"event: vm.started") == 3  # alice's only
    assert any(chunk.startswith(b": heartbeat") for chunk in got)


async def whole_stream(resource: EventStreamResource, user_id: int, **options: Any) -> list[bytes]:
    async def idle() -> None:
        await asyncio.Event().wait()

    watcher = asyncio.create_task(idle())
    return [chunk async for chunk in resource._events(user_id, EventFilter(), asyncio.Event(), watcher, **options)]


def test_a_stream_whose_credential_no_longer_holds_ends_at_its_next_check_even_while_busy(
        world: World, alice: Caller) -> None:
    # the web pages' stream: a session signed out (or expired, or rotated) ends the stream; checked
    # every heartbeat interval (0 here) whether events flow or not
    seed(world, alice, 2)
    answers = iter([True, False])
    asked: list[bool] = []

    async def still_allowed() -> bool:
        asked.append(next(answers))
        return asked[-1]

    resource = EventStreamResource(world.portal, poll=0.01, heartbeat=0.0, slow_reader=10)
    # bounded: a stream that did not end would run until the time-out
    got = asyncio.run(asyncio.wait_for(whole_stream(resource, alice.user.id, still_allowed=still_allowed), 10))
    assert asked == [True, False]
    assert b"".join(got).count(b"data: ") == 2  # the batch sent while it held, then the end
    assert b"".join(got).count(b": heartbeat") == 0  # it ended right after a busy turn, not when idle


def test_the_pages_stream_sends_every_event_as_a_plain_message_with_its_type_in_the_data(
        world: World, alice: Caller) -> None:
    seed(world, alice, 1)

    answers = iter([True, False])

    async def ends() -> bool:  # once the first batch is out
        return next(answers)

    resource = EventStreamResource(world.portal, poll=0.01, heartbeat=0.0, slow_reader=10)
    got = b"".join(asyncio.run(asyncio.wait_for(
        whole_stream(resource, alice.user.id, named=False, still_allowed=ends), 10)))
    assert b"event:" not in got  # EventSource.onmessage sees it whatever its type
    assert b'"type": "vm.started"' in got and b"\nid: " in got


def test_a_stream_whose_database_fails_ends_cleanly_for_the_client_to_resume(world: World, alice: Caller) -> None:
    # the database busy or gone once the answer has started: no traceback out of the generator
    # (the server would log it and cut the connection mid-chunk); the stream ends and the browser
    # reconnects with its Last-Event-ID
    seed(world, alice, 1)

    async def database_gone() -> bool:
        raise DatabaseUnavailable("the database cannot be reached")

    resource = EventStreamResource(world.portal, poll=0.01, heartbeat=0.0, slow_reader=10)
    got = asyncio.run(asyncio.wait_for(whole_stream(resource, alice.user.id, still_allowed=database_gone), 10))
    assert got == [b": stream of events; resume with Last-Event-ID\nretry: 2000\n\n"]
