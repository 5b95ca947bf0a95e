"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from falcon import testing

from entrypoints.settings import Settings

PROBLEM = "application/problem+json"


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
    return Settings.from_env({"MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3"), **env})


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
