"""Errors as RFC 9457 problem details, mapped once for the whole app.

Every error body is ``application/problem+json`` with ``type, title, status, detail, code`` (and
``errors`` listing invalid fields on a 422, ``request_id`` always). A 500 body never carries a
stack trace or a secret: the exception is logged (secrets redacted) and the body says only that
the request failed and which request id to look for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import falcon
import structlog

from core import errors as domain

PROBLEM_BASE = "https://manage.playrservers.com/problems/"
PROBLEM_JSON = "application/problem+json"

log = structlog.get_logger("manage_playrservers.http")

# Domain error class -> HTTP status. Subclasses inherit their parent's status unless listed.
STATUS_OF: dict[type[domain.PortalError], int] = {
    domain.ValidationFailed: 422,
    domain.NotFound: 404,
    domain.Conflict: 409,
    domain.Unauthenticated: 401,
    domain.SignupRefused: 403,
    domain.Forbidden: 403,
    domain.Unavailable: 503,
    domain.RemoteError: 502,
    domain.RemoteTimeout: 504,
    domain.TooManyRequests: 429,
    domain.MalformedBody: 400,
    domain.BodyTooLarge: 413,
    domain.UnsupportedMediaType: 415,
    domain.HeadersTooLarge: 431,
}

# Codes for errors Falcon itself raises (routing, methods, bodies).
CODE_OF_STATUS = {
    400: "bad_request",
    404: domain.NotFound.code,  # no such route: answered like anything else that is not there
    405: "method_not_allowed",
    411: "length_required",
}


def problem_body(status: int, code: str, title: str, detail: str, request_id: str | None,
                 **extra: Any) -> dict[str, Any]:
    body = {"type": PROBLEM_BASE + code.replace("_", "-"), "title": title, "status": status,
            "detail": detail, "code": code, **extra}
    if request_id:
        body["request_id"] = request_id
    return body


def write_problem(req: falcon.asgi.Request, resp: falcon.asgi.Response, status: int, code: str,
                  title: str, detail: str, **extra: Any) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = PROBLEM_JSON
    resp.text = json.dumps(problem_body(status, code, title, detail, getattr(req.context, "request_id", None),
                                        **extra))
    resp.context.error_code = code


def status_of_class(error_class: type[domain.PortalError]) -> int:
    """The HTTP status of an error class: its own, or its nearest listed ancestor's."""
    for cls in error_class.__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def status_of(error: domain.PortalError) -> int:
    return status_of_class(type(error))


async def handle_domain_error(req: falcon.asgi.Request, resp: falcon.asgi.Response,
                              error: domain.PortalError, _params: dict[str, Any]) -> None:
    status = status_of(error)
    extra: dict[str, Any] = {}
    if isinstance(error, domain.ValidationFailed):
        extra["errors"] = [{"field": e.field, "message": e.message} for e in error.errors]
    if isinstance(error, domain.WaitTimedOut):
        extra["state"] = error.state
        extra["target_state"] = error.target_state
    if isinstance(error, domain.InsufficientScope):
        extra["scope"] = error.scope  # the scope the operation needs
    if isinstance(error, domain.TooManyRequests) and error.retry_after is not None:
        resp.set_header("Retry-After", str(error.retry_after))
    if isinstance(error, domain.Unauthenticated):
        # RFC 6750: a request with no credentials gets the bare challenge, a bad key "invalid_token".
        challenge = 'Bearer realm="manage-playrservers"'
        if not isinstance(error, domain.MissingApiKey):
            challenge += ', error="invalid_token"'
        resp.set_header("WWW-Authenticate", challenge)
    if status >= 500:
        log.warning("request_failed", code=error.code, detail=error.detail)
    write_problem(req, resp, status, error.code, error.title, error.detail, **extra)


async def handle_http_error(req: falcon.asgi.Request, resp: falcon.asgi.Response,
                            error: falcon.HTTPError, _params: dict[str, Any]) -> None:
    status = error.status_code
    code = CODE_OF_STATUS.get(status, f"http_{status}")  # Falcon's own errors: routing, methods
    title = _reason(status)
    detail = error.description or _default_detail(status, req)
    headers = error.headers or {}
    pairs: list[tuple[str, str]] = (list(headers.items()) if isinstance(headers, Mapping)
                                    else list(headers))
    for name, value in pairs:
        resp.set_header(name, value)
    write_problem(req, resp, status, code, str(title), detail)


async def handle_unexpected(req: falcon.asgi.Request, resp: falcon.asgi.Response,
                            error: Exception, _params: dict[str, Any]) -> None:
    log.exception("unhandled_error", error_type=type(error).__name__)
    write_problem(req, resp, 500, "internal_error", "Internal server error",
                  "the portal failed to handle this request; the operator can find it in the logs by its "
                  "request_id")


def _default_detail(status: int, req: falcon.asgi.Request) -> str:
    if status == 404:
        return f"no such resource: {req.path}"
    if status == 405:
        return f"{req.method} is not allowed on {req.path}"
    return _reason(status)


def _reason(status: int) -> str:
    return str(falcon.code_to_http_status(status)).split(" ", 1)[1]


def register(app: falcon.asgi.App[Any, Any]) -> None:
    # Falcon picks the handler of the most specific class, so the order here does not matter.
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(domain.PortalError, handle_domain_error)
