"""The production server: gunicorn with uvicorn's ASGI workers, configured from ``Settings``.

The master process migrates the database and makes sure the secret key exists before it forks, so
workers start on a ready database; each worker then builds its own app through the composition root.

Metrics (issue 21): before anything imports ``prometheus_client``, the master points
``PROMETHEUS_MULTIPROC_DIR`` at an empty directory (``MANAGEMENT_METRICS_DIR``, emptied of old
values, or a new private temporary one removed on exit); the workers it forks inherit it and write
their values there, so ``GET /metrics`` sums every worker whichever one answers. When a worker
exits, its live gauges are dropped (``child_exit``); its counters stay in the sum.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from entrypoints import logs
from entrypoints.settings import Settings


class PortalServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [f"[{self.settings.host}]:{self.settings.port}" if ":" in self.settings.host
                     else f"{self.settings.host}:{self.settings.port}"],
            "workers": self.settings.workers,
            "worker_class": "uvicorn_worker.UvicornWorker",
            "reload": self.settings.reload,
            "timeout": 120,  # a worker silent this long is restarted; SSH commands time out well before
            "graceful_timeout": 30,
            "keepalive": 5,
            "limit_request_line": 8190,
            "limit_request_fields": 100,
            "limit_request_field_size": 8190,
            "proc_name": "manage-playrservers",
            "accesslog": None,  # one structured access line per request comes from the app itself
            "errorlog": "-",
            "loglevel": self.settings.log_level,
            # X-Forwarded-For is believed only from these peers (nginx on loopback by default);
            # uvicorn then reports the forwarded client address as the request's peer.
            "forwarded_allow_ips": self.settings.trusted_proxies or "",
        }
        if self.settings.log_format == "json" or (self.settings.log_format == "auto" and not sys.stderr.isatty()):
            options["logconfig_dict"] = logs.gunicorn_json_logging(self.settings.log_level)
        options["child_exit"] = _worker_exited
        # gunicorn >= 25.1 opens a control socket under $HOME by default; the portal does not use it,
        # and under the hardened systemd unit (ProtectHome) it could not be created anyway.
        options["control_socket_disable"] = True
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        from entrypoints.asgi import build_app

        return build_app(self.settings)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_directory(settings: Settings) -> tuple[Path, bool]:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory for the workers' metric values:
    ``MANAGEMENT_METRICS_DIR`` (created 0700, emptied of a previous run's files), or a new
    temporary directory. Answers the directory and whether it is temporary (removed on exit).
    Must run before ``prometheus_client`` is imported in this process (the workers fork from it)."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multi-process directory was set")
    if settings.metrics_dir is None:
        directory, temporary = Path(tempfile.mkdtemp(prefix="manage-playrservers-metrics-")), True
    else:
        directory, temporary = settings.metrics_dir, False
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):  # a previous run's values: counters start from zero
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory, temporary


def _worker_exited(_server: Any, worker: Any) -> None:
    from entrypoints import bootstrap

    bootstrap.metrics_worker_exited(worker.pid)


def serve(settings: Settings) -> None:
    metrics_dir, temporary = prepare_metrics_directory(settings)
    try:
        _serve(settings)
    finally:
        if temporary:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(settings: Settings) -> None:
    from entrypoints import bootstrap, logs

    logs.configure(settings.log_format, settings.log_level)
    # Prepare once, in the master: schema up to date, secret key present (or configured and valid).
    runtime = bootstrap.build_runtime(settings)
    runtime.close()
    PortalServer(settings).run()
