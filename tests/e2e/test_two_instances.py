"""Two portal instances (``python main.py``, gunicorn, different ports) on one PostgreSQL database
with the same MANAGEMENT_SECRET_KEY, as behind a load balancer: whatever one instance changes, the
other acts on at its very next request — users, API keys, agents, and the SSH connections it pools —
with each worker's caches on (issue 22: kept until a NOTIFY says another connection committed).

The hypervisors are fake (asyncssh servers on loopback, in a thread of this test) so that which
one an instance really connects to can be counted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import sqlalchemy as sa

from adapters.sealing import generate_key
from adapters.sql import migrations
from adapters.sql.changes import changes_channel, listener_name
from tests.postgres import PostgresServer
from tests.support import REPO, Server

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


class Hypervisors:
    """Fake hypervisors sharing one host key, each answering ``virsh … list --all`` with one VM
    named after it. Counts logins and open connections per port."""

    def __init__(self) -> None:
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.logins: dict[int, int] = {}
        self.open_connections: dict[int, int] = {}
        self._servers: list[Any] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def public_host_key(self) -> str:
        return str(self.host_key.export_public_key("openssh").decode().strip())

    @property
    def private_client_key(self) -> str:
        return str(self.client_key.export_private_key("openssh").decode())

    def start(self, vm: str) -> int:
        return asyncio.run_coroutine_threadsafe(self._listen(vm), self._loop).result(10)

    async def _listen(self, vm: str) -> int:
        fleet = self
        port = 0

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: Any) -> None:
                fleet.open_connections[port] = fleet.open_connections.get(port, 0) + 1

            def connection_lost(self, exc: Exception | None) -> None:
                fleet.open_connections[port] -= 1

            def auth_completed(self) -> None:
                fleet.logins[port] = fleet.logins.get(port, 0) + 1

        def session(process: Any) -> None:
            if "list" in process.command:
                process.stdout.write(f" Id   Name        State\n---------------------------\n -    {vm}   shut off\n\n")
                process.exit(0)
            else:
                process.stderr.write("error: not in this test\n")
                process.exit(1)

        server = await asyncssh.create_server(
            Server, "127.0.0.1", 0, server_host_keys=[self.host_key], process_factory=session,
            authorized_client_keys=asyncssh.import_authorized_keys(
                self.client_key.export_public_key("openssh").decode()))
        port = server.sockets[0].getsockname()[1]
        self._servers.append(server)
        return int(port)

    def stop(self) -> None:
        for server in self._servers:
            self._loop.call_soon_threadsafe(server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)  # polling an outside process's effect, not papering over a race
    return bool(condition())


@pytest.fixture(scope="module")
def database(postgres: PostgresServer) -> Iterator[str]:
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="module")
def instances(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Instance A and instance B, one worker each (so each has exactly one SSH pool)."""
    env = {"MANAGEMENT_DATABASE_URL": database, "MANAGEMENT_SECRET_KEY": generate_key(),
           "MANAGEMENT_SIGNUP": "open", "MANAGEMENT_WORKERS": "1", "MANAGEMENT_SSH_CONNECT_TIMEOUT": "5",
           "MANAGEMENT_SSH_COMMAND_TIMEOUT": "10",
           "MANAGEMENT_AUTH_FAILURE_LIMIT": "1000"}  # the old keys refused on purpose are not an attack
    a = Server(tmp_path_factory.mktemp("instance-a"), **env).start()
    b = Server(tmp_path_factory.mktemp("instance-b"), **env).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def hypervisors() -> Iterator[Hypervisors]:
    fleet = Hypervisors()
    yield fleet
    fleet.stop()


def sign_up(server: Server, name: str) -> str:
    status, body, _ = server.request("POST", "/users", body={"name": name, "email": f"{name}@example.com"})
    assert status == 201, body
    return str(body["api_key"])


def reads(server: Server) -> int:
    """Read transactions the instance has run (its GET /metrics, from loopback)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("playr_portal_database_transaction_duration_seconds_count{")
               and 'kind="read"' in line)


def costs_a_read(server: Server, path: str, key: str) -> bool:
    before = reads(server)
    status, body, _ = server.request("GET", path, key)
    assert status == 200, body
    return reads(server) > before


def until_cached(server: Server, path: str, key: str, timeout: float = 20.0) -> None:
    """Requests until three in a row are answered without reading the database: the worker's cache
    is on, and holds this answer (its listener is up; the first requests read and note the key's use)."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < 3:
        assert time.monotonic() < deadline, f"{path} on :{server.port} kept reading the database"
        in_a_row = 0 if costs_a_read(server, path, key) else in_a_row + 1


def listener_pids(postgres: PostgresServer, database: str) -> list[int]:
    """The listening connections of every worker of both instances (they share the schema)."""
    schema = str(sa.make_url(database).query["options"]).removeprefix("-csearch_path=")
    rows = postgres.sql(database, "SELECT pid FROM pg_stat_activity "
                                  f"WHERE application_name = '{listener_name(changes_channel(schema))}'")
    return sorted(int(str(pid)) for (pid,) in rows)


def test_a_user_created_on_one_instance_authenticates_on_the_other(instances: tuple[Server, Server]) -> None:
    a, b = instances
    key = sign_up(a, "alice")
    status, me, _ = b.request("GET", "/users/me", key)
    assert status == 200 and me["name"] == "alice"
    status, body, _ = b.request("POST", "/users", body={"name": "alice2", "email": "ALICE@example.com"})
    assert (status, body["code"]) == (409, "email_taken")  # the other instance's user is there


def test_a_key_rotated_on_one_instance_fails_on_the_other_at_once(instances: tuple[Server, Server]) -> None:
    a, b = instances
    old = sign_up(a, "bob")
    until_cached(b, "/users/me", old)  # B remembers the key, and the user's agents
    until_cached(b, "/agents", old)
    status, rotated, _ = a.request("POST", "/users/me/api-key/rotate", old)
    assert status == 200
    new = rotated["api_key"]
    status, body, _ = b.request("GET", "/users/me", old)  # the very next request on B
    assert (status, body["code"]) == (401, "invalid_api_key")
    assert b.request("GET", "/agents", old)[0] == 401
    assert a.request("GET", "/users/me", old)[0] == 401
    assert b.request("GET", "/users/me", new)[0] == 200
    assert a.request("GET", "/users/me", new)[0] == 200


def test_every_key_rotated_on_one_instance_is_refused_by_the_other_at_once_with_its_cache_on(
        instances: tuple[Server, Server]) -> None:
    """The race of issue 22, run many times: A commits and answers; B's very next request, made as
    soon as A has answered, must not be served from B's cache, whether or not B's listener thread has
    read the notification yet."""
    a, b = instances
    key = sign_up(a, "bert")
    for _ in range(25):
        until_cached(b, "/users/me", key)
        status, rotated, _ = a.request("POST", "/users/me/api-key/rotate", key)
        assert status == 200
        status, body, _ = b.request("GET", "/users/me", key)
        assert (status, body["code"]) == (401, "invalid_api_key")
        key = rotated["api_key"]


def test_caches_are_on_with_postgresql_and_off_while_the_listening_connection_is_lost(
        instances: tuple[Server, Server], postgres: PostgresServer, database: str) -> None:
    a, b = instances
    key = sign_up(a, "erin")
    until_cached(b, "/users/me", key)  # on: repeated requests read nothing
    assert not costs_a_read(b, "/users/me", key)
    lost = listener_pids(postgres, database)
    assert len(lost) == 2  # one per worker: A's and B's
    postgres.sql(database, f"SELECT pg_terminate_backend(pid) FROM unnest(ARRAY{lost}) AS pid")
    deadline = time.monotonic() + 10
    while not costs_a_read(b, "/users/me", key):  # off: every request reads, until it listens again
        assert time.monotonic() < deadline, "B kept answering from its cache without its listener"
    until_cached(b, "/users/me", key)  # back on, on a new listening connection
    assert set(listener_pids(postgres, database)).isdisjoint(lost)
    assert "database_listener_lost" in b.log.read_text()


def test_an_agent_changed_on_one_instance_is_used_with_its_new_settings_by_the_other(
        instances: tuple[Server, Server], hypervisors: Hypervisors) -> None:
    a, b = instances
    first, second = hypervisors.start("vm-on-first"), hypervisors.start("vm-on-second")
    key = sign_up(a, "carol")
    status, agent, _ = a.request("POST", "/agents", key, body={
        "name": "hv", "hostname": "127.0.0.1", "port": first, "username": "qemu",
        "private_key": hypervisors.private_client_key, "host_key": hypervisors.public_host_key})
    assert status == 201, agent
    vms = f"/agents/{agent['id']}/vms"

    for _ in range(2):  # B connects once and keeps the connection in its pool
        status, listed, _ = b.request("GET", vms, key)
        assert status == 200, listed
        assert [vm["name"] for vm in listed] == ["vm-on-first"]
    assert hypervisors.logins == {first: 1}

    status, changed, _ = a.request("PATCH", f"/agents/{agent['id']}", key, body={"port": second})
    assert status == 200 and changed["port"] == second

    status, seen, _ = b.request("GET", f"/agents/{agent['id']}", key)
    assert status == 200 and seen["port"] == second
    status, listed, _ = b.request("GET", vms, key)  # B's next use: the new port, not its pooled connection
    assert status == 200, listed
    assert [vm["name"] for vm in listed] == ["vm-on-second"]
    assert hypervisors.logins == {first: 1, second: 1}
    assert wait_for(lambda: hypervisors.open_connections[first] == 0)  # B retired the old connection

    assert a.request("DELETE", f"/agents/{agent['id']}", key)[0] == 204
    status, body, _ = b.request("GET", vms, key)
    assert (status, body["code"]) == (404, "agent_not_found")
    assert hypervisors.logins == {first: 1, second: 1}


def test_two_instances_migrating_one_fresh_database_at_once_both_start(
        postgres: PostgresServer, postgres_url: str, tmp_path: Path) -> None:
    env = {"MANAGEMENT_DATABASE_URL": postgres_url, "MANAGEMENT_SECRET_KEY": generate_key(),
           "MANAGEMENT_WORKERS": "2"}
    pair = [Server(tmp_path / name, **env) for name in ("a", "b")]
    for server in pair:
        server.workdir.mkdir()
    try:
        with ThreadPoolExecutor(2) as pool:  # master and workers of both: six migrators at once
            list(pool.map(Server.start, pair))
        assert postgres.sql(postgres_url, "SELECT version FROM schema_version") == [(migrations.LATEST,)]
        key = sign_up(pair[0], "dave")
        assert pair[1].request("GET", "/users/me", key)[0] == 200
    finally:
        for server in pair:
            server.stop()


def test_a_database_that_cannot_be_reached_stops_start_up_cleanly(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.url.set(password="wrong-password-here").render_as_string(hide_password=False)
    result = subprocess.run([sys.executable, str(REPO / "main.py")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "MANAGEMENT_DATABASE_URL": url}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: MANAGEMENT_DATABASE_URL: cannot open the database "
                                    "postgresql+psycopg://playr:***@")
    assert "password authentication failed" in result.stderr
    assert "Traceback" not in result.stderr and "wrong-password-here" not in result.stderr


class _Forwarder:
    """A TCP forwarder from a loopback port to the PostgreSQL server, started on demand: the
    database server "comes up" while the portal is waiting for it."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", port))
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: Any, sink: Any) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(2)

    def close(self) -> None:
        self.listener.close()


def test_an_unreachable_database_server_is_waited_for_then_exit_1(postgres: PostgresServer, tmp_path: Path) -> None:
    from tests.support import free_port

    url = postgres.url.set(port=free_port()).render_as_string(hide_password=False)
    result = subprocess.run([sys.executable, str(REPO / "main.py")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "MANAGEMENT_DATABASE_URL": url, "MANAGEMENT_DB_CONNECT_WAIT": "1.5"},
                            timeout=60)
    assert result.returncode == 1, result.stderr  # a service manager restarts it (exit 2 means "fix the config")
    *waiting, last = result.stderr.strip().splitlines()
    assert last.startswith("error: database_unavailable: cannot open the database postgresql+psycopg://")
    assert "refused" in last and last.endswith("(waited 1.5 s, MANAGEMENT_DB_CONNECT_WAIT)")
    assert waiting and all("database_not_reachable_yet" in line for line in waiting)  # it retried, and said so
    assert "Traceback" not in result.stderr and str(postgres.url.password) not in result.stderr


def test_a_database_server_that_comes_up_during_the_start_up_wait_is_used(postgres: PostgresServer,
                                                                          tmp_path: Path) -> None:
    from tests.support import free_port

    port = free_port()
    database = postgres.create_database()
    url = sa.make_url(database).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    server = Server(tmp_path, MANAGEMENT_DATABASE_URL=url, MANAGEMENT_DB_CONNECT_WAIT="60",
                    MANAGEMENT_SECRET_KEY=generate_key(), MANAGEMENT_SIGNUP="open")
    log = tmp_path / "starting.log"
    server.process = subprocess.Popen([sys.executable, str(REPO / "main.py")], cwd=tmp_path, env=server.env,
                                      stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    forwarder = None
    try:
        deadline = time.monotonic() + 30
        while "database_not_reachable_yet" not in log.read_text():  # it tried, and is waiting
            assert server.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        forwarder = _Forwarder(port, (str(postgres.url.host), int(postgres.url.port or 5432)))
        deadline = time.monotonic() + 30
        while True:
            try:
                if server.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert server.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        status, user, _ = server.request("POST", "/users", body={"name": "after-the-wait"})
        assert status == 201, user
        assert postgres.sql(database, "SELECT name FROM users") == [("after-the-wait",)]
    finally:
        server.stop()
        if forwarder is not None:
            forwarder.close()
        postgres.drop_database(database)
