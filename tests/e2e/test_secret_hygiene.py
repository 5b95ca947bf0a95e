"""Secret hygiene, end to end: a full scenario on the real server with logs at debug level; no API
key, private-key line or passphrase may appear in the logs, in any error body or in the database
files — only in the two answers meant to carry them (sign-up/rotation, and the no-store
credentials read)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.support import Server

pytestmark = pytest.mark.e2e


def test_no_secret_reaches_logs_error_bodies_or_the_database(tmp_path: Path) -> None:
    passphrase = "hunter2-but-longer-and-unique"
    key = asyncssh.generate_private_key("ssh-ed25519")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*bcrypt.kdf.*")
        private_key = key.export_private_key("openssh", passphrase=passphrase, rounds=4).decode()
    server = Server(tmp_path, MANAGEMENT_WORKERS="1", MANAGEMENT_LOG_LEVEL="debug", MANAGEMENT_SIGNUP="open",
                    MANAGEMENT_SSH_CONNECT_TIMEOUT="1").start()
    bodies: list[Any] = []

    def call(*args: Any, **kwargs: Any) -> tuple[int, Any, Any]:
        status, body, headers = server.request(*args, **kwargs)
        bodies.append(body)
        return status, body, headers

    try:
        status, user, _ = server.request("POST", "/users", body={"name": "alice", "email": "alice@example.com"})
        assert status == 201
        first_key = user["api_key"]
        status, rotated, _ = server.request("POST", "/users/me/api-key/rotate", first_key)
        assert status == 200
        api_key = rotated["api_key"]
        agent_body = {"name": "hv", "hostname": "127.0.0.1", "port": 1, "username": "qemu",
                      "private_key": private_key, "private_key_passphrase": passphrase,
                      "allow_unknown_hosts": True}
        status, agent, _ = call("POST", "/agents", api_key, agent_body)
        assert status == 201
        # mistakes that echo input back: wrong passphrase, bad key, unknown field, malformed JSON
        call("POST", "/agents", api_key, {**agent_body, "name": "hv2", "private_key_passphrase": "wrong " + passphrase})
        call("POST", "/agents", api_key, {**agent_body, "name": "hv3", "private_key": private_key[:200]})
        call("PATCH", f"/agents/{agent['id']}", api_key, {"private_key_passphrase": passphrase, "bogus": passphrase})
        call("GET", "/users/me", first_key)  # the rotated-away key, as a client would retry it
        call("GET", "/users/me", api_key + "x")
        call("POST", f"/agents/{agent['id']}/vms/guest/start", api_key)  # 502: the port is closed
        status, credentials, headers = server.request("GET", f"/agents/{agent['id']}/credentials", api_key)
        assert status == 200 and headers["Cache-Control"] == "no-store"
        assert credentials["private_key_passphrase"] == passphrase  # the one answer meant to carry it
    finally:
        server.stop()

    secrets = [first_key, api_key, passphrase]
    secrets += [line for line in private_key.splitlines() if "PRIVATE KEY" not in line and len(line) > 16]
    log = server.log.read_text()
    assert '"level": "debug"' in log  # debug level really was on
    database = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("management.sqlite3*"))
    error_text = repr(bodies)
    for secret in secrets:
        assert secret not in log, f"secret in the logs: {secret[:10]}…"
        assert secret not in error_text, f"secret in a response body: {secret[:10]}…"
        assert secret.encode() not in database, f"secret in the database: {secret[:10]}…"
    assert "PRIVATE KEY" not in log and "PRIVATE KEY" not in error_text
