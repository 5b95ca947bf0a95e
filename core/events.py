"""Events: what happened to the caller's agents and VMs, in the order the portal learnt it.

Three sources write events: the watchers (``core/watch.py``: what a host's libvirt reports, such
as ``vm.started``, and what a watcher itself sees, such as ``agent.unreachable``), and the portal's
own VM actions (``action.start``…, recorded with their audit event). Every event belongs to the
owner of its agent and carries an id that only grows, so a client resumes from the last id it saw
(``GET /events?after=``, the stream's ``Last-Event-ID``). Each user keeps at most
``retention`` events (``MANAGEMENT_EVENT_RETENTION``); older ones are pruned as new ones arrive.
Synchronous: it only talks to storage.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar

import attrs

from core.errors import FieldError, ValidationFailed
from core.live import Event, EventFilter
from core.model import Caller
from core.ports import Clock, Storage, Transaction
from core.virsh import check_vm_name
from core.webhook_rules import enqueue

EVENT_PAGE_MAX = 500
EVENT_PAGE_DEFAULT = 100
EVENT_RETENTION = 10_000  # events kept per user
MAX_ID = 2**31 - 1
PRUNE_EVERY = 32  # prune a user's history once every so many inserted ids (bounded: retention + this)

# ``vm.<event>`` (the host's libvirt), ``agent.<what>`` (a watcher), ``action.<action>`` (the portal).
EVENT_TYPE = re.compile(r"^(vm|agent|action)\.[a-z0-9][a-z0-9-]{0,40}$")

# What a watcher records about its own connection.
AGENT_WATCHING = "agent.watching"  # (re)connected; the mirror was resynchronised from virsh list
AGENT_UNREACHABLE = "agent.unreachable"  # the host cannot be reached (or the watcher's stream ended)


def check_filter(*, after: int | None = None, agent_id: int | None = None, vm: str | None = None,
                 types: Sequence[str] = ()) -> EventFilter:
    """The filter, or ``ValidationFailed`` naming each bad field."""
    problems: list[FieldError] = []
    if after is not None and not 0 <= after <= 2**63 - 1:
        problems.append(FieldError("after", "must be an event id (0 or more)"))
    if agent_id is not None and not 1 <= agent_id <= MAX_ID:
        problems.append(FieldError("agent", "must be a positive agent id"))
    if vm is not None:
        problem = check_vm_name(vm)
        if problem is not None:
            problems.append(FieldError("vm", problem))
    for kind in types:
        if not EVENT_TYPE.match(kind):
            problems.append(FieldError("type", "must be an event type such as vm.started, agent.unreachable or "
                                               "action.start (lowercase letters, digits and '-' after the dot)"))
            break
    if problems:
        raise ValidationFailed(problems)
    return EventFilter(after=min(after or 0, 2**63 - 1), agent_id=agent_id, vm=vm, types=tuple(types))


class EventLog:
    """Records events and serves each user their own."""

    runs_on_event_loop: ClassVar[bool] = False

    def __init__(self, *, storage: Storage, clock: Clock, retention: int = EVENT_RETENTION) -> None:
        self.storage = storage
        self.clock = clock
        self.retention = retention

    def list_events(self, caller: Caller, *, after: int | None = None, agent_id: int | None = None,
                    vm: str | None = None, types: Sequence[str] = (), limit: int = EVENT_PAGE_DEFAULT) -> list[Event]:
        """The caller's events with an id above ``after``, oldest first (pass the last id as the next
        ``after``), filtered by agent, VM and types."""
        if not 1 <= limit <= EVENT_PAGE_MAX:
            raise ValidationFailed.one("limit", f"must be between 1 and {EVENT_PAGE_MAX}")
        wanted = attrs.evolve(check_filter(after=after, agent_id=agent_id, vm=vm, types=types),
                              agent_ids=caller.agent_ids)  # a key limited to agents sees only theirs
        return self.read(caller.user.id, wanted, limit)

    def read(self, user_id: int, wanted: EventFilter, limit: int) -> list[Event]:
        """``user_id``'s events that ``wanted`` matches, oldest first (the stream reads with this)."""
        with self.storage.transaction() as tx:
            return tx.list_events(user_id, wanted, limit)

    def last_id(self, user_id: int) -> int:
        """The id of the user's newest event (0: none); a stream without ``Last-Event-ID`` starts there."""
        with self.storage.transaction() as tx:
            return tx.last_event_id(user_id)

    def add(self, tx: Transaction, event: Event) -> Event:
        """Record ``event`` inside ``tx`` (the caller's transaction: a mirror update or an audit
        commits with its event), pruning the user's oldest past the retention now and then. The
        user's webhooks that want it get their outbox rows in ``tx`` too (issue 18: nothing lost)."""
        stored = tx.add_event(event)
        enqueue(tx, stored, self.clock.now())
        if stored.id % PRUNE_EVERY == 0:
            tx.prune_events(event.user_id, self.retention)
        return stored

    def new(self, user_id: int, agent_id: int | None, vm: str | None, type_: str, detail: str | None,
            at: datetime | None = None) -> Event:
        return Event(id=0, user_id=user_id, at=at or self.clock.now(), agent_id=agent_id, vm=vm, type=type_,
                     detail=detail or "")
