"""The operator's command line, run as a real subprocess against a temporary database."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.sql import migrations
from tests.support import TEST_AGENT_NETWORKS

REPO = Path(__file__).resolve().parents[2]


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3"),
                   "MANAGEMENT_AGENT_NETWORKS": TEST_AGENT_NETWORKS, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=60)


def test_users_create_prints_the_key_once_and_it_authenticates(tmp_path: Path) -> None:
    created = cli(tmp_path, "users", "create", "--name", "alice", "--email", "alice@example.com")
    assert created.returncode == 0, created.stderr
    user = json.loads(created.stdout)
    assert user["name"] == "alice" and user["api_key"].startswith(user["api_key_prefix"])
    assert "not shown again" in created.stderr
    from entrypoints.library import connect
    from entrypoints.settings import Settings

    with connect(settings=Settings.from_env({"MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3")})) \
            as portal:
        assert portal.login(user["api_key"]).user.id == user["id"]


def test_operator_creates_users_even_when_sign_up_is_closed(tmp_path: Path) -> None:
    for name in ("alice", "bob"):
        assert cli(tmp_path, "users", "create", "--name", name, MANAGEMENT_SIGNUP="closed").returncode == 0
    listing = cli(tmp_path, "users", "list", "--json")
    assert [u["name"] for u in json.loads(listing.stdout)] == ["alice", "bob"]
    assert "alice" in cli(tmp_path, "users", "list").stdout


def test_rotate_key_replaces_a_users_key(tmp_path: Path) -> None:
    first = json.loads(cli(tmp_path, "users", "create", "--name", "alice", "--email", "a@example.com").stdout)
    rotated = cli(tmp_path, "users", "rotate-key", "--email", "a@example.com")
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    assert new["api_key"] != first["api_key"] and new["api_key_prefix"] != first["api_key_prefix"]
    missing = cli(tmp_path, "users", "rotate-key", "--id", "999")
    assert missing.returncode == 3 and "user_not_found" in missing.stderr  # 3: not found


def test_invalid_input_is_reported_with_its_code(tmp_path: Path) -> None:
    result = cli(tmp_path, "users", "create", "--name", "alice", "--email", "nope")
    assert result.returncode == 2  # 2: input refused (422), like a usage error
    assert "validation_failed" in result.stderr and "email" in result.stderr


def test_db_upgrade_version_and_backup(tmp_path: Path) -> None:
    assert cli(tmp_path, "db", "upgrade").returncode == 0
    key_file = tmp_path / "data" / "secret.key"  # everything the server needs at start is ready
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert cli(tmp_path, "db", "version").stdout.strip() == str(migrations.LATEST)
    cli(tmp_path, "users", "create", "--name", "alice")
    backup = tmp_path / "backup.sqlite3"
    result = cli(tmp_path, "db", "backup", str(backup))
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(backup) as copy:
        assert copy.execute("SELECT name FROM users").fetchall() == [("alice",)]
    again = cli(tmp_path, "db", "backup", str(backup))
    assert again.returncode == 1 and "already exists" in again.stderr


@pytest.mark.parametrize(("variable", "value"), [("MANAGEMENT_SIGNUP", "sometimes"),
                                                 ("MANAGEMENT_SECRET_KEY", "too-short")])
def test_configuration_errors_name_the_variable_and_exit_2(tmp_path: Path, variable: str, value: str) -> None:
    result = cli(tmp_path, "users", "list", **{variable: value})
    assert result.returncode == 2
    assert variable in result.stderr


def test_secret_key_prints_a_usable_key(tmp_path: Path) -> None:
    key = cli(tmp_path, "secret-key").stdout.strip()
    result = cli(tmp_path, "users", "create", "--name", "alice", MANAGEMENT_SECRET_KEY=key)
    assert result.returncode == 0, result.stderr


def test_agents_public_key_and_rotate_key_print_the_authorized_keys_line(tmp_path: Path) -> None:
    from entrypoints.library import connect
    from entrypoints.settings import Settings

    api_key = json.loads(cli(tmp_path, "users", "create", "--name", "alice").stdout)["api_key"]
    with connect(settings=Settings.from_env({"MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3"),
                                             "MANAGEMENT_AGENT_NETWORKS": TEST_AGENT_NETWORKS})) as portal:
        agent = portal.login(api_key).register_agent(name="hv", hostname="hv.example.com", username="playr-agent",
                                                     generate_key=True)
    shown = cli(tmp_path, "agents", "public-key", str(agent.id), MANAGEMENT_API_KEY=api_key)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == ('restrict,pty,command="/usr/local/libexec/playr-agent-shell" '
                            f"{agent.client_key.public_key} playr-portal-agent-{agent.id}\n")
    rotated = cli(tmp_path, "agents", "rotate-key", str(agent.id), "--json", MANAGEMENT_API_KEY=api_key)
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    assert new["agent_id"] == agent.id and new["public_key"] != agent.client_key.public_key
    assert new["public_key"] in cli(tmp_path, "agents", "public-key", str(agent.id), MANAGEMENT_API_KEY=api_key).stdout
    other = cli(tmp_path, "agents", "rotate-key", "999", MANAGEMENT_API_KEY=api_key)
    assert other.returncode == 3 and "agent_not_found" in other.stderr
