"""Revocation and expiry of scoped API keys (issue 20) with the real server (``python main.py``,
gunicorn + uvicorn workers): two workers on one SQLite file, whose per-worker caches remember keys,
and two instances on one PostgreSQL database. A revoked key is refused at its very next request on
every worker and instance; an expired key likewise, the first request after its time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from adapters.sealing import generate_key
from tests.postgres import PostgresServer
from tests.support import REPO, Server

pytestmark = [pytest.mark.e2e]

ROUNDS = 16  # requests per check: new connections, spread by the kernel over both workers


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("scoped-keys")
    server = Server(workdir, MANAGEMENT_DB_PATH=str(workdir / "m.sqlite3"), MANAGEMENT_WORKERS="2",
                    MANAGEMENT_SIGNUP="open").start()
    deadline = time.monotonic() + 20
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # gunicorn forks its workers one after another: wait (bounded) for both
    assert len(server.worker_pids()) == 2
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_instances(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, ...]]:
    url = postgres.create_database()
    env = {"MANAGEMENT_DATABASE_URL": url, "MANAGEMENT_SECRET_KEY": generate_key(), "MANAGEMENT_SIGNUP": "open",
           "MANAGEMENT_WORKERS": "1"}
    servers = (Server(tmp_path_factory.mktemp("scoped-a"), **env).start(),
               Server(tmp_path_factory.mktemp("scoped-b"), **env).start())
    yield servers
    for server in servers:
        server.stop()
    postgres.drop_database(url)


def full_key(server: Server, name: str) -> str:
    status, body, _ = server.request("POST", "/users", body={"name": name})
    assert status == 201, body
    return str(body["api_key"])


def scoped_key(server: Server, full: str, expires_at: datetime | None = None) -> dict[str, object]:
    body = {"name": "dashboard", "scopes": ["read"],
            "expires_at": None if expires_at is None else expires_at.isoformat()}
    status, created, _ = server.request("POST", "/users/me/keys", full, body=body)
    assert status == 201, created
    return dict(created)


def answers(servers: tuple[Server, ...], key: str) -> set[tuple[int, str | None]]:
    """(status, code) of ``ROUNDS`` requests to each server with ``key``."""
    seen = set()
    for server in servers:
        for _ in range(ROUNDS):
            status, body, _ = server.request("GET", "/agents", key)
            seen.add((status, body.get("code") if isinstance(body, dict) else None))
    return seen


def wait_until(moment: datetime) -> None:
    """Until the wall clock (which the servers read too) is past ``moment``: bounded by it."""
    while datetime.now(UTC) <= moment:
        time.sleep(min(0.05, max(0.0, (moment - datetime.now(UTC)).total_seconds())))


def test_a_revoked_key_is_refused_at_its_next_request_on_every_worker(two_workers: Server) -> None:
    full = full_key(two_workers, "alice")
    created = scoped_key(two_workers, full)
    assert answers((two_workers,), str(created["api_key"])) == {(200, None)}  # remembered by both workers
    assert two_workers.request("DELETE", f"/users/me/keys/{created['id']}", full)[0] == 204
    assert answers((two_workers,), str(created["api_key"])) == {(401, "invalid_api_key")}
    assert answers((two_workers,), full) == {(200, None)}


def test_an_expired_key_is_refused_at_its_first_request_after_its_time_on_every_worker(two_workers: Server) -> None:
    full = full_key(two_workers, "bob")
    expires_at = datetime.now(UTC) + timedelta(seconds=3)
    created = scoped_key(two_workers, full, expires_at)
    assert answers((two_workers,), str(created["api_key"])) == {(200, None)}
    wait_until(expires_at)
    assert answers((two_workers,), str(created["api_key"])) == {(401, "api_key_expired")}


@pytest.mark.postgres
def test_a_key_revoked_on_one_instance_is_refused_on_the_other_at_once(two_instances: tuple[Server, ...]) -> None:
    a, b = two_instances
    full = full_key(a, "carol")
    created = scoped_key(a, full)
    assert answers((a, b), str(created["api_key"])) == {(200, None)}
    assert a.request("DELETE", f"/users/me/keys/{created['id']}", full)[0] == 204
    assert answers((b, a), str(created["api_key"])) == {(401, "invalid_api_key")}


@pytest.mark.postgres
def test_an_expired_key_is_refused_on_both_instances(two_instances: tuple[Server, ...]) -> None:
    a, b = two_instances
    full = full_key(b, "dave")
    expires_at = datetime.now(UTC) + timedelta(seconds=3)
    created = scoped_key(b, full, expires_at)
    assert answers((a, b), str(created["api_key"])) == {(200, None)}
    wait_until(expires_at)
    assert answers((a, b), str(created["api_key"])) == {(401, "api_key_expired")}


def test_the_cli_creates_lists_and_revokes_keys(two_workers: Server) -> None:
    full = full_key(two_workers, "erin")
    env = {**os.environ, "MANAGEMENT_DB_PATH": two_workers.env["MANAGEMENT_DB_PATH"], "MANAGEMENT_API_KEY": full}
    cli = [sys.executable, "-m", "entrypoints.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                              check=False)

    created = run("keys", "create", "ci", "--scope", "operate", "--scope", "read", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["scopes"] == ["operate", "read"] and key["api_key"].startswith(key["prefix"])
    listed = run("keys", "list")
    assert listed.returncode == 0 and "ci" in listed.stdout and key["api_key"] not in listed.stdout
    assert two_workers.request("GET", "/agents", key["api_key"])[0] == 200
    revoked = run("keys", "revoke", str(key["id"]))
    assert revoked.returncode == 0, revoked.stderr
    assert two_workers.request("GET", "/agents", key["api_key"])[0] == 401
    refused = run("keys", "revoke", str(key["id"]))
    assert refused.returncode == 3 and "api_key_not_found" in refused.stderr  # 3: not found (docs/client.md)
