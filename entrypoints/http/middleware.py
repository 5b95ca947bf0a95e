"""Cross-cutting concerns of every request: request id, client address, body limit, HTTPS for
credentials behind a proxy, authentication with a per-address limit on failures, and one structured
access-log line per request."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import time
import uuid
from collections import deque
from typing import Any

import falcon
import falcon.asgi
import structlog

from core import errors
from core.errors import ApiKeyExpired, PortalError, Unauthenticated
from core.portal import Portal
from core.ports import NullObserver, Observer
from core.users import Authenticated
from entrypoints.http.cache import UntilChanged

access_log = structlog.get_logger("manage_playrservers.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_HEADER_BYTES = 16 * 1024  # like nginx's large_client_header_buffers in front of it
MAX_HEADERS = 100


# "/agents/{agent_id:int(min=1, max=2147483647)}" -> "/agents/{agent_id}": the operation's path
_CONVERTER = re.compile(r"\{(\w+):[^{}]*\}")


def route_label(template: str | None) -> str:
    """The route template a request matched, as the operation table writes it; ``unmatched`` for
    a request no route took (a 404 by path): a metric label never holds a raw path."""
    return _CONVERTER.sub(r"{\1}", template) if template else "unmatched"


class RequestContext:
    """Gives each request an id (the client's ``X-Request-Id`` if sane) and logs it when done; tells
    the observer its route template, method, status and duration (the portal's metrics)."""

    def __init__(self, observer: Observer | None = None) -> None:
        self.observer: Observer = observer if observer is not None else NullObserver()

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        supplied = req.get_header("X-Request-Id") or ""
        req.context.request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        req.context.client_address = req.remote_addr or "unknown"
        req.context.started = time.perf_counter()
        req.context.user = None
        req.context.key = None
        structlog.contextvars.bind_contextvars(request_id=req.context.request_id)
        resp.set_header("X-Request-Id", req.context.request_id)
        # The HTTP server (uvicorn) does not bound headers that arrive whole; refuse them here.
        headers = req.headers
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers.items()) > MAX_HEADER_BYTES:
            raise errors.HeadersTooLarge(f"send at most {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes of them")

    async def process_request_ws(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket) -> None:
        """The same context for a WebSocket (consoles, issue 17). Nothing is raised here: a refused
        upgrade is the route's to answer (403 without detail), so limits only mark the request."""
        supplied = req.get_header("X-Request-Id") or ""
        req.context.request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        req.context.client_address = req.remote_addr or "unknown"
        req.context.started = time.perf_counter()
        req.context.user = None
        structlog.contextvars.bind_contextvars(request_id=req.context.request_id)
        headers = req.headers
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers.items()) > MAX_HEADER_BYTES:
            req.context.refused = True

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: object, req_succeeded: bool) -> None:
        user = getattr(req.context, "user", None)
        started = getattr(req.context, "started", time.perf_counter())
        self.observer.request_served(route_label(req.uri_template), req.method, int(resp.status_code),
                                     time.perf_counter() - started)
        access_log.info(
            "request",
            method=req.method,
            path=req.path,
            status=int(resp.status_code),
            code=getattr(resp.context, "error_code", None),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            user_id=user.id if user is not None else None,
            client=getattr(req.context, "client_address", None),
        )
        structlog.contextvars.clear_contextvars()


class BodyLimit:
    """Refuses a declared body over the limit before reading any of it (413). Bodies without a
    declared length are bounded while they are read (``entrypoints.http.resources.read_json``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        req.context.max_body_bytes = self.max_bytes
        length = req.content_length
        if req.method in ("POST", "PUT", "PATCH") and length is not None and length > self.max_bytes:
            raise errors.BodyTooLarge(f"the request body is {length} bytes; the limit is {self.max_bytes} bytes")


class HttpsRequired:
    """Refuses credential-bearing requests that reached the proxy in front of the portal over plain
    HTTP (403 ``https_required``), unless the operator allows it (``MANAGEMENT_ALLOW_PLAIN_HTTP``).

    Why: the installed nginx listens on port 80 until TLS is added; an API key sent over that leg
    crosses the network in clear. Refusing makes the mistake visible at the first request instead
    of after a key was sniffed. The key is not looked up at all (this runs before authentication).

    Credential-bearing: every request with an ``Authorization`` header (the API key travels in it:
    every authenticated route, ``rotate``, ``credentials``) and ``POST /users`` (its answer carries
    a new API key even without one). Public reads (``/health``, ``/openapi.json``) stay reachable.

    Through a proxy: the request carries ``X-Forwarded-Proto``. The HTTP server (uvicorn) takes the
    scheme from that header only when the peer is in ``MANAGEMENT_TRUSTED_PROXIES``; otherwise the
    scheme stays the connection's own, plain ``http``. So a request is refused when it carries the
    header and its scheme is not ``https``: a trusted proxy that says ``http``, or an untrusted peer
    claiming anything. A direct request without the header (the local command line, a client on
    loopback, the tests) is not a proxied one and is let through: the portal itself never serves
    TLS, so it binds 127.0.0.1 behind nginx in production.
    """

    def __init__(self, allow_plain_http: bool) -> None:
        self.allow_plain_http = allow_plain_http

    # Routes whose answer carries a new key even to a request without one (by route template, so
    # that "//users" or "/users/" count too)
    ISSUING_KEYS = frozenset({("POST", "/users")})

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        # before routing, so before any process_resource (authentication): a refused key is never looked up
        if req.get_header("Authorization") is not None:
            self.check(req)

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: object, params: dict[str, Any]) -> None:
        if resource is not None and (req.method, req.uri_template) in self.ISSUING_KEYS:
            self.check(req)

    async def process_request_ws(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket) -> None:
        """A console ticket is a credential too: one that crossed the network in clear through the
        proxy is not redeemed (the upgrade is refused; issue 17)."""
        try:
            self.check(req)
        except errors.HttpsRequired:
            req.context.refused = True

    def check(self, req: falcon.asgi.Request) -> None:
        if self.allow_plain_http:
            return
        forwarded = req.get_header("X-Forwarded-Proto")
        if forwarded is None or req.scheme == "https":
            return
        raise errors.HttpsRequired(
                      "API keys are accepted only over HTTPS: this request reached the proxy in front of the "
                      f"portal over plain HTTP (X-Forwarded-Proto: {forwarded[:16]!r}), or came from a proxy "
                      "not listed in MANAGEMENT_TRUSTED_PROXIES. Use https://, add TLS to the proxy "
                      "(certbot --nginx), or set MANAGEMENT_ALLOW_PLAIN_HTTP=true to accept plain HTTP.")


class FailureLimiter:
    """At most ``limit`` failed authentications per client address in a sliding ``window`` of
    seconds; past that the address's failures get 429 with ``Retry-After`` until the oldest one ages
    out, while its valid keys keep working. Kept per worker process (documented in docs/security.md)."""

    def __init__(self, limit: int, window: float, max_addresses: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float) -> int | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        if len(failures) < self.limit:
            return None
        return max(1, int(failures[0] + self.window - now + 0.999))

    def record_failure(self, address: str, now: float) -> None:
        if address not in self._failures and len(self._failures) >= self.max_addresses:
            self._failures.pop(next(iter(self._failures)))  # forget the oldest address
        self._failures.setdefault(address, deque()).append(now)


class Lifespan:
    """Runs the worker's share of the agents' watchers (issue 18, ``core/watch.py``) while it
    serves, and closes its pooled SSH connections when the server shuts down."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._stop = asyncio.Event()
        self._watchers: asyncio.Task[None] | None = None
        self._deliveries: asyncio.Task[None] | None = None

    async def process_startup(self, scope: dict[str, Any], event: dict[str, Any]) -> None:
        holder = f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        if self.runtime.settings.watchers:
            self._watchers = asyncio.create_task(self.runtime.portal.watch.run(holder, self._stop),
                                                 name="watchers")
        if self.runtime.settings.webhook_deliveries:  # webhooks (issue 18): this worker's share of the outbox
            self._deliveries = asyncio.create_task(self.runtime.portal.webhooks.run(holder, self._stop),
                                                   name="webhook-deliveries")

    async def process_shutdown(self, scope: dict[str, Any], event: dict[str, Any]) -> None:
        self._stop.set()
        for task in (self._watchers, self._deliveries):
            if task is not None:
                with contextlib.suppress(Exception):  # the leases expire anyway
                    await asyncio.wait_for(task, timeout=5)
        await self.runtime.close_connections()
        self.runtime.close()


class Authentication:
    """Resolves ``Authorization: Bearer <key>`` to a user on every route that needs one.

    A resource opts out per method with ``public_methods = {"GET", ...}``. A key already resolved
    is not looked up again until the database changes (``known``, see ``entrypoints.http.cache``);
    it is remembered by its SHA-256 digest, never in clear. Revoking or rotating a key is a commit,
    so a remembered key is never used past it; expiry needs no commit, so it is checked on every
    request, remembered keys included.
    """

    def __init__(self, portal: Portal, limiter: FailureLimiter,
                 known: UntilChanged[bytes, Authenticated] | None = None, *, observer: Observer | None = None) -> None:
        self.observer: Observer = observer if observer is not None else NullObserver()
        self.portal = portal
        self.limiter = limiter
        self.known: UntilChanged[bytes, Authenticated] = known if known is not None else UntilChanged(None)

    def _failed(self, address: str, reason: str) -> None:
        """Count a failed authentication from ``address``, or refuse it with 429 once the address has
        had ``limit`` in the window (a refused attempt is not counted: the window still ends)."""
        now = time.monotonic()
        wait = self.limiter.retry_after(address, now)
        self.observer.authentication_failed(reason)
        if wait is not None:
            self.observer.rate_limited()
            raise errors.TooManyAuthFailures(f"too many failed authentications from {address}; retry in {wait} s",
                                             retry_after=wait)
        self.limiter.record_failure(address, now)

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: Any, params: dict[str, Any]) -> None:
        if resource is None or req.method == "OPTIONS" or req.method in getattr(resource, "public_methods", ()):
            return
        address = req.context.client_address
        header = req.get_header("Authorization") or ""
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            self._failed(address, errors.MissingApiKey.code)
            raise errors.MissingApiKey()
        # A valid key always gets through, even from a limited address: many clients can share one
        # (a NAT, an office, a CI runner pool) and one of them guessing must not lock out the rest.
        # Only failures are limited; a guess costs the same indexed lookup as a valid request.
        version = await self.known.fresh_version()
        req.context.data_version = version  # taken before anything this request reads: its caches share it
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = self.known.get(digest, version)
        if found is None:
            try:
                found = await asyncio.to_thread(self.portal.users.authenticate_key, key)
            except ApiKeyExpired:
                raise  # a real key that has had its time: not a guess, not counted against the address
            except Unauthenticated as error:
                self._failed(address, error.code)
                raise
            self.known.put(digest, version, found)
        else:
            self.portal.users.check_not_expired(found.key)
        req.context.user = found.user
        req.context.key = found.key
        structlog.contextvars.bind_contextvars(user_id=found.user.id, key_id=found.key.id)
        if self.portal.keys.use_due(found.key):
            try:
                await asyncio.to_thread(self.portal.keys.record_use, found.key)
            except PortalError as error:  # a busy database must not fail the request it only notes
                structlog.get_logger("manage_playrservers.http").warning("last_used_not_recorded", code=error.code)
