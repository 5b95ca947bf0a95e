"""Structured logs with structlog: JSON lines in production, readable console lines on a terminal,
and one processor that keeps secrets out of every log line."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(api_key|private_key|passphrase|password|secret|authorization|token)", re.I)
REDACTED = "[redacted]"
_SECRET_TEXT = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), REDACTED),
    (re.compile(r"mgmt_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}"), REDACTED),
    (re.compile(r"(Bearer\s+)\S+", re.I), r"\g<1>" + REDACTED),
]


def redact_text(text: str) -> str:
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def drop_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of secret-named keys, and secret-looking text anywhere, with ``[redacted]``."""
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and key != "api_key_prefix":
            event[key] = REDACTED
        elif isinstance(value, str):
            event[key] = redact_text(value)
    return event


def configure(log_format: str = "auto", level: str = "info") -> None:
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            drop_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def gunicorn_json_logging(level: str) -> dict[str, Any]:
    """A logging.config dictionary that makes gunicorn's own lines (start, worker boot, errors)
    JSON too, through the same secret-dropping processors as the portal's lines."""
    formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            drop_secrets,
            structlog.processors.JSONRenderer(),
        ],
        "foreign_pre_chain": [
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
    }
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": formatter},
        "handlers": {"console": handler},
        "loggers": {
            "gunicorn.error": {"handlers": ["console"], "level": level.upper(), "propagate": False},
            # No handler: the app writes the one access line per request. (The uvicorn worker
            # copies this logger's handlers to uvicorn.access, which otherwise wrote a second,
            # plain-text line for every request.)
            "gunicorn.access": {"handlers": [], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"handlers": ["console"], "level": level.upper(), "propagate": False},
            # asyncssh logs every connection and channel at INFO: lines per host command, which a
            # fleet view of hundreds of agents multiplies (issue 22); its warnings stay.
            "asyncssh": {"level": "DEBUG" if level.lower() == "debug" else "WARNING"},
        },
    }
