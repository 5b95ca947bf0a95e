"""Errors as RFC 9457 problem details, mapped once for the whole app.

Every error body is ``application/problem+json`` with ``type, title, status, detail, code`` (and
``errors`` listing invalid fields on a 422, ``request_id`` always). A 500 body never carries a
stack trace or a secret: the exception is logged (secrets redacted) and the body says only that
the request failed and which request id to look for.
"""

from __future__ import annotations

import json
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
    domain.Unavailable: 503,
    domain.RemoteError: 502,
    domain.RemoteTimeout: 504,
    domain.TooManyRequests: 429,
}

# Codes for errors Falcon itself raises (routing, methods, bodies).
CODE_OF_STATUS = {
    400: "bad_request",
    401: "missing_api_key",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    431: "headers_too_large",
    409: "conflict",
    422: "validation_failed",
    502: "remote_error",
    503: "unavailable",
    504: "agent_timeout",
}


class Problem(falcon.HTTPError):
    """An HTTP error with a stable ``code``, raised by the entrypoint's own checks."""

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(falcon.code_to_http_status(status), title=title, description=detail, headers=headers)
        self.code = code  # type: ignore[assignment]  # falcon's optional int code; ours is the problem's code


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


def status_of(error: domain.PortalError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


async def handle_domain_error(req: falcon.asgi.Request, resp: falcon.asgi.Response,
                              error: domain.PortalError, _params: dict[str, Any]) -> None:
    status = status_of(error)
    extra: dict[str, Any] = {}
    if isinstance(error, domain.ValidationFailed):
        extra["errors"] = [{"field": e.field, "message": e.message} for e in error.errors]
    if isinstance(error, domain.WaitTimedOut):
        extra["state"] = error.state
        extra["target_state"] = error.target_state
    if isinstance(error, domain.Unauthenticated):
        resp.set_header("WWW-Authenticate", 'Bearer realm="manage-playrservers", error="invalid_token"')
    if isinstance(error, domain.TooManyRequests):
        resp.set_header("Retry-After", str(error.retry_after))
    if status >= 500:
        log.warning("request_failed", code=error.code, detail=error.detail)
    write_problem(req, resp, status, error.code, error.title, error.detail, **extra)


async def handle_http_error(req: falcon.asgi.Request, resp: falcon.asgi.Response,
                            error: falcon.HTTPError, _params: dict[str, Any]) -> None:
    status = error.status_code
    code = getattr(error, "code", None) or CODE_OF_STATUS.get(status, f"http_{status}")
    title = error.title if isinstance(error, Problem) and error.title else _reason(status)
    detail = error.description or _default_detail(status, req)
    for name, value in dict(error.headers or {}).items():
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
