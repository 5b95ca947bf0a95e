"""Browser sessions of the web console: an API key is exchanged once for a random session token.

Why a session and not the key in a cookie: the API key is the account's master credential and lives
for months; a browser keeps a cookie on disk. The session token is random (256 bits), stored only
as its SHA-256 digest (like API keys, a random token needs no slow hash), ends at an absolute time
and after an idle time-out, and signing out deletes it server-side, so a copied cookie dies with it.
The form token against cross-site requests is derived from the session token, so it needs no
storage and changes with every session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import ClassVar

import attrs

from core.audit import AuditLog
from core.errors import SessionEnded
from core.model import ApiKey, Origin, User, WebSession, api_key_prefix
from core.ports import Clock, Storage
from core.users import UserService

SESSION_LIFETIME = timedelta(hours=12)
SESSION_IDLE = timedelta(minutes=30)
# A session's last use is written at most this often (a page view is not a database write).
TOUCH_EVERY = timedelta(seconds=60)


def session_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@attrs.frozen
class SignedIn:
    """A new session: its token (for the cookie, never stored) and who it belongs to."""

    token: str
    user: User
    session: WebSession


class WebSessionService:
    """Sign in with an API key, find the user behind a session token, sign out."""

    runs_on_event_loop: ClassVar[bool] = False

    def __init__(self, *, storage: Storage, clock: Clock, audit: AuditLog, users: UserService,
                 lifetime: timedelta = SESSION_LIFETIME, idle: timedelta = SESSION_IDLE) -> None:
        self.storage = storage
        self.clock = clock
        self.audit = audit
        self.users = users
        self.lifetime = lifetime
        self.idle = idle

    def sign_in(self, api_key: str, origin: Origin) -> SignedIn:
        """A new session for the owner of ``api_key`` (``Unauthenticated`` if it is not valid)."""
        user = self.users.authenticate(api_key)
        prefix = api_key_prefix(api_key)
        assert prefix is not None  # authenticate refuses a malformed key
        token = secrets.token_urlsafe(32)
        now = self.clock.now()
        with self.storage.transaction(write=True) as tx:
            tx.delete_web_sessions_ended(now, now - self.idle)
            session = tx.add_web_session(user.id, session_digest(token), now, now + self.lifetime, prefix)
            tx.add_audit_event(self.audit.event(user.id, "user.sign_in", origin.request_id, origin.client_address))
        return SignedIn(token=token, user=user, session=session)

    def resolve(self, token: str) -> tuple[User, WebSession]:
        """The user and live session behind ``token``; ``SessionEnded`` if there is none (never
        was, signed out, past its end, idle too long: the browser is told only to sign in again)."""
        user, session, _key = self.resolve_with_key(token)
        return user, session

    def resolve_with_key(self, token: str) -> tuple[User, WebSession, ApiKey]:
        """``resolve``, with the API key the session was signed in with: the pages act with that
        key's powers (its scopes and agents, issue 20), and end with it (revoked, rotated, expired)."""
        now = self.clock.now()
        digest = session_digest(token)
        with self.storage.transaction() as tx:
            session = tx.find_web_session(digest)
            user = tx.get_user(session.user_id) if session is not None else None
            # the key it was signed in with is still live and still its user's (rotated or revoked: ended)
            key = tx.find_api_key(session.key_prefix) if session is not None else None
        if session is None or user is None or key is None or key.user_id != session.user_id \
                or not hmac.compare_digest(session.digest, digest):
            raise SessionEnded("sign in again: this session has ended or never existed")
        if key.expires_at is not None and now >= key.expires_at:
            raise SessionEnded("sign in again: the API key this session was signed in with has expired")
        if now >= session.expires_at or now - session.last_seen_at >= self.idle:
            with self.storage.transaction(write=True) as tx:
                tx.delete_web_session(digest)
            raise SessionEnded("sign in again: this session has ended (time limit or idle time-out)")
        if now - session.last_seen_at >= TOUCH_EVERY:
            with self.storage.transaction(write=True) as tx:
                tx.touch_web_session(session.id, now)
        return user, session, key

    def sign_out(self, token: str, origin: Origin) -> None:
        """End the session of ``token`` at once (nothing happens if it already ended)."""
        digest = session_digest(token)
        with self.storage.transaction(write=True) as tx:
            session = tx.find_web_session(digest)
            if session is not None and tx.delete_web_session(digest):
                tx.add_audit_event(self.audit.event(session.user_id, "user.sign_out", origin.request_id,
                                                    origin.client_address))

    @staticmethod
    def form_token(token: str) -> str:
        """The session's token for forms (CSRF): derived from the session's secret, so another site
        cannot know it and the server needs not store it."""
        return hmac.new(token.encode("utf-8", "surrogatepass"), b"playr-web-form", hashlib.sha256).hexdigest()

    def form_token_matches(self, token: str, given: str) -> bool:
        return hmac.compare_digest(self.form_token(token).encode(), given.encode("utf-8", "surrogatepass"))
