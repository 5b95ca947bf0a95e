"""The storage port on SQLAlchemy Core: SQLite by default, PostgreSQL (psycopg 3) for several instances.

Write transactions hold the database's write lock from their first statement, so a
read-check-write use case cannot interleave with another writer (``core.ports.Storage``):

- SQLite is opened in WAL mode with foreign keys on, a busy time-out and ``synchronous=FULL`` (an
  answered write survives a power cut, not only a crash); write transactions begin with
  ``BEGIN IMMEDIATE``.
- PostgreSQL write transactions begin by taking one transaction-scoped advisory lock, the same for
  every portal instance (READ COMMITTED, so each statement after it sees every earlier writer's
  commit); ``lock_timeout`` bounds the wait like SQLite's busy time-out. Pooled connections are
  checked before use (``pool_pre_ping``), and a read that loses its connection is run again once on
  a fresh one. A write is never re-run: it fails with 503 ``database_unavailable``.

Waiting too long for the lock (or for a free pooled connection) is 503 ``database_busy`` on both.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy import event

from adapters.sql import migrations
from adapters.sql.schema import agents, api_keys, audit_events, users, web_sessions
from core.errors import AgentNameTaken, DatabaseBusy, DatabaseUnavailable, EmailTaken
from core.model import Agent, ApiKey, AuditEvent, ClientKey, HostKey, IssuedApiKey, User, WebSession
from core.validation import normalize_email

# The reads behind every authenticated request and agent lookup, built once: building a statement
# (and its cache key) on each call cost SQLAlchemy more than SQLite takes to run it.
_API_KEY_BY_PREFIX = sa.select(api_keys).where(api_keys.c.prefix == sa.bindparam("prefix"))
_USER_BY_ID = (sa.select(users, api_keys.c.prefix).join(api_keys, api_keys.c.user_id == users.c.id)
               .where(users.c.id == sa.bindparam("user_id")))
_AGENTS_OF_OWNER = sa.select(agents).where(agents.c.owner_id == sa.bindparam("owner_id")).order_by(agents.c.id)
_NEWEST_AGENT = sa.select(agents).order_by(agents.c.id.desc()).limit(1)
_AGENT_OF_OWNER = sa.select(agents).where(agents.c.owner_id == sa.bindparam("owner_id"),
                                          agents.c.id == sa.bindparam("agent_id"))

# PostgreSQL: the advisory lock every write transaction of every instance takes first (the
# counterpart of SQLite's single writer); migrations take their own as well (migrations.py).
WRITE_LOCK_KEY = 7252018
_TAKE_WRITE_LOCK = sa.text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=WRITE_LOCK_KEY)
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

    def __init__(self, url: str, *, busy_timeout: float = 10.0, pool_size: int = 5) -> None:
        self.url = sa.engine.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgresql = self.url.get_backend_name() == "postgresql"
        self._watch: sqlite3.Connection | None = None  # answers data_version(), nothing else
        self._watches = 0  # how many it has had: each one counts from its own start
        self._watch_lock = threading.Lock()
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
            # none free waits up to the busy time-out, then gets 503 database_busy.
            self.engine = sa.create_engine(self.url, pool_size=pool_size, max_overflow=0,
                                           pool_timeout=busy_timeout, pool_pre_ping=True,
                                           connect_args=connect_args)
            if self.is_postgresql:
                self._install_postgresql_hooks(busy_timeout)

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
            dbapi_connection.autocommit = autocommit

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[SqlTransaction]:
        with self._database_errors():
            tx = SqlTransaction(self, write=write)
            try:
                yield tx
            except BaseException:
                tx.finish(commit=False)
                raise
            tx.finish(commit=True)

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
            conn.execution_options(write=write)
            conn.begin()
            if write and self.is_postgresql:
                conn.execute(_TAKE_WRITE_LOCK)
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
                conn.commit()
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

    def data_version(self) -> tuple[int, int] | None:
        """A value that changes whenever another connection, of this process or another one,
        commits to the SQLite file (``PRAGMA data_version`` on a connection of its own, which
        never writes: microseconds, no lock waited for). What was read while it had a value is
        still true while it has that value. None when it cannot be told: an in-memory database,
        the file busy at that instant, or PostgreSQL — where another instance's commit could only
        be seen by asking the server, which costs the same round trip as the read it would save,
        so every request reads (``entrypoints/http/cache.py``)."""
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

    def dispose(self) -> None:
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


class SqlTransaction:
    """Implements ``core.ports.Transaction`` on one connection inside one transaction."""

    def __init__(self, storage: SqlStorage, *, write: bool) -> None:
        self.storage = storage
        self.conn = storage.begin(write=write)
        self._may_run_again = not write  # a read transaction, until its first retry or a stray write

    def finish(self, *, commit: bool) -> None:
        try:
            if commit:
                self.conn.commit()
            else:
                with suppress(sa.exc.DBAPIError):  # a lost connection's transaction is rolled back anyway
                    self.conn.rollback()
        finally:
            self.conn.close()

    def _execute(self, statement: sa.Executable, params: dict[str, Any] | None = None) -> sa.CursorResult[Any]:
        """Run one statement. In a read transaction a statement whose connection was lost runs again
        once on a fresh connection: under READ COMMITTED every statement sees the latest commits
        anyway, so that answer is one this transaction could have given. Writes are never re-run."""
        if statement.is_dml:
            self._may_run_again = False
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
        self._execute(api_keys.insert().values(user_id=user_id, prefix=key.prefix, digest=key.digest,
                                               created_at=at))
        return User(id=user_id, name=name, email=email, api_key_prefix=key.prefix, created_at=at)

    def count_users(self) -> int:
        return int(self._execute(sa.select(sa.func.count()).select_from(users)).scalar_one())

    def get_user(self, user_id: int) -> User | None:
        if not 0 < user_id <= MAX_ID:  # `users rotate-key --id 99999999999` on the command line
            return None
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
            .join(api_keys, api_keys.c.user_id == users.c.id)
            .where(condition)
            .order_by(users.c.id)
        )
        return [User(id=row.id, name=row.name, email=row.email, api_key_prefix=row.prefix,
                     created_at=row.created_at) for row in rows]

    def find_api_key(self, prefix: str) -> ApiKey | None:
        row = self._execute(_API_KEY_BY_PREFIX, {"prefix": prefix}).one_or_none()
        if row is None:
            return None
        return ApiKey(user_id=row.user_id, prefix=row.prefix, digest=row.digest, created_at=row.created_at)

    def replace_api_key(self, user_id: int, key: IssuedApiKey, at: datetime) -> None:
        self._execute(
            api_keys.update()
            .where(api_keys.c.user_id == user_id)
            .values(prefix=key.prefix, digest=key.digest, created_at=at)
        )

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
        }
        event_id = _inserted_id(self._execute(audit_events.insert().values(**values)))
        return attrs.evolve(event, id=event_id)

    def list_audit_events(self, user_id: int, limit: int, before: int | None) -> list[AuditEvent]:
        query = sa.select(audit_events).where(audit_events.c.user_id == user_id)
        # Every id is below a ``before`` past the column's range (PostgreSQL would refuse to compare
        # with it: "integer out of range", a 500 the contract fuzzer found on PostgreSQL only).
        if before is not None and before <= MAX_ID:
            query = query.where(audit_events.c.id < before)
        rows = self._execute(query.order_by(audit_events.c.id.desc()).limit(limit))
        return [AuditEvent(**row._mapping) for row in rows]


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
