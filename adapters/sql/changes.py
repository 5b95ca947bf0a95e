"""PostgreSQL: how a worker learns that another connection committed (issue 22).

Every committing write transaction of every portal process sends ``NOTIFY`` on the database's
changes channel inside the transaction, so PostgreSQL delivers it when — and only if — it commits
(``SqlTransaction.finish``). Each worker process keeps one connection of its own that does nothing
but ``LISTEN`` there (``ChangesListener``, a thread). Its data version is (listener generation,
notifications received): it moves at every commit of any instance, and it is None — the worker's
caches are off — whenever it cannot vouch for that:

- until the listening connection is open and listening, and again from the moment it is lost until
  it listens again (then the generation moves on, so nothing read before counts);
- while a notification has reached the worker's socket but is not counted yet (the request's thread
  looks at the socket itself, so a notification the listener thread has not been scheduled to read
  yet still turns the cache off);
- when the server has not answered the listener's ping (a no-op ``LISTEN`` every ``PING_EVERY``
  seconds) for ``HEARD_WITHIN`` seconds: a connection cut silently (a partition, a firewall dropping
  state) turns the caches off within that time instead of leaving them on forever.

The channel is named after the schema the portal's tables are in (``changes_channel``): two portals
sharing one database in different schemas do not wake each other.
"""

from __future__ import annotations

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
APPLICATION_NAME = "manage-playrservers-listener"

log = structlog.get_logger("manage_playrservers.database")


def changes_channel(schema: str) -> str:
    """The channel of the portal whose tables are in ``schema`` (``current_schema()``): a plain
    identifier (letters, digits, underscores) of at most 30 characters, safe to quote."""
    if schema == "public":
        return CHANNEL
    return f"{CHANNEL}_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


class ChangesListener:
    """One worker's listening connection (started on the first ``version()``, in a daemon thread,
    again in a forked child) and the data version it vouches for."""

    def __init__(self, conninfo: str, *, connect_timeout: int) -> None:
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._start_lock = threading.Lock()
        self._pid = 0  # the process whose thread listens (a forked child starts its own)
        self._stop = threading.Event()
        # Written by the listener thread only. Read by any thread in this order: socket, then
        # _draining, then the counters (see ``version``).
        self._fd = -1  # the listening connection's socket; -1 while not listening
        self._draining = False  # reading the socket: what it read is not counted yet
        self._generation = 0  # one more at every (re)connection that listens
        self._received = 0  # notifications received on this generation's connection
        self._heard_at = 0.0  # time.monotonic() of the server's last answer to a ping
        self.channel: str | None = None

    def version(self) -> tuple[int, int] | None:
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

    @property
    def listening(self) -> bool:
        return self._fd >= 0

    def _start(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._fd = -1
            self._stop = threading.Event()
            threading.Thread(target=self._run, args=(self._stop,), name="changes-listener", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, stop: threading.Event) -> None:
        import psycopg

        while not stop.is_set():
            conn: Any = None
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self._connect_timeout,
                                       application_name=APPLICATION_NAME)
                self._listen(conn, stop)
            except (psycopg.Error, OSError, ConnectionError) as error:
                log.warning("database_listener_lost", reason=str(error).strip().splitlines()[0] if str(error) else
                            type(error).__name__, retrying_in_seconds=RETRY_AFTER)
            finally:
                self._fd = -1  # caches off before anything else
                self._draining = False
                if conn is not None:
                    conn.close()
            stop.wait(RETRY_AFTER)

    def _listen(self, conn: Any, stop: threading.Event) -> None:
        from psycopg import OperationalError, pq

        schema = str(conn.execute("SELECT current_schema()").fetchone()[0])
        self.channel = changes_channel(schema)
        listen = f'LISTEN "{self.channel}"'.encode()
        conn.execute(listen)
        pgconn = conn.pgconn
        fd = pgconn.socket
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pinged_at = time.monotonic()
        ping_pending = False
        self._generation += 1  # what was read on an earlier connection's version never counts again
        self._received = 0
        self._heard_at = pinged_at
        self._fd = fd  # listening: caches on
        while not stop.is_set():
            now = time.monotonic()
            if not ping_pending and now - pinged_at >= PING_EVERY:
                pgconn.send_query(listen)  # already listening: a no-op the server answers at once
                if pgconn.flush() != 0:
                    raise OperationalError("could not send the ping to the database server")
                pinged_at, ping_pending = now, True
            elif ping_pending and now - pinged_at > HEARD_WITHIN:
                raise OperationalError(f"the database server did not answer the listener's ping in {HEARD_WITHIN:g} s")
            wait = max(0.0, (pinged_at + (HEARD_WITHIN if ping_pending else PING_EVERY)) - now)
            if not poller.poll(wait * 1000 + 1):
                continue
            self._draining = True
            pgconn.consume_input()  # raises OperationalError once the connection is lost
            received = 0
            while True:
                while pgconn.notifies() is not None:
                    received += 1
                if not ping_pending or pgconn.is_busy():
                    break
                result = pgconn.get_result()
                if result is None:
                    ping_pending = False
                    self._heard_at = time.monotonic()
                elif result.status != pq.ExecStatus.COMMAND_OK:
                    reason = result.error_message.decode(errors="replace")
                    raise OperationalError(f"the listener's ping failed: {reason}")
            if pgconn.status != pq.ConnStatus.OK:
                raise OperationalError("the listening connection was closed")
            self._received += received
            self._draining = False
