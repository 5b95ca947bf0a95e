"""The webhook outbox on real databases — a SQLite file and PostgreSQL (issue 18): workers of
different processes (each its own engine) claiming concurrently never get the same row and together
get every row; a lease that ran out is claimed again; an attempt recorded by a worker that lost its
lease is refused; on PostgreSQL a row another transaction holds is skipped, not waited for
(``FOR UPDATE SKIP LOCKED``)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from adapters.sql.storage import SqlStorage
from core.live import DELIVERY_DELIVERED, DELIVERY_PENDING, Delivery, DeliveryAttempt, Webhook
from core.model import IssuedApiKey
from tests.postgres import PostgresServer

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def outbox(storage: SqlStorage, deliveries: int) -> tuple[Webhook, list[int]]:
    """A user with a webhook and ``deliveries`` pending rows due at NOW."""
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, IssuedApiKey(plaintext="x", prefix="mgmt_000000000001", digest="d"), NOW)
        hook = tx.add_webhook(Webhook(id=0, user_id=user.id, url="https://192.0.2.10/", types=(), agent_ids=None,
                                      active=True, sealed_secret="v1:sealed", created_at=NOW, updated_at=NOW))
        ids = [tx.add_delivery(Delivery(id=0, webhook_id=hook.id, user_id=user.id, event_id=n, event_type="vm.started",
                                        body=f'{{"id":{n}}}', status=DELIVERY_PENDING, attempts=0, next_at=NOW,
                                        created_at=NOW)).id for n in range(deliveries)]
    return hook, ids


def test_concurrent_workers_of_different_processes_never_claim_one_row_twice(url: str, storage: SqlStorage) -> None:
    _, ids = outbox(storage, 120)
    workers = [SqlStorage(url) for _ in range(4)]
    claimed: dict[str, list[int]] = {f"worker-{n}": [] for n in range(4)}
    start = threading.Barrier(4)

    def claim(name: str, mine: SqlStorage) -> None:
        start.wait()
        while True:
            with mine.transaction(write=True) as tx:
                batch = tx.claim_deliveries(name, NOW, NOW + timedelta(seconds=60), 8)
            if not batch:
                return
            claimed[name] += [delivery.id for delivery, _ in batch]

    threads = [threading.Thread(target=claim, args=(name, mine)) for name, mine in zip(claimed, workers, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for mine in workers:
        mine.dispose()
    every = [delivery_id for got in claimed.values() for delivery_id in got]
    assert sorted(every) == sorted(ids)  # each row once, none left behind


def test_a_lease_that_ran_out_is_claimed_again_and_the_late_holder_records_nothing(storage: SqlStorage) -> None:
    hook, [delivery_id] = outbox(storage, 1)
    with storage.transaction(write=True) as tx:
        assert [d.id for d, _ in tx.claim_deliveries("a", NOW, NOW + timedelta(seconds=30), 8)] == [delivery_id]
    with storage.transaction() as tx:
        assert tx.next_delivery_at() == NOW + timedelta(seconds=30)  # claimable again when the lease ends
    with storage.transaction(write=True) as tx:
        assert tx.claim_deliveries("b", NOW + timedelta(seconds=10), NOW + timedelta(seconds=70), 8) == []
    later = NOW + timedelta(seconds=31)
    with storage.transaction(write=True) as tx:
        [(delivery, webhook)] = tx.claim_deliveries("b", later, later + timedelta(seconds=60), 8)
    assert delivery.id == delivery_id and webhook == hook and delivery.body == '{"id":0}'
    attempt = DeliveryAttempt(delivery_id=delivery_id, number=1, at=later, seconds=0.25, status_code=200, error=None,
                              response="ok")
    with storage.transaction(write=True) as tx:
        assert not tx.record_attempt("a", attempt, DELIVERY_DELIVERED, None)
        assert tx.record_attempt("b", attempt, DELIVERY_DELIVERED, None)
    with storage.transaction() as tx:
        [(done, [recorded])] = tx.list_deliveries(hook.user_id, hook.id, 10, None)
        assert tx.next_delivery_at() is None
    assert done.status == DELIVERY_DELIVERED and done.attempts == 1 and done.finished_at is not None
    assert recorded == attempt
    with storage.transaction(write=True) as tx:
        assert tx.prune_deliveries(later + timedelta(days=1)) == 1
        assert tx.list_deliveries(hook.user_id, hook.id, 10, None) == []


@pytest.mark.postgres
def test_on_postgresql_a_row_another_transaction_holds_is_skipped_not_waited_for(
        postgres: PostgresServer, postgres_url: str) -> None:
    import psycopg
    import sqlalchemy as sa

    storage = SqlStorage(postgres_url, busy_timeout=5)
    storage.upgrade()
    try:
        _, ids = outbox(storage, 3)
        conninfo = sa.make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, connect_timeout=10) as other:  # another client, mid-transaction
            other.execute("SELECT id FROM webhook_deliveries WHERE id = %s FOR UPDATE", (ids[0],))
            with storage.transaction(write=True) as tx:
                got = [d.id for d, _ in tx.claim_deliveries("w", NOW, NOW + timedelta(seconds=60), 8)]
            other.rollback()
        assert got == ids[1:]
    finally:
        storage.dispose()
