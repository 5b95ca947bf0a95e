"""Issue 14, items 6, 7, 8 and 14, through the HTTP app on SQLite and on PostgreSQL: hostile text in
the audit, keyed API-key digests (and the migration that re-keys old ones), generated agent keys
that are never exported, and a failure limiter that refuses failures but not valid keys."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
import sqlalchemy as sa
from falcon import testing

from adapters.hashing import api_key_pepper, legacy_digest
from adapters.sealing import decode_key, generate_key
from adapters.sql import migrations
from adapters.sql.schema import UtcDateTime
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from entrypoints.settings import Settings
from tests.integration.test_sql_storage import agent as stored_agent
from tests.support import Api, KeyMaterial, assert_problem, make_settings

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
BAD_KEY = "mgmt_000000000000_" + "C" * 43


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    (tmp_path / "data").mkdir(mode=0o700)
    return f"sqlite:///{tmp_path / 'data' / 'management.sqlite3'}"


@pytest.fixture
def backend_settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(tmp_path, MANAGEMENT_DATABASE_URL=database_url, MANAGEMENT_SECRET_KEY=generate_key(),
                         MANAGEMENT_SIGNUP="open")


@pytest.fixture
def backend_api(backend_settings: Settings) -> Iterator[Api]:
    runtime = bootstrap.build_runtime(backend_settings)
    yield Api(testing.TestClient(create_app(runtime)))
    runtime.close()


def sql(url: str, statement: str, **params: object) -> list[sa.Row[tuple[object, ...]]]:
    """Run one statement as another client of the database would (not through the portal)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


# ---------------------------------------------------------------------- item 6


@pytest.mark.parametrize("vm", ["a\x00b", "v" * 256, "\x1b[31mred\x1b[0m\u202e"], ids=["nul", "256-chars", "escapes"])
def test_item6_an_invalid_vm_name_is_a_422_with_its_audit_event_recorded(
        backend_api: Api, keys: KeyMaterial, vm: str) -> None:
    api = backend_api
    key = api.sign_up()["api_key"]
    agent_id = api.call("POST", "/agents", key, json=api.agent_body(keys)).json["id"]
    path = f"/agents/{agent_id}/vms/{urllib.parse.quote(vm, safe='')}/start"
    assert_problem(api.call("POST", path, key), 422, "validation_failed")
    event = api.call("GET", "/users/me/audit", key).json["events"][0]
    assert (event["action"], event["outcome"], event["agent_id"]) == ("vm.start", "validation_failed", agent_id)
    # What was asked, made safe: printable, escaped, cut to the column.
    assert event["vm"].isprintable() and len(event["vm"]) <= 255
    assert event["vm"].startswith(vm.encode("unicode_escape").decode("ascii")[:40].replace("\\u202e", ""))
    if vm == "a\x00b":
        assert event["vm"] == "a\\x00b"
    assert event["detail"] is None or event["detail"].isprintable()


def test_item6_text_with_nul_is_stored_and_returned_without_it(backend_api: Api, backend_settings: Settings,
                                                               keys: KeyMaterial) -> None:
    """The storage's last line: NUL (which PostgreSQL refuses in any text) never reaches a column,
    whatever a use case hands it, and none comes back from rows written before (SQLite kept them)."""
    runtime = bootstrap.build_runtime(backend_settings)
    try:
        with runtime.storage.transaction(write=True) as tx:
            user = tx.add_user("nul\x00user", None, runtime.portal.users.hasher.issue(), datetime.now(UTC))
        with runtime.storage.transaction() as tx:
            stored = tx.get_user(user.id)
        assert stored is not None and stored.name == "nul\ufffduser"
        if backend_settings.database_url.startswith("sqlite"):  # a NUL SQLite kept from before never comes back
            sql(backend_settings.database_url, "INSERT INTO audit_events (user_id, action, outcome, vm, request_id, "
                "client_address, created_at) VALUES (:u, 'vm.start', 'validation_failed', :vm, 'r', '127.0.0.1', "
                "'2026-01-01 00:00:00')", u=user.id, vm="a\x00b")
            with runtime.storage.transaction() as tx:
                [event] = tx.list_audit_events(user.id, 10, None)
            assert event.vm == "a\ufffdb"
    finally:
        runtime.close()


def test_item6_ids_past_the_integer_range_name_nothing_instead_of_failing(backend_api: Api,
                                                                         backend_settings: Settings) -> None:
    """Found by the contract fuzzer once it ran on PostgreSQL: ``GET /users/me/audit?before=2**31``
    was a 500 there ("integer out of range"); SQLite compares any integer."""
    api = backend_api
    key = api.sign_up()["api_key"]
    page = api.call("GET", f"/users/me/audit?before={2**31}", key)
    assert page.status_code == 200, page.text
    assert [e["action"] for e in page.json["events"]] == ["user.create"]
    assert api.call("GET", f"/users/me/audit?before={2**63}", key).status_code in (200, 422)
    runtime = bootstrap.build_runtime(backend_settings)
    try:
        with runtime.storage.transaction() as tx:
            assert tx.get_user(2**31) is None and tx.get_agent(1, 2**40) is None
        with runtime.storage.transaction(write=True) as tx:
            assert tx.delete_agent(1, 2**40) is False
    finally:
        runtime.close()


# ---------------------------------------------------------------------- item 8


def test_item8_a_digest_written_into_the_database_without_the_secret_does_not_log_in(
        backend_api: Api, database_url: str) -> None:
    api = backend_api
    victim = api.sign_up("victim")
    assert api.call("GET", "/users/me", victim["api_key"]).status_code == 200
    stored = sql(database_url, "SELECT digest FROM api_keys WHERE prefix = :p", p=victim["api_key_prefix"])
    assert str(stored[0][0]).startswith("hmac-sha256:")
    # Someone who can write the database but has not the server key mints a key of their own.
    forged = f"{victim['api_key_prefix']}_{secrets.token_urlsafe(32)}"
    for digest in (legacy_digest(forged),  # the old unkeyed form
                   "hmac-sha256:" + hmac.new(api_key_pepper(secrets.token_bytes(32)), forged.encode(),
                                             hashlib.sha256).hexdigest(),  # keyed, with a guessed secret
                   "hmac-sha256-of-sha256:" + hmac.new(b"", legacy_digest(forged).encode(),
                                                       hashlib.sha256).hexdigest()):
        sql(database_url, "UPDATE api_keys SET digest = :d WHERE prefix = :p", d=digest,
            p=victim["api_key_prefix"])
        assert_problem(api.call("GET", "/users/me", forged), 401, "invalid_api_key")


def test_item8_keys_issued_before_digests_were_keyed_keep_working(database_url: str, tmp_path: Path) -> None:
    """A database at schema 3 holds an unkeyed ``sha256:`` digest; starting the portal re-keys it
    (migration 4) and the same key logs in, while the unkeyed form is gone from the database."""
    engine = sa.create_engine(database_url)
    plaintext = f"mgmt_00000000000a_{secrets.token_urlsafe(32)}"
    at = datetime(2026, 1, 2, tzinfo=UTC)
    with engine.connect() as conn:
        with conn.begin():
            migrations.upgrade(conn, target=3)
        with conn.begin():
            users = sa.table("users", sa.column("id"), sa.column("name"), sa.column("created_at", UtcDateTime))
            keys = sa.table("api_keys", sa.column("user_id"), sa.column("prefix"), sa.column("digest"),
                            sa.column("created_at", UtcDateTime))
            user_id = conn.execute(users.insert().values(name="old", created_at=at)
                                   .returning(users.c.id)).scalar_one()
            conn.execute(keys.insert().values(user_id=user_id, prefix="mgmt_00000000000a",
                                              digest=legacy_digest(plaintext), created_at=at))
    engine.dispose()
    secret = generate_key()
    settings = make_settings(tmp_path, MANAGEMENT_DATABASE_URL=database_url, MANAGEMENT_SECRET_KEY=secret)
    runtime = bootstrap.build_runtime(settings)
    try:
        api = Api(testing.TestClient(create_app(runtime)))
        me = api.call("GET", "/users/me", plaintext)
        assert me.status_code == 200 and me.json["name"] == "old"
        [(digest,)] = sql(database_url, "SELECT digest FROM api_keys")
        pepper = api_key_pepper(decode_key(secret, source="test"))
        assert digest == "hmac-sha256-of-sha256:" + hmac.new(pepper, legacy_digest(plaintext).encode(),
                                                             hashlib.sha256).hexdigest()
        tampered = plaintext[:-1] + ("B" if plaintext.endswith("A") else "A")
        assert_problem(api.call("GET", "/users/me", tampered), 401, "invalid_api_key")
        rotated = api.call("POST", "/users/me/api-key/rotate", plaintext).json["api_key"]  # and on to the new form
        assert api.call("GET", "/users/me", rotated).status_code == 200
        assert str(sql(database_url, "SELECT digest FROM api_keys")[0][0]).startswith("hmac-sha256:")
    finally:
        runtime.close()


def test_item8_the_rekeying_migration_refuses_to_run_without_the_secret(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        with conn.begin():
            migrations.upgrade(conn, target=3)
            conn.execute(sa.text("INSERT INTO users (name, created_at) VALUES ('old', :at)"),
                         {"at": datetime(2026, 1, 2)})
            conn.execute(sa.text("INSERT INTO api_keys (user_id, prefix, digest, created_at) "
                                 "SELECT id, 'mgmt_00000000000b', 'sha256:00', created_at FROM users"))
        with pytest.raises(migrations.SecretNeeded), conn.begin():
            migrations.upgrade(conn)
        assert migrations.current_version(conn) == 3  # nothing half done
    engine.dispose()


# ---------------------------------------------------------------------- item 14


def test_item14_a_limited_address_refuses_failures_but_lets_valid_keys_through(tmp_path: Path) -> None:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_AUTH_FAILURE_LIMIT="3",
                                                    MANAGEMENT_SIGNUP="open"))
    api = Api(testing.TestClient(create_app(runtime)))
    colleague, other = api.sign_up("colleague")["api_key"], api.sign_up("other")["api_key"]
    nat = {"remote_addr": "127.0.0.2"}  # one address shared by a guesser and their colleagues
    for _ in range(3):
        assert_problem(api.call("GET", "/users/me", BAD_KEY, **nat), 401, "invalid_api_key")
    limited = api.call("GET", "/users/me", BAD_KEY, **nat)
    assert_problem(limited, 429, "too_many_auth_failures")
    assert int(limited.headers["retry-after"]) >= 1
    assert_problem(api.call("GET", "/users/me", **nat), 429, "too_many_auth_failures")  # no key at all
    # Valid keys from the same address still work (one never seen by this worker, one cached)...
    assert api.call("GET", "/users/me", colleague, **nat).json["name"] == "colleague"
    assert api.call("GET", "/users/me", other, **nat).json["name"] == "other"
    assert api.call("GET", "/users/me", colleague, **nat).status_code == 200
    # ...and do not lift the limit for failures; other addresses are unaffected.
    assert_problem(api.call("GET", "/users/me", BAD_KEY, **nat), 429, "too_many_auth_failures")
    assert_problem(api.call("GET", "/users/me", BAD_KEY, remote_addr="127.0.0.3"), 401, "invalid_api_key")
    runtime.close()


# ---------------------------------------------------------------------- item 7
# The use cases (core/agents.py) remember whether a key was generated; read_credentials refuses it.


def test_item7_a_generated_key_is_never_exported(backend_api: Api, keys: KeyMaterial) -> None:
    api = backend_api
    key = api.sign_up()["api_key"]
    body = api.agent_body(keys, generate_key=True)
    del body["private_key"]
    created = api.call("POST", "/agents", key, json=body)
    assert created.status_code == 201, created.text
    agent_id = created.json["id"]
    problem = assert_problem(api.call("GET", f"/agents/{agent_id}/credentials", key), 409, "key_not_exportable")
    assert "PRIVATE KEY" not in problem["detail"]
    event = api.call("GET", "/users/me/audit", key).json["events"][0]
    assert (event["action"], event["outcome"]) == ("agent.read_credentials", "key_not_exportable")
    # the public half is what its owner needs, and stays readable
    assert api.call("GET", f"/agents/{agent_id}/public-key", key).status_code == 200


def test_item7_a_rotated_key_is_never_exported_and_an_uploaded_one_always_is(
        backend_api: Api, keys: KeyMaterial) -> None:
    api = backend_api
    key = api.sign_up()["api_key"]
    agent_id = api.call("POST", "/agents", key, json=api.agent_body(keys)).json["id"]
    uploaded = api.call("GET", f"/agents/{agent_id}/credentials", key)
    assert uploaded.status_code == 200 and uploaded.json["private_key"] == keys.openssh
    assert api.call("POST", f"/agents/{agent_id}/rotate-key", key).status_code == 200
    assert_problem(api.call("GET", f"/agents/{agent_id}/credentials", key), 409, "key_not_exportable")
    # uploading a key of one's own again makes it exportable (its owner has it anyway)
    assert api.call("PATCH", f"/agents/{agent_id}", key, json={"private_key": keys.pem_rsa}).status_code == 200
    again = api.call("GET", f"/agents/{agent_id}/credentials", key)
    assert again.status_code == 200 and again.json["private_key"] == keys.pem_rsa


def test_item7_storage_remembers_whether_a_key_was_generated(backend_settings: Settings) -> None:
    """The model/storage half of item 7 (passes without the use-case change)."""
    runtime = bootstrap.build_runtime(backend_settings)
    try:
        with runtime.storage.transaction(write=True) as tx:
            user = tx.add_user("u", None, runtime.portal.users.hasher.issue(), datetime.now(UTC))
            generated = tx.add_agent(attrs.evolve(stored_agent(user.id, "gen"), key_generated=True))
            tx.add_agent(stored_agent(user.id, "up"))
        with runtime.storage.transaction() as tx:
            assert [(a.name, a.key_generated) for a in tx.list_agents(user.id)] == [("gen", True), ("up", False)]
        with runtime.storage.transaction(write=True) as tx:
            tx.update_agent(attrs.evolve(generated, key_generated=False))
        with runtime.storage.transaction() as tx:
            assert not any(a.key_generated for a in tx.list_agents(user.id))
    finally:
        runtime.close()
