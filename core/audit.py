"""The audit trail: who did what, to which agent and VM, with what outcome — readable by its owner.

Every mutation and every credentials read writes its event in the same transaction as the change
(``AuditLog.audited``); a refused attempt is recorded too (outcome = the error's code) in a
transaction of its own. Event text is made safe and cut to its column by ``AuditEvent`` itself
(``core/model.py``). Synchronous: it only talks to storage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import attrs

from core.errors import PortalError, ValidationFailed
from core.events import EventLog
from core.model import AuditEvent, Caller
from core.ports import Clock, Storage, Transaction
from core.validation import collect

AUDIT_PAGE_MAX = 500
AUDIT_PAGE_DEFAULT = 100


class AuditLog:
    """Records events and serves each user their own history."""

    runs_on_event_loop: ClassVar[bool] = False

    def __init__(self, *, storage: Storage, clock: Clock, events: EventLog | None = None) -> None:
        self.storage = storage
        self.clock = clock
        self.events = events

    def audit_events(self, caller: Caller, *, limit: int = AUDIT_PAGE_DEFAULT,
                     before: int | None = None) -> list[AuditEvent]:
        """The caller's audit events, newest first; ``before`` is the id the next page starts below."""
        errors = collect(
            ("limit", None if 1 <= limit <= AUDIT_PAGE_MAX else f"must be between 1 and {AUDIT_PAGE_MAX}"),
            ("before", None if before is None or before >= 1 else "must be a positive event id"),
        )
        if errors:
            raise ValidationFailed(errors)
        with self.storage.transaction() as tx:
            # a key limited to agents reads only the history of those agents
            return tx.list_audit_events(caller.user.id, limit, before, agent_ids=caller.agent_ids)

    @contextmanager
    def audited(self, caller: Caller, action: str, *, agent_id: int | None = None) -> Iterator[AuditedChange]:
        """Audit one attempted mutation. Slow preparation (parsing keys, sealing) happens inside
        this block but outside any transaction; ``change.write()`` then opens the write
        transaction whose last statement records ``action`` as done. If a domain error ends the
        block, the refusal (outcome = the error's code) is recorded in a transaction of its own."""
        change = AuditedChange(self, caller, action, agent_id)
        try:
            yield change
        except PortalError as error:
            with self.storage.transaction(write=True) as tx:
                tx.add_audit_event(attrs.evolve(self.caller_event(caller, action), agent_id=change.agent_id,
                                                outcome=error.code, detail=error.detail))
            raise

    def record(self, caller: Caller, action: str, agent_id: int, vm: str | None, outcome: str,
               detail: str | None) -> None:
        """Record one finished action (a remote command) in a transaction of its own; an action on
        a VM is also an event of the caller's (``action.start``…: a script sees its own action
        next to the host's confirmation)."""
        with self.storage.transaction(write=True) as tx:
            audited = tx.add_audit_event(attrs.evolve(self.caller_event(caller, action), agent_id=agent_id, vm=vm,
                                                      outcome=outcome, detail=detail or None))
            if self.events is not None and action.startswith("vm.") and vm is not None:
                words = outcome if outcome == "ok" else f"{outcome}: {detail or ''}".rstrip(": ")
                if outcome == "ok" and detail:
                    words = f"ok: {detail}"
                self.events.add(tx, self.events.new(caller.user.id, agent_id, vm,
                                                    "action." + action[3:].replace("_", "-").replace(".", "-"),
                                                    f"{words} (request {caller.request_id})", audited.created_at))

    def caller_event(self, caller: Caller, action: str) -> AuditEvent:
        event = self.event(caller.user.id, action, caller.request_id, caller.client_address)
        if caller.key is None:
            return event
        return attrs.evolve(event, key_id=caller.key.id, key_name=caller.key.name)

    def event(self, user_id: int, action: str, request_id: str, client_address: str) -> AuditEvent:
        """A successful event of ``action`` by ``user_id``, now; callers evolve what differs."""
        return AuditEvent(id=0, user_id=user_id, action=action, outcome="ok", agent_id=None, vm=None, detail=None,
                          request_id=request_id, client_address=client_address, created_at=self.clock.now())


@attrs.define
class AuditedChange:
    """An audited use case in progress: the agent its event is about (which a registration only
    learns after the insert) and the write transaction that records it."""

    log: AuditLog
    caller: Caller
    action: str
    agent_id: int | None
    detail: str | None = None  # what the event says besides its action (set inside the block)

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        with self.log.storage.transaction(write=True) as tx:
            yield tx
            tx.add_audit_event(attrs.evolve(self.log.caller_event(self.caller, self.action), agent_id=self.agent_id,
                                            detail=self.detail))
