"""Users and their API keys: sign-up (as the policy allows), operator-created users,
authentication, key rotation. Synchronous: these use cases only talk to storage and hashing."""

from __future__ import annotations

from typing import ClassVar

import attrs

from core import validation
from core.audit import AuditLog
from core.commands import NewUser
from core.errors import ApiKeyExpired, EmailTaken, SignupRefused, Unauthenticated, UserNotFound, ValidationFailed
from core.model import ApiKey, Caller, Origin, SignupPolicy, User, api_key_prefix
from core.ports import Clock, KeyHasher, Storage, Transaction
from core.results import NewApiKey

_HOW_TO_GET_AN_ACCOUNT = ("ask the portal's operator to run `manage-playrservers users create --name NAME` "
                          "on the portal host, or to set MANAGEMENT_SIGNUP=open")


@attrs.frozen
class Authenticated:
    """Who an API key belongs to, and the key itself (its scopes, agents and expiry)."""

    user: User
    key: ApiKey


class UserService:
    """Users and API keys."""

    runs_on_event_loop: ClassVar[bool] = False

    def __init__(self, *, storage: Storage, hasher: KeyHasher, clock: Clock, audit: AuditLog,
                 signup: SignupPolicy = SignupPolicy.FIRST) -> None:
        self.storage = storage
        self.hasher = hasher
        self.clock = clock
        self.audit = audit
        self.signup = signup

    def sign_up(self, request: NewUser, origin: Origin) -> NewApiKey:
        """Create a user through the unauthenticated door, as the sign-up policy allows."""
        return self._create_user(request, origin, by_operator=False)

    def create_user(self, request: NewUser, origin: Origin) -> NewApiKey:
        """Create a user on behalf of the host's operator (command line); ignores the sign-up policy."""
        return self._create_user(request, origin, by_operator=True)

    def _create_user(self, request: NewUser, origin: Origin, *, by_operator: bool) -> NewApiKey:
        errors = validation.collect(
            ("name", validation.check_name(request.name)),
            ("email", validation.check_email(request.email) if request.email is not None else None),
        )
        if errors:
            raise ValidationFailed(errors)
        key = self.hasher.issue()
        now = self.clock.now()
        with self.storage.transaction(write=True) as tx:
            if not by_operator:
                self._check_signup_allowed(tx)
            if request.email is not None and tx.find_user_by_email(request.email) is not None:
                raise EmailTaken()
            user = tx.add_user(request.name, request.email, key, now)
            tx.add_audit_event(self.audit.event(user.id, "user.create", origin.request_id, origin.client_address))
        return NewApiKey(user, key.plaintext)

    def _check_signup_allowed(self, tx: Transaction) -> None:
        if self.signup is SignupPolicy.CLOSED:
            raise SignupRefused(f"sign-up is closed on this portal; {_HOW_TO_GET_AN_ACCOUNT}")
        if self.signup is SignupPolicy.FIRST and tx.count_users() > 0:
            raise SignupRefused(f"sign-up is closed: this portal already has its first user; {_HOW_TO_GET_AN_ACCOUNT}")

    def signup_possible(self) -> bool:
        """Whether an unauthenticated sign-up would be accepted now (the sign-in page offers it)."""
        if self.signup is SignupPolicy.CLOSED:
            return False
        if self.signup is SignupPolicy.OPEN:
            return True
        with self.storage.transaction() as tx:
            return tx.count_users() == 0

    def list_users(self) -> list[User]:
        """Every user of the portal (for the host's operator, on the command line)."""
        with self.storage.transaction() as tx:
            return tx.list_users()

    def find_user(self, *, user_id: int | None = None, email: str | None = None) -> User:
        """A user by id or e-mail address (for the host's operator)."""
        with self.storage.transaction() as tx:
            if user_id is not None:
                user = tx.get_user(user_id)
            elif email is not None:
                user = tx.find_user_by_email(email)
            else:
                user = None
        if user is None:
            raise UserNotFound()
        return user

    def authenticate(self, api_key: str) -> User:
        """The user who owns ``api_key``; raises ``Unauthenticated`` for anything else."""
        return self.authenticate_key(api_key).user

    def authenticate_key(self, api_key: str) -> Authenticated:
        """The user who owns ``api_key`` and the key's powers; ``Unauthenticated`` for an unknown
        (or revoked) key, ``ApiKeyExpired`` for one past its expiry."""
        prefix = api_key_prefix(api_key)
        if prefix is None:
            raise Unauthenticated("the API key is malformed")
        with self.storage.transaction() as tx:
            stored = tx.find_api_key(prefix)
            if stored is None or not self.hasher.matches(api_key, stored.digest):
                raise Unauthenticated("the API key is not valid")
            user = tx.get_user(stored.user_id)
        if user is None:  # pragma: no cover - keys are deleted with their user
            raise Unauthenticated("the API key is not valid")
        self.check_not_expired(stored)
        return Authenticated(user, stored)

    def check_not_expired(self, key: ApiKey) -> None:
        """``ApiKeyExpired`` once ``key`` is past its expiry (checked on every request, remembered
        keys included: expiry needs no write, so no cache can miss it)."""
        if key.expired(self.clock.now()):
            raise ApiKeyExpired()

    def rotate_api_key(self, caller: Caller) -> NewApiKey:
        """Issue a new secret for the calling key (the full key from sign-up, or a named key, which
        keeps its name, scopes, agents and expiry; the host's operator rotates the full key); the
        old secret stops working at once."""
        key = self.hasher.issue()
        with self.audit.audited(caller, "user.rotate_api_key") as change, change.write() as tx:
            key_id = None if caller.key is None or caller.key.full else caller.key.id
            tx.replace_api_key(caller.user.id, key, self.clock.now(), key_id=key_id)
            # a browser signed in with the old key must not outlive it (issue 19)
            tx.delete_web_sessions_of(caller.user.id)
            user = tx.get_user(caller.user.id)
        assert user is not None
        return NewApiKey(user, key.plaintext)
