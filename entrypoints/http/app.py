"""The Falcon ASGI application: one route per path of the operation table, middleware around it,
and domain errors mapped once (``entrypoints/http/errors.py``)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import falcon
import falcon.asgi

from entrypoints.bootstrap import Runtime
from entrypoints.http import errors, openapi
from entrypoints.http.cache import UntilChanged
from entrypoints.http.console import ConsoleResource
from entrypoints.http.metrics import PortalMetrics
from entrypoints.http.middleware import (
    Authentication,
    BodyLimit,
    FailureLimiter,
    HttpsRequired,
    Lifespan,
    RequestContext,
)
from entrypoints.http.resources import OperationsResource
from entrypoints.http.stream import EventStreamResource
from entrypoints.operations import OPERATIONS, Operation
from entrypoints.web import pages
from entrypoints.web.guard import SecurityHeaders

# Falcon converters for the path parameters of the table (a bad agent id is a 404 like an unknown one).
_CONVERTERS = {"{agent_id}": "{agent_id:int(min=1, max=2147483647)}",
               "{key_id}": "{key_id:int(min=1, max=2147483647)}",
               "{webhook_id}": "{webhook_id:int(min=1, max=2147483647)}"}


def create_app(runtime: Runtime) -> falcon.asgi.App[Any, Any]:
    settings = runtime.settings
    portal = runtime.portal
    # The database's data version, when the storage has one: reads are kept until the database
    # changes (entrypoints/http/cache.py; on PostgreSQL a request waits for the fenced one).
    data_version = getattr(runtime.storage, "data_version", None)
    fenced = getattr(runtime.storage, "fenced_data_version", None)
    observer = runtime.observer
    # failed authentications per address: API keys, and keys typed on the sign-in page, count together
    limiter = FailureLimiter(settings.auth_failure_limit, settings.auth_failure_window)
    middleware: list[Any] = [
        RequestContext(observer),
        SecurityHeaders(),  # web console (issue 19): CSP, no framing, nosniff on every answer
        BodyLimit(settings.max_body_bytes),
        # before authentication: a key that came over plain HTTP is refused, never looked up
        HttpsRequired(settings.allow_plain_http),
        Authentication(portal, limiter, UntilChanged(data_version, fenced=fenced), observer=observer),
        Lifespan(runtime),
    ]
    app = falcon.asgi.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    errors.register(app)

    by_path: dict[str, list[Operation]] = defaultdict(list)
    for op in OPERATIONS:
        by_path[op.path].append(op)
    document_body = json.dumps(openapi.document())  # serialized once, served by GET /openapi.json
    metrics = PortalMetrics(runtime.exposition, settings.metrics_token)
    for path, operations in by_path.items():
        template = path
        for plain, converted in _CONVERTERS.items():
            template = template.replace(plain, converted)
        cached = any(op.cached_per_user for op in operations)
        app.add_route(template, OperationsResource(
            portal, operations, document_body=document_body,
            lists=UntilChanged(data_version, max_entries=1_000, fenced=fenced) if cached else None,
            metrics=metrics))
    # consoles (issue 17): the WebSocket a console ticket opens (its ticket is its credential)
    app.add_route("/console/{ticket}", ConsoleResource(portal))
    # issue 18: the event stream (text/event-stream, not a JSON operation)
    events = EventStreamResource(portal, listen=getattr(runtime.storage, "listen_events", None))
    app.add_route("/events/stream", events)
    # the web console (issue 19), same origin as the API; its pages follow the same event stream
    pages.add_routes(app, portal, settings, limiter, events)
    return app
