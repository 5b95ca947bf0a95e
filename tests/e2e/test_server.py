"""The portal as a new user meets it: ``python main.py`` (gunicorn + uvicorn workers) on a real port,
driven over HTTP, stopped and started again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import KeyMaterial, Server

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path, MANAGEMENT_WORKERS="2").start()
    yield server
    server.stop()


def test_a_new_user_drives_the_api_and_finds_everything_after_a_restart(server: Server, keys: KeyMaterial) -> None:
    status, user, headers = server.request("POST", "/users", body={"name": "alice", "email": "alice@example.com"})
    assert status == 201 and headers["Cache-Control"] == "no-store"
    key = user["api_key"]
    status, agent, _ = server.request("POST", "/agents", key, {
        "name": "dalek-hypervisor", "hostname": "192.0.2.15", "port": 22, "username": "qemu-admin",
        "private_key": keys.openssh_encrypted, "private_key_passphrase": keys.passphrase,
        "allow_unknown_hosts": False})
    assert status == 201, agent
    assert server.request("PATCH", f"/agents/{agent['id']}", key, {"port": 2222})[1]["port"] == 2222
    status, credentials, headers = server.request("GET", f"/agents/{agent['id']}/credentials", key)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert credentials["private_key"] == keys.openssh_encrypted
    assert server.request("POST", "/users", body={"name": "mallory"})[0] == 403
    assert server.request("GET", "/agents", "mgmt_000000000000_" + "A" * 43)[0] == 401

    # Each worker must agree on the key: many requests land on both workers.
    for _ in range(20):
        assert server.request("GET", f"/agents/{agent['id']}/credentials", key)[0] == 200

    server.stop()
    server.start()
    status, agents, _ = server.request("GET", "/agents", key)
    assert status == 200 and [a["port"] for a in agents] == [2222]
    assert server.request("GET", f"/agents/{agent['id']}/credentials", key)[1]["private_key_passphrase"] == \
        keys.passphrase
    events = server.request("GET", "/users/me/audit", key)[1]["events"]
    assert len([e for e in events if e["action"] == "agent.read_credentials"]) == 22
    assert server.request("DELETE", f"/agents/{agent['id']}", key)[0] == 204


def test_workers_setting_gives_that_many_workers(server: Server) -> None:
    # gunicorn forks its workers one after another: wait (bounded) until it has forked them all
    deadline = time.monotonic() + 15
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.worker_pids()) == 2


def test_access_logs_are_json_lines_without_secrets(server: Server, keys: KeyMaterial) -> None:
    user = server.request("POST", "/users", body={"name": "alice"})[1]
    server.request("POST", "/agents", user["api_key"], {"name": "hv", "hostname": "h.example.com",
                                                        "username": "u", "private_key": keys.openssh})
    server.stop()
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    assert {(r["method"], r["path"], r["status"]) for r in requests} >= {("POST", "/users", 201),
                                                                         ("POST", "/agents", 201)}
    text = server.log.read_text()
    assert user["api_key"] not in text and "PRIVATE KEY" not in text
    # gunicorn's own lines (start, worker boot, shutdown) are JSON too
    assert all(line.startswith("{") for line in text.splitlines() if line.strip()), text[:2000]
    assert any(line.get("logger") == "gunicorn.error" for line in lines)


@pytest.mark.parametrize(("trusted", "expected"), [(None, "203.0.113.5"), ("", "127.0.0.1")])
def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(tmp_path: Path, trusted: str | None,
                                                             expected: str) -> None:
    env = {} if trusted is None else {"MANAGEMENT_TRUSTED_PROXIES": trusted}
    server = Server(tmp_path, **env).start()
    try:
        key = server.request("POST", "/users", body={"name": "alice"},
                             headers={"X-Forwarded-For": "203.0.113.5"})[1]["api_key"]
        events = server.request("GET", "/users/me/audit", key)[1]["events"]
        assert events[0]["client_address"] == expected
    finally:
        server.stop()


@pytest.mark.parametrize(("variable", "value"), [("MANAGEMENT_PORT", "eighty"), ("MANAGEMENT_WORKERS", "0"),
                                                 ("MANAGEMENT_RELOAD", "perhaps"),
                                                 ("MANAGEMENT_TRUSTED_PROXIES", "nginx.local")])
def test_a_bad_setting_stops_start_up_naming_the_variable(tmp_path: Path, variable: str, value: str) -> None:
    result = subprocess.run([sys.executable, str(REPO / "main.py")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, variable: value}, timeout=30)
    assert result.returncode == 2
    assert variable in result.stderr


@pytest.mark.parametrize("headers", [b"X-Big: " + b"a" * 70_000 + b"\r\n",
                                     b"".join(b"X-H%d: v\r\n" % n for n in range(500))],
                         ids=["one 70 KB header", "500 headers"])
def test_oversized_headers_are_refused_with_431_and_the_server_stays_healthy(server: Server,
                                                                           headers: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: portal\r\nConnection: close\r\n" + headers + b"\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"headers_too_large" in answer
    assert server.request("GET", "/health")[0] == 200
