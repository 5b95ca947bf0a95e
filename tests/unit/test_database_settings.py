"""``MANAGEMENT_DATABASE_URL`` and ``MANAGEMENT_DB_POOL_SIZE``: what is accepted, how it is
normalised, what is refused (naming the variable), and that the password never shows."""

from __future__ import annotations

import pytest

from entrypoints.settings import ConfigError, Settings, secrets_of_url, shown_url


@pytest.mark.parametrize("given", ["postgresql+psycopg://portal:pw@db.internal:5432/portal",
                                   "postgresql://portal:pw@db.internal:5432/portal",
                                   "postgres://portal:pw@db.internal:5432/portal"])
def test_postgresql_urls_select_psycopg_3(given: str) -> None:
    settings = Settings.from_env({"MANAGEMENT_DATABASE_URL": given})
    assert settings.database_url == "postgresql+psycopg://portal:pw@db.internal:5432/portal"
    assert settings.db_path is None


def test_url_options_are_kept() -> None:
    url = "postgresql+psycopg://portal:pw@db/portal?sslmode=require&connect_timeout=3"
    assert Settings.from_env({"MANAGEMENT_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(("given", "says"), [
    ("nonsense", "must be a URL"),
    ("postgresql+psycopg://portal:pw@db:notaport/portal", "not a valid URL"),
    ("postgresql+psycopg://portal:pw@db/", "names no database"),
    ("mysql://portal:pw@db/portal", "mysql:// is not supported"),
    ("postgresql+psycopg2://portal:pw@db/portal", "is not supported"),
])
def test_unusable_urls_are_refused_naming_the_variable(given: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"MANAGEMENT_DATABASE_URL": given})
    assert refused.value.variable == "MANAGEMENT_DATABASE_URL"
    assert says in str(refused.value)
    assert "pw@" not in str(refused.value)


def test_the_database_password_is_not_in_the_repr() -> None:
    settings = Settings.from_env({"MANAGEMENT_DATABASE_URL": "postgresql://portal:s3cret-pw@db/portal"})
    assert "s3cret-pw" not in repr(settings)
    assert "postgresql+psycopg://portal:***@db/portal" in repr(settings)


def test_a_password_given_as_a_query_parameter_is_hidden_too() -> None:
    url = "postgresql+psycopg://portal@db/portal?password=s3cret-pw&sslmode=require"
    settings = Settings.from_env({"MANAGEMENT_DATABASE_URL": url})
    assert "s3cret-pw" not in repr(settings)
    assert shown_url(url) == "postgresql+psycopg://portal@db/portal?password=%2A%2A%2A&sslmode=require"
    assert secrets_of_url(url) == ["s3cret-pw"]
    assert secrets_of_url("postgresql+psycopg://portal:pw1@db/portal") == ["pw1"]


def test_pool_size_defaults_to_five_and_is_checked() -> None:
    assert Settings.from_env({}).db_pool_size == 5
    assert Settings.from_env({"MANAGEMENT_DB_POOL_SIZE": "12"}).db_pool_size == 12
    with pytest.raises(ConfigError, match="MANAGEMENT_DB_POOL_SIZE"):
        Settings.from_env({"MANAGEMENT_DB_POOL_SIZE": "0"})
