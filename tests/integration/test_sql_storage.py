"""The SQLAlchemy storage adapter on a real SQLite file: pragmas, scoping, migrations, backup."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
import sqlalchemy as sa

from adapters.sql import migrations
from adapters.sql.schema import metadata
from adapters.sql.storage import SqlStorage, sqlite_url
from core.errors import Conflict
from core.model import Agent, AuditEvent, ClientKey, HostKey, IssuedApiKey

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
def storage(tmp_path: Path) -> SqlStorage:
    storage = SqlStorage(sqlite_url(tmp_path / "db.sqlite3"))
    storage.upgrade()
    yield storage
    storage.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(storage: SqlStorage) -> None:
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


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


def test_audit_events_page_newest_first(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        ids = [tx.add_audit_event(event(user.id, f"a{n}")).id for n in range(5)]
    with storage.transaction() as tx:
        assert [e.id for e in tx.list_audit_events(user.id, 3, None)] == ids[::-1][:3]
        assert [e.id for e in tx.list_audit_events(user.id, 3, ids[2])] == [ids[1], ids[0]]


# ---------------------------------------------------------------------- migrations


def _columns(engine: sa.Engine) -> dict[str, set[str]]:
    inspector = sa.inspect(engine)
    return {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}


def test_migrations_produce_exactly_the_declared_schema(storage: SqlStorage) -> None:
    declared = {t.name: {c.name for c in t.columns} for t in metadata.sorted_tables}
    actual = _columns(storage.engine)
    assert actual.pop("schema_version") == {"version"}
    assert actual == declared
    assert storage.schema_version() == migrations.LATEST


def test_upgrade_from_the_first_schema_keeps_existing_data(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = SqlStorage(sqlite_url(path))
    with old.engine.connect() as conn:
        conn.execution_options(write=True)
        with conn.begin():
            assert migrations.upgrade(conn, target=1) == (0, 1)
        with conn.begin():
            conn.exec_driver_sql(
                "INSERT INTO users (id, name, email, email_key, created_at) "
                "VALUES (1, 'alice', 'a@example.com', 'a@example.com', '2026-01-02 03:04:05.000000')")
            conn.exec_driver_sql(
                "INSERT INTO api_keys (user_id, prefix, digest, created_at) "
                "VALUES (1, 'mgmt_00000000000a', 'sha256:x', '2026-01-02 03:04:05.000000')")
            conn.exec_driver_sql(
                "INSERT INTO agents (id, owner_id, name, hostname, port, username, allow_unknown_hosts, "
                "libvirt_uri, public_key, key_fingerprint, sealed_private_key, created_at, updated_at) "
                "VALUES (7, 1, 'hv1', 'hv.example.com', 2222, 'qemu', 1, 'qemu:///system', 'ssh-ed25519 A', "
                "'SHA256:k', 'v1:sealed', '2026-01-02 03:04:05.000000', '2026-01-02 03:04:05.000000')")
    assert "revision" not in _columns(old.engine)["agents"]
    old.dispose()

    upgraded = SqlStorage(sqlite_url(path))
    assert upgraded.upgrade() == (1, migrations.LATEST)
    with upgraded.transaction(write=True) as tx:  # ids go on from the highest one kept
        assert tx.add_agent(agent(1, "hv2")).id == 8
    with upgraded.transaction() as tx:
        user = tx.get_user(1)
        stored = tx.get_agent(1, 7)
    assert user is not None and user.name == "alice" and user.api_key_prefix == "mgmt_00000000000a"
    assert stored is not None and (stored.hostname, stored.port, stored.revision) == ("hv.example.com", 2222, 1)
    assert stored.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert upgraded.upgrade() == (migrations.LATEST, migrations.LATEST)  # idempotent
    upgraded.dispose()


def test_a_database_newer_than_the_code_is_refused(storage: SqlStorage) -> None:
    with storage.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE schema_version SET version = {migrations.LATEST + 1}")
    with pytest.raises(RuntimeError, match="newer than this portal"):
        storage.upgrade()


def test_concurrent_upgrades_migrate_exactly_once(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "race.sqlite3")
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


# ---------------------------------------------------------------------- backup


def test_backup_is_a_consistent_copy_taken_while_a_writer_is_open(storage: SqlStorage, tmp_path: Path) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        tx.add_agent(agent(user.id))
    target = tmp_path / "backups" / "copy.sqlite3"
    storage.backup(target)
    copy = sqlite3.connect(target)
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert copy.execute("SELECT name FROM agents").fetchall() == [("hv1",)]
    copy.close()
    assert target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        storage.backup(target)


def test_data_version_moves_when_any_other_connection_commits(storage: SqlStorage, tmp_path: Path) -> None:
    other_process = SqlStorage(storage.url.render_as_string(hide_password=False))
    before = storage.data_version()
    assert before is not None and storage.data_version() == before  # reading changes nothing
    with other_process.transaction(write=True) as tx:  # e.g. another worker rotating a key
        tx.add_user("alice", None, key(1), NOW)
    assert storage.data_version() != before
    after_other = storage.data_version()
    with storage.transaction(write=True) as tx:  # this process's own pooled connections count too
        tx.add_user("bob", None, key(2), NOW)
    assert storage.data_version() != after_other
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
