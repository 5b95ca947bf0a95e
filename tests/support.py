"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from falcon import testing

from core.networks import AgentNetworks
from entrypoints.settings import Settings

PROBLEM = "application/problem+json"
REPO = Path(__file__).resolve().parents[1]

# MANAGEMENT_AGENT_NETWORKS for test portals. Tests connect only to fake hosts on loopback, which
# the default refuses; they also register documentation addresses (192.0.2.0/24) and example.com
# names that are never connected to, and must not be looked up in DNS either: allowing every
# address means no name is resolved to check it. Tests of the policy itself set their own value.
TEST_AGENT_NETWORKS = "0.0.0.0/0,::/0"
# For a shell built directly (no settings): only loopback, where the fake hosts listen.
LOOPBACK_NETWORKS = AgentNetworks.parse("127.0.0.0/8,::1/128")


@attrs.frozen
class KeyMaterial:
    openssh: str  # unencrypted OpenSSH ed25519
    openssh_encrypted: str  # OpenSSH ed25519 protected by `passphrase`
    pem_rsa: str  # unencrypted PKCS#1 PEM RSA
    pem_encrypted: str  # PKCS#8 PEM ECDSA protected by `passphrase`
    passphrase: str
    host_key: str  # an OpenSSH public key line
    other_host_key: str


def make_settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3"),
                              "MANAGEMENT_AGENT_NETWORKS": TEST_AGENT_NETWORKS, **env})


class ConnectedClient:
    """An ASGI wrapper for falcon.testing whose simulated client stays connected until ``left()``.

    falcon.testing marks every client disconnected as soon as its request has been sent, which a
    real server (uvicorn) does only when the client really goes away; the portal stops a ``?wait=``
    when its client leaves, so without this every wait would end at its first look. ``left`` lets a
    test decide when the client goes (e.g. after the host has answered a few polls)."""

    def __init__(self, app: Any, left: Callable[[], bool] = lambda: False) -> None:
        self.app = app
        self.left = left

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def receive_while_connected() -> Any:
            message = await receive()
            while message.get("type") == "http.disconnect" and not self.left():
                await asyncio.sleep(0.005)  # the request is cancelled-watch only: see Call.abandoned
            return message

        await self.app(scope, receive_while_connected, send)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # the Falcon app's router, for tests that walk it


def portal_client(app: Any, left: Callable[[], bool] = lambda: False) -> testing.TestClient:
    """A falcon.testing client of ``app`` whose client stays connected (``ConnectedClient``)."""
    return testing.TestClient(ConnectedClient(app, left))


class Api:
    """A falcon.testing client with a few conveniences for authenticated JSON calls."""

    def __init__(self, client: testing.TestClient) -> None:
        self.client = client

    def call(self, method: str, path: str, key: str | None = None, *, json: Any = None,
             headers: dict[str, str] | None = None, **kwargs: Any) -> testing.Result:
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        return self.client.simulate_request(method, path, json=json, headers=all_headers, **kwargs)

    def sign_up(self, name: str = "alice", email: str | None = None) -> dict[str, Any]:
        result = self.call("POST", "/users", json={"name": name, "email": email})
        assert result.status_code == 201, result.text
        return result.json  # type: ignore[no-any-return]

    def agent_body(self, keys: KeyMaterial, **fields: Any) -> dict[str, Any]:
        return {"name": "hv1", "hostname": "192.0.2.15", "username": "qemu-admin",
                "private_key": keys.openssh, **fields}


def assert_problem(result: testing.Result, status: int, code: str) -> dict[str, Any]:
    """Assert an RFC 9457 problem response with this status and stable code; return its body."""
    assert result.status_code == status, result.text
    assert result.headers["content-type"] == PROBLEM
    body: dict[str, Any] = result.json
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(code.replace("_", "-"))
    assert body["title"] and body["detail"]
    return body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``python main.py`` (gunicorn + uvicorn workers) as a subprocess on a free loopback port."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.env = {**os.environ, "MANAGEMENT_HOST": "127.0.0.1", "MANAGEMENT_PORT": str(self.port),
                    "MANAGEMENT_LOG_FORMAT": "json", "MANAGEMENT_AGENT_NETWORKS": TEST_AGENT_NETWORKS,
                    # Watchers (issue 18) open a `virsh event` stream per agent in use: tests that count
                    # logins or commands on a host would count theirs too. The live-state tests
                    # (tests/lab/test_live_events.py) turn them on.
                    "MANAGEMENT_WATCHERS": "false", **env}
        self.process: subprocess.Popen[str] | None = None
        self.log = workdir / f"server-{self.port}.log"

    def start(self) -> Server:
        handle = self.log.open("a")
        self.process = subprocess.Popen([sys.executable, str(REPO / "main.py")], cwd=self.workdir, env=self.env,
                                        stdout=handle, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}: {self.log.read_text()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)  # polling for readiness, not papering over a race
        raise AssertionError(f"server did not answer within 30 s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def request(self, method: str, path: str, key: str | None = None, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers=headers or {})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None, response.headers
        except urllib.error.HTTPError as error:
            raw = error.read()
            return error.code, json.loads(raw) if raw else None, error.headers

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        pids = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        return sorted(pids)


def run_cli(monkeypatch: Any, capsys: Any, command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """The command line in this process (``entrypoints.cli.main``) with exactly the ``MANAGEMENT_*``
    variables of ``env``: (exit code, stdout, stderr). Cheaper than a subprocess where many commands
    are compared (issue 15: the same output locally and remotely)."""
    from entrypoints.cli import main

    with monkeypatch.context() as patched:
        for name in [name for name in os.environ if name.startswith("MANAGEMENT_")]:
            patched.delenv(name)
        for name, value in env.items():
            patched.setenv(name, value)
        status = main(command)
    out, err = capsys.readouterr()
    return status, out, err
