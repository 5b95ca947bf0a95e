"""In-memory fakes of every port, for fast unit tests of the core. They keep the ports' promises
(transactions roll back, queries are scoped by owner, sealed secrets need the right context) but
touch no disk, network or real cryptography."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import itertools
import secrets
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import attrs

from core.errors import (
    AgentAddressRefused,
    EmailTaken,
    HostKeyMismatch,
    SecretUnreadable,
    TunnelRefused,
    WebhookTargetRefused,
)
from core.live import (
    DELIVERY_PENDING,
    Delivery,
    DeliveryAttempt,
    Event,
    EventFilter,
    Mirror,
    MirroredVm,
    WatchStatus,
    Webhook,
)
from core.model import (
    API_KEY_SCHEME,
    Agent,
    AgentCredentials,
    ApiKey,
    AuditEvent,
    ClientKey,
    ConsoleTicket,
    HostKey,
    IssuedApiKey,
    User,
    WebSession,
)
from core.networks import AgentNetworks, ip_literal
from core.ports import CommandResult, PinHostKey, RemoteStream, WebhookResponse
from core.validation import normalize_email


class ManualClock:
    """A clock that moves only when told to (each reading advances it by ``step``)."""

    def __init__(self, start: datetime | None = None, step: timedelta = timedelta(seconds=1)) -> None:
        self.current = start or datetime(2026, 1, 1, tzinfo=UTC)
        self.step = step

    def now(self) -> datetime:
        self.current += self.step
        return self.current


class CountingKeyHasher:
    """Deterministic, well-formed API keys: ``mgmt_000000000001_<43 chars>``."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def issue(self) -> IssuedApiKey:
        n = next(self._counter)
        prefix = f"{API_KEY_SCHEME}_{n:012x}"
        plaintext = f"{prefix}_{hashlib.sha256(str(n).encode()).hexdigest()[:43]}"
        return IssuedApiKey(plaintext=plaintext, prefix=prefix, digest=self._digest(plaintext))

    def matches(self, plaintext: str, digest: str) -> bool:
        return hmac.compare_digest(self._digest(plaintext), digest)

    @staticmethod
    def _digest(plaintext: str) -> str:
        return "fake:" + hashlib.sha256(plaintext.encode()).hexdigest()


class ReversibleSecretBox:
    """Not encryption: ``sealed(<context>)<reversed text>``, so tests can see binding to context."""

    def seal(self, plaintext: str, *, context: str) -> str:
        return f"sealed({context}){plaintext[::-1]}"

    def unseal(self, sealed: str, *, context: str) -> str:
        head = f"sealed({context})"
        if not sealed.startswith(head):
            raise SecretUnreadable("sealed for another context")
        return sealed[len(head):][::-1]


class FakeSshKeys:
    """Accepts ``PRIVATE KEY`` texts; ``ENCRYPTED:<passphrase>`` inside one demands that passphrase.
    Generated keys are numbered, so each is different."""

    def __init__(self) -> None:
        self.generated = 0

    def inspect_private_key(self, text: str, passphrase: str | None) -> ClientKey:
        if "PRIVATE KEY" not in text:
            raise ValueError("is not an SSH private key")
        if "ENCRYPTED:" in text:
            wanted = text.split("ENCRYPTED:", 1)[1].split()[0]
            if passphrase is None:
                raise ValueError("passphrase required: the private key is encrypted")
            if passphrase != wanted:
                raise ValueError("passphrase does not decrypt the private key")
        digest = hashlib.sha256(text.encode()).hexdigest()
        return ClientKey(public_key=f"ssh-ed25519 FAKE{digest[:16]}", fingerprint=f"SHA256:{digest[:43]}")

    def generate_private_key(self) -> str:
        self.generated += 1
        return f"-----BEGIN OPENSSH PRIVATE KEY-----\ngenerated {self.generated}\n-----END OPENSSH PRIVATE KEY-----\n"

    def parse_host_key(self, text: str) -> HostKey:
        parts = text.split()
        if len(parts) < 2 or not parts[0].startswith("ssh-"):
            raise ValueError("is not an OpenSSH public key")
        return HostKey(openssh=f"{parts[0]} {parts[1]}", fingerprint=f"SHA256:{parts[1][:43]}")


@attrs.define
class _State:
    users: dict[int, User] = attrs.Factory(dict)
    email_keys: dict[str, int] = attrs.Factory(dict)
    keys: dict[int, ApiKey] = attrs.Factory(dict)  # key id -> key
    agents: dict[int, Agent] = attrs.Factory(dict)
    events: dict[int, AuditEvent] = attrs.Factory(dict)
    consoles: dict[int, ConsoleTicket] = attrs.Factory(dict)  # issue 17
    next_id: dict[str, int] = attrs.Factory(lambda: {"user": 1, "agent": 1, "event": 1, "key": 1, "console": 1,
                                                     "live": 1, "web_session": 1})
    # issue 18: events, watcher leases and the live mirror
    live_events: dict[int, Event] = attrs.Factory(dict)
    watches: dict[int, WatchStatus] = attrs.Factory(dict)
    mirror: dict[int, dict[str, MirroredVm]] = attrs.Factory(dict)
    demand: dict[int, datetime] = attrs.Factory(dict)
    web_sessions: dict[str, WebSession] = attrs.Factory(dict)  # by digest (issue 19)
    # webhooks (issue 18): subscriptions, the outbox, leases on its rows, attempts
    webhooks: dict[int, Webhook] = attrs.Factory(dict)
    deliveries: dict[int, Delivery] = attrs.Factory(dict)
    delivery_leases: dict[int, tuple[str, datetime]] = attrs.Factory(dict)
    attempts: list[DeliveryAttempt] = attrs.Factory(list)

    def take(self, kind: str) -> int:
        """``take_id`` for kinds added after the first (their counters start at 1 on first use)."""
        self.next_id.setdefault(kind, 1)
        return self.take_id(kind)

    def take_id(self, kind: str) -> int:
        value = self.next_id[kind]
        self.next_id[kind] = value + 1
        return value


class _WebhookTables:
    """The webhook half of ``InMemoryTransaction`` (issue 18)."""

    s: _State

    def add_webhook(self, hook: Webhook) -> Webhook:
        stored = attrs.evolve(hook, id=self.s.take("webhook"))
        self.s.webhooks[stored.id] = stored
        return stored

    def list_webhooks(self, user_id: int) -> list[Webhook]:
        return [h for _, h in sorted(self.s.webhooks.items()) if h.user_id == user_id]

    def get_webhook(self, user_id: int, webhook_id: int) -> Webhook | None:
        hook = self.s.webhooks.get(webhook_id)
        return hook if hook is not None and hook.user_id == user_id else None

    def update_webhook(self, hook: Webhook) -> None:
        if self.get_webhook(hook.user_id, hook.id) is not None:
            self.s.webhooks[hook.id] = hook

    def delete_webhook(self, user_id: int, webhook_id: int) -> bool:
        if self.get_webhook(user_id, webhook_id) is None:
            return False
        del self.s.webhooks[webhook_id]
        gone = {i for i, d in self.s.deliveries.items() if d.webhook_id == webhook_id}
        for delivery_id in gone:
            del self.s.deliveries[delivery_id]
            self.s.delivery_leases.pop(delivery_id, None)
        self.s.attempts = [a for a in self.s.attempts if a.delivery_id not in gone]
        return True

    def add_delivery(self, delivery: Delivery) -> Delivery:
        stored = attrs.evolve(delivery, id=self.s.take("delivery"))
        self.s.deliveries[stored.id] = stored
        return stored

    def _claimable(self) -> list[tuple[datetime, Delivery]]:
        found = []
        for delivery_id, d in self.s.deliveries.items():
            hook = self.s.webhooks.get(d.webhook_id)
            if d.status != DELIVERY_PENDING or d.next_at is None or hook is None or not hook.active:
                continue
            lease = self.s.delivery_leases.get(delivery_id)
            found.append((max(d.next_at, lease[1]) if lease is not None else d.next_at, d))
        return found

    def next_delivery_at(self) -> datetime | None:
        return min((when for when, _ in self._claimable()), default=None)

    def claim_deliveries(self, holder: str, now: datetime, until: datetime,
                         limit: int) -> list[tuple[Delivery, Webhook]]:
        due = sorted((d for when, d in self._claimable() if when <= now), key=lambda d: (d.next_at, d.id))[:limit]
        for d in due:
            self.s.delivery_leases[d.id] = (holder, until)
        return [(d, self.s.webhooks[d.webhook_id]) for d in due]

    def record_attempt(self, holder: str, attempt: DeliveryAttempt, status: str,
                       next_at: datetime | None) -> bool:
        lease = self.s.delivery_leases.get(attempt.delivery_id)
        delivery = self.s.deliveries.get(attempt.delivery_id)
        if lease is None or lease[0] != holder or delivery is None or delivery.status != DELIVERY_PENDING:
            return False
        del self.s.delivery_leases[attempt.delivery_id]
        self.s.deliveries[delivery.id] = attrs.evolve(
            delivery, status=status, attempts=attempt.number, next_at=next_at,
            finished_at=None if status == DELIVERY_PENDING else attempt.at)
        self.s.attempts.append(attempt)
        return True

    def postpone_deliveries(self, webhook_id: int, until: datetime, now: datetime) -> None:
        for delivery_id, d in list(self.s.deliveries.items()):
            lease = self.s.delivery_leases.get(delivery_id)
            if (d.webhook_id == webhook_id and d.status == DELIVERY_PENDING and d.next_at is not None
                    and d.next_at < until and (lease is None or lease[1] <= now)):
                self.s.deliveries[delivery_id] = attrs.evolve(d, next_at=until)

    def release_deliveries(self, holder: str) -> None:
        for delivery_id, lease in list(self.s.delivery_leases.items()):
            if lease[0] == holder:
                del self.s.delivery_leases[delivery_id]

    def list_deliveries(self, user_id: int, webhook_id: int, limit: int,
                        before: int | None) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
        mine = [d for i, d in sorted(self.s.deliveries.items(), reverse=True)
                if d.user_id == user_id and d.webhook_id == webhook_id and (before is None or i < before)][:limit]
        return [(d, [a for a in self.s.attempts if a.delivery_id == d.id]) for d in mine]

    def prune_deliveries(self, finished_before: datetime) -> int:
        old = {i for i, d in self.s.deliveries.items()
               if d.finished_at is not None and d.finished_at < finished_before}
        for delivery_id in old:
            del self.s.deliveries[delivery_id]
        self.s.attempts = [a for a in self.s.attempts if a.delivery_id not in old]
        return len(old)


class InMemoryStorage:
    """Implements ``core.ports.Storage``; a transaction works on a copy that replaces the state on
    commit, so an exception inside it leaves nothing behind. Write transactions take a lock first,
    as the port promises: two threads writing at once (the webhook worker records its attempts side
    by side) never lose one another's change."""

    def __init__(self) -> None:
        self.state = _State()
        self.transactions = 0
        self._write_lock = threading.RLock()

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[InMemoryTransaction]:
        with self._write_lock if write else contextlib.nullcontext():
            working = copy.deepcopy(self.state)
            yield InMemoryTransaction(working)
            self.transactions += 1
            if write:
                self.state = working


class InMemoryTransaction(_WebhookTables):
    def __init__(self, state: _State) -> None:
        self.s = state

    def add_user(self, name: str, email: str | None, key: IssuedApiKey, at: datetime) -> User:
        if email is not None and normalize_email(email) in self.s.email_keys:
            raise EmailTaken()
        user = User(id=self.s.take_id("user"), name=name, email=email, api_key_prefix=key.prefix, created_at=at)
        self.s.users[user.id] = user
        if email is not None:
            self.s.email_keys[normalize_email(email)] = user.id
        key_id = self.s.take_id("key")
        self.s.keys[key_id] = ApiKey(user_id=user.id, prefix=key.prefix, digest=key.digest, created_at=at, id=key_id)
        return user

    def count_users(self) -> int:
        return len(self.s.users)

    def get_user(self, user_id: int) -> User | None:
        return self.s.users.get(user_id)

    def find_user_by_email(self, email: str) -> User | None:
        user_id = self.s.email_keys.get(normalize_email(email))
        return None if user_id is None else self.s.users[user_id]

    def list_users(self) -> list[User]:
        return [u for _, u in sorted(self.s.users.items())]

    def find_api_key(self, prefix: str) -> ApiKey | None:
        return next((k for k in self.s.keys.values() if k.prefix == prefix), None)

    def replace_api_key(self, user_id: int, key: IssuedApiKey, at: datetime, *, key_id: int | None = None) -> None:
        for stored in self.list_api_keys(user_id):
            if (stored.full and key_id is None) or stored.id == key_id:
                self.s.keys[stored.id] = attrs.evolve(stored, prefix=key.prefix, digest=key.digest, created_at=at)
                if stored.full:
                    self.s.users[user_id] = attrs.evolve(self.s.users[user_id], api_key_prefix=key.prefix)

    def add_api_key(self, key: ApiKey) -> ApiKey:
        stored = attrs.evolve(key, id=self.s.take_id("key"))
        self.s.keys[stored.id] = stored
        return stored

    def list_api_keys(self, user_id: int) -> list[ApiKey]:
        return [k for _, k in sorted(self.s.keys.items()) if k.user_id == user_id]

    def count_api_keys(self, user_id: int) -> int:
        return len(self.list_api_keys(user_id))

    def get_api_key(self, user_id: int, key_id: int) -> ApiKey | None:
        key = self.s.keys.get(key_id)
        return key if key is not None and key.user_id == user_id else None

    def delete_api_key(self, user_id: int, key_id: int) -> bool:
        if self.get_api_key(user_id, key_id) is None:
            return False
        del self.s.keys[key_id]
        return True

    def touch_api_key(self, key_id: int, at: datetime) -> None:
        key = self.s.keys.get(key_id)
        if key is not None and (key.last_used_at is None or key.last_used_at < at):
            self.s.keys[key_id] = attrs.evolve(key, last_used_at=at)

    def add_agent(self, agent: Agent) -> Agent:
        stored = attrs.evolve(agent, id=self.s.take_id("agent"))
        self.s.agents[stored.id] = stored
        return stored

    def list_agents(self, owner_id: int) -> list[Agent]:
        return [a for _, a in sorted(self.s.agents.items()) if a.owner_id == owner_id]

    def count_agents(self, owner_id: int) -> int:
        return len(self.list_agents(owner_id))

    def newest_agent(self) -> Agent | None:
        return self.s.agents[max(self.s.agents)] if self.s.agents else None

    def get_agent(self, owner_id: int, agent_id: int) -> Agent | None:
        agent = self.s.agents.get(agent_id)
        return agent if agent is not None and agent.owner_id == owner_id else None

    def agent_name_taken(self, owner_id: int, name: str, *, except_id: int = 0) -> bool:
        return any(a.owner_id == owner_id and a.name == name and a.id != except_id for a in self.s.agents.values())

    def update_agent(self, agent: Agent) -> None:
        if self.get_agent(agent.owner_id, agent.id) is not None:
            self.s.agents[agent.id] = agent

    def delete_agent(self, owner_id: int, agent_id: int) -> bool:
        if self.get_agent(owner_id, agent_id) is None:
            return False
        del self.s.agents[agent_id]
        self.s.watches.pop(agent_id, None)  # the database cascades these
        self.s.mirror.pop(agent_id, None)
        self.s.demand.pop(agent_id, None)
        return True

    def add_audit_event(self, event: AuditEvent) -> AuditEvent:
        stored = attrs.evolve(event, id=self.s.take_id("event"))
        self.s.events[stored.id] = stored
        return stored

    def list_audit_events(self, user_id: int, limit: int, before: int | None, *,
                          agent_ids: frozenset[int] | None = None) -> list[AuditEvent]:
        events = [
            e for _, e in sorted(self.s.events.items(), reverse=True)
            if e.user_id == user_id and (before is None or e.id < before)
            and (agent_ids is None or e.agent_id in agent_ids)
        ]
        return events[:limit]

    # consoles (issue 17)
    def add_console_ticket(self, ticket: ConsoleTicket) -> ConsoleTicket:
        stored = attrs.evolve(ticket, id=self.s.take_id("console"))
        self.s.consoles[stored.id] = stored
        return stored

    def redeem_console_ticket(self, digest: str, at: datetime) -> ConsoleTicket | None:
        found = next((t for t in self.s.consoles.values() if t.digest == digest), None)
        if found is None or found.opened_at is not None or found.expires_at <= at:
            return None
        self.s.consoles[found.id] = attrs.evolve(found, opened_at=at)
        return self.s.consoles[found.id]

    def count_open_consoles(self, user_id: int, opened_after: datetime) -> int:
        return sum(1 for t in self.s.consoles.values() if t.user_id == user_id and t.opened_at is not None
                   and t.opened_at > opened_after and t.closed_at is None)

    def close_console(self, ticket_id: int, at: datetime) -> None:
        ticket = self.s.consoles.get(ticket_id)
        if ticket is not None and ticket.closed_at is None:
            self.s.consoles[ticket_id] = attrs.evolve(ticket, closed_at=at)

    # ------------------------------------------------------------------ events and the live mirror (issue 18)

    def add_event(self, event: Event) -> Event:
        stored = attrs.evolve(event, id=self.s.take_id("live"))
        self.s.live_events[stored.id] = stored
        return stored

    def list_events(self, user_id: int, wanted: EventFilter, limit: int) -> list[Event]:
        found = [e for _, e in sorted(self.s.live_events.items()) if e.user_id == user_id and wanted.matches(e)]
        return found[:limit]

    def last_event_id(self, user_id: int) -> int:
        return max((i for i, e in self.s.live_events.items() if e.user_id == user_id), default=0)

    def prune_events(self, user_id: int, keep: int) -> None:
        mine = sorted(i for i, e in self.s.live_events.items() if e.user_id == user_id)
        for event_id in mine[:max(0, len(mine) - keep)]:
            del self.s.live_events[event_id]

    def watched_agents(self, now: datetime) -> list[Agent]:
        return [a for i, a in sorted(self.s.agents.items()) if self.s.demand.get(i, now) > now]

    def want_watch(self, agent_ids: list[int], until: datetime) -> None:
        for agent_id in agent_ids:
            if agent_id in self.s.agents:
                self.s.demand[agent_id] = max(until, self.s.demand.get(agent_id, until))

    def claim_watches(self, holder: str, agent_ids: list[int], now: datetime, until: datetime,
                      alive: list[int]) -> list[int]:
        held = []
        for agent_id in agent_ids:
            current = self.s.watches.get(agent_id)
            if current is not None and current.holder != holder and current.expires_at > now:
                continue
            if current is None or current.holder != holder:
                current = WatchStatus(agent_id=agent_id, holder=holder, expires_at=until, connected=False,
                                      alive_at=None)
            else:
                current = attrs.evolve(current, expires_at=until,
                                       alive_at=now if agent_id in alive else current.alive_at)
            self.s.watches[agent_id] = current
            held.append(agent_id)
        return held

    def release_watches(self, holder: str, agent_ids: list[int]) -> None:
        for agent_id in agent_ids:
            current = self.s.watches.get(agent_id)
            if current is not None and current.holder == holder:
                del self.s.watches[agent_id]

    def set_watch_connected(self, holder: str, agent_id: int, connected: bool, now: datetime) -> bool:
        current = self.s.watches.get(agent_id)
        if current is None or current.holder != holder:
            return False
        self.s.watches[agent_id] = attrs.evolve(current, connected=connected, alive_at=now if connected else None)
        return True

    def watch_status(self, agent_id: int) -> WatchStatus | None:
        return self.s.watches.get(agent_id)

    def mirrored_vms(self, agent_id: int) -> list[MirroredVm]:
        return [vm for _, vm in sorted(self.s.mirror.get(agent_id, {}).items())]

    def agent_names(self, owner_id: int) -> list[tuple[int, str]]:
        return [(a.id, a.name) for _, a in sorted(self.s.agents.items()) if a.owner_id == owner_id]

    def mirrors(self, owner_id: int) -> dict[int, Mirror]:
        agent_ids = [a.id for a in self.s.agents.values() if a.owner_id == owner_id]
        return {a: Mirror(status=self.s.watches[a], vms=tuple(vm for _, vm in sorted(self.s.mirror.get(a, {}).items())))
                for a in sorted(agent_ids) if a in self.s.watches}

    def replace_mirror(self, agent_id: int, vms: list[MirroredVm], now: datetime) -> None:
        self.s.mirror[agent_id] = {vm.name: vm for vm in vms}

    def mirror_vm(self, agent_id: int, vm: MirroredVm | None, name: str, now: datetime) -> None:
        vms = self.s.mirror.setdefault(agent_id, {})
        vms.pop(name, None)
        if vm is not None:
            vms[vm.name] = vm

    # web console sessions (issue 19)
    def add_web_session(self, user_id: int, digest: str, at: datetime, expires_at: datetime,
                        key_prefix: str) -> WebSession:
        session = WebSession(id=self.s.take_id("web_session"), user_id=user_id, digest=digest, created_at=at,
                             last_seen_at=at, expires_at=expires_at, key_prefix=key_prefix)
        self.s.web_sessions[digest] = session
        return session

    def find_web_session(self, digest: str) -> WebSession | None:
        session = self.s.web_sessions.get(digest)
        return session if session is not None and session.user_id in self.s.users else None

    def touch_web_session(self, session_id: int, at: datetime) -> None:
        for digest, session in self.s.web_sessions.items():
            if session.id == session_id:
                self.s.web_sessions[digest] = attrs.evolve(session, last_seen_at=at)

    def delete_web_session(self, digest: str) -> bool:
        return self.s.web_sessions.pop(digest, None) is not None

    def delete_web_sessions_of(self, user_id: int) -> int:
        ended = [d for d, s in self.s.web_sessions.items() if s.user_id == user_id]
        for digest in ended:
            del self.s.web_sessions[digest]
        return len(ended)

    def delete_web_sessions_ended(self, expired_before: datetime, idle_since: datetime) -> int:
        ended = [d for d, s in self.s.web_sessions.items()
                 if s.expires_at <= expired_before or s.last_seen_at <= idle_since]
        for digest in ended:
            del self.s.web_sessions[digest]
        return len(ended)


class CountingTicketDigests:
    """Implements ``core.ports.TicketDigests``: sequential tickets, digests anyone can recompute."""

    def __init__(self) -> None:
        self.issued = 0

    def new_ticket(self) -> tuple[str, str]:
        self.issued += 1
        ticket = f"ticket-{self.issued:012d}-{secrets.token_hex(8)}"
        return ticket, self.digest(ticket)

    def digest(self, ticket: str) -> str:
        return "fake:" + hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).hexdigest()


class ScriptedShell:
    """A remote shell that records every argv and answers from a script of results."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[str, ...]]] = []
        self.discarded: list[int] = []
        self.closed = False
        self.results: dict[tuple[str, ...], CommandResult] = {}
        self.inputs: list[bytes | None] = []  # the stdin of each call, in order
        self.streams: dict[tuple[str, ...], bytes] = {}  # argv -> what a stream of it prints
        self.uncounted: list[tuple[str, ...]] = []
        self.fresh: list[tuple[str, ...]] = []
        # consoles (issue 17): streams stay open after their output until closed when this is set;
        # ``tunnels`` maps (host, port) -> what a connection there prints (absent: TunnelRefused)
        self.hold_streams_open = False
        self.tunnels: dict[tuple[str, int], bytes] = {}
        self.opened: list[ScriptedStream] = []
        self.ptys: list[bool] = []
        # set: streams stay open once they printed their script, until this event is set (a watcher)
        self.hold: asyncio.Event | None = None

    async def run(self, target: AgentCredentials, argv: Sequence[str], *,
                  pin: PinHostKey | None = None, stdin: bytes | None = None,
                  counted: bool = True, fresh: bool = False) -> CommandResult:
        """Answers from ``results``; a scripted result's ``host_key`` is the key the (pretend)
        connection saw, offered to ``pin`` as a real connection would. ``uncounted`` and ``fresh``
        record the calls run with ``counted=False`` and ``fresh=True``."""
        if not counted:
            self.uncounted.append(tuple(argv))
        if fresh:
            self.fresh.append(tuple(argv))
        command = tuple(argv)
        result = self.results.get(command, CommandResult(command=command, exit_status=0, stdout="", stderr=""))
        if pin is not None and result.host_key is not None:
            pinned = await pin(result.host_key)
            if pinned != result.host_key:
                raise HostKeyMismatch("the host key seen differs from the one pinned on first use")
        self.calls.append((target.agent.id, command))
        self.inputs.append(stdin)
        return result

    @contextlib.asynccontextmanager
    async def stream(self, target: AgentCredentials, argv: Sequence[str], *, pin: PinHostKey | None = None,
                     pty: bool = False) -> AsyncIterator[RemoteStream]:
        """A stream that prints ``streams[argv]`` and keeps what is written to it (``written``)."""
        self.calls.append((target.agent.id, tuple(argv)))
        self.ptys.append(pty)
        stream = ScriptedStream(self.streams.get(tuple(argv), b""), self.hold, hold_open=self.hold_streams_open)
        self.opened.append(stream)
        try:
            yield stream
        finally:
            stream.close()

    @contextlib.asynccontextmanager
    async def connect(self, target: AgentCredentials, host: str, port: int, *,
                      pin: PinHostKey | None = None) -> AsyncIterator[RemoteStream]:
        """A tunnel printing ``tunnels[(host, port)]``; ``TunnelRefused`` for any other address."""
        self.calls.append((target.agent.id, ("direct-tcpip", host, str(port))))
        if (host, port) not in self.tunnels:
            raise TunnelRefused(f"{target.agent.hostname} refused to forward to {host}:{port}")
        stream = ScriptedStream(self.tunnels[(host, port)], hold_open=self.hold_streams_open)
        self.opened.append(stream)
        try:
            yield stream
        finally:
            stream.close()

    def discard(self, agent_id: int) -> None:
        self.discarded.append(agent_id)

    async def close(self) -> None:
        self.closed = True


class ScriptedStream:
    """Implements ``core.ports.RemoteStream``: prints ``output``, then ends; keeps what it is sent."""

    def __init__(self, output: bytes, hold: asyncio.Event | None = None, *, hold_open: bool = False) -> None:
        self._output = output
        self._hold = hold
        self.written = bytearray()
        self.closed = False
        self._hold_open = hold_open  # after its output, wait for close() instead of ending
        self._closing = asyncio.Event()

    async def read(self, limit: int = 65536) -> bytes:
        if not self._output and self._hold_open and not self.closed:
            await self._closing.wait()
        chunk, self._output = self._output[:limit], self._output[limit:]
        if not chunk and self._hold is not None:
            await self._hold.wait()
        return chunk

    async def read_stderr(self, limit: int = 65536) -> bytes:
        return b""

    async def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self._closing.set()

    async def wait_closed(self) -> int | None:
        return 0


class FakeAgentAddresses:
    """Implements ``core.ports.AgentAddresses`` without DNS: IP literals are checked against
    ``networks``, names resolve through the ``names`` table (a name not in it does not resolve,
    and passes, as with the real adapter). Every check is recorded."""

    def __init__(self, networks: AgentNetworks | None = None, names: dict[str, list[str]] | None = None) -> None:
        self.networks = networks if networks is not None else AgentNetworks()
        self.names = dict(names or {})
        self.checked: list[tuple[str, int]] = []

    def check(self, hostname: str, port: int) -> None:
        self.checked.append((hostname, port))
        literal = ip_literal(hostname)
        addresses = [literal] if literal is not None else [
            address for address in map(ip_literal, self.names.get(hostname, [])) if address is not None]
        refused = self.networks.refused(addresses)
        if refused:
            raise AgentAddressRefused(f"{hostname} resolves to {refused[0]}, which agents may not point at "
                                      f"({self.networks.describe()})")


class FakeWebhookSender:
    """Implements ``core.ports.WebhookSender`` without a network: ``check`` refuses IP-literal hosts
    outside ``networks`` (names pass); ``post`` records each request and answers what ``answers`` says
    (status codes, or a string: that error), then 200 once they run out."""

    def __init__(self, networks: AgentNetworks | None = None, answers: list[int | str] | None = None) -> None:
        self.networks = networks if networks is not None else AgentNetworks(variable="MANAGEMENT_WEBHOOK_ALLOW")
        self.answers = list(answers or [])
        self.posted: list[tuple[str, dict[str, str], bytes]] = []

    def check(self, url: str) -> None:
        from urllib.parse import urlsplit

        literal = ip_literal(urlsplit(url).hostname or "")
        if literal is not None and not self.networks.allows(literal):
            raise WebhookTargetRefused(f"{literal} is refused ({self.networks.describe()})")

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> WebhookResponse:
        self.posted.append((url, dict(headers), body))
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, str):
            return WebhookResponse(status_code=None, response=None, error=answer, seconds=0.001)
        return WebhookResponse(status_code=answer, response="ok", error=None, seconds=0.001)
