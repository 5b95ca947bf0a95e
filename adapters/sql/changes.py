"""PostgreSQL: how a worker learns that another connection committed (issue 22).

Every committing write transaction of every portal process (but one that wrote only tables no
cache reads: ``_NOT_CACHED_TABLES`` in ``storage.py``) sends ``NOTIFY`` on the database's
changes channel inside the transaction, so PostgreSQL delivers it when — and only if — it commits
(``SqlTransaction.finish``). Each worker process keeps one connection of its own that does nothing
but ``LISTEN`` there (``ChangesListener``, a thread). Its data version is (listener generation,
notifications received): it moves at every commit of any instance, and it is None — the worker's
caches are off — whenever it cannot vouch for that:

- until the listening connection is open and listening, and again from the moment it is lost until
  it listens again (then the generation moves on, so nothing read before counts);
- when the server has not answered the listener's ping (an empty query at least every
  ``PING_EVERY`` seconds) for ``HEARD_WITHIN`` seconds: a connection cut silently (a partition, a
  firewall dropping state) turns the caches off within that time instead of leaving them on forever.

A notification is not instantaneous, though: PostgreSQL signals the listening backends while the
writer commits, before its ``COMMIT`` returns, but a listening backend the machine has not
scheduled yet sends it milliseconds later (measured here under load: median 15 µs, p99 16 ms). A
request to another instance right after the writer answered could come first. So the HTTP caches
ask ``fenced_version``: a round trip on the listening connection (an empty query) that starts after
the request did. A listening backend that has been signalled sends its pending notifications as
soon as it has read its next query, before answering it (``ProcessClientReadInterrupt``), and the
writer's signal was sent before its commit returned (``AtCommit_Notify`` since PostgreSQL 15,
before the writer's ``ReadyForQuery`` before that), so every commit that returned before the request
arrived is counted when that round trip ends: the version it gives is exact. Concurrent requests
share one round trip (each waits for the first that starts after it), which costs far less than the
reads it saves: no pooled connection, no transaction, nothing parsed.

The channel is named after the schema the portal's tables are in (``changes_channel``): two portals
sharing one database in different schemas do not wake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import threading
import time
from typing import Any

import structlog

CHANNEL = "playr_changes"
PING_EVERY = 1.0  # seconds between two pings on the listening connection
HEARD_WITHIN = 3.0  # caches stay on only while the server answered a ping this recently
RETRY_AFTER = 1.0  # seconds before opening a lost listening connection again
APPLICATION_NAME = "manage-playrservers-listener"  # followed by its channel once it knows it

log = structlog.get_logger("manage_playrservers.database")


def changes_channel(schema: str) -> str:
    """The channel of the portal whose tables are in ``schema`` (``current_schema()``): a plain
    identifier (letters, digits, underscores) of at most 30 characters, safe to quote."""
    if schema == "public":
        return CHANNEL
    return f"{CHANNEL}_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


def listener_name(channel: str) -> str:
    """The ``application_name`` of a listening connection on ``channel`` (pg_stat_activity)."""
    return f"{APPLICATION_NAME} {channel}"


class ChangesListener:
    """One worker's listening connection (started on first use, in a daemon thread, again in a
    forked child) and the data version it vouches for."""

    def __init__(self, conninfo: str, *, connect_timeout: int) -> None:
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._start_lock = threading.Lock()
        self._pid = 0  # the process whose thread listens (a forked child starts its own)
        self._stop = threading.Event()
        # Written by the listener thread only. ``version`` reads them in this order: socket, then
        # _draining, then the counters.
        self._fd = -1  # the listening connection's socket; -1 while not listening
        self._draining = False  # reading the socket: what it read is not counted yet
        self._generation = 0  # one more at every (re)connection that listens
        self._received = 0  # notifications received on this generation's connection
        self._heard_at = 0.0  # time.monotonic() of the server's last answer to a ping
        self.channel: str | None = None
        # Requests waiting for the next round trip to start (``fenced_version``), and the pipe that
        # wakes the listener thread for them (one byte while ``_woken``).
        self._asked: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[tuple[int, int] | None]]] = []
        self._asked_lock = threading.Lock()
        self._woken = False
        self._wake_r, self._wake_w = -1, -1

    def version(self) -> tuple[int, int] | None:
        """The version as far as this worker can tell without asking the server: what the listener
        has counted, or None while a notification is waiting on its socket (not counted yet)."""
        if self._pid != os.getpid():
            self._start()
        fd = self._fd
        if fd < 0 or time.monotonic() - self._heard_at > HEARD_WITHIN:
            return None
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if poller.poll(0):  # bytes waiting: a notification (or the connection's end) not read yet
                return None
        except (OSError, ValueError):
            return None
        if self._draining or self._fd != fd:
            return None
        return self._generation, self._received

    async def fenced_version(self) -> tuple[int, int] | None:
        """The version once a round trip on the listening connection that started after this call
        has ended: it counts every commit that returned before this call. None while not listening."""
        if self._pid != os.getpid():
            self._start()
        if self._fd < 0:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int] | None] = loop.create_future()
        with self._asked_lock:
            if self._fd < 0:
                return None
            self._asked.append((loop, future))
            wake, self._woken = not self._woken, True
        if wake:
            with contextlib.suppress(OSError):  # stopped meanwhile: it answered everyone waiting
                os.write(self._wake_w, b"!")
        return await future

    @property
    def listening(self) -> bool:
        return self._fd >= 0

    def _start(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._fd = -1
            self._asked, self._woken = [], False
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            self._stop = threading.Event()
            threading.Thread(target=self._run, args=(self._stop,), name="changes-listener", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._wake_w >= 0 and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"!")

    def _run(self, stop: threading.Event) -> None:
        import psycopg

        failed = 0  # attempts in a row that never listened: logged once per outage, not every second
        while not stop.is_set():
            conn: Any = None
            in_flight: list[Any] = []
            generation = self._generation
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self._connect_timeout,
                                       application_name=APPLICATION_NAME)
                self._listen(conn, stop, in_flight, back_after=failed)
            except (psycopg.Error, OSError) as error:
                reason = str(error).strip().splitlines()
                listened = self._generation != generation
                if listened or not failed:
                    log.warning("database_listener_lost" if listened else "database_listener_unavailable",
                                reason=reason[0] if reason else type(error).__name__,
                                caches="off until it listens again", retrying_every_seconds=RETRY_AFTER)
                failed = 0 if listened else failed + 1
            finally:
                with self._asked_lock:
                    self._fd = -1  # caches off before anything else
                    waiting, self._asked = in_flight + self._asked, []
                self._draining = False
                _answer(waiting, None)  # those waiting read the database
                if conn is not None:
                    conn.close()
            stop.wait(RETRY_AFTER)
        for end in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(end)

    def _listen(self, conn: Any, stop: threading.Event, in_flight: list[Any], *, back_after: int = 0) -> None:
        """Listen until the connection is lost (an exception) or ``stop`` is set. ``in_flight``
        holds the requests waiting for the round trip in flight (answered None if it never ends).
        ``back_after``: attempts that failed before this one (said in the log once listening)."""
        from psycopg import OperationalError, pq

        schema = str(conn.execute("SELECT current_schema()").fetchone()[0])
        self.channel = changes_channel(schema)
        # named after its channel, so that an operator (and the tests) can tell whose it is
        conn.execute(f"SET application_name = '{listener_name(self.channel)}'")
        conn.execute(f'LISTEN "{self.channel}"')
        pgconn = conn.pgconn
        fd = pgconn.socket
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        sent_at = time.monotonic()
        pinging = False  # a round trip is in flight; ``in_flight`` is who waits for it
        self._generation += 1  # what was read on an earlier connection's version never counts again
        self._received = 0
        self._heard_at = sent_at
        self._fd = fd  # listening: caches on
        if self._generation > 1 or back_after:
            log.info("database_listener_listening", generation=self._generation, failed_attempts=back_after)
        while not stop.is_set():
            now = time.monotonic()
            if not pinging:
                with self._asked_lock:
                    in_flight[:], self._asked = self._asked, []
                if in_flight or now - sent_at >= PING_EVERY:
                    pgconn.send_query(b"")  # an empty query: the cheapest round trip there is
                    if pgconn.flush() != 0:
                        raise OperationalError("could not send the ping to the database server")
                    sent_at, pinging = now, True
            elif now - sent_at > HEARD_WITHIN:
                raise OperationalError(f"the database server did not answer the listener in {HEARD_WITHIN:g} s")
            wait = max(0.0, sent_at + (HEARD_WITHIN if pinging else PING_EVERY) - now)
            ready = {ready_fd for ready_fd, _ in poller.poll(wait * 1000 + 1)}
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                with self._asked_lock:
                    self._woken = False  # after the read: a request asking from now on writes again
            if fd not in ready:
                continue
            self._draining = True
            pgconn.consume_input()  # raises OperationalError once the connection is lost
            received, answered = 0, False
            while True:
                while pgconn.notifies() is not None:
                    received += 1
                if not pinging or pgconn.is_busy():
                    break
                result = pgconn.get_result()
                if result is None:  # the round trip ended: every notification sent before it is in
                    pinging, answered = False, True
                elif result.status not in (pq.ExecStatus.EMPTY_QUERY, pq.ExecStatus.COMMAND_OK):
                    reason = result.error_message.decode(errors="replace")
                    raise OperationalError(f"the listener's ping failed: {reason}")
            if pgconn.status != pq.ConnStatus.OK:
                raise OperationalError("the listening connection was closed")
            self._received += received
            self._draining = False
            if answered:
                self._heard_at = time.monotonic()
                _answer(in_flight, (self._generation, self._received))
                in_flight.clear()


def _answer(waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]], version: Any) -> None:
    """Give ``version`` to the requests waiting, on their event loops (one call per loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[Any]]] = {}
    for loop, future in waiting:
        by_loop.setdefault(loop, []).append(future)
    for loop, futures in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(_set_results, futures, version)


def _set_results(futures: list[asyncio.Future[Any]], version: Any) -> None:
    for future in futures:
        if not future.done():  # a request cancelled meanwhile
            future.set_result(version)
