"""The ASGI application of one server worker, built through the composition root."""

from __future__ import annotations

from typing import Any

from entrypoints import bootstrap, logs
from entrypoints.http.app import create_app
from entrypoints.http.middleware import HttpsRequired
from entrypoints.settings import Settings


def build_app(settings: Settings) -> Any:
    logs.configure(settings.log_format, settings.log_level)
    runtime = bootstrap.build_runtime(settings)
    app = create_app(runtime)
    # Appended here while entrypoints/http/app.py is being rewritten; its process_request runs before
    # any process_resource (authentication), so a refused key is never looked up.
    app.add_middleware(HttpsRequired(settings.allow_plain_http))
    return app

