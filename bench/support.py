# ruff: noqa: S603, S607 - a benchmark harness: it runs ssh, virsh, wrk, bash and the portal by design
"""Helpers of the benchmark suite: the lab, the throwaway PostgreSQL server, the portal under
gunicorn, a small asyncio HTTP client, wrk, the raw ``ssh``/``virsh`` references and a few ``/proc``
readers.

Standard library only (plus the portal itself, started as a subprocess, and ``psql``), so
``bench/run.py`` runs from the project's virtual environment or from ``tox -e bench`` alike.
Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
LAB_SCRIPT = REPO / "scripts" / "lab.sh"
POSTGRES_SCRIPT = REPO / "scripts" / "postgres.sh"
LOOPBACK = "127.0.0.1"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------- the lab


def bring_up(script: Path, prefix: str, *, timeout: int) -> tuple[dict[str, str], bool]:
    """Run ``script up`` (idempotent) and read the ``PREFIX_NAME=value`` lines it prints; also
    whether it was already up (then the bench leaves it running at the end)."""
    already_up = subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0
    started = time.monotonic()
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=timeout)
    if up.returncode != 0:
        raise SystemExit(f"bench: scripts/{script.name} up failed ({up.returncode}):\n{up.stderr[-3000:]}")
    log(f"{script.name} up in {time.monotonic() - started:.1f} s ({'already running' if already_up else 'started'})")
    env: dict[str, str] = {}
    for line in up.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith(prefix):
            env[name] = " ".join(shlex.split(value))
    return env, already_up


@dataclass
class Lab:
    host: str
    port: int
    user: str
    key_path: Path
    host_key: str
    known_hosts: Path
    sshd_log: Path
    uri: str
    started_here: bool

    @classmethod
    def up(cls) -> Lab:
        if os.geteuid() != 0:
            raise SystemExit("bench: the lab needs root (it installs packages and starts sshd and libvirtd); "
                             "run bench/run.py as root")
        env, already_up = bring_up(LAB_SCRIPT, "LAB_", timeout=1800)
        return cls(host=env["LAB_HOST"], port=int(env["LAB_SSH_PORT"]), user=env["LAB_USER"],
                   key_path=Path(env["LAB_KEY"]), host_key=env["LAB_HOST_KEY"],
                   known_hosts=Path(env["LAB_KNOWN_HOSTS"]), sshd_log=Path(env["LAB_SSHD_LOG"]),
                   uri=env.get("LAB_URI", "qemu:///system"), started_here=not already_up)

    def down_if_started(self) -> None:
        if self.started_here:
            subprocess.run(["bash", str(LAB_SCRIPT), "down"], capture_output=True, timeout=300)
            log("lab stopped (this run had started it)")

    def logins(self) -> int:
        """SSH logins the lab's sshd has accepted so far (each is one new connection)."""
        return self.sshd_log.read_text(errors="replace").count(f"Accepted publickey for {self.user}")

    # The command the portal runs for GET /agents/{id}/vms, as one remote command line.
    def virsh_list(self) -> list[str]:
        return ["virsh", "--connect", self.uri, "list", "--all"]

    def ssh_base(self) -> list[str]:
        return ["ssh", "-F", "none", "-i", str(self.key_path), "-p", str(self.port),
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


class ControlMaster:
    """An OpenSSH ControlMaster connection to the lab, and commands multiplexed over it."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.path = workdir / "cm.sock"

    def options(self) -> list[str]:
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.path}"]

    def start(self) -> None:
        subprocess.run([*self.lab.ssh_base(), "-fN", "-o", "ControlMaster=yes", "-o", f"ControlPath={self.path}",
                        "-o", "ControlPersist=600", f"{self.lab.user}@{self.lab.host}"], check=True, timeout=30)

    def stop(self) -> None:
        subprocess.run([*self.lab.ssh_base(), "-o", f"ControlPath={self.path}", "-O", "exit",
                        f"{self.lab.user}@{self.lab.host}"], capture_output=True, timeout=30)

    def command(self) -> list[str]:
        return [*self.lab.ssh_base(), *self.options(), f"{self.lab.user}@{self.lab.host}", *self.lab.virsh_list()]


def fresh_ssh_command(lab: Lab, *options: str) -> list[str]:
    return [*lab.ssh_base(), "-o", "ControlMaster=no", "-o", "ControlPath=none", *options, f"{lab.user}@{lab.host}",
            *lab.virsh_list()]


def local_virsh_command(lab: Lab) -> list[str]:
    return lab.virsh_list()


_TIMER = r'''
n=$1; shift
s=$EPOCHREALTIME
for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>>"$BENCH_ERRLOG" & done
fail=0
for job in $(jobs -p); do wait "$job" || fail=$((fail + 1)); done
e=$EPOCHREALTIME
echo "$s $e $fail"
'''


def timed_commands(command: Sequence[str], count: int, errlog: Path) -> float:
    """Wall time (s) of ``count`` copies of ``command`` started at once by bash (cheaper to start
    than from Python, so the reference is not slowed by the harness); fails if any failed."""
    out = subprocess.run(["bash", "-c", _TIMER, "timer", str(count), *command], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "BENCH_ERRLOG": str(errlog)}, check=True).stdout
    start, end, failed = out.split()
    if int(failed):
        raise RuntimeError(f"{failed} of {count} reference commands failed: {' '.join(command)} (see {errlog})")
    return float(end) - float(start)


# ---------------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    """The throwaway server of ``scripts/postgres.sh`` (fsync off: a test server), and schemas of
    this run's own on its database, as ``tests/postgres.py`` makes them."""

    env: dict[str, str]  # the PG_* lines of `postgres.sh up`
    started_here: bool
    version: str = ""
    schemas: list[str] = field(default_factory=list)

    @classmethod
    def up(cls) -> Postgres:
        env, already_up = bring_up(POSTGRES_SCRIPT, "PG_", timeout=900)
        server = cls(env, started_here=not already_up)
        server.version = server.psql("SHOW server_version").strip()
        return server

    def psql(self, statement: str) -> str:
        env = {**os.environ, "PGHOST": self.env["PG_HOST"], "PGPORT": self.env["PG_PORT"],
               "PGUSER": self.env["PG_USER"], "PGPASSWORD": self.env["PG_PASSWORD"],
               "PGDATABASE": self.env["PG_DATABASE"], "PGCONNECT_TIMEOUT": "10"}
        return subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", statement], env=env,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    def create_database(self) -> str:
        """The URL of a new, empty database as the portal sees it: a schema of its own, alone on
        the connection's search path."""
        name = f"bench_{secrets.token_hex(6)}"
        self.psql(f'CREATE SCHEMA "{name}"')
        self.schemas.append(name)
        return f"{self.env['PG_URL']}?{urlencode({'options': f'-csearch_path={name}'})}"

    def drop_databases(self) -> None:
        while self.schemas:
            self.psql(f'DROP SCHEMA IF EXISTS "{self.schemas.pop()}" CASCADE')

    def down_if_started(self) -> None:
        if self.started_here:
            subprocess.run(["bash", str(POSTGRES_SCRIPT), "down"], capture_output=True, timeout=120)
            log("postgres stopped (this run had started it)")


# ------------------------------------------------------------------------------------ the portal


class Portal:
    """``python main.py`` (gunicorn, uvicorn workers) of a checkout, on a free loopback port; ``env``
    overrides its settings (e.g. ``MANAGEMENT_DATABASE_URL``)."""

    def __init__(self, repo: Path, workdir: Path, workers: int = 2, **env: str) -> None:
        self.repo = repo
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "portal.log"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MANAGEMENT_")}  # never a real database
        # The lab's sshd is on loopback, which MANAGEMENT_AGENT_NETWORKS refuses by default; the
        # figures measure the pool under bursts of one user (20 concurrent lists), not the
        # per-user limit on concurrent SSH operations.
        self.env = {**inherited, "MANAGEMENT_HOST": LOOPBACK, "MANAGEMENT_PORT": str(self.port),
                    "MANAGEMENT_WORKERS": str(workers), "MANAGEMENT_DB_PATH": str(workdir / "m.sqlite3"),
                    "MANAGEMENT_SIGNUP": "open", "MANAGEMENT_LOG_FORMAT": "json",
                    "MANAGEMENT_AGENT_NETWORKS": "127.0.0.0/8,::1/128", "MANAGEMENT_MAX_OPERATIONS_PER_USER": "1000",
                    **env}
        self.process: subprocess.Popen[bytes] | None = None
        self.workers = workers

    def start(self) -> Portal:
        handle = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, str(self.repo / "main.py")], cwd=self.workdir,
                                        env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: the portal exited {self.process.returncode}:\n"
                                 f"{self.log_path.read_text()[-3000:]}")
            if len(self.worker_pids()) == self.workers and self._health():
                return self
            time.sleep(0.1)
        raise SystemExit(f"bench: the portal did not answer within 60 s:\n{self.log_path.read_text()[-3000:]}")

    def _health(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=2) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        pids: list[int] = []
        try:
            for task in Path(f"/proc/{self.process.pid}/task").iterdir():
                pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            return []
        return sorted(pids)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def proc_status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def tcp_connections(pid: int, *, local_port: int | None = None, remote_port: int | None = None) -> int:
    """Established TCP connections of process ``pid`` (on this local port, or to that remote port)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, state, inode = int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16), \
                parts[3], parts[9]
            if state == "01" and inode in inodes and local_port in (None, local) and remote_port in (None, remote):
                count += 1
    return count


# --------------------------------------------------------------------------- a small HTTP client


class HttpError(Exception):
    pass


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to the portal (reconnects once if the server closed it)."""

    def __init__(self, port: int, key: str | None = None) -> None:
        self.port = port
        self.key = key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> HttpConnection:
        self.reader, self.writer = await asyncio.open_connection(LOOPBACK, self.port)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None

    async def request(self, method: str, path: str, body: Any = None) -> Response:
        for attempt in (1, 2):
            if self.writer is None:
                await self.connect()
            try:
                return await self._once(method, path, body)
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.close()
                if attempt == 2 or method != "GET":
                    raise
        raise AssertionError("unreachable")

    async def _once(self, method: str, path: str, body: Any) -> Response:
        assert self.reader is not None and self.writer is not None
        data = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {path} HTTP/1.1", "Host: bench"]
        if self.key:
            head.append(f"Authorization: Bearer {self.key}")
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            payload = b"".join(c[:-2] for c in chunks)
        else:
            payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, payload, headers)


async def call(port: int, method: str, path: str, key: str | None = None, body: Any = None,
               expect: int | None = None) -> Response:
    conn = HttpConnection(port, key)
    try:
        response = await conn.request(method, path, body)
    finally:
        await conn.close()
    if expect is not None and response.status != expect:
        raise HttpError(f"{method} {path}: {response.status} {response.body[:500]!r}")
    return response


# ------------------------------------------------------------------------------------------- wrk


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("bench: wrk is missing; install it with `apt-get install wrk` (as root)")
    log("installing wrk (apt-get install wrk)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench: wrk could not be installed")
    return found


@dataclass
class WrkResult:
    requests_per_second: float
    requests: int
    non_2xx: int
    socket_errors: int


def wrk(url: str, *, key: str | None, seconds: float, connections: int, threads: int = 1) -> WrkResult:
    process = start_wrk(url, key=key, seconds=seconds, connections=connections, threads=threads)
    return wrk_result(process, seconds)


def start_wrk(url: str, *, key: str | None, seconds: float, connections: int,
              threads: int = 1) -> subprocess.Popen[str]:
    command = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s"]
    if key:
        command += ["-H", f"Authorization: Bearer {key}"]
    return subprocess.Popen([*command, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wrk_result(process: subprocess.Popen[str], seconds: float) -> WrkResult:
    out, err = process.communicate(timeout=seconds + 60)
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(rps, total, int(non_2xx.group(1)) if non_2xx else 0,
                     sum(int(g) for g in errors.groups()) if errors else 0)


def wrk_balanced(portal: Portal, path: str, *, key: str | None, seconds: float,
                 connections: int) -> tuple[WrkResult, list[int]]:
    """wrk with the same number of connections on every worker.

    All the workers accept on one shared socket, and wrk opens all its connections at once: the
    first worker to wake accepts all of them, so a plain wrk run measures one worker while the
    other idles (and which one, and how unevenly, changes from run to run). Instead one wrk per
    worker is started while the other workers are paused (SIGSTOP, a few milliseconds, until
    the connections are accepted), and their rates are added up."""
    pids = portal.worker_pids()
    share = connections // len(pids)
    url = f"http://{LOOPBACK}:{portal.port}{path}"
    processes = []
    try:
        for pid in pids:
            others = [other for other in pids if other != pid]
            held = tcp_connections(pid, local_port=portal.port)
            for other in others:
                os.kill(other, signal.SIGSTOP)
            try:
                processes.append(start_wrk(url, key=key, seconds=seconds, connections=share))
                deadline = time.monotonic() + 5
                while tcp_connections(pid, local_port=portal.port) < held + share and time.monotonic() < deadline:
                    time.sleep(0.002)
            finally:
                for other in others:
                    os.kill(other, signal.SIGCONT)
        split = [tcp_connections(pid, local_port=portal.port) for pid in pids]
        results = [wrk_result(process, seconds) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return WrkResult(sum(r.requests_per_second for r in results), sum(r.requests for r in results),
                     sum(r.non_2xx for r in results), sum(r.socket_errors for r in results)), split
