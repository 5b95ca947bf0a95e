"""The watchers' storage at fleet scale (issue 22), on SQLite and PostgreSQL: renewing every lease
of a worker is a constant number of statements however many agents it holds, and the fleet view
reads the leases and mirrored VMs of hundreds of agents in two queries."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest
import sqlalchemy as sa

from adapters.memory import CountingKeyHasher
from adapters.sql.storage import SqlStorage, sqlite_url
from core.live import MirroredVm
from tests.unit.world import make_caller, make_world, register

AGENTS = 300


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStorage]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else sqlite_url(
        tmp_path / "db.sqlite3")
    storage = SqlStorage(url)
    storage.upgrade()
    yield storage
    storage.dispose()


def agents_of(storage: SqlStorage, count: int, name: str = "alice",
              hasher: CountingKeyHasher = CountingKeyHasher()) -> tuple[int, list[int]]:  # noqa: B008 - one for all
    """A user's id and the ids of ``count`` agents of theirs."""
    world = make_world()  # an agent value made by the use cases, stored below under new ids
    agent = register(world, make_caller(world, name))
    with storage.transaction(write=True) as tx:
        user = tx.add_user(name, None, hasher.issue(), datetime.now(UTC))
        return user.id, [tx.add_agent(attrs.evolve(agent, id=0, owner_id=user.id, name=f"hv{i}")).id
                         for i in range(count)]


def counted(storage: SqlStorage) -> list[str]:
    statements: list[str] = []
    sa.event.listen(storage.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *rest: statements.append(statement.split()[0].upper()))
    return statements


def test_renewing_every_lease_of_a_worker_is_a_few_statements_whatever_the_number_of_agents(
        storage: SqlStorage) -> None:
    owner, ids = agents_of(storage, AGENTS)
    now = datetime.now(UTC)
    until = now + timedelta(seconds=6)
    with storage.transaction(write=True) as tx:
        tx.want_watch(ids, now + timedelta(seconds=600))
        assert tx.claim_watches("a", ids, now, until, []) == ids
        assert tx.claim_watches("b", ids[:10], now, until, []) == []  # held by a, not expired
    statements = counted(storage)
    later = now + timedelta(seconds=1)
    with storage.transaction(write=True) as tx:
        tx.want_watch(ids, now + timedelta(seconds=900))
        assert tx.claim_watches("a", ids, later, later + timedelta(seconds=6), ids[: AGENTS // 2]) == ids
    writes = [s for s in statements if s in ("INSERT", "UPDATE", "DELETE")]
    assert len(writes) <= 6, statements  # not one per agent
    with storage.transaction() as tx:
        mirrors = tx.mirrors(owner)
    assert {a for a, m in mirrors.items() if m.status.alive_at == later} == set(ids[: AGENTS // 2])
    assert {m.status.expires_at for m in mirrors.values()} == {later + timedelta(seconds=6)}
    # an expired lease goes to the next claimant, not stamped alive, not connected
    expired = later + timedelta(seconds=7)
    with storage.transaction(write=True) as tx:
        assert tx.claim_watches("b", ids[:3], expired, expired + timedelta(seconds=6), ids[:3]) == ids[:3]
        taken = {a: m for a, m in tx.mirrors(owner).items() if a in ids[:3]}
    assert {(m.status.holder, m.status.connected, m.status.alive_at) for m in taken.values()} == {("b", False, None)}


def test_the_leases_and_mirrors_of_hundreds_of_agents_are_two_queries(storage: SqlStorage) -> None:
    owner, ids = agents_of(storage, AGENTS)
    other, theirs = agents_of(storage, 2, "bob")
    now = datetime.now(UTC)
    with storage.transaction(write=True) as tx:
        tx.want_watch(ids[:-1], now + timedelta(seconds=600))
        tx.claim_watches("a", ids[:-1], now, now + timedelta(seconds=6), [])  # the last agent: no lease
        tx.want_watch(theirs, now + timedelta(seconds=600))
        tx.claim_watches("a", theirs, now, now + timedelta(seconds=6), [])
        tx.replace_mirror(theirs[0], [MirroredVm("bobs", "running", 1)], now)
        for n, agent_id in enumerate(ids[:-2]):  # the one before: a lease, no VM
            tx.replace_mirror(agent_id, [MirroredVm("web", "running", n + 1), MirroredVm("db", "shut off", None)],
                              now)
    statements = counted(storage)
    with storage.transaction() as tx:
        mirrors = tx.mirrors(owner)
    assert [s for s in statements if s == "SELECT"] == ["SELECT", "SELECT"]  # leases, then VMs
    assert set(mirrors) == set(ids[:-1])  # the owner's agents with a lease, no other user's
    with storage.transaction() as tx:
        assert [vm.name for m in tx.mirrors(other).values() for vm in m.vms] == ["bobs"]
    assert mirrors[ids[0]].vms == (MirroredVm("db", "shut off", None), MirroredVm("web", "running", 1))
    assert mirrors[ids[-2]].vms == ()
    assert mirrors[ids[0]].status.holder == "a"
