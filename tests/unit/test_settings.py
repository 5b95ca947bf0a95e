"""``entrypoints.settings.Settings.from_env``: defaults, overrides, and bad values naming their variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model import SignupPolicy
from entrypoints.settings import ConfigError, Settings


def test_defaults_keep_the_seed_meaning() -> None:
    settings = Settings.from_env({})
    assert settings.db_path == Path("data/management.sqlite3")
    assert settings.database_url == "sqlite:///data/management.sqlite3"
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.workers == 1
    assert settings.reload is False
    assert settings.signup is SignupPolicy.FIRST
    assert settings.secret_key is None
    assert settings.secret_key_file == Path("data/secret.key")


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGEMENT_PORT", "8123")
    assert Settings.from_env().port == 8123


def test_seed_variables_are_read() -> None:
    settings = Settings.from_env({
        "MANAGEMENT_DB_PATH": "/srv/portal/portal.db",
        "MANAGEMENT_HOST": "127.0.0.1",
        "MANAGEMENT_PORT": "9000",
        "MANAGEMENT_WORKERS": "4",
        "MANAGEMENT_RELOAD": "true",
        "MANAGEMENT_SIGNUP": "Closed",
        "MANAGEMENT_LOG_FORMAT": "json",
    })
    assert settings.db_path == Path("/srv/portal/portal.db")
    assert settings.database_url == "sqlite:////srv/portal/portal.db"
    assert (settings.host, settings.port, settings.workers, settings.reload) == ("127.0.0.1", 9000, 4, True)
    assert settings.signup is SignupPolicy.CLOSED
    assert settings.log_format == "json"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("yes", True), ("ON", True), ("0", False),
                                               ("false", False), ("off", False), ("", False)])
def test_reload_accepts_the_usual_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_env({"MANAGEMENT_RELOAD": raw}).reload is expected


@pytest.mark.parametrize("policy", list(SignupPolicy))
def test_every_signup_policy_is_accepted(policy: SignupPolicy) -> None:
    assert Settings.from_env({"MANAGEMENT_SIGNUP": policy.value}).signup is policy


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MANAGEMENT_PORT", "abc"),
        ("MANAGEMENT_PORT", "0"),
        ("MANAGEMENT_PORT", "70000"),
        ("MANAGEMENT_PORT", "80.5"),
        ("MANAGEMENT_WORKERS", "0"),
        ("MANAGEMENT_WORKERS", "many"),
        ("MANAGEMENT_RELOAD", "maybe"),
        ("MANAGEMENT_SIGNUP", "sometimes"),
        ("MANAGEMENT_LOG_FORMAT", "xml"),
        ("MANAGEMENT_LOG_LEVEL", "loud"),
        ("MANAGEMENT_DATABASE_URL", "nonsense"),
        ("MANAGEMENT_DB_PATH", "  "),
        ("MANAGEMENT_HOST", " "),
        ("MANAGEMENT_SSH_CONNECT_TIMEOUT", "nan"),
        ("MANAGEMENT_SSH_COMMAND_TIMEOUT", "-1"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({variable: value})
    assert bad.value.variable == variable
    assert variable in str(bad.value)


def test_database_url_overrides_the_path() -> None:
    url = "postgresql+psycopg://portal:pw@db.internal/portal"
    settings = Settings.from_env({"MANAGEMENT_DB_PATH": "/srv/ignored.sqlite3", "MANAGEMENT_DATABASE_URL": url})
    assert settings.database_url == url
    assert settings.db_path is None
    assert settings.secret_key_file == Path("data/secret.key")


def test_a_sqlite_database_url_gives_the_database_file() -> None:
    settings = Settings.from_env({"MANAGEMENT_DATABASE_URL": "sqlite:////var/lib/portal/portal.db"})
    assert settings.db_path == Path("/var/lib/portal/portal.db")
    assert settings.secret_key_file == Path("/var/lib/portal/secret.key")


def test_secret_key_file_defaults_beside_the_database() -> None:
    settings = Settings.from_env({"MANAGEMENT_DB_PATH": "/srv/portal/state/management.sqlite3"})
    assert settings.secret_key_file == Path("/srv/portal/state/secret.key")


def test_explicit_secret_key_file_and_key_are_used() -> None:
    settings = Settings.from_env({"MANAGEMENT_SECRET_KEY_FILE": "/etc/portal/key",
                                  "MANAGEMENT_SECRET_KEY": "c2VjcmV0"})
    assert settings.secret_key_file == Path("/etc/portal/key")
    assert settings.secret_key == "c2VjcmV0"


def test_the_secret_key_is_not_in_the_repr() -> None:
    settings = Settings.from_env({"MANAGEMENT_SECRET_KEY": "do-not-print-me"})
    assert "do-not-print-me" not in repr(settings)
