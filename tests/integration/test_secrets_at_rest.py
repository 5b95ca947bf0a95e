"""Nothing secret is ever stored in clear: not in the database file, not in its WAL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.sealing import generate_key
from entrypoints import bootstrap
from entrypoints.settings import ConfigError, Settings
from tests.support import Api, KeyMaterial


def _database_bytes(settings: Settings) -> bytes:
    assert settings.db_path is not None
    files = [settings.db_path, Path(f"{settings.db_path}-wal"), Path(f"{settings.db_path}-shm")]
    return b"".join(f.read_bytes() for f in files if f.exists())


def test_database_and_wal_never_hold_a_private_key_passphrase_or_api_key(
    api: Api, keys: KeyMaterial, settings: Settings
) -> None:
    user = api.sign_up("alice")
    rotated = api.call("POST", "/users/me/api-key/rotate", user["api_key"]).json["api_key"]
    body = api.agent_body(keys, private_key=keys.openssh_encrypted, private_key_passphrase=keys.passphrase)
    agent = api.call("POST", "/agents", rotated, json=body).json
    api.call("PATCH", f"/agents/{agent['id']}", rotated,
             json={"private_key": keys.pem_rsa, "private_key_passphrase": None})
    assert api.call("GET", f"/agents/{agent['id']}/credentials", rotated).json["private_key"] == keys.pem_rsa

    stored = _database_bytes(settings)
    secrets = [user["api_key"], rotated, keys.passphrase]
    secrets += [line for text in (keys.openssh_encrypted, keys.pem_rsa) for line in text.splitlines()
                if "PRIVATE KEY" not in line and len(line) > 16]
    for secret in secrets:
        assert secret.encode() not in stored, f"found in the database: {secret[:12]}..."
    assert b"PRIVATE KEY" not in stored


def test_database_and_key_files_are_private(api: Api, settings: Settings) -> None:
    api.sign_up()
    assert settings.db_path is not None
    assert settings.db_path.stat().st_mode & 0o777 == 0o600
    assert settings.secret_key_file.stat().st_mode & 0o777 == 0o600
    assert settings.db_path.parent.stat().st_mode & 0o077 == 0


def test_the_database_alone_does_not_open_the_keys(api: Api, keys: KeyMaterial, settings: Settings,
                                                   tmp_path: Path) -> None:
    # Same database, a different server key (started while no credentials were stored yet). API-key
    # digests are keyed with that key too (issue 14 item 8), so the other server is given this one's
    # hasher: what is tested here is the sealed SSH key alone.
    other = bootstrap.build_runtime(Settings.from_env({
        "MANAGEMENT_DB_PATH": str(settings.db_path),
        "MANAGEMENT_SECRET_KEY_FILE": str(tmp_path / "other.key"),
    }), hasher=bootstrap.key_hasher(settings))
    key = api.sign_up()["api_key"]
    agent = api.call("POST", "/agents", key, json=api.agent_body(keys)).json
    from falcon import testing

    from entrypoints.http.app import create_app

    result = testing.TestClient(create_app(other)).simulate_get(
        f"/agents/{agent['id']}/credentials", headers={"Authorization": f"Bearer {key}"})
    assert result.status_code == 503  # the sealed key cannot be opened: 503 with a clear code
    assert result.json["code"] == "secret_unreadable"
    assert "PRIVATE KEY" not in result.text
    other.close()


def test_start_up_refuses_a_secret_key_that_does_not_open_the_stored_credentials(
        api: Api, keys: KeyMaterial, settings: Settings, tmp_path: Path) -> None:
    key = api.sign_up()["api_key"]
    assert api.call("POST", "/agents", key, json=api.agent_body(keys)).status_code == 201
    with pytest.raises(ConfigError) as refused:
        bootstrap.build_runtime(Settings.from_env({
            "MANAGEMENT_DB_PATH": str(settings.db_path),
            "MANAGEMENT_SECRET_KEY_FILE": str(tmp_path / "other.key"),
        }))
    assert refused.value.variable == "MANAGEMENT_SECRET_KEY_FILE"
    assert "every instance must use the same key" in str(refused.value)
    with pytest.raises(ConfigError) as configured:
        bootstrap.build_runtime(Settings.from_env({
            "MANAGEMENT_DB_PATH": str(settings.db_path), "MANAGEMENT_SECRET_KEY": generate_key()}))
    assert configured.value.variable == "MANAGEMENT_SECRET_KEY"
    bootstrap.build_runtime(settings).close()  # the right key still starts


_RACE = """
import sys, time
from pathlib import Path
from adapters.sealing import load_or_create_key_file, encode_key
start = float(sys.argv[2])
while time.time() < start:
    pass
print(encode_key(load_or_create_key_file(Path(sys.argv[1]))))
"""


def test_workers_starting_at_once_agree_on_one_secret_key(tmp_path: Path) -> None:
    import time

    key_file = tmp_path / "data" / "secret.key"
    start = f"{time.time() + 1.0}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    processes = [subprocess.Popen([sys.executable, "-c", _RACE, str(key_file), start], stdout=subprocess.PIPE,
                                  env=env, text=True) for _ in range(6)]
    outputs = {p.communicate(timeout=60)[0].strip() for p in processes}
    assert all(p.returncode == 0 for p in processes)
    assert len(outputs) == 1
    assert key_file.read_text().strip() == outputs.pop()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == ["secret.key"]  # no temporary files left
