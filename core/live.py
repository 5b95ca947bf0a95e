"""Values of the live state: events, and the mirror of each agent's VMs that its watcher keeps
(``core/watch.py``). Plain attrs classes: storage (``core/ports.py``) and the services share them."""

from __future__ import annotations

from datetime import datetime

import attrs

from core.model import printable

EVENT_TYPE_MAX = 64
EVENT_DETAIL_MAX = 1000


def _vm(text: str | None) -> str | None:
    return None if text is None else printable(text, 255)


def _type(text: str) -> str:
    return printable(text, EVENT_TYPE_MAX)


def _detail(text: str | None) -> str:
    return printable(text or "", EVENT_DETAIL_MAX)


@attrs.frozen
class Event:
    """One event: ``at`` is when it happened (the host's time for host events), ``agent_id`` and
    ``vm`` what it is about, ``type`` what happened, ``detail`` libvirt's or the portal's words."""

    id: int
    user_id: int
    at: datetime
    agent_id: int | None
    vm: str | None = attrs.field(converter=_vm)
    type: str = attrs.field(converter=_type)
    detail: str = attrs.field(converter=_detail)


@attrs.frozen
class EventFilter:
    """Which events a reader wants: those after ``after`` (an id), of one agent, one VM, some types."""

    after: int = 0
    agent_id: int | None = None
    vm: str | None = None
    types: tuple[str, ...] = ()
    # the only agents the reader's API key sees (issue 20), or None: every agent of the user
    agent_ids: frozenset[int] | None = None

    def matches(self, event: Event) -> bool:
        return (event.id > self.after and (self.agent_id is None or event.agent_id == self.agent_id)
                and (self.agent_ids is None or event.agent_id in self.agent_ids)
                and (self.vm is None or event.vm == self.vm) and (not self.types or event.type in self.types))



@attrs.frozen
class MirroredVm:
    """One VM as the agent's watcher last knew it; ``id`` is None when it is not running."""

    name: str
    state: str
    id: int | None


@attrs.frozen
class WatchStatus:
    """An agent's watcher as the database knows it: who holds its lease until when, whether its
    stream is up, and the last time it confirmed the mirror current (``alive_at``)."""

    agent_id: int
    holder: str
    expires_at: datetime
    connected: bool
    alive_at: datetime | None


@attrs.frozen
class Mirror:
    """An agent's watcher lease and its mirrored VMs (by name), as one read found them."""

    status: WatchStatus
    vms: tuple[MirroredVm, ...]


# --- webhooks (issue 18): a user's subscriptions, and the outbox of their deliveries


@attrs.frozen
class Webhook:
    """Where to POST the owner's events: ``types`` says which (empty: every type; ``vm.*`` a whole
    family), ``agent_ids`` of which agents (None: every agent of the owner; a webhook made with a key
    limited to agents is limited to them). Its secret is held sealed (``core/webhooks.py``)."""

    id: int
    user_id: int
    url: str
    types: tuple[str, ...]
    agent_ids: frozenset[int] | None
    active: bool
    sealed_secret: str = attrs.field(repr=False)
    created_at: datetime
    updated_at: datetime


DELIVERY_PENDING = "pending"  # waiting for its next attempt (or being attempted)
DELIVERY_DELIVERED = "delivered"  # the receiver answered 2xx
DELIVERY_FAILED = "failed"  # every attempt failed: no more tries


@attrs.frozen
class Delivery:
    """One event on its way to one webhook (a row of the outbox): the body is fixed when the event
    is stored, so every attempt sends the same bytes with the same id (``X-Playr-Delivery``)."""

    id: int
    webhook_id: int
    user_id: int
    event_id: int
    event_type: str
    body: str
    status: str
    attempts: int  # attempts made so far
    next_at: datetime | None  # when the next attempt is due (None: finished)
    created_at: datetime
    finished_at: datetime | None = None


@attrs.frozen
class DeliveryAttempt:
    """One POST of a delivery and how it ended: the receiver's status code and the start of its
    answer, or why there was none (time-out, refused address, connection error)."""

    delivery_id: int
    number: int
    at: datetime
    seconds: float
    status_code: int | None
    error: str | None
    response: str | None
