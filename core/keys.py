"""A user's API keys beyond the full one: named keys with fewer scopes, fewer agents, an expiry.

Rules (docs/security.md, "API keys and scopes"):

- A key never creates a key with more power than its own (``ApiKey.covers``): its scopes are a
  subset, its agents a subset (a key limited to agents creates only keys limited to some of them),
  and it dies no later (a key with an expiry gives its expiry to a new key that asks for none).
- A key sees, and revokes, only the keys it covers: a narrow key that may manage keys cannot list
  or revoke the wider keys of its user. The full key covers every key.
- The full key is never revoked (``rotate`` replaces it): a user always has a key with every power.
- Revoking deletes the key: the next request with it, on any worker or instance, is 401 like any
  unknown key (nothing keeps a key valid in memory past the database's word, see
  entrypoints/http/cache.py). The audit keeps the key's id and name.

Synchronous: storage and hashing only.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from core import validation
from core.audit import AuditLog
from core.commands import NewKey
from core.errors import (
    ApiKeyLimitReached,
    ApiKeyNotFound,
    FieldError,
    FullKeyNotRevocable,
    InsufficientScope,
    KeyLimitedToAgents,
    ValidationFailed,
)
from core.model import ApiKey, Caller, Scope
from core.ports import Clock, KeyHasher, Storage

MAX_KEYS_PER_USER = 100
# ``last_used_at`` is written at most this often per key and worker process: knowing a key was used
# this minute is what an operator needs (is this key still in use?), and a write per request would
# cost every request a write transaction (and, on SQLite, every worker its caches).
LAST_USED_RESOLUTION = timedelta(minutes=1)
_MAX_ID = 2**31 - 1


class NewScopedKey:
    """A key just created, and its plaintext (shown once)."""

    __slots__ = ("api_key", "key")

    def __init__(self, key: ApiKey, api_key: str) -> None:
        self.key = key
        self.api_key = api_key

    def __repr__(self) -> str:
        return f"NewScopedKey(key={self.key!r})"


def parse_scopes(names: list[str]) -> tuple[frozenset[Scope], list[FieldError]]:
    """The scopes ``names`` name, or the field error saying which one is not a scope."""
    known = {scope.value: scope for scope in Scope}
    unknown = [name for name in names if name not in known]
    if unknown:
        return frozenset(), [FieldError("scopes", f"unknown scope {unknown[0]!r}; the scopes are "
                                                  + ", ".join(known))]
    if not names:
        return frozenset(), [FieldError("scopes", "must name at least one scope")]
    return frozenset(known[name] for name in names), []


def parse_expiry(text: str, now: datetime) -> tuple[datetime | None, str | None]:
    """An RFC 3339 time with a zone, in the future."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None, "must be an RFC 3339 date and time, e.g. 2027-01-31T00:00:00Z"
    if when.tzinfo is None:
        return None, "must carry a time zone (Z or +HH:MM)"
    try:
        when = when.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is past the last representable instant
        return None, "is out of range"
    if when <= now:
        return None, "must be in the future"
    return when, None


class KeyService:
    """List, create, revoke and describe a user's API keys."""

    runs_on_event_loop: ClassVar[bool] = False

    def __init__(self, *, storage: Storage, hasher: KeyHasher, clock: Clock, audit: AuditLog,
                 max_keys: int = MAX_KEYS_PER_USER) -> None:
        self.storage = storage
        self.hasher = hasher
        self.clock = clock
        self.audit = audit
        self.max_keys = max_keys
        self._used_lock = threading.Lock()
        self._last_written: dict[int, datetime] = {}  # key id -> when this process last wrote last_used_at

    def current_key(self, caller: Caller) -> ApiKey:
        """The key the caller came with: its scopes, agents and expiry (what it may do)."""
        if caller.key is None:  # the host's operator acting as the user: their full key's powers
            with self.storage.transaction() as tx:
                keys = tx.list_api_keys(caller.user.id)
            return next(key for key in keys if key.full)
        return caller.key

    def list_keys(self, caller: Caller) -> list[ApiKey]:
        """The user's keys that the calling key covers, oldest first (never a secret)."""
        with self.storage.transaction() as tx:
            keys = tx.list_api_keys(caller.user.id)
        return [key for key in keys if caller.key is None or caller.key.covers(key)]

    def create_key(self, caller: Caller, request: NewKey) -> NewScopedKey:
        """A new key with at most the calling key's powers (``InsufficientScope`` naming a scope it
        lacks, ``KeyLimitedToAgents`` for agents beyond its own)."""
        with self.audit.audited(caller, "api_key.create") as change:
            now = self.clock.now()
            scopes, errors = parse_scopes(request.scopes)
            expires_at: datetime | None = None
            if request.expires_at is not None:
                expires_at, problem = parse_expiry(request.expires_at, now)
                errors += validation.collect(("expires_at", problem))
            errors += validation.collect(("name", validation.check_name(request.name)))
            agents = None if request.agents is None else frozenset(request.agents)
            if agents is not None and not agents:
                errors.append(FieldError("agents", "must list at least one agent id (or be null for every agent)"))
            if errors:
                raise ValidationFailed(errors)
            creator = caller.key
            if creator is not None:
                missing = sorted(scope.value for scope in scopes - creator.scopes)
                if missing:
                    raise InsufficientScope(missing[0], f"this API key cannot grant the scope {missing[0]!r}: "
                                                        "a key never creates a key with scopes it lacks")
                if creator.agents is not None:
                    if agents is None:
                        raise KeyLimitedToAgents(
                            "this API key is limited to some agents: the keys it creates must list some of them "
                            "in \"agents\"")
                    beyond = sorted(agents - creator.agents)
                    if beyond:
                        raise KeyLimitedToAgents(f"this API key is not allowed agent {beyond[0]}: a key never "
                                                 "creates a key for agents beyond its own")
                if creator.expires_at is not None:
                    if expires_at is None:
                        expires_at = creator.expires_at  # a key never outlives the key that made it
                    elif expires_at > creator.expires_at:
                        raise ValidationFailed.one("expires_at", "must not be later than the creating key's expiry "
                                                                 f"({creator.expires_at.isoformat()})")
            issued = self.hasher.issue()
            with change.write() as tx:
                for agent_id in sorted(agents or ()):
                    if not 0 < agent_id <= _MAX_ID or tx.get_agent(caller.user.id, agent_id) is None \
                            or not caller.sees_agent(agent_id):
                        raise ValidationFailed.one("agents", f"{agent_id} is not one of your agents")
                if tx.count_api_keys(caller.user.id) >= self.max_keys:
                    raise ApiKeyLimitReached(f"you already have {self.max_keys} API keys, the most a user may "
                                             "have; revoke one first")
                key = tx.add_api_key(ApiKey(user_id=caller.user.id, prefix=issued.prefix, digest=issued.digest,
                                            created_at=now, name=request.name, scopes=scopes, agents=agents,
                                            expires_at=expires_at, full=False))
                change.detail = f"key {key.id} {key.name!r}: {' '.join(sorted(s.value for s in scopes))}"
        return NewScopedKey(key, issued.plaintext)

    def revoke_key(self, caller: Caller, key_id: int) -> None:
        """Delete one of the user's keys (one the calling key covers); it fails at its next request
        on every worker and instance."""
        with self.audit.audited(caller, "api_key.revoke") as change, change.write() as tx:
            key = tx.get_api_key(caller.user.id, key_id) if 0 < key_id <= _MAX_ID else None
            if key is None or (caller.key is not None and not caller.key.covers(key)):
                raise ApiKeyNotFound()
            if key.full:
                raise FullKeyNotRevocable()
            tx.delete_api_key(caller.user.id, key_id)
            change.detail = f"key {key.id} {key.name!r}"

    def record_use(self, key: ApiKey) -> None:
        """Note that ``key`` was just used: written at most once per ``LAST_USED_RESOLUTION`` per key
        in this process (and not at all while the stored value is that recent)."""
        now = self.clock.now()
        if not self.use_due(key, now):
            return
        with self._used_lock:
            if len(self._last_written) >= 100_000:
                self._last_written.clear()
            self._last_written[key.id] = now
        with self.storage.transaction(write=True) as tx:
            tx.touch_api_key(key.id, now)

    def use_due(self, key: ApiKey, now: datetime | None = None) -> bool:
        """Whether ``record_use`` would write now (cheap: no storage)."""
        now = now or self.clock.now()
        if key.last_used_at is not None and now - key.last_used_at < LAST_USED_RESOLUTION:
            return False
        written = self._last_written.get(key.id)
        return written is None or now - written >= LAST_USED_RESOLUTION
