"""Domain errors.

Every error carries a stable machine-readable ``code``; the HTTP layer maps each class to a status
once (``entrypoints/http/errors.py``), the command line prints ``code: detail``.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs


class PortalError(Exception):
    """Base of every error the core raises on purpose."""

    code = "portal_error"
    title = "Portal error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


@attrs.frozen
class FieldError:
    """One invalid field of a request: which field and what is wrong with it."""

    field: str
    message: str


class ValidationFailed(PortalError):
    """Well-formed input whose fields break a rule (HTTP 422)."""

    code = "validation_failed"
    title = "Invalid fields"

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = tuple(errors)
        detail = "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        super().__init__(detail or "invalid input")

    @classmethod
    def one(cls, field: str, message: str) -> ValidationFailed:
        return cls([FieldError(field, message)])


class NotFound(PortalError):
    """The thing does not exist *for this caller* (HTTP 404). Never says whether it exists for another."""

    code = "not_found"
    title = "Not found"


class Conflict(PortalError):
    """The request clashes with existing state, e.g. a taken e-mail address (HTTP 409)."""

    code = "conflict"
    title = "Conflict"


class Unauthenticated(PortalError):
    """Missing or invalid API key (HTTP 401)."""

    code = "invalid_api_key"
    title = "Unauthorized"


class SignupRefused(PortalError):
    """Unauthenticated sign-up refused by the portal's sign-up policy (HTTP 403)."""

    code = "signup_closed"
    title = "Sign-up closed"


class Unavailable(PortalError):
    """The portal cannot serve this now for a reason on its own side (HTTP 503), e.g. the database
    stayed locked by another writer past the busy time-out."""

    code = "unavailable"
    title = "Service unavailable"


class SecretUnreadable(Unavailable):
    """A sealed secret cannot be opened with the server's key (wrong or changed secret key)."""

    code = "secret_unreadable"
    title = "Stored secret cannot be unsealed"


class RemoteError(PortalError):
    """A remote hypervisor failed to do what was asked (HTTP 502 unless a subclass says otherwise)."""

    code = "remote_error"
    title = "Remote host error"


class RemoteTimeout(RemoteError):
    """A remote operation did not finish within its time-out (HTTP 504)."""

    code = "agent_timeout"
    title = "Remote host timed out"


class WaitTimedOut(RemoteTimeout):
    """The action was done, but the VM had not reached the awaited state when the wait ran out
    (HTTP 504); ``state`` is the state it was last seen in."""

    code = "wait_timeout"
    title = "VM did not reach the state in time"

    def __init__(self, detail: str, *, state: str | None, target_state: str) -> None:
        super().__init__(detail)
        self.state = state
        self.target_state = target_state
