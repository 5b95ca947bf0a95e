"""The ASGI application of one server worker, built through the composition root."""

from __future__ import annotations

from typing import Any

from entrypoints import bootstrap, logs
from entrypoints.http.app import create_app
from entrypoints.settings import Settings


def build_app(settings: Settings) -> Any:
    logs.configure(settings.log_format, settings.log_level)
    runtime = bootstrap.build_runtime(settings)
    return create_app(runtime)
