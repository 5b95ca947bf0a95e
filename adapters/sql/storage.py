"""The storage port on SQLAlchemy Core: SQLite by default, any SQLAlchemy URL (PostgreSQL) alike.

SQLite is opened in WAL mode with foreign keys on, a busy time-out and ``synchronous=FULL`` (an
answered write survives a power cut, not only a crash). Write transactions begin with
``BEGIN IMMEDIATE`` so a read-check-write use case holds the write lock from its first read.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from adapters.sql import migrations
from adapters.sql.schema import agents, api_keys, audit_events, users
from core.errors import Conflict, Unavailable
from core.model import Agent, ApiKey, AuditEvent, ClientKey, HostKey, IssuedApiKey, User
from core.validation import normalize_email

# The reads behind every authenticated request and agent lookup, built once: building a statement
# (and its cache key) on each call cost SQLAlchemy more than SQLite takes to run it.
_API_KEY_BY_PREFIX = sa.select(api_keys).where(api_keys.c.prefix == sa.bindparam("prefix"))
_USER_BY_ID = (sa.select(users, api_keys.c.prefix).join(api_keys, api_keys.c.user_id == users.c.id)
               .where(users.c.id == sa.bindparam("user_id")))
_AGENTS_OF_OWNER = sa.select(agents).where(agents.c.owner_id == sa.bindparam("owner_id")).order_by(agents.c.id)
_AGENT_OF_OWNER = sa.select(agents).where(agents.c.owner_id == sa.bindparam("owner_id"),
                                          agents.c.id == sa.bindparam("agent_id"))


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path)}"


class SqlStorage:
    """Implements ``core.ports.Storage``."""

    def __init__(self, url: str, *, busy_timeout: float = 10.0, pool_size: int = 5) -> None:
        self.url = sa.engine.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
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
            self.engine = sa.create_engine(self.url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)

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

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[SqlTransaction]:
        try:
            with self.engine.connect() as conn:
                conn.execution_options(write=write)
                with conn.begin():
                    yield SqlTransaction(conn)
        except sa.exc.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise Unavailable(
                    "the database stayed locked by another writer past MANAGEMENT_DB_BUSY_TIMEOUT; retry",
                    code="database_busy",
                ) from error
            raise

    def upgrade(self) -> tuple[int, int]:
        """Bring the schema to the latest version (safe to call from several processes at once)."""
        with self.engine.connect() as conn:
            conn.execution_options(write=True)
            with conn.begin():
                return migrations.upgrade(conn)

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return migrations.current_version(conn)

    def backup(self, destination: str | Path) -> None:
        """Copy a consistent snapshot of a SQLite database with SQLite's online backup API, while
        the portal keeps serving (readers and writers are not stopped)."""
        if not self.is_sqlite:
            raise RuntimeError("db backup copies SQLite databases; back up PostgreSQL with pg_dump")
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
        still true while it has that value. None when it cannot be told: not SQLite, an in-memory
        database, or the file busy at that instant."""
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

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn

    # ------------------------------------------------------------------ users and keys

    def add_user(self, name: str, email: str | None, key: IssuedApiKey, at: datetime) -> User:
        try:
            user_id = self.conn.execute(
                users.insert().values(
                    name=name,
                    email=email,
                    email_key=normalize_email(email) if email is not None else None,
                    created_at=at,
                )
            ).inserted_primary_key[0]
        except sa.exc.IntegrityError as error:
            raise Conflict("a user with this e-mail address already exists", code="email_taken") from error
        self.conn.execute(api_keys.insert().values(user_id=user_id, prefix=key.prefix, digest=key.digest,
                                                   created_at=at))
        return User(id=user_id, name=name, email=email, api_key_prefix=key.prefix, created_at=at)

    def count_users(self) -> int:
        return int(self.conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())

    def get_user(self, user_id: int) -> User | None:
        row = self.conn.execute(_USER_BY_ID, {"user_id": user_id}).one_or_none()
        return None if row is None else User(id=row.id, name=row.name, email=row.email, api_key_prefix=row.prefix,
                                             created_at=row.created_at)

    def find_user_by_email(self, email: str) -> User | None:
        users_found = self._users(users.c.email_key == normalize_email(email))
        return users_found[0] if users_found else None

    def list_users(self) -> list[User]:
        return self._users(sa.true())

    def _users(self, condition: sa.ColumnElement[bool]) -> list[User]:
        rows = self.conn.execute(
            sa.select(users, api_keys.c.prefix)
            .join(api_keys, api_keys.c.user_id == users.c.id)
            .where(condition)
            .order_by(users.c.id)
        )
        return [User(id=row.id, name=row.name, email=row.email, api_key_prefix=row.prefix,
                     created_at=row.created_at) for row in rows]

    def find_api_key(self, prefix: str) -> ApiKey | None:
        row = self.conn.execute(_API_KEY_BY_PREFIX, {"prefix": prefix}).one_or_none()
        if row is None:
            return None
        return ApiKey(user_id=row.user_id, prefix=row.prefix, digest=row.digest, created_at=row.created_at)

    def replace_api_key(self, user_id: int, key: IssuedApiKey, at: datetime) -> None:
        self.conn.execute(
            api_keys.update()
            .where(api_keys.c.user_id == user_id)
            .values(prefix=key.prefix, digest=key.digest, created_at=at)
        )

    # ------------------------------------------------------------------ agents

    def add_agent(self, agent: Agent) -> Agent:
        values = _agent_values(agent)
        try:
            agent_id = self.conn.execute(agents.insert().values(**values)).inserted_primary_key[0]
        except sa.exc.IntegrityError as error:
            raise Conflict("you already have an agent with this name", code="agent_name_taken") from error
        return _agent_from_row({**values, "id": agent_id})

    def list_agents(self, owner_id: int) -> list[Agent]:
        rows = self.conn.execute(_AGENTS_OF_OWNER, {"owner_id": owner_id})
        return [_agent_from_row(row._mapping) for row in rows]

    def get_agent(self, owner_id: int, agent_id: int) -> Agent | None:
        row = self.conn.execute(_AGENT_OF_OWNER, {"owner_id": owner_id, "agent_id": agent_id}).one_or_none()
        return None if row is None else _agent_from_row(row._mapping)

    def agent_name_taken(self, owner_id: int, name: str, *, except_id: int = 0) -> bool:
        query = sa.select(agents.c.id).where(
            agents.c.owner_id == owner_id, agents.c.name == name, agents.c.id != except_id
        )
        return self.conn.execute(query).first() is not None

    def update_agent(self, agent: Agent) -> None:
        values = _agent_values(agent)
        del values["owner_id"], values["created_at"]
        try:
            self.conn.execute(
                agents.update()
                .where(agents.c.owner_id == agent.owner_id, agents.c.id == agent.id)
                .values(**values)
            )
        except sa.exc.IntegrityError as error:
            raise Conflict("you already have an agent with this name", code="agent_name_taken") from error

    def delete_agent(self, owner_id: int, agent_id: int) -> bool:
        result = self.conn.execute(
            agents.delete().where(agents.c.owner_id == owner_id, agents.c.id == agent_id)
        )
        return bool(result.rowcount)

    # ------------------------------------------------------------------ audit

    def add_audit_event(self, event: AuditEvent) -> AuditEvent:
        values = {
            "user_id": event.user_id,
            "action": event.action,
            "outcome": event.outcome,
            "agent_id": event.agent_id,
            "vm": event.vm,
            "detail": event.detail,
            "request_id": event.request_id[:64],
            "client_address": event.client_address[:64],
            "created_at": event.created_at,
        }
        event_id = self.conn.execute(audit_events.insert().values(**values)).inserted_primary_key[0]
        return AuditEvent(id=event_id, **values)

    def list_audit_events(self, user_id: int, limit: int, before: int | None) -> list[AuditEvent]:
        query = sa.select(audit_events).where(audit_events.c.user_id == user_id)
        if before is not None:
            query = query.where(audit_events.c.id < before)
        rows = self.conn.execute(query.order_by(audit_events.c.id.desc()).limit(limit))
        return [AuditEvent(**row._mapping) for row in rows]


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
    )
