"""The SQLAlchemy storage adapter on a real database — a SQLite file and a PostgreSQL server (every
test marked ``both`` runs on each): scoping, constraints, the write lock, migrations, and what each
dialect adds (SQLite's pragmas, backup and data version; PostgreSQL's reconnects and errors)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import sqlalchemy as sa

from adapters.sql import migrations
from adapters.sql.changes import listener_name
from adapters.sql.schema import UtcDateTime, metadata
from adapters.sql.storage import SqlStorage, sqlite_url
from core.errors import Conflict, Unavailable
from core.live import Event
from core.model import Agent, ApiKey, AuditEvent, ClientKey, HostKey, IssuedApiKey, Scope
from entrypoints import bootstrap, cli
from entrypoints.settings import ConfigError, Settings
from tests.postgres import PostgresServer

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def key(n: int) -> IssuedApiKey:
    return IssuedApiKey(plaintext=f"mgmt_{n:012x}_x", prefix=f"mgmt_{n:012x}", digest=f"sha256:{n}")


def agent(owner_id: int, name: str = "hv1") -> Agent:
    return Agent(
        id=0, owner_id=owner_id, name=name, hostname="192.0.2.1", port=22, username="qemu",
        allow_unknown_hosts=False, host_key=HostKey("ssh-ed25519 AAAA", "SHA256:host"),
        libvirt_uri="qemu:///system", client_key=ClientKey("ssh-ed25519 BBBB", "SHA256:client"),
        sealed_private_key="v1:sealed", sealed_passphrase=None, created_at=NOW, updated_at=NOW,
    )


def event(user_id: int, action: str = "agent.create") -> AuditEvent:
    return AuditEvent(id=0, user_id=user_id, action=action, outcome="ok", agent_id=None, vm=None, detail=None,
                      request_id="r", client_address="127.0.0.1", created_at=NOW)


@pytest.fixture
def pg(postgres: PostgresServer, postgres_url: str) -> Iterator[SqlStorage]:
    """Storage on a fresh PostgreSQL database, for what only PostgreSQL does."""
    storage = SqlStorage(postgres_url)
    storage.upgrade()
    yield storage
    storage.dispose()


def backend_pid(conn: sa.Connection) -> int:
    return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


# ---------------------------------------------------------------------- both backends


def test_round_trip_of_users_agents_and_events(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", "Alice@Example.com", key(1), NOW)
        stored = tx.add_agent(agent(user.id))
        tx.add_audit_event(event(user.id))
    with storage.transaction() as tx:
        assert tx.get_user(user.id) == user
        assert tx.find_user_by_email("alice@example.COM") == user
        assert tx.get_agent(user.id, stored.id) == stored
        assert tx.list_agents(user.id) == [stored]
        assert tx.find_api_key(user.api_key_prefix).digest == "sha256:1"
        assert tx.list_audit_events(user.id, 10, None)[0].action == "agent.create"
    assert stored.created_at.tzinfo is not None


def test_a_key_found_with_its_user_gives_that_user_until_a_write(storage: SqlStorage) -> None:
    """Issue 22: ``find_api_key`` reads the key's user in the same statement, and ``get_user``
    answers from it — the same user as its own query would give, and never one a write has changed."""
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        scoped = tx.add_api_key(ApiKey(user_id=user.id, prefix="mgmt_scoped", digest="d", created_at=NOW,
                                       name="dashboard", scopes=frozenset({Scope.READ}), full=False))
    with storage.transaction() as tx:
        found = tx.find_api_key(scoped.prefix)
        assert found is not None and found.id == scoped.id and not found.full
        assert tx.get_user(user.id) == user  # the user's full key's prefix, as always
    with storage.transaction(write=True) as tx:
        assert tx.find_api_key(user.api_key_prefix) is not None
        tx.replace_api_key(user.id, key(2), NOW)
        assert tx.get_user(user.id) == attrs.evolve(user, api_key_prefix=key(2).prefix)
    with storage.transaction() as tx:
        assert tx.find_api_key(key(1).prefix) is None
        assert tx.get_user(user.id) == attrs.evolve(user, api_key_prefix=key(2).prefix)


def test_agents_and_events_are_scoped_by_owner(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        alice = tx.add_user("alice", None, key(1), NOW)
        bob = tx.add_user("bob", None, key(2), NOW)
        hers = tx.add_agent(agent(alice.id))
        tx.add_audit_event(event(alice.id))
    with storage.transaction(write=True) as tx:
        assert tx.get_agent(bob.id, hers.id) is None
        assert tx.list_agents(bob.id) == []
        assert tx.delete_agent(bob.id, hers.id) is False
        assert tx.list_audit_events(bob.id, 10, None) == []
        tx.update_agent(attrs.evolve(hers, owner_id=bob.id, name="stolen"))  # bob cannot overwrite it
    with storage.transaction() as tx:
        assert tx.get_agent(alice.id, hers.id) == hers


def test_a_failed_transaction_leaves_nothing(storage: SqlStorage) -> None:
    with pytest.raises(RuntimeError), storage.transaction(write=True) as tx:
        tx.add_user("alice", None, key(1), NOW)
        raise RuntimeError("boom")
    with storage.transaction() as tx:
        assert tx.count_users() == 0


def test_unique_constraints_become_conflicts(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", "a@example.com", key(1), NOW)
        tx.add_agent(agent(user.id))
    with pytest.raises(Conflict) as email, storage.transaction(write=True) as tx:
        tx.add_user("alice2", "A@EXAMPLE.com", key(2), NOW)
    assert email.value.code == "email_taken"
    with pytest.raises(Conflict) as name, storage.transaction(write=True) as tx:
        tx.add_agent(agent(user.id))
    assert name.value.code == "agent_name_taken"
    with pytest.raises(Conflict) as renamed, storage.transaction(write=True) as tx:
        other = tx.add_agent(agent(user.id, "hv2"))
        tx.update_agent(attrs.evolve(other, name="hv1"))
    assert renamed.value.code == "agent_name_taken"
    with storage.transaction() as tx:  # each refused transaction left nothing behind
        assert [a.name for a in tx.list_agents(user.id)] == ["hv1"]
        assert tx.count_users() == 1


def test_deleting_a_user_row_cascades_to_keys_and_agents(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        tx.add_agent(agent(user.id))
    with storage.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM users")
        assert conn.exec_driver_sql("SELECT count(*) FROM agents").scalar() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM api_keys").scalar() == 0


def test_an_agent_id_is_never_reused_after_a_delete(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        first = tx.add_agent(agent(user.id, "hv1"))
        newest = tx.add_agent(agent(user.id, "hv2"))
        assert tx.delete_agent(user.id, newest.id)
        again = tx.add_agent(agent(user.id, "hv3"))
    assert again.id > newest.id > first.id


def test_an_agent_id_is_not_reused_even_after_a_rolled_back_insert(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
    with pytest.raises(RuntimeError), storage.transaction(write=True) as tx:
        lost = tx.add_agent(agent(user.id, "hv1"))
        raise RuntimeError("boom")
    with storage.transaction(write=True) as tx:
        kept = tx.add_agent(agent(user.id, "hv1"))
    assert kept.id >= lost.id  # SQLite may hand out a rolled-back id again; never an older, deleted one


def test_audit_events_page_newest_first(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        ids = [tx.add_audit_event(event(user.id, f"a{n}")).id for n in range(5)]
    with storage.transaction() as tx:
        assert [e.id for e in tx.list_audit_events(user.id, 3, None)] == ids[::-1][:3]
        assert [e.id for e in tx.list_audit_events(user.id, 3, ids[2])] == [ids[1], ids[0]]


def test_datetimes_come_back_as_the_same_utc_instant(storage: SqlStorage) -> None:
    from datetime import timedelta, timezone

    elsewhere = datetime(2026, 5, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2, minutes=30)))
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), elsewhere)
    with storage.transaction() as tx:
        stored = tx.get_user(user.id)
    assert stored is not None and stored.created_at == elsewhere and stored.created_at.tzinfo == UTC


# ---------------------------------------------------------------------- the write lock (both backends)


def test_a_write_transaction_waits_for_another_writer_then_gives_up_as_database_busy(url: str) -> None:
    first, second = SqlStorage(url), SqlStorage(url, busy_timeout=0.3)
    first.upgrade()
    try:
        with first.transaction(write=True):  # another instance holds the write lock...
            started = time.monotonic()
            with pytest.raises(Unavailable) as busy, second.transaction(write=True):
                pass
            waited = time.monotonic() - started
        assert busy.value.code == "database_busy"
        assert 0.25 <= waited < 5
        with second.transaction() as tx:  # ...which never blocks readers
            assert tx.count_users() == 0
    finally:
        first.dispose()
        second.dispose()


def test_read_check_write_sequences_of_two_instances_never_interleave(url: str) -> None:
    """The first-user sign-up: count the users, then add one only if there were none. Two
    instances doing it at the same moment must create exactly one first user."""
    instances = [SqlStorage(url), SqlStorage(url)]
    instances[0].upgrade()
    first_users: list[str] = []
    barrier = threading.Barrier(2)

    def sign_up_first(storage: SqlStorage, name: str, number: int) -> None:
        barrier.wait()
        with storage.transaction(write=True) as tx:
            if tx.count_users() == 0:
                time.sleep(0.2)  # the other instance tries meanwhile
                tx.add_user(name, None, key(number), NOW)
                first_users.append(name)

    threads = [threading.Thread(target=sign_up_first, args=(s, f"user{n}", n)) for n, s in enumerate(instances)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with instances[0].transaction() as tx:
        assert tx.count_users() == 1
    assert len(first_users) == 1
    for storage in instances:
        storage.dispose()


# ---------------------------------------------------------------------- migrations (both backends)


def _schema(engine: sa.Engine) -> dict[str, Any]:
    """What the database says its tables are: columns (type, nullability, default), keys, indexes.
    (Normalised where reflection differs for the same thing: SQLite reports an INTEGER PRIMARY KEY
    as nullable, a default of 1 as '1' or 1, and misses ON DELETE in column constraints, so foreign
    keys are read from SQLite's own pragma.)"""
    inspector = sa.inspect(engine)
    tables: dict[str, Any] = {}
    for table in inspector.get_table_names():
        primary_key = inspector.get_pk_constraint(table)["constrained_columns"]
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                foreign_keys = sorted((row._mapping["from"], row.table, row.on_delete) for row in
                                      conn.exec_driver_sql(f"PRAGMA foreign_key_list('{table}')"))
        else:
            foreign_keys = sorted((fk["constrained_columns"][0], fk["referred_table"], fk["options"].get("ondelete"))
                                  for fk in inspector.get_foreign_keys(table))
        tables[table] = {
            "columns": {c["name"]: (str(c["type"]), c["nullable"] and c["name"] not in primary_key,
                                    str(c.get("default")).strip("'"))
                        for c in inspector.get_columns(table)},
            "primary key": primary_key,
            "foreign keys": foreign_keys,
            "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table) if not i.get("duplicates_constraint")),
        }
    return tables


def test_migrations_produce_exactly_the_declared_schema(storage: SqlStorage, new_url: Callable[[], str]) -> None:
    declared = sa.create_engine(new_url())
    metadata.create_all(declared)
    migrated = _schema(storage.engine)
    assert migrated.pop("schema_version")["columns"].keys() == {"version"}
    assert migrated == _schema(declared)
    assert set(migrated) == {t.name for t in metadata.sorted_tables}
    assert storage.schema_version() == migrations.LATEST
    declared.dispose()


def test_upgrade_from_the_first_schema_keeps_existing_data(url: str) -> None:
    old = SqlStorage(url)
    with old.engine.connect() as conn:
        conn.execution_options(write=True)
        with conn.begin():
            assert migrations.upgrade(conn, target=1) == (0, 1)
        # Rows as the first release wrote them (its tables, without the later columns).
        at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        users_v1 = sa.table("users", sa.column("name"), sa.column("email"), sa.column("email_key"),
                            sa.column("created_at", UtcDateTime))
        keys_v1 = sa.table("api_keys", sa.column("user_id"), sa.column("prefix"), sa.column("digest"),
                           sa.column("created_at", UtcDateTime))
        agents_v1 = sa.table("agents", *(sa.column(c) for c in (
            "owner_id", "name", "hostname", "port", "username", "libvirt_uri", "public_key", "key_fingerprint",
            "sealed_private_key")), sa.column("allow_unknown_hosts", sa.Boolean),
            sa.column("created_at", UtcDateTime), sa.column("updated_at", UtcDateTime))
        with conn.begin():
            user_id = conn.execute(users_v1.insert().values(name="alice", email="a@example.com",
                                                            email_key="a@example.com", created_at=at)
                                   .returning(sa.column("id"))).scalar_one()
            conn.execute(keys_v1.insert().values(user_id=user_id, prefix="mgmt_00000000000a", digest="sha256:x",
                                                 created_at=at))
            agent_id = conn.execute(agents_v1.insert().values(
                owner_id=user_id, name="hv1", hostname="hv.example.com", port=2222, username="qemu",
                allow_unknown_hosts=True, libvirt_uri="qemu:///system", public_key="ssh-ed25519 A",
                key_fingerprint="SHA256:k", sealed_private_key="v1:sealed", created_at=at, updated_at=at,
            ).returning(sa.column("id"))).scalar_one()
    assert "revision" not in {c["name"] for c in sa.inspect(old.engine).get_columns("agents")}
    old.dispose()

    upgraded = SqlStorage(url)
    with pytest.raises(migrations.SecretNeeded):  # migration 4 re-keys the digest: it needs the server key
        upgraded.upgrade()
    assert upgraded.schema_version() == 1
    assert upgraded.upgrade(rekey_api_key_digest=lambda digest: f"hmac-sha256-of-sha256:({digest})") == (
        1, migrations.LATEST)
    with upgraded.transaction(write=True) as tx:  # ids go on from the highest one kept
        assert tx.add_agent(agent(user_id, "hv2")).id == agent_id + 1
    with upgraded.transaction() as tx:
        user = tx.get_user(user_id)
        stored = tx.get_agent(user_id, agent_id)
    assert user is not None and user.name == "alice" and user.api_key_prefix == "mgmt_00000000000a"
    assert stored is not None and (stored.hostname, stored.port, stored.revision) == ("hv.example.com", 2222, 1)
    assert stored.allow_unknown_hosts is True
    assert stored.key_generated is False  # migration 5: an existing key stays exportable
    assert stored.created_at == at
    with upgraded.transaction() as tx:
        api_key = tx.find_api_key("mgmt_00000000000a")
    assert api_key is not None and api_key.digest == "hmac-sha256-of-sha256:(sha256:x)"
    assert upgraded.upgrade() == (migrations.LATEST, migrations.LATEST)  # idempotent
    upgraded.dispose()


def test_a_database_newer_than_the_code_is_refused(storage: SqlStorage) -> None:
    with storage.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE schema_version SET version = {migrations.LATEST + 1}")
    with pytest.raises(RuntimeError, match="newer than this portal"):
        storage.upgrade()


def test_a_failed_migration_step_leaves_the_database_as_it_was(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = SqlStorage(url)
    with storage.engine.connect() as conn, conn.begin():
        migrations.upgrade(conn, target=1)

    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("ALTER TABLE agents ADD COLUMN half_done INTEGER"))
        raise RuntimeError("step failed half-way")

    monkeypatch.setattr(migrations, "STEPS", (migrations.STEPS[0], broken, *migrations.STEPS[2:]))
    with pytest.raises(RuntimeError, match="half-way"):
        storage.upgrade()
    assert storage.schema_version() == 1
    assert "half_done" not in {c["name"] for c in sa.inspect(storage.engine).get_columns("agents")}
    storage.dispose()


def test_concurrent_upgrades_migrate_exactly_once(url: str) -> None:
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        storage = SqlStorage(url)
        try:
            barrier.wait()
            results.append(storage.upgrade())
        except BaseException as error:
            errors.append(error)
        finally:
            storage.dispose()

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [(0, migrations.LATEST)] + [(migrations.LATEST, migrations.LATEST)] * 3


# ---------------------------------------------------------------------- SQLite only


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[SqlStorage]:
    storage = SqlStorage(sqlite_url(tmp_path / "db.sqlite3"))
    storage.upgrade()
    yield storage
    storage.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(lite: SqlStorage) -> None:
    with lite.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_backup_is_a_consistent_copy_taken_while_a_writer_is_open(lite: SqlStorage, tmp_path: Path) -> None:
    with lite.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        tx.add_agent(agent(user.id))
    target = tmp_path / "backups" / "copy.sqlite3"
    lite.backup(target)
    copy = sqlite3.connect(target)
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert copy.execute("SELECT name FROM agents").fetchall() == [("hv1",)]
    copy.close()
    assert target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        lite.backup(target)


def test_data_version_moves_when_any_other_connection_commits(lite: SqlStorage) -> None:
    other_process = SqlStorage(lite.url.render_as_string(hide_password=False))
    before = lite.data_version()
    assert before is not None and lite.data_version() == before  # reading changes nothing
    with other_process.transaction(write=True) as tx:  # e.g. another worker rotating a key
        tx.add_user("alice", None, key(1), NOW)
    assert lite.data_version() != before
    after_other = lite.data_version()
    with lite.transaction(write=True) as tx:  # this process's own pooled connections count too
        tx.add_user("bob", None, key(2), NOW)
    assert lite.data_version() != after_other
    other_process.dispose()


def test_until_changed_gives_values_back_only_at_the_version_they_were_read_at() -> None:
    from entrypoints.http.cache import UntilChanged

    version = [1]
    cache: UntilChanged[str, int] = UntilChanged(lambda: version[0])
    cache.put("k", cache.version(), 42)
    assert cache.get("k", cache.version()) == 42
    version[0] = 2  # a commit somewhere
    assert cache.get("k", cache.version()) is None
    assert UntilChanged(None).version() is None  # no version, nothing kept


# ---------------------------------------------------------------------- PostgreSQL only

pg_only = pytest.mark.postgres


def listening_version(storage: SqlStorage, unlike: object = None, timeout: float = 10.0) -> tuple[int, ...]:
    """The storage's data version once it has one other than ``unlike`` (PostgreSQL: its listener
    is up, and has heard what it should), polled with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        version = storage.data_version()
        if version is not None and version != unlike:
            return version
        assert time.monotonic() < deadline, f"data version still {version!r}"
        time.sleep(0.005)  # polling another thread's (and the server's) progress


def listener_pids(postgres: PostgresServer, url: str, storage: SqlStorage) -> list[int]:
    rows = postgres.sql(url, "SELECT pid FROM pg_stat_activity "
                             f"WHERE application_name = '{listener_name(storage.changes_channel)}'")
    return [int(str(pid)) for (pid,) in rows]


@pg_only
def test_postgresql_data_version_moves_when_any_connection_commits(pg: SqlStorage, postgres_url: str) -> None:
    other_instance = SqlStorage(postgres_url)
    try:
        before = listening_version(pg)
        with pg.transaction() as tx:  # reading changes nothing
            tx.count_users()
        assert listening_version(pg) == before
        with other_instance.transaction(write=True) as tx:  # e.g. another instance rotating a key
            tx.add_user("alice", None, key(1), NOW)
        after_other = listening_version(pg, unlike=before)  # its notification arrives
        with pg.transaction(write=True) as tx:
            tx.add_user("bob", None, key(2), NOW)
        # this worker's own commit moves it at once, before its notification comes back
        assert pg.data_version() != after_other
        deadline = time.monotonic() + 10
        while (settled := listening_version(pg))[1] == after_other[1]:  # and its notification came back
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(RuntimeError), pg.transaction(write=True) as tx:  # rolled back: nothing to tell
            tx.add_user("carol", None, key(3), NOW)
            raise RuntimeError("changed my mind")
        with pg.transaction(write=True) as tx:  # a write transaction that wrote nothing
            tx.count_users()
        with other_instance.transaction(write=True) as tx:
            tx.count_users()
        assert listening_version(pg) == settled
    finally:
        other_instance.dispose()


@pg_only
def test_postgresql_fenced_data_version_counts_every_commit_that_returned_before_it(pg: SqlStorage,
                                                                                    postgres_url: str) -> None:
    """No polling here: a commit of another instance that has returned is counted by the very next
    fenced version, however late the server's notification would otherwise reach this worker."""
    other_instance = SqlStorage(postgres_url)

    async def rounds() -> None:
        listening_version(pg)
        for n in range(40):
            before = await pg.fenced_data_version()
            assert before is not None and await pg.fenced_data_version() == before  # nothing committed
            with other_instance.transaction(write=True) as tx:
                tx.add_user(f"user{n}", None, key(n + 1), NOW)
            assert await pg.fenced_data_version() not in (before, None)

    try:
        asyncio.run(rounds())
    finally:
        other_instance.dispose()


@pg_only
def test_postgresql_data_version_is_none_while_its_listening_connection_is_lost(
        pg: SqlStorage, postgres: PostgresServer, postgres_url: str) -> None:
    before = listening_version(pg)
    [listener] = listener_pids(postgres, postgres_url, pg)
    postgres.sql(postgres_url, f"SELECT pg_terminate_backend({listener})")
    deadline = time.monotonic() + 10
    while pg.data_version() is not None:  # off from the moment the connection is seen to end
        assert time.monotonic() < deadline, "the data version outlived its listening connection"
        time.sleep(0.001)
    after = listening_version(pg)  # listening again, on a new connection: nothing read before counts
    assert after[0] == before[0] + 1 and after != before
    assert listener_pids(postgres, postgres_url, pg) not in ([], [listener])


@pg_only
def test_two_portals_in_two_schemas_of_one_database_notify_apart(postgres_databases: Callable[[], str]) -> None:
    first, second = SqlStorage(postgres_databases()), SqlStorage(postgres_databases())
    try:
        first.upgrade()
        second.upgrade()
        assert first.changes_channel != second.changes_channel
        listening_version(first)
        quiet = listening_version(second)
        assert asyncio.run(second.fenced_data_version()) == quiet
        moved = asyncio.run(first.fenced_data_version())
        with first.transaction(write=True) as tx:
            tx.add_user("alice", None, key(1), NOW)
        with second.transaction() as tx:
            assert tx.count_users() == 0
        # fenced: had the notification been sent to second's channel, it would be counted by now
        assert asyncio.run(second.fenced_data_version()) == quiet
        assert asyncio.run(first.fenced_data_version()) not in (moved, None)
    finally:
        first.dispose()
        second.dispose()


def _first_words(sql: str) -> str:
    """``SELECT`` for one statement, ``BEGIN; SELECT`` for two sent in one message."""
    return "; ".join(statement.split()[0].strip('"') for statement in sql.split(";") if statement.strip(' "'))


@pg_only
def test_postgresql_round_trips_are_the_statements_alone(pg: SqlStorage, tmp_path: Path) -> None:
    """Issue 22: no pre-ping, no BEGIN/COMMIT around a read, one statement for a key and its user;
    a write sends BEGIN with its lock and NOTIFY with its COMMIT. Counted on the wire (libpq's
    trace of the pooled connection)."""
    with pg.transaction(write=True) as tx:
        tx.add_user("alice", None, key(1), NOW)
    sent: dict[str, list[str]] = {}
    for kind, write in (("read", False), ("write", True)):
        raw = pg.engine.raw_connection()  # the pool's connection the transaction will use (LIFO)
        trace = tmp_path / f"{kind}.trace"
        with trace.open("w") as handle:
            raw.driver_connection.pgconn.trace(handle.fileno())  # type: ignore[union-attr]
            raw.close()
            with pg.transaction(write=write) as tx:
                found = tx.find_api_key(key(1).prefix)  # an authentication: the key, then its user
                assert found is not None and tx.get_user(found.user_id) is not None
                if write:
                    tx.touch_api_key(1, NOW)
            pooled = pg.engine.raw_connection()
            pooled.driver_connection.pgconn.untrace()  # type: ignore[union-attr]
            pooled.close()
        sent[kind] = [_first_words(found.group(1)) for found in re.finditer(
            r'\tF\t\d+\t(?:Query\t "|Parse\t "[^"]*" ")([^\n]*)', trace.read_text())]
    assert sent["read"] == ["SELECT"]
    assert sent["write"] == ["BEGIN; SELECT", "SELECT", "UPDATE", "NOTIFY; COMMIT"]


@pg_only
def test_postgresql_writes_no_cache_reads_send_no_change_notification(pg: SqlStorage) -> None:
    """An event (like a lease renewal, a mirrored VM, an audit row or a delivery) changes nothing a
    per-worker cache keeps: its commit does not empty every worker's caches; a key's does."""
    with pg.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
    before = pg._commits
    with pg.transaction(write=True) as tx:
        tx.add_event(Event(id=0, user_id=user.id, at=NOW, agent_id=None, vm=None, type="vm.started", detail="x"))
    assert pg._commits == before
    with pg.transaction(write=True) as tx:
        tx.touch_api_key(1, NOW)
    assert pg._commits != before


@pg_only
def test_postgresql_backup_is_refused_with_the_pg_dump_command(pg: SqlStorage, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="pg_dump"):
        pg.backup(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


@pg_only
def test_db_backup_on_the_command_line_says_to_use_pg_dump(postgres_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MANAGEMENT_DATABASE_URL", postgres_url)
    monkeypatch.setenv("MANAGEMENT_SECRET_KEY_FILE", str(tmp_path / "secret.key"))
    assert cli.main(["db", "backup", str(tmp_path / "copy")]) == 1
    err = capsys.readouterr().err
    assert "pg_dump" in err and "Traceback" not in err
    assert cli.main(["db", "version"]) == 0
    assert capsys.readouterr().out.strip() == str(migrations.LATEST)


@pg_only
def test_a_read_that_loses_its_connection_runs_again_on_a_fresh_one(pg: SqlStorage, postgres: PostgresServer,
                                                                   postgres_url: str) -> None:
    with pg.transaction(write=True) as tx:
        tx.add_user("alice", None, key(1), NOW)
    with pg.transaction() as tx:
        assert tx.count_users() == 1
        lost = backend_pid(tx.conn)
        postgres.sql(postgres_url, f"SELECT pg_terminate_backend({lost})")  # a failover, a restart...
        assert tx.count_users() == 1
        assert backend_pid(tx.conn) != lost
    with pg.transaction() as tx:  # and the pool goes on serving
        assert tx.count_users() == 1


@pg_only
def test_a_write_that_loses_its_connection_is_never_run_again(pg: SqlStorage, postgres: PostgresServer,
                                                             postgres_url: str) -> None:
    with pytest.raises(Unavailable) as lost, pg.transaction(write=True) as tx:
        tx.add_user("alice", None, key(1), NOW)
        postgres.sql(postgres_url, f"SELECT pg_terminate_backend({backend_pid(tx.conn)})")
        tx.add_audit_event(event(1))
    assert lost.value.code == "database_unavailable"
    with pg.transaction() as tx:
        assert tx.count_users() == 0


@pg_only
def test_pooled_connections_killed_while_idle_are_replaced_unseen(pg: SqlStorage, postgres: PostgresServer,
                                                                 postgres_url: str) -> None:
    with pg.transaction() as tx:
        idle = backend_pid(tx.conn)
    postgres.sql(postgres_url, f"SELECT pg_terminate_backend({idle})")
    with pg.transaction(write=True) as tx:  # a write: its first message fails, and is sent again
        tx.add_user("alice", None, key(1), NOW)
        assert backend_pid(tx.conn) != idle
    with pg.transaction() as tx:
        idle = backend_pid(tx.conn)
    postgres.sql(postgres_url, f"SELECT pg_terminate_backend({idle})")
    with pg.transaction() as tx:  # a read: its first statement runs again on a fresh connection
        assert tx.count_users() == 1
        assert backend_pid(tx.conn) != idle


@pg_only
def test_no_free_connection_within_the_busy_timeout_is_database_busy(postgres_url: str) -> None:
    storage = SqlStorage(postgres_url, busy_timeout=0.3, pool_size=1)
    storage.upgrade()
    try:
        with storage.transaction(), pytest.raises(Unavailable) as busy, storage.transaction():
            pass
        assert busy.value.code == "database_busy"
    finally:
        storage.dispose()


@pg_only
def test_a_serialization_failure_is_database_busy(pg: SqlStorage) -> None:
    with pytest.raises(Unavailable) as busy, pg.transaction(write=True) as tx:
        tx.conn.exec_driver_sql("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'serialization_failure'; END $$")
    assert busy.value.code == "database_busy"


@pg_only
def test_postgresql_connections_name_the_portal_and_use_utc(pg: SqlStorage) -> None:
    with pg.transaction() as tx:
        row = tx.conn.exec_driver_sql("SELECT current_setting('application_name'), current_setting('TimeZone'), "
                                      "current_setting('lock_timeout')").one()
    assert tuple(row) == ("manage-playrservers", "UTC", "10s")


# ---------------------------------------------------------------------- start-up errors


def _open(url: str, tmp_path: Path) -> ConfigError:
    settings = Settings.from_env({"MANAGEMENT_DATABASE_URL": url, "MANAGEMENT_SECRET_KEY_FILE": str(tmp_path / "k")})
    with pytest.raises(ConfigError) as refused:
        bootstrap.open_storage(settings)
    return refused.value


@pg_only
@pytest.mark.parametrize("what", ["wrong password", "no such database"])
def test_a_database_that_cannot_be_opened_stops_start_up_naming_the_variable(
        what: str, postgres: PostgresServer, tmp_path: Path) -> None:
    good = postgres.url
    url = {
        "wrong password": good.set(password="not-the-password-at-all"),
        "no such database": good.set(database="no_such_database"),
    }[what]
    error = _open(url.render_as_string(hide_password=False), tmp_path)
    message = str(error)
    assert error.variable == "MANAGEMENT_DATABASE_URL"
    assert message.startswith("MANAGEMENT_DATABASE_URL: cannot open the database postgresql+psycopg://")
    assert "***@" in message
    assert str(good.password) not in message and "not-the-password-at-all" not in message
    assert {"wrong password": "password authentication failed", "no such database": "does not exist"}[what] in message
    assert "\n" not in message


@pg_only
def test_a_database_server_that_cannot_be_reached_is_unavailable_not_misconfigured(
        postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.url.set(port=1).render_as_string(hide_password=False)  # nothing listens on port 1
    settings = Settings.from_env({"MANAGEMENT_DATABASE_URL": url, "MANAGEMENT_DB_CONNECT_WAIT": "0",
                                  "MANAGEMENT_SECRET_KEY_FILE": str(tmp_path / "k")})
    with pytest.raises(Unavailable) as unavailable:
        bootstrap.open_storage(settings)
    assert unavailable.value.code == "database_unavailable"
    assert "refused" in unavailable.value.detail and "***@" in unavailable.value.detail
    assert str(postgres.url.password) not in unavailable.value.detail


@pg_only
def test_start_up_waits_while_another_instance_holds_the_write_lock(postgres: PostgresServer, postgres_url: str,
                                                                   tmp_path: Path) -> None:
    """A migration running on another instance holds the write lock: start-up waits for it (or, past
    MANAGEMENT_DB_CONNECT_WAIT, exits 1 to be restarted), instead of a configuration error."""
    other = SqlStorage(postgres_url)
    other.upgrade()
    env = {"MANAGEMENT_DATABASE_URL": postgres_url, "MANAGEMENT_DB_BUSY_TIMEOUT": "0.2",
           "MANAGEMENT_SECRET_KEY_FILE": str(tmp_path / "k")}
    released = threading.Event()
    holding = threading.Event()

    def hold_the_lock() -> None:
        with other.transaction(write=True):
            holding.set()
            released.wait(30)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert holding.wait(30)
        with pytest.raises(Unavailable) as busy:
            bootstrap.open_storage(Settings.from_env({**env, "MANAGEMENT_DB_CONNECT_WAIT": "0"}))
        assert busy.value.code == "database_unavailable" and "lock timeout" in busy.value.detail
        threading.Timer(0.5, released.set).start()
        storage = bootstrap.open_storage(Settings.from_env({**env, "MANAGEMENT_DB_CONNECT_WAIT": "30"}))
        assert released.is_set()  # it got through only once the lock was released
        storage.dispose()
    finally:
        released.set()
        holder.join()
        other.dispose()
