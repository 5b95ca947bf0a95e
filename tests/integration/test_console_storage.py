"""Console tickets in SQL storage (issue 17), on SQLite and PostgreSQL: redeemed once (also by two
connections at once), never after expiry, open consoles counted per user until closed."""

from __future__ import annotations

import threading
from datetime import timedelta

from adapters.sql.storage import SqlStorage
from core.model import ConsoleKind, ConsoleTicket
from tests.integration.test_sql_storage import NOW, key


def new_ticket(user_id: int, digest: str) -> ConsoleTicket:
    return ConsoleTicket(id=0, user_id=user_id, agent_id=7, vm="web 1", kind=ConsoleKind.VNC, digest=digest,
                         created_at=NOW, expires_at=NOW + timedelta(seconds=30))


def test_a_ticket_is_redeemed_once_and_never_after_it_expired(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        tx.add_console_ticket(new_ticket(user.id, "hmac-sha256:a"))
        tx.add_console_ticket(new_ticket(user.id, "hmac-sha256:b"))
    with storage.transaction(write=True) as tx:
        redeemed = tx.redeem_console_ticket("hmac-sha256:a", NOW + timedelta(seconds=1))
        assert redeemed is not None and (redeemed.vm, redeemed.kind, redeemed.agent_id) == ("web 1", ConsoleKind.VNC, 7)
        assert tx.redeem_console_ticket("hmac-sha256:a", NOW + timedelta(seconds=2)) is None
        assert tx.redeem_console_ticket("hmac-sha256:b", NOW + timedelta(seconds=30)) is None
        assert tx.redeem_console_ticket("hmac-sha256:unknown", NOW) is None
        assert tx.count_open_consoles(user.id, NOW - timedelta(hours=9)) == 1
        tx.close_console(redeemed.id, NOW + timedelta(seconds=5))
        assert tx.count_open_consoles(user.id, NOW - timedelta(hours=9)) == 0


def test_two_workers_redeeming_one_ticket_at_once_open_one_console(storage: SqlStorage) -> None:
    with storage.transaction(write=True) as tx:
        user = tx.add_user("alice", None, key(1), NOW)
        tx.add_console_ticket(new_ticket(user.id, "hmac-sha256:race"))
    start = threading.Barrier(4)
    won: list[bool] = []

    def redeem() -> None:
        start.wait()
        with storage.transaction(write=True) as tx:
            won.append(tx.redeem_console_ticket("hmac-sha256:race", NOW + timedelta(seconds=1)) is not None)

    threads = [threading.Thread(target=redeem) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(won) == [False, False, False, True]
