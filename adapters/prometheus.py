"""The portal's own metrics with the official Prometheus client (``core.ports.Observer``).

Under gunicorn every worker is a process with its own counters; Prometheus must see their sum,
whichever worker answers the scrape. So the client runs in its multi-process mode: the server
launcher (``entrypoints/server.py``) points ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory
before anything imports ``prometheus_client``, each worker writes its values to memory-mapped
files there, ``exposition()`` reads and sums them all, and the launcher marks a worker dead when it
exits (its live gauges vanish, its counters stay counted). Without that variable (the command
line, tests, a library script), the values live in this process only.

Metrics are registered in a registry of the instance, never the client's global one: several
portals in one process (tests) do not collide, and nothing is created at import time.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from core.errors import DatabaseBusy

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "playr_portal"

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SSH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DATABASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def multiprocess_directory() -> str | None:
    """The directory every worker writes its values to, when the server set one."""
    return os.environ.get(MULTIPROC_ENV) or None


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (connections it no longer holds); counters stay."""
    if multiprocess_directory() is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def package_version() -> str:
    try:
        return metadata.version("manage-playrservers")
    except metadata.PackageNotFoundError:
        return "unknown"


class _BuildInfo(Collector):
    """``playr_portal_build_info``: the portal's version and Python, value 1 (not per worker)."""

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(f"{PREFIX}_build_info", "The portal's version and runtime (always 1)",
                                   labels=("version", "python", "multiprocess"))
        family.add_metric((package_version(), platform.python_version(),
                           "true" if multiprocess_directory() else "false"), 1)
        yield family


class PrometheusObserver:
    """Implements ``core.ports.Observer`` with ``prometheus_client``; ``exposition()`` is the body
    of ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by route template, method "
                                "and status", ("route", "method", "status"), registry=r)
        self.request_duration = Histogram(f"{PREFIX}_http_request_duration_seconds", "Time to answer an HTTP "
                                          "request, by route template and method", ("route", "method"),
                                          buckets=REQUEST_BUCKETS, registry=r)
        self.auth_failures = Counter(f"{PREFIX}_authentication_failures", "Requests refused for their API key, "
                                     "by reason (error code)", ("reason",), registry=r)
        self.limited = Counter(f"{PREFIX}_rate_limited_requests", "Requests refused with 429 because "
                                    "their address failed to authenticate too often", registry=r)
        self.connects = Counter(f"{PREFIX}_ssh_connects", "SSH connection attempts, by outcome (ok or the "
                                "error code)", ("outcome",), registry=r)
        self.connect_duration = Histogram(f"{PREFIX}_ssh_connect_duration_seconds", "Time to open an SSH "
                                          "connection (resolve, handshake, log in)", buckets=SSH_BUCKETS, registry=r)
        # Gauges of every live worker are summed; a dead worker's disappear (mark_process_dead).
        self.connections_open = Gauge(f"{PREFIX}_ssh_connections_open", "Pooled SSH connections open",
                                      registry=r, multiprocess_mode="livesum")
        self.connections_opening = Gauge(f"{PREFIX}_ssh_connections_opening", "SSH connections being opened",
                                         registry=r, multiprocess_mode="livesum")
        self.channels = Gauge(f"{PREFIX}_ssh_channels_in_use", "SSH channels (commands, streams) open now",
                              registry=r, multiprocess_mode="livesum")
        self.command_duration = Histogram(f"{PREFIX}_ssh_command_duration_seconds", "Time a remote command took, "
                                          "by virsh subcommand and outcome (ok, failed: non-zero exit, or the "
                                          "error code)", ("subcommand", "outcome"), buckets=SSH_BUCKETS, registry=r)
        self.transaction_duration = Histogram(f"{PREFIX}_database_transaction_duration_seconds", "Time a database "
                                              "transaction took, by kind (read, write) and outcome",
                                              ("kind", "outcome"), buckets=DATABASE_BUCKETS, registry=r)
        self.database_busy = Counter(f"{PREFIX}_database_busy", "Transactions refused with 503 database_busy "
                                     "(the write lock or a pooled connection stayed busy past the time-out)",
                                     registry=r)
        self.fleet_hosts = Counter(f"{PREFIX}_fleet_host_samples", "Hosts asked for their VM statistics by "
                                   "GET /metrics/vms, by outcome (ok or the error code)", ("outcome",), registry=r)
        self.fleet_duration = Histogram(f"{PREFIX}_fleet_host_sample_duration_seconds", "Time to ask one host "
                                        "for its VM statistics", buckets=SSH_BUCKETS, registry=r)
        self._build_info = _BuildInfo()
        r.register(self._build_info)

    # ------------------------------------------------------------------ the port

    def request_served(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.request_duration.labels(route, method).observe(seconds)

    def authentication_failed(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def rate_limited(self) -> None:
        self.limited.inc()

    def ssh_connect(self, outcome: str, seconds: float) -> None:
        self.connects.labels(outcome).inc()
        self.connect_duration.observe(seconds)

    def ssh_pool(self, *, connections_open: int, connections_opening: int, channels_in_use: int) -> None:
        self.connections_open.set(connections_open)
        self.connections_opening.set(connections_opening)
        self.channels.set(channels_in_use)

    def ssh_command(self, subcommand: str, outcome: str, seconds: float) -> None:
        self.command_duration.labels(subcommand, outcome).observe(seconds)

    def database_transaction(self, kind: str, outcome: str, seconds: float) -> None:
        self.transaction_duration.labels(kind, outcome).observe(seconds)
        if outcome == DatabaseBusy.code:
            self.database_busy.inc()

    def fleet_host_sampled(self, outcome: str, seconds: float) -> None:
        self.fleet_hosts.labels(outcome).inc()
        self.fleet_duration.observe(seconds)

    # ------------------------------------------------------------------ GET /metrics

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format: summed over every worker's files in
        multi-process mode, this process's values otherwise. Reads files: call it off the loop."""
        if multiprocess_directory() is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(self._build_info)
        return generate_latest(registry)
