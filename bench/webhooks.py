"""Webhooks (issue 18), measured side by side in one run on a SQLite file:

A. What the outbox adds to storing an event: ``EventLog.add`` (the event and its outbox rows, in one
   write transaction) ÷ the same transaction with the event alone (``tx.add_event``), for a user
   with 0, 1 and 5 webhooks that want the event.
B. Delivery latency: from the commit of an event to a real receiver on loopback having the signed
   POST, with the delivery worker as the server runs it (``WebhookService.run``, the httpx sender):
   median and 95th percentile, and the worker's idle poll for comparison.

    .venv/bin/python bench/webhooks.py [--events 300] [--deliveries 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.clock import SystemClock  # noqa: E402
from adapters.memory import ReversibleSecretBox  # noqa: E402
from adapters.sql.storage import SqlStorage, sqlite_url  # noqa: E402
from adapters.webhook_http import HttpWebhookSender  # noqa: E402
from core.audit import AuditLog  # noqa: E402
from core.events import EventLog  # noqa: E402
from core.live import Webhook  # noqa: E402
from core.model import IssuedApiKey  # noqa: E402
from core.networks import AgentNetworks  # noqa: E402
from core.webhooks import POLL_SECONDS, WebhookService  # noqa: E402
from tests.webhook_receiver import Receiver  # noqa: E402


def user_with_webhooks(storage: SqlStorage, name: str, count: int, url: str = "https://192.0.2.10/") -> int:
    now = SystemClock().now()
    with storage.transaction(write=True) as tx:
        user = tx.add_user(name, None, IssuedApiKey(plaintext="x", prefix=f"mgmt_{name:0>12}", digest="d"), now)
        sealed = ReversibleSecretBox().seal("whsec_x", context=f"webhook-secret/user:{user.id}")
        for _ in range(count):
            tx.add_webhook(Webhook(id=0, user_id=user.id, url=url, types=(), agent_ids=None, active=True,
                                   sealed_secret=sealed, created_at=now, updated_at=now))
    return user.id


def insert_cost(storage: SqlStorage, events: int) -> list[tuple[str, float]]:
    log = EventLog(storage=storage, clock=SystemClock())
    rows: list[tuple[str, float]] = []

    def per_event(user_id: int, with_outbox: bool) -> float:
        started = time.perf_counter()
        for _ in range(events):
            with storage.transaction(write=True) as tx:
                event = log.new(user_id, 1, "web", "vm.started", "Booted")
                if with_outbox:
                    log.add(tx, event)
                else:
                    tx.add_event(event)
        return (time.perf_counter() - started) / events

    for hooks in (0, 1, 5):
        user_id = user_with_webhooks(storage, f"{hooks:012x}", hooks)
        alone, with_outbox = [], []
        for _ in range(3):  # interleaved rounds, best of each: same disk, same cache state
            alone.append(per_event(user_id, False))
            with_outbox.append(per_event(user_id, True))
        rows.append((f"A. event with outbox, {hooks} webhooks ÷ event alone", min(with_outbox) / min(alone)))
        rows.append((f"   (event alone {min(alone) * 1000:.2f} ms, with outbox {min(with_outbox) * 1000:.2f} ms)", 0))
    return rows


async def latency(storage: SqlStorage, deliveries: int) -> list[float]:
    clock = SystemClock()
    secrets = ReversibleSecretBox()
    log = EventLog(storage=storage, clock=clock)
    service = WebhookService(storage=storage, secrets=secrets, clock=clock,
                             audit=AuditLog(storage=storage, clock=clock), poll_seconds=POLL_SECONDS,
                             sender=HttpWebhookSender(AgentNetworks.parse("127.0.0.0/8", "MANAGEMENT_WEBHOOK_ALLOW")))
    seen: list[float] = []
    with Receiver() as receiver:
        user_id = user_with_webhooks(storage, "latency00000", 0)
        now = clock.now()
        with storage.transaction(write=True) as tx:
            tx.add_webhook(Webhook(id=0, user_id=user_id, url=receiver.url, types=(), agent_ids=None, active=True,
                                   sealed_secret=secrets.seal("whsec_x", context=f"webhook-secret/user:{user_id}"),
                                   created_at=now, updated_at=now))
        stop = asyncio.Event()
        worker = asyncio.create_task(service.run("bench", stop))
        for n in range(deliveries):
            await asyncio.sleep(0.37)  # events at a steady, unaligned pace
            committed = time.perf_counter()
            await asyncio.to_thread(_emit, storage, log, user_id)
            while len(receiver.requests) <= n:
                await asyncio.sleep(0.002)
            seen.append(time.perf_counter() - committed)
        stop.set()
        await worker
    return seen


def _emit(storage: SqlStorage, log: EventLog, user_id: int) -> None:
    with storage.transaction(write=True) as tx:
        log.add(tx, log.new(user_id, 1, "web", "vm.started", "Booted"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--deliveries", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as workdir:
        storage = SqlStorage(sqlite_url(Path(workdir) / "db.sqlite3"))
        storage.upgrade()
        rows = insert_cost(storage, args.events)
        storage.dispose()
        # a database of its own: the outbox rows of A (to an address that never answers) would wait
        # their turn in front of B's
        storage = SqlStorage(sqlite_url(Path(workdir) / "latency.sqlite3"))
        storage.upgrade()
        delays = asyncio.run(latency(storage, args.deliveries))
        storage.dispose()
    for label, value in rows:
        print(f"{label:<60} {value:.2f}" if value else label)
    delays.sort()
    print(f"B. commit → receiver: median {statistics.median(delays) * 1000:.0f} ms, "
          f"p95 {delays[int(len(delays) * 0.95) - 1] * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms "
          f"(idle poll every {POLL_SECONDS:g} s; threads alive: {threading.active_count()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
