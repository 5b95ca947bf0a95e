"""Issue 21: ``GET /metrics/vms`` for a fleet of fake hypervisors, and what a scrape costs others.

A fleet of ``--agents`` hosts with ``--vms`` VMs each (``tests/fleet_hypervisor.py``: one asyncssh
server in this process on 127.0.0.1, each agent logging in as its own user so its commands are
counted) is registered with a portal (``main.py``, gunicorn, ``--workers`` workers, fresh SQLite,
``MANAGEMENT_METRICS_MIN_INTERVAL=--interval``). Figures:

- the first scrape (connections opened, host facts asked), a refresh (the interval has passed:
  one ``domstats`` per host over pooled connections) and a scrape inside the interval (the sample
  shared), each with its time and the host commands it caused;
- ``GET /users/me`` latency alone, and while a refreshing scrape runs (the requests that start
  while one is in flight), as a ratio.

    .venv/bin/python bench/fleet_metrics.py [--agents 20] [--vms 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.support import REPO, HttpConnection, Portal, median
from tests.fleet_hypervisor import FleetHypervisor


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commands(fleet: FleetHypervisor) -> dict[str, int]:
    return {sub: fleet.count(None, sub) for sub in ("domstats", "nodeinfo", "version")}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in after}


async def timed(conn: HttpConnection, path: str) -> tuple[float, int, int]:
    started = time.perf_counter()
    response = await conn.request("GET", path)
    return time.perf_counter() - started, response.status, len(response.body)


async def measure(portal: Portal, fleet: FleetHypervisor, agents: int, interval: float) -> dict[str, Any]:
    setup = HttpConnection(portal.port)
    user = (await setup.request("POST", "/users", {"name": "bench"})).json()
    key = user["api_key"]
    admin = HttpConnection(portal.port, key)
    for index in range(agents):
        body = {"name": f"hv{index:03d}", "hostname": "127.0.0.1", "port": fleet.port, "username": f"hv{index:03d}",
                "private_key": fleet.private_key, "host_key": fleet.host_key_line}
        response = await admin.request("POST", "/agents", body)
        assert response.status == 201, response.body
    scraper = HttpConnection(portal.port, key)
    results: dict[str, Any] = {}

    before = commands(fleet)
    seconds, status, size = await timed(scraper, "/metrics/vms")
    assert status == 200
    results["first_scrape"] = {"seconds": round(seconds, 4), "commands": delta(commands(fleet), before),
                               "bytes": size}

    worker = portal.worker_pids()[0]
    refreshes, cpu = [], []
    before = commands(fleet)
    for _ in range(5):
        await asyncio.sleep(interval * 1.1)
        used = cpu_seconds(worker)
        seconds, status, _ = await timed(scraper, "/metrics/vms")
        cpu.append(cpu_seconds(worker) - used)
        assert status == 200
        refreshes.append(seconds)
    results["refresh_scrape"] = {"median_seconds": round(median(refreshes), 4),
                                 "worker_cpu_seconds_median": round(median(cpu), 4),
                                 "commands_per_scrape": {k: v / 5 for k, v in delta(commands(fleet), before).items()}}

    await asyncio.sleep(interval * 1.1)
    fresh_until = time.monotonic() + interval * 0.8  # the sample taken now serves until the interval ends
    await timed(scraper, "/metrics/vms")
    before = commands(fleet)
    used = cpu_seconds(worker)
    cached = []
    while time.monotonic() < fresh_until:
        cached.append((await timed(scraper, "/metrics/vms"))[0])
    results["cached_scrape"] = {"median_seconds": round(median(cached), 5), "scrapes": len(cached),
                                "worker_cpu_seconds_each": round((cpu_seconds(worker) - used) / len(cached), 5),
                                "commands": delta(commands(fleet), before)}

    me = HttpConnection(portal.port, key)
    for _ in range(50):
        await timed(me, "/users/me")  # warm
    alone = [(await timed(me, "/users/me"))[0] for _ in range(400)]

    during: list[float] = []
    scraping = asyncio.Event()
    done = asyncio.Event()

    async def scrape_loop() -> None:
        for _ in range(8):
            await asyncio.sleep(interval * 1.1)  # past the interval: this scrape asks every host
            scraping.set()
            await timed(scraper, "/metrics/vms")
            scraping.clear()
        done.set()

    between: list[float] = []

    async def me_loop() -> None:
        while not done.is_set():  # back to back; each request classed by whether a scrape ran throughout
            started_during = scraping.is_set()
            seconds, _, _ = await timed(me, "/users/me")
            if started_during and scraping.is_set():
                during.append(seconds)
            elif not started_during and not scraping.is_set():
                between.append(seconds)

    await asyncio.gather(scrape_loop(), me_loop())
    results["users_me"] = {
        "alone_median_ms": round(median(alone) * 1000, 3), "alone_p95_ms": round(percentile(alone, 0.95) * 1000, 3),
        "during_scrape_median_ms": round(median(during) * 1000, 3) if during else None,
        "during_scrape_p95_ms": round(percentile(during, 0.95) * 1000, 3) if during else None,
        "during_samples": len(during),
        "between_scrapes_median_ms": round(median(between) * 1000, 3) if between else None,
        "median_ratio": round(median(during) / median(alone), 3) if during else None,
    }
    for conn in (setup, admin, scraper, me):
        await conn.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--interval", type=float, default=2.0, help="MANAGEMENT_METRICS_MIN_INTERVAL of the run")
    parser.add_argument("--cipher", action="append", default=[],
                        help="SSH encryption algorithm the fake hosts offer (repeatable; default: asyncssh's list)")
    args = parser.parse_args()
    fleet = FleetHypervisor(vms=args.vms, ciphers=tuple(args.cipher)).start()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-metrics-") as workdir:
        portal = Portal(args.repo.resolve(), Path(workdir), workers=args.workers,
                        MANAGEMENT_METRICS_MIN_INTERVAL=str(args.interval)).start()
        try:
            results = asyncio.run(measure(portal, fleet, args.agents, args.interval))
        finally:
            portal.stop()
            fleet.stop()
    print(json.dumps({"agents": args.agents, "vms_per_agent": args.vms, "workers": args.workers,
                      "interval_seconds": args.interval, "ciphers": args.cipher or "default", **results}, indent=2))


if __name__ == "__main__":
    main()
