"""The storage port on SQLAlchemy Core: SQLite by default, PostgreSQL (psycopg 3) for several instances.

Write transactions hold the database's write lock from their first statement, so a
read-check-write use case cannot interleave with another writer (``core.ports.Storage``):

- SQLite is opened in WAL mode with foreign keys on, a busy time-out and ``synchronous=FULL`` (an
  answered write survives a power cut, not only a crash); write transactions begin with
  ``BEGIN IMMEDIATE``.
- PostgreSQL write transactions begin by taking one transaction-scoped advisory lock, the same for
  every portal instance (READ COMMITTED, so each statement after it sees every earlier writer's
  commit); ``lock_timeout`` bounds the wait like SQLite's busy time-out. Every round trip that can
  go does (issue 22): connections are in autocommit, so a read transaction sends only its own
  statements (each sees every commit before it, as under READ COMMITTED) and a write sends
  ``BEGIN; SELECT pg_advisory_xact_lock(…)`` as one message and ``NOTIFY …; COMMIT`` as another.
  Pooled connections are not pinged before use: a read whose connection turns out lost runs again
  once on a fresh one, and so does a write's first message; a write is never re-run once it has
  the lock: it fails with 503 ``database_unavailable``.
- PostgreSQL: every committing write notifies the changes channel (``adapters.sql.changes``), which
  gives ``data_version`` a value there too, so the per-worker caches stay on.

Waiting too long for the lock (or for a free pooled connection) is 503 ``database_busy`` on both.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy import event

from adapters.sql import migrations
from adapters.sql.changes import ChangesListener, changes_channel
from adapters.sql.schema import (
    agents,
    api_keys,
    audit_events,
    console_tickets,
    events,
    mirrored_vms,
    users,
    watch_demand,
    watches,
    web_sessions,
    webhook_attempts,
    webhook_deliveries,
    webhooks,
)
from core.errors import AgentNameTaken, DatabaseBusy, DatabaseUnavailable, EmailTaken
from core.live import (
    DELIVERY_PENDING,
    Delivery,
    DeliveryAttempt,
    Event,
    EventFilter,
    Mirror,
    MirroredVm,
    WatchStatus,
    Webhook,
)
from core.model import (
    ALL_SCOPES,
    Agent,
    ApiKey,
    AuditEvent,
    ClientKey,
    ConsoleKind,
    ConsoleTicket,
    HostKey,
    IssuedApiKey,
    Scope,
    User,
    WebSession,
)
from core.ports import NullObserver, Observer
from core.validation import normalize_email

# The reads behind every authenticated request and agent lookup, built once: building a statement
# (and its cache key) on each call cost SQLAlchemy more than SQLite takes to run it.
# A key by its prefix, with its user (and the prefix of the user's full key) in the same round trip:
# an authentication asks for both (issue 22; ``get_user`` answers from it until the next write).
_full_keys = api_keys.alias("full_keys")
_API_KEY_WITH_USER = (
    sa.select(api_keys, users.c.name.label("user_name"), users.c.email.label("user_email"),
              users.c.created_at.label("user_created_at"), _full_keys.c.prefix.label("user_key_prefix"))
    .select_from(api_keys.join(users, users.c.id == api_keys.c.user_id)
                 .outerjoin(_full_keys, sa.and_(_full_keys.c.user_id == users.c.id, _full_keys.c.is_full)))
    .where(api_keys.c.prefix == sa.bindparam("prefix")))
_USER_BY_ID = (sa.select(users, api_keys.c.prefix)
               .join(api_keys, sa.and_(api_keys.c.user_id == users.c.id, api_keys.c.is_full))
               .where(users.c.id == sa.bindparam("user_id")))
_AGENTS_OF_OWNER = sa.select(agents).where(agents.c.owner_id == sa.bindparam("owner_id")).order_by(agents.c.id)
_AGENT_NAMES_OF_OWNER = (sa.select(agents.c.id, agents.c.name).where(agents.c.owner_id == sa.bindparam("owner_id"))
                         .order_by(agents.c.id))
# The fleet view's reads of the live mirror (issue 22): by owner, so one parameter for any number of agents.
_LEASES_OF_OWNER = (sa.select(watches.c.agent_id, watches.c.holder, watches.c.expires_at, watches.c.connected,
                              watches.c.alive_at)
                    .join(agents, agents.c.id == watches.c.agent_id)
                    .where(agents.c.owner_id == sa.bindparam("owner_id")))
_MIRRORED_VMS_OF_OWNER = (sa.select(mirrored_vms.c.agent_id, mirrored_vms.c.name, mirrored_vms.c.state,
                                    mirrored_vms.c.domain_id)
                          .join(agents, agents.c.id == mirrored_vms.c.agent_id)
                          .where(agents.c.owner_id == sa.bindparam("owner_id"))
                          .order_by(mirrored_vms.c.agent_id, mirrored_vms.c.name))
_NEWEST_AGENT = sa.select(agents).order_by(agents.c.id.desc()).limit(1)
_AGENT_OF_OWNER = sa.select(agents).where(agents.c.owner_id == sa.bindparam("owner_id"),
                                          agents.c.id == sa.bindparam("agent_id"))

# Webhooks (issue 18): every stored event reads its owner's webhooks, and each one that wants it adds
# an outbox row (the statements are built once, like the reads above).
_WEBHOOKS_OF_USER = sa.select(webhooks).where(webhooks.c.user_id == sa.bindparam("user_id")).order_by(webhooks.c.id)
_ADD_DELIVERY = webhook_deliveries.insert()

# PostgreSQL: the advisory lock every write transaction of every instance takes first (the
# counterpart of SQLite's single writer); migrations take their own as well (migrations.py).
WRITE_LOCK_KEY = 7252018
# Taken in the message that begins the transaction (PostgreSQL connections are in autocommit: issue 22).
_BEGIN_WRITE = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"
# SQLSTATEs that mean "another transaction is in the way, try again": serialization failure,
# deadlock detected, lock not available (lock_timeout).
_BUSY_SQLSTATES = {"40001", "40P01", "55P03"}
# The largest id an INTEGER column holds on every backend (PostgreSQL's int4): ids a client sends
# beyond it name no row, and must not reach PostgreSQL, which answers "integer out of range".
MAX_ID = 2**31 - 1
CONNECT_TIMEOUT = 10  # seconds to reach the PostgreSQL server, unless the URL says connect_timeout=


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path)}"


class SqlStorage:
    """Implements ``core.ports.Storage``."""

    def __init__(self, url: str, *, busy_timeout: float = 10.0, pool_size: int = 5,
                 observer: Observer | None = None) -> None:
        # Told how long each transaction took and how it ended (the portal's metrics, issue 21).
        self.observer: Observer = observer if observer is not None else NullObserver()
        self.url = sa.engine.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgresql = self.url.get_backend_name() == "postgresql"
        self._watch: sqlite3.Connection | None = None  # answers data_version(), nothing else
        self._watches = 0  # how many it has had: each one counts from its own start
        self._watch_lock = threading.Lock()
        # PostgreSQL (issue 22): this worker's listening connection, the channel its commits notify,
        # and how many write transactions it committed itself (its own commits invalidate its
        # caches at once, without waiting for their notification to come back).
        self._changes: ChangesListener | None = None
        self.changes_channel = changes_channel("public")
        self._notify_and_commit = f'NOTIFY "{self.changes_channel}"; COMMIT'
        self._commit_counter = itertools.count(1)
        self._commits = 0
        if self.is_sqlite:
            database = self.url.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(
                self.url,
                connect_args={"timeout": busy_timeout, "check_same_thread": False},
                pool_size=pool_size,
                max_overflow=10,
            )
            self._install_sqlite_hooks(busy_timeout)
        else:
            connect_args: dict[str, Any] = {}
            if self.is_postgresql:
                connect_args = {"connect_timeout": CONNECT_TIMEOUT, "application_name": "manage-playrservers"}
                connect_args = {k: v for k, v in connect_args.items() if k not in self.url.query}
            # A fixed number of connections per process (no overflow), so that instances x workers x
            # pool_size is the most the portal ever opens (docs/scaling.md); a request that finds
            # none free waits up to the busy time-out, then gets 503 database_busy. No pre-ping
            # (a round trip per transaction): a lost connection is handled where it is used.
            options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if self.is_postgresql else {}
            self.engine = sa.create_engine(self.url, pool_size=pool_size, max_overflow=0,
                                           pool_timeout=busy_timeout, connect_args=connect_args, **options)
            if self.is_postgresql:
                self._install_postgresql_hooks(busy_timeout)
                self._changes = ChangesListener(self.url.set(drivername="postgresql").render_as_string(
                    hide_password=False), connect_timeout=int(connect_args.get("connect_timeout", CONNECT_TIMEOUT)))

    def _install_sqlite_hooks(self, busy_timeout: float) -> None:
        @event.listens_for(self.engine, "connect")
        def _configure(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
            # Take transaction control away from the sqlite3 module: we emit BEGIN ourselves.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            _enable_wal(cursor, busy_timeout)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        @event.listens_for(self.engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

    def _install_postgresql_hooks(self, busy_timeout: float) -> None:
        @event.listens_for(self.engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            # Every lock wait (the write lock above all) gives up after the busy time-out, as on SQLite.
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            dbapi_connection.execute(f"SET lock_timeout = {max(1, int(busy_timeout * 1000))}")
            dbapi_connection.execute("SET TIME ZONE 'UTC'")
            # the schema the tables are in names the channel the commits notify (adapters.sql.changes)
            channel = changes_channel(str(dbapi_connection.execute("SELECT current_schema()").fetchone()[0]))
            if channel != self.changes_channel:
                self.changes_channel, self._notify_and_commit = channel, f'NOTIFY "{channel}"; COMMIT'
            dbapi_connection.autocommit = autocommit

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[SqlTransaction]:
        started = time.perf_counter()
        outcome = "rolled_back"
        try:
            with self._database_errors():
                tx = SqlTransaction(self, write=write)
                try:
                    yield tx
                except BaseException:
                    tx.finish(commit=False)
                    raise
                if tx.finish(commit=True):
                    self._commits = next(self._commit_counter)  # this worker's caches: before it answers
            outcome = "committed"
        except (DatabaseBusy, DatabaseUnavailable) as error:
            outcome = error.code
            raise
        finally:
            self.observer.database_transaction("write" if write else "read", outcome, time.perf_counter() - started)

    def begin(self, *, write: bool) -> sa.Connection:
        """A pooled connection inside a new transaction (holding the write lock if ``write``)."""
        try:
            return self._begin(write)
        except sa.exc.DBAPIError as error:
            if not error.connection_invalidated:
                raise
        return self._begin(write)  # nothing was done yet: a connection lost here is safe to replace, once

    def _begin(self, write: bool) -> sa.Connection:
        conn = self.engine.connect()
        try:
            if self.is_postgresql:  # autocommit: a read sends nothing until its first statement
                if write:
                    conn.exec_driver_sql(_BEGIN_WRITE)
            else:
                conn.execution_options(write=write)
                conn.begin()
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _database_errors(self) -> Iterator[None]:
        """Driver errors that mean "not now" become the domain's 503s; anything else is a bug."""
        try:
            yield
        except sa.exc.TimeoutError as error:  # no pooled connection came free in time
            raise DatabaseBusy("every database connection of this worker stayed busy past "
                               "MANAGEMENT_DB_BUSY_TIMEOUT; retry") from error
        except sa.exc.DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            message = str(error.orig)
            if (self.is_sqlite and ("locked" in message or "busy" in message)) or sqlstate in _BUSY_SQLSTATES:
                raise DatabaseBusy(
                    "the database stayed locked by another writer past MANAGEMENT_DB_BUSY_TIMEOUT; retry") from error
            if self.is_postgresql and (error.connection_invalidated or isinstance(error, sa.exc.OperationalError)):
                raise DatabaseUnavailable(
                    "the database server cannot be reached or closed the connection; retry") from error
            raise

    def upgrade(self, *, rekey_api_key_digest: Callable[[str], str] | None = None) -> tuple[int, int]:
        """Bring the schema to the latest version (safe to call from several processes at once).
        ``rekey_api_key_digest``: see ``migrations.upgrade`` (the server key's hasher's ``rekey``)."""
        with self._database_errors():
            conn = self.begin(write=True)
            try:
                result = migrations.upgrade(conn, rekey_api_key_digest=rekey_api_key_digest)
                if self.is_postgresql:
                    conn.exec_driver_sql(self._notify_and_commit)
                conn.commit()
                self._commits = next(self._commit_counter)
                return result
            finally:
                conn.close()

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return migrations.current_version(conn)

    def backup(self, destination: str | Path) -> None:
        """Copy a consistent snapshot of a SQLite database with SQLite's online backup API, while
        the portal keeps serving (readers and writers are not stopped)."""
        if not self.is_sqlite:
            raise RuntimeError("db backup copies SQLite databases; back up PostgreSQL with pg_dump "
                               "(pg_dump --format=custom --file=PATH DATABASE, see docs/scaling.md)")
        destination = Path(destination)
        if destination.exists():
            raise FileExistsError(f"{destination} already exists; refusing to overwrite it")
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Created private before a byte is copied: the copy holds e-mails, audit history and sealed keys.
        os.close(os.open(destination, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        raw = self.engine.raw_connection()
        try:
            source = raw.driver_connection
            assert isinstance(source, sqlite3.Connection)
            target = sqlite3.connect(destination)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            raw.close()

    def data_version(self) -> tuple[int, ...] | None:
        """A value that changes whenever any connection, of this process or another one, commits.
        What was read while it had a value is still true while it has that value. None when it
        cannot be told (every request then reads: ``entrypoints/http/cache.py``).

        SQLite: ``PRAGMA data_version`` on a connection of its own, which never writes
        (microseconds, no lock waited for); None for an in-memory database or the file busy at
        that instant. PostgreSQL: the worker's listening connection's (generation, notifications
        received) and this worker's own commits (``adapters.sql.changes``); None while it is not
        listening. Other databases: None."""
        if self._changes is not None:
            listened = self._changes.version()
            return None if listened is None else (*listened, self._commits)
        if not self.is_sqlite or (self.url.database or ":memory:") == ":memory:":
            return None
        with self._watch_lock:
            try:
                if self._watch is None:
                    pooled = self.engine.raw_connection()
                    watch = pooled.driver_connection
                    pooled.detach()  # kept: data_version compares with this connection's previous answer
                    assert isinstance(watch, sqlite3.Connection)
                    watch.execute("PRAGMA busy_timeout=0")
                    self._watch = watch
                    self._watches += 1  # a new connection starts counting afresh: never equal to before
                return self._watches, int(self._watch.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error:
                return None

    async def fenced_data_version(self) -> tuple[int, ...] | None:
        """``data_version`` for a request that has just arrived: on PostgreSQL, once a round trip
        on the listening connection that started after this call has ended, so that it counts
        every commit that returned before (``ChangesListener.fenced_version``); as it is elsewhere."""
        if self._changes is None:
            return self.data_version()
        listened = await self._changes.fenced_version()
        return None if listened is None else (*listened, self._commits)

    # PostgreSQL: every commit that added events wakes the event streams of every instance
    # (issue 18). The channel carries no data: a woken stream reads the events table after its id.
    EVENTS_CHANNEL = "playr_events"

    def listen_events(self, wake: Callable[[], None], stop: threading.Event) -> bool:
        """Call ``wake`` (from a thread of its own) whenever another connection commits events,
        until ``stop`` is set; False (nothing started) unless the database is PostgreSQL. A lost
        listening connection is opened again after a second; streams keep their short poll meanwhile."""
        if not self.is_postgresql:
            return False
        import psycopg

        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)

        def listen() -> None:
            while not stop.is_set():
                try:
                    with psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                        conn.execute(f"LISTEN {self.EVENTS_CHANNEL}")
                        while not stop.is_set():
                            for _ in conn.notifies(timeout=1.0, stop_after=1):
                                wake()
                except psycopg.Error:
                    stop.wait(1.0)

        threading.Thread(target=listen, name="events-listener", daemon=True).start()
        return True

    def dispose(self) -> None:
        if self._changes is not None:
            self._changes.stop()
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
        self.engine.dispose()


def _enable_wal(cursor: sqlite3.Cursor, busy_timeout: float) -> None:
    """Switch the database to WAL (a persistent setting, so normally only once in its life).
    SQLite answers "locked" at once, without waiting, when another connection is using the file
    at that moment (two processes opening a new database together): retry until the busy
    time-out, as SQLite itself would for any other statement."""
    deadline = time.monotonic() + busy_timeout
    delay = 0.005
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


# Tables the watchers, the webhook worker and VM actions write all the time (leases renewed every few
# seconds, mirrored VMs, events, deliveries, audit rows) and that no per-worker cache reads (entrypoints/http/cache.py
# keeps users, keys and agents). On PostgreSQL a transaction that wrote only these sends no change
# notification, so a watched fleet does not empty every worker's caches at each lease renewal.
# (SQLite's data_version moves on any commit: there it cannot be told apart.)
_NOT_CACHED_TABLES = frozenset({audit_events.name, events.name, watches.name, watch_demand.name, mirrored_vms.name,
                                webhook_deliveries.name, webhook_attempts.name})


class SqlTransaction:
    """Implements ``core.ports.Transaction`` on one connection inside one transaction."""

    def __init__(self, storage: SqlStorage, *, write: bool) -> None:
        self.storage = storage
        self.conn = storage.begin(write=write)
        self._may_run_again = not write  # a read transaction, until its first retry or a stray write
        self._changed_cached = False  # one of them on a table a per-worker cache reads (not _NOT_CACHED_TABLES)
        self._user_read: User | None = None  # read with a key, for the get_user that follows (until a write)
        # PostgreSQL: a BEGIN was sent (a write transaction, or a read one that came to write)
        self._open = write and storage.is_postgresql

    def finish(self, *, commit: bool) -> bool:
        """Commit or roll back, and give the connection back. True: it committed a change."""
        try:
            if not commit:
                with suppress(sa.exc.DBAPIError):  # a lost connection's transaction is rolled back anyway
                    self.conn.rollback()
                return False
            if not self.storage.is_postgresql:
                self.conn.commit()
            elif self._open:
                # Delivered to every listening worker when — and only if — this commits.
                self.conn.exec_driver_sql(self.storage._notify_and_commit if self._changed_cached else "COMMIT")
            return self._changed_cached
        finally:
            self.conn.close()

    def _execute(self, statement: sa.Executable, params: dict[str, Any] | None = None) -> sa.CursorResult[Any]:
        """Run one statement. In a read transaction a statement whose connection was lost runs again
        once on a fresh connection: under READ COMMITTED every statement sees the latest commits
        anyway, so that answer is one this transaction could have given. Writes are never re-run."""
        if statement.is_dml:
            self._may_run_again = False
            table = getattr(statement, "table", None)
            if getattr(table, "name", None) not in _NOT_CACHED_TABLES:
                self._changed_cached = True
            self._user_read = None
            if not self._open and self.storage.is_postgresql:  # a read transaction's writes stay together
                self.conn.exec_driver_sql("BEGIN")
                self._open = True
        try:
            return self.conn.execute(statement, params)
        except sa.exc.DBAPIError as error:
            if not (self._may_run_again and error.connection_invalidated):
                raise
        self._may_run_again = False
        self.conn.close()
        self.conn = self.storage.begin(write=False)
        return self.conn.execute(statement, params)

    # ------------------------------------------------------------------ users and keys

    def add_user(self, name: str, email: str | None, key: IssuedApiKey, at: datetime) -> User:
        try:
            user_id = _inserted_id(self._execute(
                users.insert().values(
                    name=name,
                    email=email,
                    email_key=normalize_email(email) if email is not None else None,
                    created_at=at,
                )
            ))
        except sa.exc.IntegrityError as error:
            raise EmailTaken() from error
        self._execute(api_keys.insert().values(_key_values(ApiKey(user_id=user_id, prefix=key.prefix,
                                                                  digest=key.digest, created_at=at))))
        return User(id=user_id, name=name, email=email, api_key_prefix=key.prefix, created_at=at)

    def count_users(self) -> int:
        return int(self._execute(sa.select(sa.func.count()).select_from(users)).scalar_one())

    def get_user(self, user_id: int) -> User | None:
        if not 0 < user_id <= MAX_ID:  # `users rotate-key --id 99999999999` on the command line
            return None
        if self._user_read is not None and self._user_read.id == user_id:  # read with its key just now
            return self._user_read
        row = self._execute(_USER_BY_ID, {"user_id": user_id}).one_or_none()
        return None if row is None else User(id=row.id, name=row.name, email=row.email, api_key_prefix=row.prefix,
                                             created_at=row.created_at)

    def find_user_by_email(self, email: str) -> User | None:
        users_found = self._users(users.c.email_key == normalize_email(email))
        return users_found[0] if users_found else None

    def list_users(self) -> list[User]:
        return self._users(sa.true())

    def _users(self, condition: sa.ColumnElement[bool]) -> list[User]:
        rows = self._execute(
            sa.select(users, api_keys.c.prefix)
            .join(api_keys, sa.and_(api_keys.c.user_id == users.c.id, api_keys.c.is_full))
            .where(condition)
            .order_by(users.c.id)
        )
        return [User(id=row.id, name=row.name, email=row.email, api_key_prefix=row.prefix,
                     created_at=row.created_at) for row in rows]

    def find_api_key(self, prefix: str) -> ApiKey | None:
        row = self._execute(_API_KEY_WITH_USER, {"prefix": prefix}).one_or_none()
        if row is None:
            return None
        if row.user_key_prefix is not None:
            self._user_read = User(id=row.user_id, name=row.user_name, email=row.user_email,
                                   api_key_prefix=row.user_key_prefix, created_at=row.user_created_at)
        return _key_from_row(row)

    def replace_api_key(self, user_id: int, key: IssuedApiKey, at: datetime, *, key_id: int | None = None) -> None:
        which = api_keys.c.is_full if key_id is None else api_keys.c.id == key_id
        self._execute(
            api_keys.update()
            .where(api_keys.c.user_id == user_id, which)
            .values(prefix=key.prefix, digest=key.digest, created_at=at)
        )

    def add_api_key(self, key: ApiKey) -> ApiKey:
        values = _key_values(key)
        return attrs.evolve(key, id=_inserted_id(self._execute(api_keys.insert().values(**values))))

    def list_api_keys(self, user_id: int) -> list[ApiKey]:
        rows = self._execute(sa.select(api_keys).where(api_keys.c.user_id == user_id).order_by(api_keys.c.id))
        return [_key_from_row(row) for row in rows]

    def count_api_keys(self, user_id: int) -> int:
        query = sa.select(sa.func.count()).select_from(api_keys).where(api_keys.c.user_id == user_id)
        return int(self._execute(query).scalar_one())

    def get_api_key(self, user_id: int, key_id: int) -> ApiKey | None:
        if not 0 < key_id <= MAX_ID:
            return None
        row = self._execute(sa.select(api_keys).where(api_keys.c.user_id == user_id,
                                                      api_keys.c.id == key_id)).one_or_none()
        return None if row is None else _key_from_row(row)

    def delete_api_key(self, user_id: int, key_id: int) -> bool:
        if not 0 < key_id <= MAX_ID:
            return False
        result = self._execute(api_keys.delete().where(api_keys.c.user_id == user_id, api_keys.c.id == key_id))
        return bool(result.rowcount)

    def touch_api_key(self, key_id: int, at: datetime) -> None:
        self._execute(api_keys.update().where(
            api_keys.c.id == key_id,
            sa.or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < at)).values(last_used_at=at))

    # ------------------------------------------------------------------ agents

    def add_agent(self, agent: Agent) -> Agent:
        values = _agent_values(agent)
        try:
            agent_id = _inserted_id(self._execute(agents.insert().values(**values)))
        except sa.exc.IntegrityError as error:
            raise AgentNameTaken() from error
        return _agent_from_row({**values, "id": agent_id})

    def list_agents(self, owner_id: int) -> list[Agent]:
        rows = self._execute(_AGENTS_OF_OWNER, {"owner_id": owner_id})
        return [_agent_from_row(row._mapping) for row in rows]

    def agent_names(self, owner_id: int) -> list[tuple[int, str]]:
        return [(agent_id, name) for agent_id, name in
                (tuple(row) for row in self._execute(_AGENT_NAMES_OF_OWNER, {"owner_id": owner_id}))]

    def count_agents(self, owner_id: int) -> int:
        query = sa.select(sa.func.count()).select_from(agents).where(agents.c.owner_id == owner_id)
        return int(self._execute(query).scalar_one())

    def newest_agent(self) -> Agent | None:
        row = self._execute(_NEWEST_AGENT).one_or_none()
        return None if row is None else _agent_from_row(row._mapping)

    def get_agent(self, owner_id: int, agent_id: int) -> Agent | None:
        if not 0 < agent_id <= MAX_ID:  # no such row, and PostgreSQL refuses to compare with it
            return None
        row = self._execute(_AGENT_OF_OWNER, {"owner_id": owner_id, "agent_id": agent_id}).one_or_none()
        return None if row is None else _agent_from_row(row._mapping)

    def agent_name_taken(self, owner_id: int, name: str, *, except_id: int = 0) -> bool:
        query = sa.select(agents.c.id).where(
            agents.c.owner_id == owner_id, agents.c.name == name, agents.c.id != except_id
        )
        return self._execute(query).first() is not None

    def update_agent(self, agent: Agent) -> None:
        values = _agent_values(agent)
        del values["owner_id"], values["created_at"]
        try:
            self._execute(
                agents.update()
                .where(agents.c.owner_id == agent.owner_id, agents.c.id == agent.id)
                .values(**values)
            )
        except sa.exc.IntegrityError as error:
            raise AgentNameTaken() from error

    def delete_agent(self, owner_id: int, agent_id: int) -> bool:
        if not 0 < agent_id <= MAX_ID:
            return False
        result = self._execute(
            agents.delete().where(agents.c.owner_id == owner_id, agents.c.id == agent_id)
        )
        return bool(result.rowcount)

    # ------------------------------------------------------------------ audit

    def add_audit_event(self, event: AuditEvent) -> AuditEvent:
        # The event's text is already printable and cut to the columns' lengths (core.model.AuditEvent);
        # the column types drop NUL whatever reaches them (schema.SafeString).
        values = {
            "user_id": event.user_id,
            "action": event.action,
            "outcome": event.outcome,
            "agent_id": event.agent_id,
            "vm": event.vm,
            "detail": event.detail,
            "request_id": event.request_id,
            "client_address": event.client_address,
            "created_at": event.created_at,
            "key_id": event.key_id,
            "key_name": event.key_name,
        }
        event_id = _inserted_id(self._execute(audit_events.insert().values(**values)))
        return attrs.evolve(event, id=event_id)

    def list_audit_events(self, user_id: int, limit: int, before: int | None, *,
                          agent_ids: frozenset[int] | None = None) -> list[AuditEvent]:
        query = sa.select(audit_events).where(audit_events.c.user_id == user_id)
        if agent_ids is not None:
            query = query.where(audit_events.c.agent_id.in_(sorted(a for a in agent_ids if 0 < a <= MAX_ID)))
        # Every id is below a ``before`` past the column's range (PostgreSQL would refuse to compare
        # with it: "integer out of range", a 500 the contract fuzzer found on PostgreSQL only).
        if before is not None and before <= MAX_ID:
            query = query.where(audit_events.c.id < before)
        rows = self._execute(query.order_by(audit_events.c.id.desc()).limit(limit))
        return [AuditEvent(**row._mapping) for row in rows]

    # ------------------------------------------------------------------ consoles (issue 17)

    def add_console_ticket(self, ticket: ConsoleTicket) -> ConsoleTicket:
        # Housekeeping on the way: tickets never used and consoles closed a day ago are forgotten
        # (the audit keeps what happened).
        old = ticket.created_at - CONSOLE_ROWS_KEPT
        self._execute(console_tickets.delete().where(
            sa.or_(sa.and_(console_tickets.c.opened_at.is_(None), console_tickets.c.expires_at < old),
                   console_tickets.c.closed_at < old)))
        ticket_id = _inserted_id(self._execute(console_tickets.insert().values(
            digest=ticket.digest, user_id=ticket.user_id, agent_id=ticket.agent_id, vm=ticket.vm,
            kind=ticket.kind.value, created_at=ticket.created_at, expires_at=ticket.expires_at)))
        return attrs.evolve(ticket, id=ticket_id)

    def redeem_console_ticket(self, digest: str, at: datetime) -> ConsoleTicket | None:
        # One conditional update: of two workers redeeming the same ticket, one changes the row.
        redeemed = self._execute(console_tickets.update().where(
            console_tickets.c.digest == digest, console_tickets.c.opened_at.is_(None),
            console_tickets.c.expires_at > at).values(opened_at=at))
        if redeemed.rowcount != 1:
            return None
        row = self._execute(sa.select(console_tickets).where(console_tickets.c.digest == digest)).one()._mapping
        return ConsoleTicket(id=row["id"], user_id=row["user_id"], agent_id=row["agent_id"], vm=row["vm"],
                             kind=ConsoleKind(row["kind"]), digest=row["digest"], created_at=row["created_at"],
                             expires_at=row["expires_at"], opened_at=row["opened_at"], closed_at=row["closed_at"])

    def count_open_consoles(self, user_id: int, opened_after: datetime) -> int:
        return int(self._execute(sa.select(sa.func.count()).select_from(console_tickets).where(
            console_tickets.c.user_id == user_id, console_tickets.c.opened_at > opened_after,
            console_tickets.c.closed_at.is_(None))).scalar_one())

    def close_console(self, ticket_id: int, at: datetime) -> None:
        self._execute(console_tickets.update().where(console_tickets.c.id == ticket_id,
                                                     console_tickets.c.closed_at.is_(None)).values(closed_at=at))


    # ------------------------------------------------------------------ events and the live mirror (issue 18)

    def add_event(self, event: Event) -> Event:
        values = {"user_id": event.user_id, "at": event.at, "agent_id": event.agent_id, "vm": event.vm,
                  "type": event.type, "detail": event.detail}
        event_id = _inserted_id(self._execute(events.insert().values(**values)))
        if self.storage.is_postgresql:  # delivered to the listeners when this transaction commits
            self._execute(sa.select(sa.func.pg_notify(SqlStorage.EVENTS_CHANNEL, "")))
        return attrs.evolve(event, id=event_id)

    def list_events(self, user_id: int, wanted: EventFilter, limit: int) -> list[Event]:
        query = sa.select(events).where(events.c.user_id == user_id, events.c.id > wanted.after)
        if wanted.agent_id is not None:
            query = query.where(events.c.agent_id == wanted.agent_id)
        if wanted.agent_ids is not None:
            query = query.where(events.c.agent_id.in_(sorted(wanted.agent_ids)))
        if wanted.vm is not None:
            query = query.where(events.c.vm == wanted.vm)
        if wanted.types:
            query = query.where(events.c.type.in_(wanted.types))
        rows = self._execute(query.order_by(events.c.id).limit(limit))
        return [Event(**row._mapping) for row in rows]

    def last_event_id(self, user_id: int) -> int:
        query = sa.select(sa.func.max(events.c.id)).where(events.c.user_id == user_id)
        return int(self._execute(query).scalar() or 0)

    def prune_events(self, user_id: int, keep: int) -> None:
        boundary = self._execute(sa.select(events.c.id).where(events.c.user_id == user_id)
                                 .order_by(events.c.id.desc()).offset(keep).limit(1)).scalar()
        if boundary is not None:
            self._execute(events.delete().where(events.c.user_id == user_id, events.c.id <= boundary))

    def watched_agents(self, now: datetime) -> list[Agent]:
        query = (sa.select(agents).join(watch_demand, watch_demand.c.agent_id == agents.c.id)
                 .where(watch_demand.c.until > now).order_by(agents.c.id))
        return [_agent_from_row(row._mapping) for row in self._execute(query)]

    def want_watch(self, agent_ids: list[int], until: datetime) -> None:
        # At most three statements for any number of agents (a fleet view marks hundreds at once).
        if not agent_ids:
            return
        known = {row.agent_id: row.until for row in self._execute(
            sa.select(watch_demand).where(watch_demand.c.agent_id.in_(agent_ids)))}
        existing = {row.id for row in self._execute(sa.select(agents.c.id).where(agents.c.id.in_(agent_ids)))}
        later = sorted(a for a in existing if a in known and known[a] < until)
        if later:
            self._execute(watch_demand.update().where(watch_demand.c.agent_id.in_(later)).values(until=until))
        new = sorted(a for a in existing if a not in known)
        if new:
            self._execute(watch_demand.insert(), [{"agent_id": a, "until": until} for a in new])  # type: ignore[arg-type]

    def claim_watches(self, holder: str, agent_ids: list[int], now: datetime, until: datetime,
                      alive: list[int]) -> list[int]:
        # Four statements for any number of agents (issue 22): renew the holder's leases (stamping
        # those whose stream is up), take over the expired ones, insert the missing ones, and read
        # back which are the holder's. The write transaction's lock keeps other claimants out.
        if not agent_ids:
            return []
        wanted = watches.c.agent_id.in_(agent_ids)
        confirmed = sorted(set(alive) & set(agent_ids))
        renewed: dict[str, Any] = {"expires_at": until}
        if confirmed:
            renewed["alive_at"] = sa.case((watches.c.agent_id.in_(confirmed), now), else_=watches.c.alive_at)
        self._execute(watches.update().where(wanted, watches.c.holder == holder).values(**renewed))
        self._execute(watches.update().where(wanted, watches.c.holder != holder, watches.c.expires_at <= now)
                      .values(holder=holder, expires_at=until, connected=False, alive_at=None))
        holders = {row.agent_id: row.holder for row in self._execute(
            sa.select(watches.c.agent_id, watches.c.holder).where(wanted))}
        missing = [a for a in agent_ids if a not in holders]
        if missing:
            self._execute(watches.insert(), [  # type: ignore[arg-type]
                {"agent_id": a, "holder": holder, "expires_at": until, "connected": False, "alive_at": None}
                for a in missing])
        return [a for a in agent_ids if holders.get(a, holder) == holder]

    def release_watches(self, holder: str, agent_ids: list[int]) -> None:
        if agent_ids:
            self._execute(watches.delete().where(watches.c.holder == holder, watches.c.agent_id.in_(agent_ids)))

    def set_watch_connected(self, holder: str, agent_id: int, connected: bool, now: datetime) -> bool:
        result = self._execute(watches.update().where(watches.c.agent_id == agent_id, watches.c.holder == holder)
                               .values(connected=connected, alive_at=now if connected else None))
        return bool(result.rowcount)

    def watch_status(self, agent_id: int) -> WatchStatus | None:
        row = self._execute(sa.select(watches).where(watches.c.agent_id == agent_id)).one_or_none()
        return None if row is None else WatchStatus(agent_id=row.agent_id, holder=row.holder,
                                                    expires_at=row.expires_at, connected=bool(row.connected),
                                                    alive_at=row.alive_at)

    def mirrored_vms(self, agent_id: int) -> list[MirroredVm]:
        rows = self._execute(sa.select(mirrored_vms).where(mirrored_vms.c.agent_id == agent_id)
                             .order_by(mirrored_vms.c.name))
        return [MirroredVm(name=row.name, state=row.state, id=row.domain_id) for row in rows]

    def mirrors(self, owner_id: int) -> dict[int, Mirror]:
        # Two statements for any number of agents, each with one parameter: the owner's leases, then
        # their VMs (a join of the two would convert each lease's times once per VM).
        params = {"owner_id": owner_id}
        leases = self._tuples(_LEASES_OF_OWNER, params)
        if not leases:
            return {}
        vms: dict[int, list[MirroredVm]] = {row[0]: [] for row in leases}
        for agent_id, name, state, domain_id in self._tuples(_MIRRORED_VMS_OF_OWNER, params):
            if agent_id in vms:  # (a VM of an agent whose lease was released meanwhile: not read)
                vms[agent_id].append(MirroredVm(name=name, state=state, id=domain_id))
        return {agent_id: Mirror(status=WatchStatus(agent_id=agent_id, holder=holder, expires_at=expires_at,
                                                    connected=bool(connected), alive_at=alive_at),
                                 vms=tuple(vms[agent_id]))
                for agent_id, holder, expires_at, connected, alive_at in leases}

    def _tuples(self, query: sa.Select[Any], params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._execute(query, params)]

    def replace_mirror(self, agent_id: int, vms: list[MirroredVm], now: datetime) -> None:
        self._execute(mirrored_vms.delete().where(mirrored_vms.c.agent_id == agent_id))
        if vms:
            self._execute(mirrored_vms.insert(), [  # type: ignore[arg-type]
                {"agent_id": agent_id, "name": vm.name, "state": vm.state, "domain_id": vm.id, "changed_at": now}
                for vm in vms])

    def mirror_vm(self, agent_id: int, vm: MirroredVm | None, name: str, now: datetime) -> None:
        self._execute(mirrored_vms.delete().where(mirrored_vms.c.agent_id == agent_id, mirrored_vms.c.name == name))
        if vm is not None:
            self._execute(mirrored_vms.insert().values(agent_id=agent_id, name=vm.name, state=vm.state,
                                                       domain_id=vm.id, changed_at=now))

    # ------------------------------------------------------------------ web console sessions (issue 19)

    def add_web_session(self, user_id: int, digest: str, at: datetime, expires_at: datetime,
                        key_prefix: str) -> WebSession:
        session_id = _inserted_id(self._execute(web_sessions.insert().values(
            user_id=user_id, digest=digest, created_at=at, last_seen_at=at, expires_at=expires_at,
            key_prefix=key_prefix)))
        return WebSession(id=session_id, user_id=user_id, digest=digest, created_at=at, last_seen_at=at,
                          expires_at=expires_at, key_prefix=key_prefix)

    def find_web_session(self, digest: str) -> WebSession | None:
        row = self._execute(sa.select(web_sessions).where(web_sessions.c.digest == digest)).one_or_none()
        return None if row is None else WebSession(id=row.id, user_id=row.user_id, digest=row.digest,
                                                   created_at=row.created_at, last_seen_at=row.last_seen_at,
                                                   expires_at=row.expires_at, key_prefix=row.key_prefix)

    def touch_web_session(self, session_id: int, at: datetime) -> None:
        self._execute(web_sessions.update().where(web_sessions.c.id == session_id).values(last_seen_at=at))

    def delete_web_session(self, digest: str) -> bool:
        return bool(self._execute(web_sessions.delete().where(web_sessions.c.digest == digest)).rowcount)

    def delete_web_sessions_of(self, user_id: int) -> int:
        return int(self._execute(web_sessions.delete().where(web_sessions.c.user_id == user_id)).rowcount)

    def delete_web_sessions_ended(self, expired_before: datetime, idle_since: datetime) -> int:
        return int(self._execute(web_sessions.delete().where(
            sa.or_(web_sessions.c.expires_at <= expired_before, web_sessions.c.last_seen_at <= idle_since))).rowcount)

    # ------------------------------------------------------------------ webhooks (issue 18)

    def add_webhook(self, hook: Webhook) -> Webhook:
        webhook_id = _inserted_id(self._execute(webhooks.insert().values(user_id=hook.user_id,
                                                                         **_webhook_values(hook))))
        return attrs.evolve(hook, id=webhook_id)

    def list_webhooks(self, user_id: int) -> list[Webhook]:
        return [_webhook_from_row(row) for row in self._execute(_WEBHOOKS_OF_USER, {"user_id": user_id})]

    def get_webhook(self, user_id: int, webhook_id: int) -> Webhook | None:
        row = self._execute(sa.select(webhooks).where(webhooks.c.user_id == user_id,
                                                      webhooks.c.id == webhook_id)).one_or_none()
        return None if row is None else _webhook_from_row(row)

    def update_webhook(self, hook: Webhook) -> None:
        self._execute(webhooks.update().where(webhooks.c.user_id == hook.user_id, webhooks.c.id == hook.id)
                      .values(**_webhook_values(hook)))

    def delete_webhook(self, user_id: int, webhook_id: int) -> bool:
        # explicit (not only the foreign keys' cascade): the attempts go first, then the outbox rows
        owned = sa.select(webhooks.c.id).where(webhooks.c.user_id == user_id, webhooks.c.id == webhook_id)
        deliveries = sa.select(webhook_deliveries.c.id).where(webhook_deliveries.c.webhook_id.in_(owned))
        self._execute(webhook_attempts.delete().where(webhook_attempts.c.delivery_id.in_(deliveries)))
        self._execute(webhook_deliveries.delete().where(webhook_deliveries.c.webhook_id.in_(owned)))
        return bool(self._execute(webhooks.delete().where(webhooks.c.user_id == user_id,
                                                          webhooks.c.id == webhook_id)).rowcount)

    def add_delivery(self, delivery: Delivery) -> Delivery:
        delivery_id = _inserted_id(self._execute(_ADD_DELIVERY, {
            "webhook_id": delivery.webhook_id, "user_id": delivery.user_id, "event_id": delivery.event_id,
            "event_type": delivery.event_type, "body": delivery.body, "status": delivery.status,
            "attempts": delivery.attempts, "next_at": delivery.next_at, "created_at": delivery.created_at,
            "finished_at": delivery.finished_at}))
        return attrs.evolve(delivery, id=delivery_id)

    def next_delivery_at(self) -> datetime | None:
        d = webhook_deliveries
        claimable = sa.case((d.c.lease_until > d.c.next_at, d.c.lease_until), else_=d.c.next_at)
        query = (sa.select(sa.func.min(claimable)).select_from(d.join(webhooks, webhooks.c.id == d.c.webhook_id))
                 .where(d.c.status == DELIVERY_PENDING, webhooks.c.active))
        value = self._execute(query).scalar()
        if value is None:
            return None
        return _utc(value)

    def claim_deliveries(self, holder: str, now: datetime, until: datetime,
                         limit: int) -> list[tuple[Delivery, Webhook]]:
        d = webhook_deliveries
        due = (sa.select(d.c.id).select_from(d.join(webhooks, webhooks.c.id == d.c.webhook_id))
               .where(d.c.status == DELIVERY_PENDING, d.c.next_at <= now, webhooks.c.active,
                      sa.or_(d.c.lease_until.is_(None), d.c.lease_until <= now))
               .order_by(d.c.next_at, d.c.id).limit(limit))
        if self.storage.is_postgresql:  # rows another transaction is claiming are skipped, not waited for
            due = due.with_for_update(of=d, skip_locked=True)
        ids = [row.id for row in self._execute(due)]
        claimed: list[int] = []
        for delivery_id in ids:
            # conditional: a row someone else leased in between (no shared lock) is not taken twice
            taken = self._execute(d.update().where(
                d.c.id == delivery_id, d.c.status == DELIVERY_PENDING,
                sa.or_(d.c.lease_until.is_(None), d.c.lease_until <= now)).values(lease_holder=holder,
                                                                                   lease_until=until))
            if taken.rowcount == 1:
                claimed.append(delivery_id)
        if not claimed:
            return []
        rows = self._execute(sa.select(d, webhooks).join(webhooks, webhooks.c.id == d.c.webhook_id)
                             .where(d.c.id.in_(claimed)).order_by(d.c.next_at, d.c.id)).all()
        return [(_delivery_from_row(row), _webhook_from_row(row)) for row in rows]

    def record_attempt(self, holder: str, attempt: DeliveryAttempt, status: str,
                       next_at: datetime | None) -> bool:
        d = webhook_deliveries
        moved = self._execute(d.update().where(d.c.id == attempt.delivery_id, d.c.lease_holder == holder,
                                               d.c.status == DELIVERY_PENDING).values(
            status=status, attempts=attempt.number, next_at=next_at, lease_holder=None, lease_until=None,
            finished_at=None if status == DELIVERY_PENDING else attempt.at + timedelta(seconds=attempt.seconds)))
        if moved.rowcount != 1:
            return False
        self._execute(webhook_attempts.insert().values(
            delivery_id=attempt.delivery_id, number=attempt.number, at=attempt.at, seconds=attempt.seconds,
            status_code=attempt.status_code, error=attempt.error, response=attempt.response))
        return True

    def postpone_deliveries(self, webhook_id: int, until: datetime, now: datetime) -> None:
        d = webhook_deliveries
        self._execute(d.update().where(d.c.webhook_id == webhook_id, d.c.status == DELIVERY_PENDING,
                                       d.c.next_at < until,
                                       sa.or_(d.c.lease_until.is_(None), d.c.lease_until <= now)).values(next_at=until))

    def release_deliveries(self, holder: str) -> None:
        d = webhook_deliveries
        self._execute(d.update().where(d.c.lease_holder == holder, d.c.status == DELIVERY_PENDING)
                      .values(lease_holder=None, lease_until=None))

    def list_deliveries(self, user_id: int, webhook_id: int, limit: int,
                        before: int | None) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
        d = webhook_deliveries
        query = sa.select(d).where(d.c.user_id == user_id, d.c.webhook_id == webhook_id)
        if before is not None:
            query = query.where(d.c.id < before)
        deliveries = [_delivery_from_row(row) for row in self._execute(query.order_by(d.c.id.desc()).limit(limit))]
        attempts: dict[int, list[DeliveryAttempt]] = {delivery.id: [] for delivery in deliveries}
        if deliveries:
            a = webhook_attempts
            for row in self._execute(sa.select(a).where(a.c.delivery_id.in_(list(attempts)))
                                     .order_by(a.c.delivery_id, a.c.number, a.c.id)):
                attempts[row.delivery_id].append(DeliveryAttempt(
                    delivery_id=row.delivery_id, number=row.number, at=row.at, seconds=row.seconds,
                    status_code=row.status_code, error=row.error, response=row.response))
        return [(delivery, attempts[delivery.id]) for delivery in deliveries]

    def prune_deliveries(self, finished_before: datetime) -> int:
        d = webhook_deliveries
        old = sa.select(d.c.id).where(d.c.status != DELIVERY_PENDING, d.c.finished_at < finished_before)
        self._execute(webhook_attempts.delete().where(webhook_attempts.c.delivery_id.in_(old)))
        return int(self._execute(d.delete().where(d.c.status != DELIVERY_PENDING,
                                                  d.c.finished_at < finished_before)).rowcount)


def _webhook_values(hook: Webhook) -> dict[str, Any]:
    return {"url": hook.url, "types": " ".join(hook.types),
            "agents": None if hook.agent_ids is None else ",".join(str(a) for a in sorted(hook.agent_ids)),
            "active": hook.active, "sealed_secret": hook.sealed_secret, "created_at": hook.created_at,
            "updated_at": hook.updated_at}


def _webhook_from_row(row: Any) -> Webhook:
    m = row._mapping  # keyed by column (a join with the outbox has two "id" columns)
    agents = m[webhooks.c.agents]
    return Webhook(id=m[webhooks.c.id], user_id=m[webhooks.c.user_id], url=m[webhooks.c.url],
                   types=tuple(m[webhooks.c.types].split()),
                   agent_ids=None if agents is None else frozenset(int(a) for a in agents.split(",") if a),
                   active=bool(m[webhooks.c.active]), sealed_secret=m[webhooks.c.sealed_secret],
                   created_at=m[webhooks.c.created_at], updated_at=m[webhooks.c.updated_at])


def _delivery_from_row(row: Any) -> Delivery:
    m = row._mapping
    d = webhook_deliveries.c
    return Delivery(id=m[d.id], webhook_id=m[d.webhook_id], user_id=m[d.user_id], event_id=m[d.event_id],
                    event_type=m[d.event_type], body=m[d.body], status=m[d.status], attempts=m[d.attempts],
                    next_at=m[d.next_at], created_at=m[d.created_at], finished_at=m[d.finished_at])


def _utc(value: Any) -> datetime:
    """A datetime from an aggregate (SQLite answers ``min()`` of a column as text, without its type)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


CONSOLE_ROWS_KEPT = timedelta(days=1)

_SCOPES_BY_NAME = {scope.value: scope for scope in Scope}


def _key_values(key: ApiKey) -> dict[str, Any]:
    return {"user_id": key.user_id, "prefix": key.prefix, "digest": key.digest, "created_at": key.created_at,
            "name": key.name, "scopes": " ".join(sorted(scope.value for scope in key.scopes)),
            "agents": None if key.agents is None else ",".join(str(a) for a in sorted(key.agents)),
            "expires_at": key.expires_at, "last_used_at": key.last_used_at, "is_full": key.full}


def _key_from_row(row: Any) -> ApiKey:
    # a scope this code does not know (written by a newer portal) grants nothing here
    scopes = ALL_SCOPES if row.is_full else frozenset(
        _SCOPES_BY_NAME[name] for name in row.scopes.split() if name in _SCOPES_BY_NAME)
    agents = None if row.agents is None else frozenset(int(a) for a in row.agents.split(",") if a)
    return ApiKey(user_id=row.user_id, prefix=row.prefix, digest=row.digest, created_at=row.created_at, id=row.id,
                  name=row.name, scopes=scopes, agents=agents, expires_at=row.expires_at,
                  last_used_at=row.last_used_at, full=bool(row.is_full))


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None  # every table has a single-column primary key
    return int(key[0])


def _agent_values(agent: Agent) -> dict[str, Any]:
    return {
        "owner_id": agent.owner_id,
        "name": agent.name,
        "hostname": agent.hostname,
        "port": agent.port,
        "username": agent.username,
        "allow_unknown_hosts": agent.allow_unknown_hosts,
        "host_key": agent.host_key.openssh if agent.host_key else None,
        "host_key_fingerprint": agent.host_key.fingerprint if agent.host_key else None,
        "libvirt_uri": agent.libvirt_uri,
        "public_key": agent.client_key.public_key,
        "key_fingerprint": agent.client_key.fingerprint,
        "sealed_private_key": agent.sealed_private_key,
        "sealed_passphrase": agent.sealed_passphrase,
        "created_at": agent.created_at,
        "updated_at": agent.updated_at,
        "revision": agent.revision,
        "key_generated": agent.key_generated,
    }


def _agent_from_row(row: Any) -> Agent:
    host_key = None
    if row["host_key"] is not None:
        host_key = HostKey(openssh=row["host_key"], fingerprint=row["host_key_fingerprint"])
    return Agent(
        id=row["id"],
        owner_id=row["owner_id"],
        name=row["name"],
        hostname=row["hostname"],
        port=row["port"],
        username=row["username"],
        allow_unknown_hosts=bool(row["allow_unknown_hosts"]),
        host_key=host_key,
        libvirt_uri=row["libvirt_uri"],
        client_key=ClientKey(public_key=row["public_key"], fingerprint=row["key_fingerprint"]),
        sealed_private_key=row["sealed_private_key"],
        sealed_passphrase=row["sealed_passphrase"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        revision=row["revision"],
        key_generated=bool(row["key_generated"]),
    )
