"""Reads a worker keeps until the database changes.

The hottest reads (the user behind an API key, on every authenticated request; a user's agents)
are remembered together with the database's data version taken *before* reading them
(``SqlStorage.data_version``: SQLite's ``PRAGMA data_version``, which moves on whenever any other
connection, in any worker or process, commits). They are given back only while the version has
not moved: a rotated key, a new agent, an audit event, any commit at all makes the next request
read again, so nothing is ever served that the database no longer says. Without a version (the
file busy at that instant, or PostgreSQL) nothing is remembered and every request reads.

On PostgreSQL several instances share the database, and only the server knows whether another
instance committed: asking it costs the same round trip as the read it would save. So there is no
version there, and a key rotated or deleted on one instance fails on every other instance at its
very next request (tests/e2e/test_two_instances.py).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class UntilChanged(Generic[K, V]):
    def __init__(self, data_version: Callable[[], Hashable | None] | None, max_entries: int = 10_000) -> None:
        self._data_version = data_version
        self.max_entries = max_entries
        self._version: Hashable | None = None  # the version every remembered value was read at
        self._values: dict[K, V] = {}

    def version(self) -> Hashable | None:
        """The database's version now: take it before reading, and ``put`` the value with it."""
        return self._data_version() if self._data_version is not None else None

    def get(self, key: K, version: Hashable | None) -> V | None:
        if version is None or version != self._version:
            return None
        return self._values.get(key)

    def put(self, key: K, version: Hashable | None, value: V) -> None:
        if version is None:
            return
        if version != self._version or len(self._values) >= self.max_entries:
            self._values.clear()  # values read at another version are never given back: drop them
            self._version = version
        self._values[key] = value
