"""Cost curves of the fleet view (issue 22): for N simulated agents (tests/simulator.py), what one
portal worker pays for ``GET /vms`` cold (no pooled connection) and warm, with 10 % of the hosts
silent (they accept TCP and never answer), in memory, file descriptors, SSH connections and host
commands.

    .venv/bin/python bench/fleet.py                 # N = 10, 100, 500, 1000; a few minutes
    .venv/bin/python bench/fleet.py --sizes 10,100  # fewer
    .venv/bin/python bench/run.py --figures 9       # the same, as figure 9 of the suite

For each N it starts a fresh portal (``main.py``: gunicorn, one uvicorn worker, so one pool
serves every request; SQLite in a temporary directory), and a simulated fleet of N live hosts plus
N/10 silent ones in this process. User A registers the N live hosts; user B registers 90 % of
them (as agents of its own: connections of its own) plus the silent ones. Then, one after the
other: A's fleet view cold, A's warm (median of ``--warm`` views), B's first view (its live hosts
cold, its silent hosts each costing a connect time-out), B's next views (warm). Every view must
answer 200 with one entry per agent; A's must have no error, B's exactly the silent ones.
Nothing is sent anywhere but 127.0.0.1. These host-path curves run with watchers off
(``MANAGEMENT_WATCHERS=false``): every view asks every host.

The mirror curves (``--mirror-sizes``, figure 9d to 9f) start another portal per N with watchers on
(issue 18: one ``virsh event`` stream per agent, answered by the simulator) and N live hosts of
user A: A's first view (from the hosts; it marks the agents in use), then views until every row
comes from the live mirror (the watchers are up), then A's warm views from the mirror (median of
``--warm``): time, host commands per view (0 expected), the worker's RSS and descriptors with N
watchers, and its CPU time per agent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import REPO, HttpConnection, Portal, call, log, median, proc_status_kib

from tests.simulator import SimulatedFleet, SimulatedHost, raise_fd_limit

CONNECT_TIMEOUT = 2.0  # MANAGEMENT_SSH_CONNECT_TIMEOUT of the measured portals
LATENCY = 0.02  # seconds each simulated virsh takes, about what `virsh list` takes on the lab


@dataclass
class MirrorPoint:
    agents: int
    cold_s: float  # A's first view, from the hosts
    watchers_up_s: float  # from the start of that view until every row of a view came from the mirror
    warm_s: float  # median of the warm views from the mirror
    warm_min_s: float  # the fastest of them (the least disturbed by the machine's other load)
    commands_per_view: float  # host commands one warm view sent (0: all from the mirror)
    rss_start_mib: float
    rss_warm_mib: float  # with N watchers up, after the warm views
    kib_per_agent: float  # (RSS warm - RSS start) / N: a pooled connection + a watcher (task, channel, stream)
    fds_start: int
    fds_warm: int
    ssh_connections: int
    event_streams: int  # `virsh event` streams open on the simulated hosts
    cpu_ms_per_agent: float


@dataclass
class Point:
    agents: int
    cold_s: float
    warm_s: float
    silent_first_s: float
    silent_warm_s: float
    silent_agents: int
    rss_start_mib: float
    rss_warm_mib: float
    kib_per_connection: float
    fds_start: int
    fds_warm: int
    ssh_connections: int  # open from the worker once A's and B's views ran
    connections_opened_warm: int  # during A's warm views (0: all reused)
    commands_per_view: float  # host commands one warm view of A sent
    cpu_ms_per_agent: float  # the worker's CPU time (user + system) per agent in a warm view


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def register_all(port: int, key: str, fleet: SimulatedFleet, hosts: list[SimulatedHost], prefix: str) -> None:
    gate = asyncio.Semaphore(8)

    async def one(host: SimulatedHost) -> None:
        body = {"name": f"{prefix}-{host.index}", "hostname": "127.0.0.1", "port": host.port,
                "username": fleet.username, "private_key": fleet.client_private_key}
        if host.host_key:
            body["host_key"] = host.host_key
        else:  # a silent host shows no key: trust on first use (it never gets that far)
            body["allow_unknown_hosts"] = True
        async with gate:
            await call(port, "POST", "/agents", key, body, expect=201)

    await asyncio.gather(*(one(h) for h in hosts))


async def fleet_view(conn: HttpConnection, agents: int, failing: int) -> float:
    started = time.perf_counter()
    response = await conn.request("GET", "/vms")
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"GET /vms: {response.status} {response.body[:300]!r}")
    entries = response.json()
    errors = [e for e in entries if e["error"] is not None]
    if len(entries) != agents or len(errors) != failing:
        codes = sorted({e["error"]["code"] for e in errors})
        raise RuntimeError(f"GET /vms: {len(entries)} entries ({agents} expected), {len(errors)} errors "
                           f"({failing} expected): {codes}")
    return elapsed


async def measure_point(repo: Path, workdir: Path, agents: int, warm_views: int, env: dict[str, str]) -> Point:
    silent = max(1, agents // 10)
    fleet = await SimulatedFleet(agents + silent, silent=silent, latency=LATENCY).start()
    portal = Portal(repo, workdir / f"n{agents}", workers=1, MANAGEMENT_SSH_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT),
                    MANAGEMENT_MAX_AGENTS_PER_USER="5000", **{"MANAGEMENT_WATCHERS": "false", **env})
    try:
        await asyncio.to_thread(portal.start)
        pid = portal.worker_pids()[0]
        a = (await call(portal.port, "POST", "/users", body={"name": "fleet-a"}, expect=201)).json()["api_key"]
        b = (await call(portal.port, "POST", "/users", body={"name": "fleet-b"}, expect=201)).json()["api_key"]
        live, quiet = fleet.live, [h for h in fleet.hosts if h.silent]
        await register_all(portal.port, a, fleet, live, "a")
        b_live = live[: agents - silent]
        await register_all(portal.port, b, fleet, b_live + quiet, "b")
        conn_a = await HttpConnection(portal.port, a).connect()
        conn_b = await HttpConnection(portal.port, b).connect()
        await conn_a.request("GET", "/users/me")
        await conn_b.request("GET", "/users/me")
        rss_start, fds_start = proc_status_kib(pid, "VmRSS"), worker_fds(pid)

        cold = await fleet_view(conn_a, agents, 0)
        log(f"N={agents}: cold view {cold:.2f} s, {fleet.connections_open()} SSH connections")
        accepted, commands, cpu = fleet.connections_accepted(), fleet.commands_run(), cpu_seconds(pid)
        warm = [await fleet_view(conn_a, agents, 0) for _ in range(warm_views)]
        cpu_ms = (cpu_seconds(pid) - cpu) * 1000 / warm_views / agents
        opened_warm = fleet.connections_accepted() - accepted
        commands_per_view = (fleet.commands_run() - commands) / warm_views
        rss_warm, fds_warm, open_now = proc_status_kib(pid, "VmRSS"), worker_fds(pid), fleet.connections_open()
        log(f"N={agents}: warm view {median(warm):.3f} s (of {', '.join(f'{w:.3f}' for w in warm)})")

        silent_first = await fleet_view(conn_b, agents, silent)
        silent_warm = [await fleet_view(conn_b, agents, silent) for _ in range(2)]
        log(f"N={agents}: with {silent} silent: first {silent_first:.2f} s, then "
            f"{', '.join(f'{s:.2f}' for s in silent_warm)} s")
        connections = fleet.connections_open()
        await conn_a.close()
        await conn_b.close()
        return Point(agents=agents, cold_s=round(cold, 3), warm_s=round(median(warm), 4),
                     silent_first_s=round(silent_first, 3), silent_warm_s=round(median(silent_warm), 3),
                     silent_agents=silent, rss_start_mib=round(rss_start / 1024, 1),
                     rss_warm_mib=round(rss_warm / 1024, 1),
                     kib_per_connection=round((rss_warm - rss_start) / max(1, open_now), 1),
                     fds_start=fds_start, fds_warm=fds_warm, ssh_connections=connections,
                     connections_opened_warm=opened_warm, commands_per_view=commands_per_view,
                     cpu_ms_per_agent=round(cpu_ms, 2))
    finally:
        await asyncio.to_thread(portal.stop)
        await fleet.close()


async def sources(conn: HttpConnection, agents: int) -> set[str]:
    """Where the rows of one view of A came from ("live", "host"; "error" for an agent that failed)."""
    response = await conn.request("GET", "/vms")
    if response.status != 200:
        raise RuntimeError(f"GET /vms: {response.status} {response.body[:300]!r}")
    entries = response.json()
    if len(entries) != agents:
        raise RuntimeError(f"GET /vms: {len(entries)} entries ({agents} expected)")
    return {vm["source"] for e in entries for vm in e["vms"] or []} | {"error" for e in entries if e["error"]}


async def measure_mirror_point(repo: Path, workdir: Path, agents: int, warm_views: int,
                               env: dict[str, str]) -> MirrorPoint:
    fleet = await SimulatedFleet(agents, latency=LATENCY).start()
    portal = Portal(repo, workdir / f"mirror-n{agents}", workers=1,
                    MANAGEMENT_SSH_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT), MANAGEMENT_MAX_AGENTS_PER_USER="5000",
                    **{"MANAGEMENT_WATCHERS": "true", **env})
    try:
        await asyncio.to_thread(portal.start)
        pid = portal.worker_pids()[0]
        a = (await call(portal.port, "POST", "/users", body={"name": "fleet-a"}, expect=201)).json()["api_key"]
        await register_all(portal.port, a, fleet, fleet.hosts, "a")
        conn = await HttpConnection(portal.port, a).connect()
        await conn.request("GET", "/users/me")
        rss_start, fds_start = proc_status_kib(pid, "VmRSS"), worker_fds(pid)

        started = time.perf_counter()
        await sources(conn, agents)  # (on a loaded machine a few cold handshakes may miss the time-out)
        cold = time.perf_counter() - started
        deadline = time.monotonic() + 120 + agents * 0.2
        while await sources(conn, agents) != {"live"}:  # until every agent's watcher is up
            if time.monotonic() > deadline:
                raise RuntimeError(f"N={agents}: the watchers were not all up in time")
            await asyncio.sleep(0.5)
        watchers_up = time.perf_counter() - started
        log(f"N={agents}: cold view {cold:.2f} s; every watcher up after {watchers_up:.1f} s")

        commands, cpu = fleet.commands_run(), cpu_seconds(pid)
        warm = [await fleet_view(conn, agents, 0) for _ in range(warm_views)]
        cpu_ms = (cpu_seconds(pid) - cpu) * 1000 / warm_views / agents
        commands_per_view = (fleet.commands_run() - commands) / warm_views
        if await sources(conn, agents) != {"live"}:
            raise RuntimeError(f"N={agents}: a warm view was not answered from the mirror alone")
        rss_warm, fds_warm = proc_status_kib(pid, "VmRSS"), worker_fds(pid)
        log(f"N={agents}: warm view from the mirror {median(warm):.4f} s (of {', '.join(f'{w:.4f}' for w in warm)})"
            f", {commands_per_view:g} host commands per view")
        streams = sum(h.state.listeners for h in fleet.hosts)
        await conn.close()
        return MirrorPoint(agents=agents, cold_s=round(cold, 3), watchers_up_s=round(watchers_up, 1),
                           warm_s=round(median(warm), 4), warm_min_s=round(min(warm), 4),
                           commands_per_view=commands_per_view,
                           rss_start_mib=round(rss_start / 1024, 1), rss_warm_mib=round(rss_warm / 1024, 1),
                           kib_per_agent=round((rss_warm - rss_start) / agents, 1), fds_start=fds_start,
                           fds_warm=fds_warm, ssh_connections=fleet.connections_open(), event_streams=streams,
                           cpu_ms_per_agent=round(cpu_ms, 3))
    finally:
        await asyncio.to_thread(portal.stop)
        await fleet.close()


def mirror_table(points: list[MirrorPoint]) -> str:
    header = ["N", "1st view s", "watchers up s", "warm s (mirror)", "warm / warm(10)", "fastest s", "cmds/view",
              "RSS MiB start→warm", "KiB/agent", "fds start→warm", "SSH conns", "event streams",
              "worker CPU ms/agent"]
    base = points[0].warm_s
    rows = [[str(p.agents), f"{p.cold_s:.2f}", f"{p.watchers_up_s:.1f}", f"{p.warm_s:.4f}", f"{p.warm_s / base:.1f}",
             f"{p.warm_min_s:.4f}", f"{p.commands_per_view:g}", f"{p.rss_start_mib}→{p.rss_warm_mib}",
             f"{p.kib_per_agent:.0f}",
             f"{p.fds_start}→{p.fds_warm}", str(p.ssh_connections), str(p.event_streams),
             f"{p.cpu_ms_per_agent:.3f}"] for p in points]
    return _markdown(header, rows)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


async def mirror_curves(repo: Path, workdir: Path, sizes: list[int], warm_views: int,
                        env: dict[str, str] | None = None) -> list[MirrorPoint]:
    raise_fd_limit()
    return [await measure_mirror_point(repo, workdir, n, warm_views, env or {}) for n in sizes]


def table(points: list[Point]) -> str:
    header = ["N", "cold s", "warm s", "warm / warm(10)", "10% silent: 1st s", "then s", "RSS MiB start→warm",
              "KiB/conn", "fds start→warm", "SSH conns", "new conns warm", "cmds/view", "worker CPU ms/agent"]
    base = points[0].warm_s
    rows = [[str(p.agents), f"{p.cold_s:.2f}", f"{p.warm_s:.3f}", f"{p.warm_s / base:.1f}",
             f"{p.silent_first_s:.2f}", f"{p.silent_warm_s:.2f}", f"{p.rss_start_mib}→{p.rss_warm_mib}",
             f"{p.kib_per_connection:.0f}", f"{p.fds_start}→{p.fds_warm}", str(p.ssh_connections),
             str(p.connections_opened_warm), f"{p.commands_per_view:g}", f"{p.cpu_ms_per_agent:.2f}"]
            for p in points]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


async def curves(repo: Path, workdir: Path, sizes: list[int], warm_views: int,
                 env: dict[str, str] | None = None) -> list[Point]:
    raise_fd_limit()
    return [await measure_point(repo, workdir, n, warm_views, env or {}) for n in sizes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose main.py is measured")
    parser.add_argument("--sizes", default="10,100,500,1000", help="host-path curves (none: \"\")")
    parser.add_argument("--mirror-sizes", default="10,100,500,1000", help="curves from the live mirror (none: \"\")")
    parser.add_argument("--warm", type=int, default=5, help="warm views per size (the median is taken)")
    parser.add_argument("--mirror-warm", type=int, default=21, help="warm views from the mirror per size")
    parser.add_argument("--json", type=Path, help="also write the points here")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the portal (repeatable)")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    started = time.monotonic()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    mirror_sizes = [int(s) for s in args.mirror_sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as workdir:
        points = asyncio.run(curves(args.repo.resolve(), Path(workdir), sizes, args.warm, env)) if sizes else []
        mirrored = asyncio.run(mirror_curves(args.repo.resolve(), Path(workdir), mirror_sizes, args.mirror_warm,
                                             env)) if mirror_sizes else []
    print(f"Fleet view cost curves, {time.strftime('%Y-%m-%d %H:%M %Z')}, {time.monotonic() - started:.0f} s; "
          f"simulated hosts answer after {LATENCY * 1000:g} ms; connect time-out {CONNECT_TIMEOUT:g} s; "
          f"{args.repo.resolve()}/main.py, 1 worker; {' '.join(args.env)}\n")
    if points:
        print("From the hosts (watchers off):\n\n" + table(points) + "\n")
    if mirrored:
        print("From the live mirror (watchers on):\n\n" + mirror_table(mirrored) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"host": [asdict(p) for p in points],
                                         "mirror": [asdict(p) for p in mirrored]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
