"""PostgreSQL for the tests: a throwaway server that ``scripts/postgres.sh`` brings up once per test
session (torn down afterwards if this session started it), and a fresh database for each test.

``TEST_POSTGRES_URL`` (a URL whose role may create schemas in its database) uses that server instead. Without
root or apt-get the PostgreSQL tests skip with the reason; under ``CI=true`` they fail instead."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import attrs
import psycopg
import pytest
import sqlalchemy as sa

from tests.support import REPO

POSTGRES_SCRIPT = REPO / "scripts" / "postgres.sh"


@attrs.frozen
class PostgresServer:
    url: sa.URL  # a role that may create schemas, on a database that always exists

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=10)

    def create_database(self) -> str:
        """The URL of a new, empty database as the portal sees it: a schema of its own on the test
        database, alone on the connection's search path (CREATE DATABASE costs 0.2 s, this 1 ms)."""
        name = f"test_{secrets.token_hex(6)}"
        with self._admin() as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return self.url.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = str(sa.make_url(url).query["options"]).removeprefix("-csearch_path=")
        with self._admin() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def sql(self, url: str, statement: str) -> list[tuple[object, ...]]:
        """Run one statement on a database directly (autocommit), as another client would."""
        conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the PostgreSQL tests need Linux"
    if os.geteuid() != 0:
        return "the PostgreSQL tests need root (scripts/postgres.sh installs and runs postgresql), or TEST_POSTGRES_URL"
    if shutil.which("apt-get") is None and shutil.which("pg_createcluster") is None:
        return "the PostgreSQL tests need apt-get (Debian/Ubuntu) to install postgresql, or TEST_POSTGRES_URL"
    return None


def _refuse(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires PostgreSQL, but {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    given = os.environ.get("TEST_POSTGRES_URL")
    if given:
        yield PostgresServer(sa.make_url(given))
        return
    missing = _missing()
    if missing is not None:
        _refuse(missing)
    already_up = subprocess.run(["bash", str(POSTGRES_SCRIPT), "status"], capture_output=True).returncode == 0
    started = time.monotonic()
    up = subprocess.run(["bash", str(POSTGRES_SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        _refuse(f"scripts/postgres.sh up failed ({up.returncode}):\n{up.stderr[-3000:]}")
    print(f"postgres up in {time.monotonic() - started:.1f} s", file=sys.stderr)
    env = dict(line.partition("=")[::2] for line in up.stdout.splitlines() if line.startswith("PG_"))
    yield PostgresServer(sa.make_url(env["PG_URL"]))
    if not already_up:
        subprocess.run(["bash", str(POSTGRES_SCRIPT), "down"], capture_output=True, timeout=120)


@pytest.fixture
def postgres_databases(postgres: PostgresServer) -> Iterator[Callable[[], str]]:
    """Makes fresh databases on the test server (as many as a test needs); dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(postgres.create_database())
        return made[-1]

    yield make
    for url in made:
        postgres.drop_database(url)


@pytest.fixture
def postgres_url(postgres_databases: Callable[[], str]) -> str:
    """The URL of a fresh, empty PostgreSQL database of this test's own."""
    return postgres_databases()
