"""JSON in and out: one strict cattrs converter, and the response shapes (views) of the API.

Requests are structured into ``core.commands`` classes (unknown fields rejected, no type coercion:
``"22"`` is not a port); responses are views built from domain objects and unstructured. The OpenAPI
document is generated from these same classes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from core.errors import FieldError, ValidationFailed
from core.model import Agent, AgentCredentials, AuditEvent, User
from core.ports import CommandResult
from core.results import Failure, FleetEntry, VmInfo, WaitedAction
from core.virsh import VmSummary

T = TypeVar("T")


def _strict(kind: type, label: str) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        if type(value) is not kind:  # bool is not an int, 1 is not a bool, "1" is not an int
            raise TypeError(f"must be {label}")
        if kind is str and not value.isascii():
            try:
                value.encode("utf-8")  # JSON's \ud800 escapes decode to lone surrogates
            except UnicodeEncodeError:
                raise TypeError("must be valid Unicode text (no lone surrogates)") from None
        return value

    return structure


def make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(str, _strict(str, "a string"))
    converter.register_structure_hook(int, _strict(int, "an integer"))
    converter.register_structure_hook(bool, _strict(bool, "true or false"))
    converter.register_unstructure_hook(datetime, lambda value: value.isoformat().replace("+00:00", "Z"))
    return converter


converter = make_converter()


def structure(data: Any, command: type[T]) -> T:
    """Turn decoded JSON into ``command`` or raise ``ValidationFailed`` naming each bad field."""
    if not isinstance(data, dict):
        raise ValidationFailed.one("body", "must be a JSON object")
    try:
        return converter.structure(data, command)
    except ClassValidationError as group:
        raise ValidationFailed(_field_errors(group)) from None
    except ForbiddenExtraKeysError as error:
        raise ValidationFailed([FieldError(k, "unknown field") for k in sorted(error.extra_fields)]) from None


def _field_errors(group: BaseException) -> list[FieldError]:
    errors: list[FieldError] = []
    for error in getattr(group, "exceptions", ()):
        notes = [n for n in getattr(error, "__notes__", []) if n.startswith("Structuring class")]
        field = _note_field(getattr(error, "__notes__", []))
        if isinstance(error, ForbiddenExtraKeysError):
            errors += [FieldError(k, "unknown field") for k in sorted(error.extra_fields)]
        elif isinstance(error, KeyError) and field:
            errors.append(FieldError(field, "is required"))
        elif isinstance(error, ClassValidationError):
            errors += _field_errors(error)
        elif field:
            message = str(error) if isinstance(error, TypeError) and str(error).startswith("must") else None
            errors.append(FieldError(field, message or "has the wrong type"))
        elif not notes:
            errors.append(FieldError("body", str(error)))
    return errors or [FieldError("body", "is not valid")]


def _note_field(notes: list[str]) -> str | None:
    for note in notes:
        # cattrs notes look like "Structuring class NewAgent @ attribute port"
        marker = "@ attribute "
        if marker in note:
            return note.split(marker, 1)[1].strip()
    return None


# ---------------------------------------------------------------------- response shapes


@attrs.frozen
class UserView:
    id: int
    name: str
    email: str | None
    api_key_prefix: str
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserView:
        return cls(user.id, user.name, user.email, user.api_key_prefix, user.created_at)


@attrs.frozen
class UserWithKeyView(UserView):
    """A user together with their new API key; the only time the key is ever shown."""

    api_key: str = attrs.field(kw_only=True, repr=False)

    @classmethod
    def with_key(cls, user: User, api_key: str) -> UserWithKeyView:
        return cls(user.id, user.name, user.email, user.api_key_prefix, user.created_at, api_key=api_key)


@attrs.frozen
class AgentView:
    id: int
    name: str
    hostname: str
    port: int
    username: str
    allow_unknown_hosts: bool
    host_key: str | None
    host_key_fingerprint: str | None
    key_fingerprint: str
    public_key: str
    libvirt_uri: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, agent: Agent) -> AgentView:
        return cls(**_agent_fields(agent))


@attrs.frozen
class CredentialsView(AgentView):
    private_key: str = attrs.field(kw_only=True, repr=False)
    private_key_passphrase: str | None = attrs.field(kw_only=True, repr=False)

    @classmethod
    def of_credentials(cls, credentials: AgentCredentials) -> CredentialsView:
        return cls(
            **_agent_fields(credentials.agent),
            private_key=credentials.private_key,
            private_key_passphrase=credentials.private_key_passphrase,
        )


# Where scripts/agent-install.sh installs the restricted shell every portal command is forced through.
AGENT_SHELL = "/usr/local/libexec/playr-agent-shell"


@attrs.frozen
class PublicKeyView:
    """The agent's SSH public key, ready for the hypervisor's ``authorized_keys``."""

    agent_id: int
    public_key: str
    key_fingerprint: str
    authorized_keys_line: str

    @classmethod
    def of(cls, agent: Agent) -> PublicKeyView:
        return cls(agent_id=agent.id, public_key=agent.client_key.public_key,
                   key_fingerprint=agent.client_key.fingerprint,
                   authorized_keys_line=f'restrict,command="{AGENT_SHELL}" {agent.client_key.public_key} '
                                        f"playr-portal-agent-{agent.id}")


def _agent_fields(agent: Agent) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "hostname": agent.hostname,
        "port": agent.port,
        "username": agent.username,
        "allow_unknown_hosts": agent.allow_unknown_hosts,
        "host_key": agent.host_key.openssh if agent.host_key else None,
        "host_key_fingerprint": agent.host_key.fingerprint if agent.host_key else None,
        "key_fingerprint": agent.client_key.fingerprint,
        "public_key": agent.client_key.public_key,
        "libvirt_uri": agent.libvirt_uri,
        "created_at": agent.created_at,
        "updated_at": agent.updated_at,
    }


@attrs.frozen
class AuditEventView:
    id: int
    action: str
    outcome: str
    agent_id: int | None
    vm: str | None
    detail: str | None
    request_id: str
    client_address: str
    created_at: datetime

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventView:
        return cls(event.id, event.action, event.outcome, event.agent_id, event.vm, event.detail,
                   event.request_id, event.client_address, event.created_at)


@attrs.frozen
class AuditPage:
    """A page of audit events, newest first; pass ``next_before`` as ``before`` for the next page."""

    events: list[AuditEventView]
    next_before: int | None


@attrs.frozen
class VmView:
    """A VM as ``virsh list --all`` shows it; ``id`` is null when it is not running."""

    name: str
    state: str
    id: int | None

    @classmethod
    def of(cls, vm: VmSummary) -> VmView:
        return cls(vm.name, vm.state, vm.id)


@attrs.frozen
class CommandView:
    """What ran on the agent and what it answered."""

    command: list[str]
    exit_status: int
    stdout: str
    stderr: str

    @classmethod
    def of(cls, result: CommandResult) -> CommandView:
        return cls(list(result.command), result.exit_status, result.stdout, result.stderr)


@attrs.frozen
class VmInfoView:
    """``virsh dominfo`` parsed into snake_case keys, with the raw command result."""

    dominfo: dict[str, str | int | None]
    raw: CommandView

    @classmethod
    def of(cls, info: VmInfo) -> VmInfoView:
        return cls(dict(info.dominfo), CommandView.of(info.raw))


@attrs.frozen
class Health:
    status: str


# ---------------------------------------------------------------------- VMs beyond the lifecycle
# Snapshots, stats, host facts and checks are answered as the core's own values (core.virsh,
# core.services): plain attrs data already shaped for JSON.


@attrs.frozen
class WaitedActionView(CommandView):
    """What ran on the agent, and (with ``?wait=``) the state the VM reached and how long it took."""

    state: str = attrs.field(kw_only=True)
    waited_seconds: float = attrs.field(kw_only=True)

    @classmethod
    def of_waited(cls, waited: WaitedAction) -> WaitedActionView:
        result = waited.result
        return cls(list(result.command), result.exit_status, result.stdout, result.stderr, state=waited.state,
                   waited_seconds=round(waited.waited_seconds, 3))


@attrs.frozen
class AutostartView:
    """Whether libvirt now starts the VM with the host, and the command that set it."""

    vm: str
    enabled: bool
    result: CommandView


@attrs.frozen
class FleetEntryView:
    """One agent of the fleet view: its VMs, or (``vms`` null) the error that agent answered."""

    agent_id: int
    agent_name: str
    vms: list[VmView] | None
    error: Failure | None

    @classmethod
    def of(cls, entry: FleetEntry) -> FleetEntryView:
        vms = None if entry.vms is None else [VmView.of(vm) for vm in entry.vms]
        return cls(entry.agent_id, entry.agent_name, vms, entry.error)


def dump(value: Any) -> Any:
    return converter.unstructure(value)
