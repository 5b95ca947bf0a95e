"""Domain errors.

Every error carries a stable machine-readable ``code``; the HTTP layer maps each class to a status
once (``entrypoints/http/errors.py``), the command line prints ``code: detail``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import attrs

# The longest detail an error carries (characters): details quote remote output (virsh's stderr),
# which a hostile host controls; answers, logs and audit events stay small whatever it writes.
DETAIL_LIMIT = 4096


class PortalError(Exception):
    """Base of every error the core raises on purpose."""

    code = "portal_error"
    title = "Portal error"

    def __init__(self, detail: str) -> None:
        if len(detail) > DETAIL_LIMIT:  # e.g. a hostile host's stderr quoted in a message
            detail = f"{detail[:DETAIL_LIMIT]}… ({len(detail) - DETAIL_LIMIT} more characters not shown)"
        super().__init__(detail)
        self.detail = detail


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
    """A remote hypervisor failed to do what was asked (HTTP 502 unless a subclass says otherwise).

    ``reached_host`` and ``logged_in`` say how far the connection got before the failure, which is
    what an agent check reports (reachable, authenticated)."""

    code = "remote_error"
    title = "Remote host error"
    reached_host: ClassVar[bool] = True
    logged_in: ClassVar[bool] = True


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



class TooManyRequests(PortalError):
    """The caller must slow down (HTTP 429); ``retry_after`` says in how many seconds to retry."""

    code = "too_many_requests"
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


# ---------------------------------------------------------------------- request errors
# Raised by the entrypoints while reading a request, before any use case runs.


class MalformedBody(PortalError):
    """The body is not JSON that can be read at all (HTTP 400)."""

    code = "malformed_json"
    title = "Malformed JSON"


class BodyTooLarge(PortalError):
    """The body is over the size limit (HTTP 413)."""

    code = "body_too_large"
    title = "Request body too large"


class UnsupportedMediaType(PortalError):
    """The body is not sent as JSON (HTTP 415)."""

    code = "unsupported_media_type"
    title = "Unsupported media type"


class HeadersTooLarge(PortalError):
    """Too many headers, or too many bytes of them (HTTP 431)."""

    code = "headers_too_large"
    title = "Request header fields too large"


class MissingApiKey(Unauthenticated):
    """No ``Authorization: Bearer`` header (HTTP 401)."""

    code = "missing_api_key"

    def __init__(self, detail: str = "send your API key as 'Authorization: Bearer <key>'") -> None:
        super().__init__(detail)


class Forbidden(PortalError):
    """Refused whoever the caller is, for a reason the portal's operator set (HTTP 403)."""

    code = "forbidden"
    title = "Forbidden"


class HttpsRequired(Forbidden):
    """A credential-bearing request reached the proxy in front of the portal over plain HTTP."""

    code = "https_required"
    title = "HTTPS required"


class TooManyAuthFailures(TooManyRequests):
    """Too many failed authentications from one client address (HTTP 429)."""

    code = "too_many_auth_failures"
    title = "Too many failed authentications"

# ---------------------------------------------------------------------- the vocabulary
# Every code the portal answers with is one class below (or a base above); nothing compares code
# strings. A class whose message never varies carries it as its default detail.


class UserNotFound(NotFound):
    code = "user_not_found"

    def __init__(self, detail: str = "no such user") -> None:
        super().__init__(detail)


class AgentNotFound(NotFound):
    code = "agent_not_found"

    def __init__(self, detail: str = "no such agent") -> None:
        super().__init__(detail)


class VmNotFound(NotFound):
    code = "vm_not_found"


class SnapshotNotFound(NotFound):
    code = "snapshot_not_found"


class EmailTaken(Conflict):
    code = "email_taken"

    def __init__(self, detail: str = "a user with this e-mail address already exists") -> None:
        super().__init__(detail)


class AgentNameTaken(Conflict):
    code = "agent_name_taken"

    def __init__(self, detail: str = "you already have an agent with this name") -> None:
        super().__init__(detail)


class AgentChanged(Conflict):
    """The agent changed (or was deleted) between reading it and writing the change."""

    code = "agent_changed"

    def __init__(self, detail: str = "the agent was changed by another request meanwhile; send the change "
                                     "again") -> None:
        super().__init__(detail)


class AgentLimitReached(Conflict):
    """The caller already has as many agents as a user may have (``MANAGEMENT_MAX_AGENTS_PER_USER``)."""

    code = "agent_limit_reached"


class VmAlreadyRunning(Conflict):
    code = "vm_already_running"


class VmNotRunning(Conflict):
    code = "vm_not_running"


class VmStateConflict(Conflict):
    code = "vm_state_conflict"


class SnapshotNameTaken(Conflict):
    code = "snapshot_name_taken"


class SnapshotUnsupported(Conflict):
    code = "snapshot_unsupported"


class DatabaseBusy(Unavailable):
    code = "database_busy"


class DatabaseUnavailable(Unavailable):
    code = "database_unavailable"


class AgentUnreachable(RemoteError):
    """The host could not be reached at all (name not resolved, refused, no route)."""

    code = "agent_unreachable"
    reached_host = False


class AgentConnectTimeout(RemoteTimeout):
    code = "agent_connect_timeout"
    reached_host = False


class HostKeyUnknown(RemoteError):
    code = "host_key_unknown"
    logged_in = False


class HostKeyMismatch(RemoteError):
    code = "host_key_mismatch"
    logged_in = False


class AgentAuthFailed(RemoteError):
    code = "agent_auth_failed"
    logged_in = False


class AgentConnectionLost(RemoteError):
    code = "agent_connection_lost"


class CommandTimeout(RemoteTimeout):
    code = "command_timeout"


class VirshNotFound(RemoteError):
    code = "virsh_not_found"


class LibvirtUnavailable(RemoteError):
    code = "libvirt_unavailable"


class VirshFailed(RemoteError):
    code = "virsh_failed"


# ---------------------------------------------------------------------- SSH adapter hardening
# (issue 14: items 2, 4, 5 and 13)


class AgentAddressRefused(ValidationFailed):
    """The agent's address is, or resolves to, an address outside ``MANAGEMENT_AGENT_NETWORKS``
    (issue 14 item 4, SSRF). Raised on registration and change, and again at every connection
    (a name may resolve elsewhere later): the portal never connects to a refused address."""

    code = "agent_address_refused"
    title = "Agent address refused"
    # Like RemoteError's: how far a connection got (an agent check reports it): not even a packet.
    reached_host: ClassVar[bool] = False
    logged_in: ClassVar[bool] = False

    def __init__(self, detail: str) -> None:
        super().__init__([FieldError("hostname", detail)])


class OutputTooLarge(RemoteError):
    """A command wrote more than ``MANAGEMENT_MAX_OUTPUT_BYTES``; the channel was closed there."""

    code = "output_too_large"
    title = "Remote output too large"


class NotSsh(RemoteError):
    """Something accepted the connection, but it did not speak SSH (no SSH identification)."""

    code = "not_ssh"
    title = "Not an SSH server"
    logged_in = False


class TooManyOperations(TooManyRequests):
    """The user already has ``MANAGEMENT_MAX_OPERATIONS_PER_USER`` SSH operations running."""

    code = "too_many_operations"


# ---------------------------------------------------------------------- SSH key parsing (issue 14, item 1)


class KeyParserBusy(Unavailable):
    """Every child process that parses private keys stayed busy past the deadline (or one could not
    be started): nothing is wrong with the key, try again."""

    code = "key_parser_busy"


def error_classes() -> list[type[PortalError]]:
    """Every error class of the vocabulary, bases included (for documents that list the codes)."""
    found: list[type[PortalError]] = []
    pending: list[type[PortalError]] = [PortalError]
    while pending:
        cls = pending.pop(0)
        if cls not in found:
            if cls.__module__ == __name__:  # not the HTTP client's copies (entrypoints/client.py, issue 15)
                found.append(cls)
            pending.extend(cls.__subclasses__())
    return found


# ---------------------------------------------------------------------- storage and auth hardening


class KeyNotExportable(Conflict):
    """The agent's private key was generated by the portal: its owner never needs it, so it is not
    exported (a stolen API key must not yield every agent's key). Uploaded keys stay exportable."""

    code = "key_not_exportable"

    def __init__(self, detail: str = (
            "this agent's private key was generated by the portal and is never exported; its public key is "
            "in the agent's public_key (install that on the hypervisor). Upload a key of your own with "
            "PATCH /agents/{id} if you need to hold the private half")) -> None:
        super().__init__(detail)


# ---------------------------------------------------------------------- API keys and scopes (issue 20)


class InsufficientScope(Forbidden):
    """The API key lacks the scope the operation needs (the answer names it)."""

    code = "insufficient_scope"
    title = "Insufficient scope"

    def __init__(self, scope: str, detail: str | None = None) -> None:
        self.scope = scope
        super().__init__(detail or f"this API key does not have the scope {scope!r}, which this operation needs; "
                                   "use a key that has it (GET /users/me/keys/current shows this key's scopes)")


class KeyLimitedToAgents(Forbidden):
    """The API key is limited to some agents, and the request would reach beyond them."""

    code = "key_limited_to_agents"


class ApiKeyExpired(Unauthenticated):
    """The API key was valid until its expiry time, which has passed (HTTP 401)."""

    code = "api_key_expired"

    def __init__(self, detail: str = "this API key has expired; create a new one (POST /users/me/keys)") -> None:
        super().__init__(detail)


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"

    def __init__(self, detail: str = "no such API key") -> None:
        super().__init__(detail)


class FullKeyNotRevocable(Conflict):
    """The user's full key (sign-up / rotate) is replaced by rotating it, never revoked: a user
    always has one key with every power."""

    code = "full_key_not_revocable"

    def __init__(self, detail: str = ("the full key cannot be revoked; replace it with "
                                      "POST /users/me/api-key/rotate (the old one dies at once)")) -> None:
        super().__init__(detail)


class ApiKeyLimitReached(Conflict):
    code = "api_key_limit_reached"


# ---------------------------------------------------------------------- metrics (issue 21)


class MetricsForbidden(Forbidden):
    """``GET /metrics`` from a client that is not on loopback (or came through a proxy) without
    the operator's ``MANAGEMENT_METRICS_TOKEN`` (HTTP 403)."""

    code = "metrics_forbidden"
    title = "Metrics not available to this client"

    def __init__(self, detail: str = (
            "the portal's metrics are served to loopback clients that do not come through a proxy, or with "
            "'Authorization: Bearer <MANAGEMENT_METRICS_TOKEN>' (set that variable on the portal to scrape it "
            "from elsewhere)")) -> None:
        super().__init__(detail)


# ---------------------------------------------------------------------- provisioning (issue 16)


class PoolNotFound(NotFound):
    code = "pool_not_found"


class VolumeNotFound(NotFound):
    code = "volume_not_found"


class NetworkNotFound(NotFound):
    code = "network_not_found"


class VmNameTaken(Conflict):
    code = "vm_name_taken"


class VolumeNameTaken(Conflict):
    """A volume the request would create already exists in the pool (left by someone else)."""

    code = "volume_name_taken"


class InsufficientStorage(Conflict):
    code = "insufficient_storage"


class VolumeInUse(Conflict):
    """A volume another defined VM uses (as its disk, or as the backing file of one of its disks)."""

    code = "volume_in_use"


class VmRunning(Conflict):
    """Deleting (or cloning) needs the VM shut off; ``?force=true`` destroys it first (delete only)."""

    code = "vm_running"


# ---------------------------------------------------------------------- consoles (issue 17)


class ConsoleUnavailable(Conflict):
    """The VM has no console of the kind asked for: no serial device (``virsh ttyconsole``
    finds none), or no VNC graphics the host's loopback reaches (``virsh domdisplay``)."""

    code = "console_unavailable"


class TooManyConsoles(TooManyRequests):
    """The caller already has the most consoles open at once (``MANAGEMENT_MAX_CONSOLES_PER_USER``)."""

    code = "too_many_consoles"


class TunnelRefused(RemoteError):
    """The agent's sshd refused to forward a TCP connection (``restrict`` or
    ``AllowTcpForwarding no``, as on hosts enrolled with agent-install.sh): the VNC console then
    goes through the restricted shell's own relay instead."""

    code = "tunnel_refused"


# --- web console (issue 19)


class SessionEnded(Unauthenticated):
    """The browser's session cookie names no live session: signed out, expired or idle too long (401)."""

    code = "session_ended"
    title = "Signed out"


class CsrfRefused(Forbidden):
    """A state change through the pages without this session's form token, or from another site (403)."""

    code = "csrf_refused"
    title = "Cross-site request refused"


# --- webhooks (issue 18)


class WebhookNotFound(NotFound):
    code = "webhook_not_found"

    def __init__(self, detail: str = "no such webhook") -> None:
        super().__init__(detail)


class WebhookTargetRefused(ValidationFailed):
    """The webhook's URL names, or resolves to, an address outside ``MANAGEMENT_WEBHOOK_ALLOW``
    (by default loopback, link-local and the like): the portal never posts there, so a webhook
    cannot probe the portal's own host or link. Checked on create and change, and again before
    every delivery (a name may resolve elsewhere later)."""

    code = "webhook_target_refused"
    title = "Webhook target refused"

    def __init__(self, detail: str) -> None:
        super().__init__([FieldError("url", detail)])


class WebhookLimitReached(Conflict):
    code = "webhook_limit_reached"
