"""The metrics of the real server (issue 21): gunicorn with uvicorn workers, SQLite, asyncssh to an
in-process fleet of fake hypervisors on loopback.

- counters of every worker are summed (multi-process mode), whichever worker answers the scrape,
  and a worker that exits leaves its counters in the sum and its live gauges out;
- a hundred concurrent scrapes of ``/metrics/vms`` cause one ``domstats`` per host;
- an agent whose port nobody listens on is ``playr_agent_up 0`` in a successful scrape."""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet_hypervisor import FleetHypervisor
from tests.support import Server, free_port

pytestmark = pytest.mark.e2e


def fetch(server: Server, path: str, key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> list[Any]:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(text) if s.name == name and all(s.labels.get(k) == v
                                                                          for k, v in labels.items()))


def health_count(server: Server) -> float:
    status, text = fetch(server, "/metrics")
    assert status == 200, text
    return value(text, "playr_portal_http_requests_total", route="/health", method="GET", status="200")


def wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)  # polling a condition with a bound, not waiting out a race


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    workdir = tmp_path_factory.mktemp("metrics-two-workers")
    metrics_dir = workdir / "metrics"
    server = Server(workdir, MANAGEMENT_WORKERS="2", MANAGEMENT_METRICS_DIR=str(metrics_dir)).start()
    yield server, metrics_dir
    server.stop()


def test_counters_of_both_workers_are_summed_whichever_answers(two_workers: tuple[Server, Path]) -> None:
    server, metrics_dir = two_workers
    workers = server.worker_pids()
    assert len(workers) == 2
    before = health_count(server)

    def ping(_: int) -> int:
        return server.request("GET", "/health")[0]

    served: set[int] = set()
    total = 0
    for _ in range(10):  # rounds of concurrent new connections until both workers have served some
        with ThreadPoolExecutor(max_workers=16) as pool:
            assert set(pool.map(ping, range(40))) == {200}
        total += 40
        served = {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")}
        if set(workers) <= served:
            break
    assert set(workers) <= served, "both workers should have served requests"
    for _ in range(6):  # each scrape may be answered by either worker: all see the sum
        assert health_count(server) - before == total


def test_a_worker_that_exits_keeps_its_counters_and_drops_its_live_gauges(two_workers: tuple[Server, Path]) -> None:
    server, metrics_dir = two_workers
    counted = health_count(server)
    victim = server.worker_pids()[0]
    assert (metrics_dir / f"gauge_livesum_{victim}.db").exists()
    os.kill(victim, signal.SIGTERM)
    wait_for(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2)
    wait_for(lambda: not (metrics_dir / f"gauge_livesum_{victim}.db").exists())
    assert health_count(server) == counted


@pytest.fixture(scope="module")
def fleet() -> Iterator[FleetHypervisor]:
    hypervisor = FleetHypervisor(vms=10).start()
    yield hypervisor
    hypervisor.stop()


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("metrics-one-worker"), MANAGEMENT_WORKERS="1",
                    MANAGEMENT_SIGNUP="open", MANAGEMENT_METRICS_MIN_INTERVAL="60",
                    MANAGEMENT_SSH_CONNECT_TIMEOUT="3").start()
    yield server
    server.stop()


def register(server: Server, key: str, fleet: FleetHypervisor, name: str, port: int | None = None) -> dict[str, Any]:
    body = {"name": name, "hostname": "127.0.0.1", "port": port or fleet.port, "username": name,
            "private_key": fleet.private_key, "host_key": fleet.host_key_line}
    status, agent, _ = server.request("POST", "/agents", key, body)
    assert status == 201, agent
    return dict(agent)


def test_a_hundred_scrapes_at_once_ask_each_host_once(one_worker: Server, fleet: FleetHypervisor) -> None:
    status, user, _ = one_worker.request("POST", "/users", body={"name": "scraper"})
    assert status == 201, user
    key = user["api_key"]
    hosts = [register(one_worker, key, fleet, f"burst-{i}") for i in range(3)]

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: fetch(one_worker, "/metrics/vms", key), range(100)))

    assert {status for status, _ in answers} == {200}
    assert [fleet.count(host["name"], "domstats") for host in hosts] == [1, 1, 1]
    first = {(s.name, s.labels.get("agent_id")): s.value for s in samples(answers[0][1])}
    for host in hosts:
        assert first[("playr_agent_up", str(host["id"]))] == 1
        assert first[("playr_agent_vms", str(host["id"]))] == 10
    # every answer carries the same sample (only its age moves): compare the lines about VMs
    vm_lines = {tuple(line for line in text.splitlines() if line.startswith("playr_vm_")) for _, text in answers}
    assert len(vm_lines) == 1
    portal = fetch(one_worker, "/metrics")[1]
    assert value(portal, "playr_portal_ssh_command_duration_seconds_count", subcommand="domstats",
                 outcome="ok") == 3
    assert value(portal, "playr_portal_ssh_connects_total", outcome="ok") == 3
    assert value(portal, "playr_portal_ssh_connections_open") == 3
    assert value(portal, "playr_portal_fleet_host_samples_total", outcome="ok") == 3


def test_an_agent_nobody_listens_for_is_up_zero_in_a_successful_scrape(one_worker: Server,
                                                                       fleet: FleetHypervisor) -> None:
    status, user, _ = one_worker.request("POST", "/users", body={"name": "half-dead"})
    key = user["api_key"]
    alive = register(one_worker, key, fleet, "alive")
    dead = register(one_worker, key, fleet, "dead", port=free_port())
    status, text = fetch(one_worker, "/metrics/vms", key)
    assert status == 200, text
    assert value(text, "playr_agent_up", agent_id=str(dead["id"])) == 0
    assert value(text, "playr_agent_error", agent_id=str(dead["id"]), code="agent_unreachable") == 1
    assert not [s for s in samples(text) if s.name.startswith("playr_vm_") and s.labels["agent_id"] == str(dead["id"])]
    assert value(text, "playr_agent_up", agent_id=str(alive["id"])) == 1
    portal = fetch(one_worker, "/metrics")[1]
    assert value(portal, "playr_portal_ssh_connects_total", outcome="agent_unreachable") >= 1
