"""Reads a worker keeps until the database changes.

The hottest reads (the user behind an API key, on every authenticated request; a user's agents)
are remembered together with the database's data version taken *before* reading them
(``SqlStorage.data_version``). They are given back only while the version has not moved: a rotated
key, a new agent, an audit event, any commit at all makes the next request read again, so nothing
is ever served that the database no longer says. Without a version nothing is remembered and every
request reads.

- SQLite: ``PRAGMA data_version``, which moves on whenever any other connection, in any worker or
  process, commits (None for an instant when the file is busy).
- PostgreSQL, where several instances share the database (issue 22): every committing write sends a
  NOTIFY (except one that wrote only tables no cache reads: leases, mirrored VMs, events, audit,
  webhook deliveries) that each worker's listening connection counts, and the worker's own commits count at
  once (``adapters.sql.changes``). A request takes the version with ``fresh_version``: after a round
  trip on the listening connection that started after the request arrived, shared by the requests
  arriving meanwhile, so every commit that returned before the request is counted, whichever
  instance made it. A key rotated or deleted on one instance therefore fails on every other
  instance at its very next request (tests/e2e/test_two_instances.py). While the listening
  connection is down the version is None: caches off, every request reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class UntilChanged(Generic[K, V]):
    def __init__(self, data_version: Callable[[], Hashable | None] | None, max_entries: int = 10_000, *,
                 fenced: Callable[[], Awaitable[Hashable | None]] | None = None) -> None:
        self._data_version = data_version
        self._fenced = fenced  # the version for a request that has just arrived, where it needs waiting for
        self.max_entries = max_entries
        self._version: Hashable | None = None  # the version every remembered value was read at
        self._values: dict[K, V] = {}

    def version(self) -> Hashable | None:
        """The database's version now: take it before reading, and ``put`` the value with it."""
        return self._data_version() if self._data_version is not None else None

    async def fresh_version(self) -> Hashable | None:
        """The version for a request that has just arrived: it counts every commit that returned
        before (``version`` may not yet, on PostgreSQL)."""
        return await self._fenced() if self._fenced is not None else self.version()

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
