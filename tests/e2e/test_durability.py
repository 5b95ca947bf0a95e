"""Nothing accepted is ever lost: writes wait for a database locked by an outside process instead
of failing, and a server killed with SIGKILL in the middle of a burst of writes comes back with an
intact database holding every write it had answered with a 2xx."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncssh
import pytest

from tests.support import Server

pytestmark = pytest.mark.e2e
PRIVATE_KEY = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh").decode()


# Another process takes SQLite's write lock and holds it for a second (that is the scenario).
_HOLD_THE_LOCK = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(1.0)
connection.execute("COMMIT")
print("released", flush=True)
"""


def agent_body(name: str) -> dict[str, object]:
    return {"name": name, "hostname": "192.0.2.10", "username": "qemu", "private_key": PRIVATE_KEY}


def test_writes_wait_for_an_outside_writer_holding_the_lock_and_none_fails(tmp_path: Path) -> None:
    server = Server(tmp_path, MANAGEMENT_WORKERS="2", MANAGEMENT_DB_BUSY_TIMEOUT="10").start()
    try:
        key = server.request("POST", "/users", body={"name": "alice"})[1]["api_key"]
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_THE_LOCK, str(tmp_path / "data" / "management.sqlite3")],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(lambda n: server.request("POST", "/agents", key, agent_body(f"hv{n}"))[0],
                                    range(6)))
        assert holder.wait(timeout=10) == 0
        assert holder.stdout.read().strip() == "released"  # the lock was held while the requests came in
        assert results == [201] * 6
        assert len(server.request("GET", "/agents", key)[1]) == 6
    finally:
        server.stop()


def test_sigkill_during_a_burst_of_writes_loses_nothing_that_was_answered(tmp_path: Path) -> None:
    server = Server(tmp_path, MANAGEMENT_WORKERS="2").start()
    key = server.request("POST", "/users", body={"name": "alice"})[1]["api_key"]
    answered: list[str] = []
    stop = threading.Event()

    def writer(worker: int) -> None:
        n = 0
        while not stop.is_set():
            name = f"w{worker}-{n}"
            n += 1
            try:
                status, _, _ = server.request("POST", "/agents", key, agent_body(name))
            except OSError:
                return  # the server died under us: this write was never answered
            if status == 201:
                answered.append(name)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(answered) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.process is not None
    victims = [server.process.pid, *server.worker_pids()]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # no shutdown, no flush: the power-cut of a process
    server.process.wait(timeout=10)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(answered) >= 40

    database = tmp_path / "data" / "management.sqlite3"
    check = sqlite3.connect(database)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()
    server.start()
    try:
        stored = {agent["name"] for agent in server.request("GET", "/agents", key)[1]}
        assert set(answered) <= stored
    finally:
        server.stop()
