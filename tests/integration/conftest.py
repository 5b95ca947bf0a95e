"""Fixtures of the SQL storage tests: a fresh, migrated database of each backend (a SQLite file,
and PostgreSQL when the ``postgres`` marker runs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

import pytest

from adapters.sql.storage import SqlStorage, sqlite_url

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Makes URLs of fresh, empty databases of the backend under test."""
    if request.param == "postgresql":
        make: Callable[[], str] = request.getfixturevalue("postgres_databases")
        return make
    numbers = count(1)
    return lambda: sqlite_url(tmp_path / f"db{next(numbers)}.sqlite3")


@pytest.fixture
def url(new_url: Callable[[], str]) -> str:
    return new_url()


@pytest.fixture
def storage(url: str) -> Iterator[SqlStorage]:
    storage = SqlStorage(url)
    storage.upgrade()
    yield storage
    storage.dispose()
