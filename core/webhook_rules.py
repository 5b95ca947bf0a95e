"""The rules of webhooks (issue 18), pure: how a delivery is signed and verified, when a failed one
is tried again, which events a webhook gets, what a webhook URL may look like, and the outbox row
each matching event makes in the transaction that stores it.

- **Signature** (Stripe's scheme): ``X-Playr-Signature: t=<unix seconds>,v1=<hex>`` where the hex is
  HMAC-SHA256 keyed with the webhook's secret over ``"<t>.<body>"``. A receiver recomputes it,
  compares in constant time and refuses a ``t`` too far from its clock (a replayed old delivery).
  ``t`` is the time of each attempt, so a retry carries a fresh signature over the same body.
- **Idempotency**: ``X-Playr-Delivery`` is the outbox row's id: the same on every attempt of one
  event to one webhook. Deliveries are at least once; receivers skip ids they have already done.
- **Back-off**: attempt ``n`` failed → the next one ``base * 2**(n-1)`` seconds later (at most
  ``cap``), until ``max_attempts`` attempts: then the delivery is ``failed``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import attrs

from core.errors import FieldError
from core.live import DELIVERY_PENDING, Delivery, Event, Webhook
from core.ports import Transaction

SIGNATURE_HEADER = "X-Playr-Signature"
DELIVERY_HEADER = "X-Playr-Delivery"
EVENT_HEADER = "X-Playr-Event"
TOLERANCE = 300  # seconds a receiver should accept between t and its clock (documented)

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of generated secrets, not a secret
RETRY_BASE = 10.0  # seconds before the second attempt
RETRY_CAP = 3600.0  # the longest wait between two attempts
MAX_ATTEMPTS = 12  # 10 s, 20 s … 1 h: the last attempt is about 3.4 hours after the first

URL_MAX = 2000
ERROR_MAX = 500  # characters of an attempt's error kept
RESPONSE_MAX = 1000  # characters of the receiver's answer kept (and 4 KiB at most read)

# An event type (``vm.started``) or a whole family (``vm.*``).
TYPE_PATTERN = re.compile(r"^(vm|agent|action)\.(\*|[a-z0-9][a-z0-9-]{0,40})$")


# ---------------------------------------------------------------------- signing


def new_secret() -> str:
    """A new signing secret: 256 random bits, shown to the owner once."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Playr-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = TOLERANCE) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` at a time within ``tolerance`` seconds of
    ``now`` (what a receiver does; docs/events.md has the same in a few lines)."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        fields.setdefault(name, []).append(value)
    stamps = fields.get("t", [])
    if len(stamps) != 1 or not stamps[0].isascii() or not stamps[0].isdigit() or len(stamps[0]) > 15:
        return False
    timestamp = int(stamps[0])
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).partition(",v1=")[2]
    return any(hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))
               for given in fields.get("v1", []))


def headers(secret: str, delivery: Delivery, timestamp: int) -> dict[str, str]:
    """The headers of one attempt of ``delivery``."""
    return {"Content-Type": "application/json", "User-Agent": "playr-portal-webhooks/1",
            SIGNATURE_HEADER: signature(secret, timestamp, delivery.body.encode()),
            DELIVERY_HEADER: str(delivery.id), EVENT_HEADER: delivery.event_type}


# ---------------------------------------------------------------------- retries


def retry_delay(attempts: int, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """Seconds from the ``attempts``-th failed attempt to the next: doubling from ``base``, at most ``cap``."""
    if attempts <= 0:
        return 0.0
    return float(min(cap, base * 2.0 ** min(attempts - 1, 40)))


def next_attempt(attempts: int, now: datetime, *, max_attempts: int = MAX_ATTEMPTS, base: float = RETRY_BASE,
                 cap: float = RETRY_CAP) -> datetime | None:
    """When to try again after ``attempts`` failed attempts; None: give up (the delivery failed)."""
    if attempts >= max_attempts:
        return None
    return now + timedelta(seconds=retry_delay(attempts, base, cap))


def succeeded(status_code: int | None) -> bool:
    """A delivery is done when the receiver answers 2xx (a redirect is not followed: a failure)."""
    return status_code is not None and 200 <= status_code <= 299


# ---------------------------------------------------------------------- matching and the outbox


def matches(hook: Webhook, event: Event) -> bool:
    """Whether ``hook`` gets ``event``: active, one of its agents, one of its types (or families)."""
    if not hook.active or event.user_id != hook.user_id:
        return False
    if hook.agent_ids is not None and event.agent_id not in hook.agent_ids:
        return False
    return not hook.types or any(kind == event.type or (kind.endswith(".*") and event.type.startswith(kind[:-1]))
                                 for kind in hook.types)


def event_body(event: Event) -> str:
    """The JSON a delivery carries: the event as ``GET /events`` shows it."""
    return json.dumps({"id": event.id, "at": event.at.isoformat().replace("+00:00", "Z"), "agent_id": event.agent_id,
                       "vm": event.vm, "type": event.type, "detail": event.detail}, separators=(",", ":"))


def enqueue(tx: Transaction, event: Event, now: datetime) -> int:
    """Put ``event`` (just stored in ``tx``) in the outbox of every webhook of its owner that wants it,
    in the same transaction: an event that is stored is delivered (or fails visibly). How many."""
    rows = [hook for hook in tx.list_webhooks(event.user_id) if matches(hook, event)]
    if not rows:
        return 0
    body = event_body(event)
    for hook in rows:
        tx.add_delivery(Delivery(id=0, webhook_id=hook.id, user_id=event.user_id, event_id=event.id,
                                 event_type=event.type, body=body, status=DELIVERY_PENDING, attempts=0, next_at=now,
                                 created_at=now))
    return len(rows)


# ---------------------------------------------------------------------- what a webhook may be


@attrs.frozen
class Target:
    """Where a webhook URL points: its scheme, host (a name or an IP literal, without brackets) and port."""

    scheme: str
    host: str
    port: int


def parse_url(url: str) -> tuple[Target | None, str | None]:
    """The target of an ``http``/``https`` URL, or why it is not one a webhook may have. Credentials in
    the URL and fragments are refused (secrets in URLs end up in logs; a fragment is never sent)."""
    if len(url) > URL_MAX:
        return None, f"must be at most {URL_MAX} characters"
    if not url.isascii() or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        return None, "must be an ASCII URL without spaces or control characters (percent-encode the rest)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return None, f"is not a valid URL ({error})"
    if parts.scheme not in ("http", "https"):
        return None, "must be an http:// or https:// URL"
    host = parts.hostname or ""
    if not host:
        return None, "must name a host"
    if parts.username is not None or parts.password is not None:
        return None, "must not carry credentials (user:password@); authenticate the portal by the signature"
    if parts.fragment or url.endswith("#"):
        return None, "must not have a #fragment"
    if port == 0:
        return None, "must not use port 0"
    return Target(scheme=parts.scheme, host=host, port=port or (443 if parts.scheme == "https" else 80)), None


def check_types(types: Sequence[str]) -> list[FieldError]:
    """Problems with a webhook's event types (empty list: every type)."""
    if len(types) > 50:
        return [FieldError("events", "must list at most 50 event types")]
    for kind in types:
        if not isinstance(kind, str) or not TYPE_PATTERN.match(kind):
            return [FieldError("events", f"{str(kind)[:64]!r} is not an event type such as vm.started, "
                                         "agent.unreachable, action.start, or a family such as vm.*")]
    return []


def excerpt(text: str | None, limit: int) -> str | None:
    """``text`` cut to ``limit`` characters (the cut ends with "…"), printable."""
    if text is None:
        return None
    text = "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"
