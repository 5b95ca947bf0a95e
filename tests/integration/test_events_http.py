"""Events through every door on SQLite (issue 18): GET /events with its filters and 422s, the
stream's format and resumption with Last-Event-ID (falcon's ASGI test client), the library's
iterator and the CLI's ``events list``/``events tail``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.live import Event
from entrypoints.library import connect
from entrypoints.settings import Settings
from tests.support import TEST_AGENT_NETWORKS

REPO = Path(__file__).resolve().parents[2]


def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3"),
                              "MANAGEMENT_AGENT_NETWORKS": TEST_AGENT_NETWORKS, "MANAGEMENT_WATCHERS": "false"})


def seed(tmp_path: Path) -> tuple[str, int, list[int]]:
    """A user with three events (two VMs, two types); its key, id and the event ids."""
    with connect(settings=settings(tmp_path)) as library:
        created = library.create_user("alice")
        log = library.portal.events
        user_id = created.user.id
        ids = []
        with library.portal.audit.storage.transaction(write=True) as tx:
            for vm, kind in (("web", "vm.started"), ("db", "vm.started"), ("web", "vm.stopped")):
                ids.append(log.add(tx, log.new(user_id, 7, vm, kind, "Booted")).id)
        return created.api_key, user_id, ids


def test_the_library_iterator_follows_events_after_an_id_filtered(tmp_path: Path) -> None:
    key, _, ids = seed(tmp_path)
    with connect(settings=settings(tmp_path)) as library:
        me = library.login(key)
        follow = me.follow_events(after=0, vm="web")
        first, second = next(follow), next(follow)
        assert isinstance(first, Event) and [first.id, second.id] == [ids[0], ids[2]]
        assert [e.type for e in me.list_events(after=ids[0])] == ["vm.started", "vm.stopped"]
        with pytest.raises(Exception, match="type"):
            next(me.follow_events(types=["nonsense"]))


def cli(tmp_path: Path, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3"),
                   "MANAGEMENT_AGENT_NETWORKS": TEST_AGENT_NETWORKS, "PYTHONPATH": str(REPO),
                   "MANAGEMENT_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=tmp_path, timeout=60)


def test_cli_events_list_filters_and_prints_json(tmp_path: Path) -> None:
    key, _, ids = seed(tmp_path)
    listed = cli(tmp_path, key, "events", "list", "--type", "vm.stopped", "--json")
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert [e["id"] for e in page["events"]] == [ids[2]] and page["last_id"] == ids[2]
    refused = cli(tmp_path, key, "events", "list", "--vm", "a;b")
    assert refused.returncode != 0 and "vm" in refused.stderr


def test_cli_events_tail_prints_events_as_they_come(tmp_path: Path) -> None:
    key, _, ids = seed(tmp_path)
    environment = {**os.environ, "MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3"),
                   "PYTHONPATH": str(REPO), "MANAGEMENT_API_KEY": key, "MANAGEMENT_AGENT_NETWORKS": TEST_AGENT_NETWORKS}
    tail = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "events", "tail", "--after", "0"],
                            stdout=subprocess.PIPE, text=True, env=environment, cwd=tmp_path)
    try:
        assert tail.stdout is not None
        lines = [tail.stdout.readline() for _ in ids]
        assert [int(line.split()[0]) for line in lines] == ids
    finally:
        tail.kill()
        tail.wait(timeout=10)


def test_the_stream_resumes_after_last_event_id_and_a_user_sees_only_their_events(tmp_path: Path) -> None:
    import httpx

    from tests.support import Server

    key, _, ids = seed(tmp_path)
    with connect(settings=settings(tmp_path)) as library:
        other = library.create_user("bob").api_key
    server = Server(tmp_path, MANAGEMENT_DB_PATH=str(tmp_path / "data" / "management.sqlite3"),
                    MANAGEMENT_WATCHERS="false").start()
    try:
        url = f"http://127.0.0.1:{server.port}/events/stream"

        def read(api_key: str, headers: dict[str, str], count: int) -> tuple[str, list[str]]:
            found: list[str] = []
            with httpx.stream("GET", url, headers={"Authorization": f"Bearer {api_key}", **headers},
                              timeout=httpx.Timeout(10)) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("id: "):
                        found.append(line[4:])
                    if len(found) == count:
                        break
                return response.headers["content-type"], found

        content_type, resumed = read(key, {"Last-Event-ID": str(ids[0])}, 2)
        assert content_type.startswith("text/event-stream") and resumed == [str(ids[1]), str(ids[2])]
        status, problem, _ = server.request("GET", "/events/stream?type=Started", key)
        assert status == 422, problem
        status, page, _ = server.request("GET", "/events?after=0", other)
        assert status == 200 and page["events"] == []
    finally:
        server.stop()


@pytest.mark.postgres
def test_on_postgresql_a_commit_of_events_wakes_the_listeners_of_every_instance(postgres_url: str,
                                                                               tmp_path: Path) -> None:
    import threading
    from datetime import UTC, datetime

    from adapters.memory import CountingKeyHasher
    from adapters.sql.storage import SqlStorage, sqlite_url

    listening, writing = SqlStorage(postgres_url), SqlStorage(postgres_url)
    stop, woken = threading.Event(), threading.Event()
    try:
        listening.upgrade()
        assert listening.listen_events(woken.set, stop) is True
        with writing.transaction(write=True) as tx:
            user = tx.add_user("alice", None, CountingKeyHasher().issue(), datetime.now(UTC))
        for _ in range(100):  # the listener connects in its thread: commit until one wakes it (bounded)
            with writing.transaction(write=True) as tx:
                tx.add_event(Event(id=0, user_id=user.id, at=datetime.now(UTC), agent_id=None, vm=None,
                                   type="agent.watching", detail=""))
            if woken.wait(0.1):
                break
        assert woken.is_set()
        sqlite = SqlStorage(sqlite_url(tmp_path / "db.sqlite3"))
        assert sqlite.listen_events(woken.set, stop) is False  # SQLite has no such signal: streams poll
        sqlite.dispose()
    finally:
        stop.set()
        listening.dispose()
        writing.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_sql_leases_give_each_agent_one_holder_until_it_expires_and_cascade_with_the_agent(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from datetime import UTC, datetime, timedelta

    import attrs

    from adapters.memory import CountingKeyHasher
    from adapters.sql.storage import SqlStorage, sqlite_url
    from core.live import MirroredVm
    from tests.unit.world import make_caller, make_world, register

    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else sqlite_url(tmp_path / "db.sqlite3")
    storage = SqlStorage(url)
    try:
        storage.upgrade()
        world = make_world()  # an agent value made by the use cases, stored below
        agent = register(world, make_caller(world, "alice"))
        now = datetime.now(UTC)
        with storage.transaction(write=True) as tx:
            user = tx.add_user("alice", None, CountingKeyHasher().issue(), now)
            stored = tx.add_agent(attrs.evolve(agent, id=0, owner_id=user.id))
            assert tx.watched_agents(now) == []  # registered, not in use
            tx.want_watch([stored.id], now + timedelta(seconds=600))
            assert [a.id for a in tx.watched_agents(now)] == [stored.id]
            later = now + timedelta(seconds=7)
            assert tx.claim_watches("a", [stored.id], now, now + timedelta(seconds=6), []) == [stored.id]
            assert tx.claim_watches("b", [stored.id], now, now + timedelta(seconds=6), []) == []
            assert tx.set_watch_connected("a", stored.id, True, now) and not tx.set_watch_connected("b", stored.id,
                                                                                                    True, now)
            tx.replace_mirror(stored.id, [MirroredVm("web", "running", 3)], now)
            assert tx.claim_watches("b", [stored.id], later, later + timedelta(seconds=6), []) == [stored.id]
            status = tx.watch_status(stored.id)
            assert status is not None and status.holder == "b" and not status.connected
            tx.delete_agent(user.id, stored.id)
            assert tx.watch_status(stored.id) is None and tx.mirrored_vms(stored.id) == []
    finally:
        storage.dispose()
