"""Every operation of the portal, declared once.

Each ``Operation`` names its route (method and path), how it calls its use case, the view its
answer goes through, its request and query, the domain errors it can answer with, and its OpenAPI
``operationId`` and tag. From this table follow the HTTP routes (``entrypoints/http/app.py``), the
OpenAPI document (``entrypoints/http/openapi.py``), the library's methods
(``entrypoints/library.py``) and the command line's user commands (``entrypoints/cli.py``).

To add an operation: write the use case in its service (``core/``), add one ``Operation`` here (and
its view in ``entrypoints/shapes.py`` if the answer is new), and test it. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import functools
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import attrs

from core import errors
from core.agents import AGENT_PAGE_MAX
from core.audit import AUDIT_PAGE_DEFAULT, AUDIT_PAGE_MAX
from core.commands import (
    AgentChanges,
    AutostartChange,
    CloneRequest,
    NewAgent,
    NewConsole,
    NewKey,
    NewSnapshot,
    NewUser,
    NewVm,
    NewWebhook,
    WebhookChanges,
)
from core.errors import PortalError, ValidationFailed
from core.events import EVENT_PAGE_DEFAULT, EVENT_PAGE_MAX
from core.model import Caller, Origin, Scope, User
from core.portal import Portal
from core.results import NewApiKey, WaitedAction
from core.virsh import INTERFACE_SOURCES, VM_NAME_MAX, VM_STATES, WAIT_MAX, VmAction
from core.webhooks import DELIVERY_PAGE_DEFAULT, DELIVERY_PAGE_MAX
from entrypoints.exposition import Exposition
from entrypoints.shapes import (
    AgentCheckView,
    AgentView,
    ApiKeyView,
    AuditEventView,
    AuditPage,
    AutostartView,
    CommandView,
    ConsoleTicketView,
    CreatedVmView,
    CredentialsView,
    DeliveryView,
    EventPage,
    EventView,
    FleetEntryView,
    GuestInterfaceView,
    HostFactsView,
    NetworkView,
    NewApiKeyView,
    NewWebhookView,
    PoolView,
    PublicKeyView,
    SnapshotView,
    UserView,
    UserWithKeyView,
    VmInfoView,
    VmStatsView,
    VmView,
    VolumeView,
    WaitedActionView,
    WebhookView,
)


@attrs.frozen
class Call:
    """One invocation of an operation, whichever door it came through (HTTP, library, command
    line): who calls, the values of the path, the structured body and the parsed query."""

    caller: Caller | None
    origin: Origin
    path: Mapping[str, Any] = attrs.field(factory=dict)
    body: Any = None
    query: Mapping[str, Any] = attrs.field(factory=dict)
    # Set when the HTTP client has gone away, for operations that may wait long (``long_running``).
    abandoned: asyncio.Event | None = None

    @property
    def me(self) -> Caller:
        """The authenticated caller (every operation but the public ones has one)."""
        assert self.caller is not None, "an authenticated operation was called without a caller"
        return self.caller

    @property
    def agent_id(self) -> int:
        return int(self.path["agent_id"])

    @property
    def vm(self) -> str:
        return str(self.path["vm"])

    @property
    def snapshot(self) -> str:
        return str(self.path["snapshot"])

    @property
    def key_id(self) -> int:
        return int(self.path["key_id"])

    @property
    def pool(self) -> str:
        return str(self.path["pool"])

    @property
    def webhook_id(self) -> int:
        return int(self.path["webhook_id"])


Run = Callable[[Portal, Call], Coroutine[Any, Any, Any]]
View = Callable[[Any, Call], Any]


async def invoke(use_case: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a use case the way its service runs: awaited on the event loop if the service says
    ``runs_on_event_loop``, otherwise in a worker thread (storage may wait on a lock, and that must
    never stall the loop other requests share)."""
    if getattr(getattr(use_case, "__self__", None), "runs_on_event_loop", False):
        return await use_case(*args, **kwargs)
    return await asyncio.to_thread(functools.partial(use_case, *args, **kwargs))


@attrs.frozen
class Query:
    """A query parameter: its OpenAPI description and schema, and how its raw values are read."""

    name: str
    description: str
    schema: dict[str, Any]
    repeat: bool = False  # given any number of times (a list); otherwise at most once

    @property
    def _integers(self) -> bool:
        """Whether the parameter's value (each value, when repeated) is a whole number."""
        schema = self.schema.get("items", {}) if self.repeat else self.schema
        return bool(schema.get("type") == "integer")

    def parse(self, raw: Sequence[str]) -> Any:
        """The parameter's value from the strings the client sent (None when absent)."""
        values = [_whole_number(self.name, value) if self._integers else value for value in raw]
        if self.repeat:
            return values
        if len(values) > 1:
            raise ValidationFailed.one(self.name, "must be given once")
        return values[0] if values else self.schema.get("default")

    def check(self, value: Any) -> Any:
        """A value given by keyword (the library), held to the same types as the HTTP query."""
        kind: type = int if self._integers else str
        items = list(value) if self.repeat and isinstance(value, list | tuple) else [value]
        if (self.repeat and not isinstance(value, list | tuple)) or \
                any(type(item) is not kind for item in items if item is not None):
            one = "a whole number" if kind is int else "a string"
            many = "a list of whole numbers" if kind is int else "a list of strings"
            raise ValidationFailed.one(self.name, f"must be {many if self.repeat else one}")
        return value

    def openapi(self) -> dict[str, Any]:
        parameter = {"name": self.name, "in": "query", "required": False, "description": self.description,
                     "schema": self.schema}
        return {**parameter, "style": "form", "explode": True} if self.repeat else parameter


def _whole_number(name: str, raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ValidationFailed.one(name, "must be a whole number (digits only)")
    return int(raw)


# Operations that every valid key may call, whatever its scopes: asking what the key itself may do.
ANY_KEY = frozenset({"get_current_api_key"})


@attrs.frozen
class Operation:
    """One thing a client can do, and every door's view of it."""

    name: str  # operationId, library method, e.g. "list_vms"
    method: str  # HTTP method, upper case
    path: str  # template with {agent_id}, {vm}, {snapshot}
    tag: str  # area: users, agents, vms, snapshots, fleet, service
    summary: str
    run: Run | None  # None: answered by the HTTP layer itself (health, this document)
    view: View | None = None  # core value -> the view the wire carries (None: no body)
    response: Any = None  # the view's type, for the OpenAPI document
    request: type | None = None  # the body's command class
    ok: int = 200
    errors: tuple[type[PortalError], ...] = ()  # besides those of every request (body, auth, 503)
    query: tuple[Query, ...] = ()
    public: bool = False
    no_store: bool = False  # the answer carries a secret: never cache it
    cached_per_user: bool = False  # a read kept per user until the database changes (HTTP only)
    location: Callable[[Any], str] | None = None  # Location header of a 201
    headers: Callable[[Any, Call], dict[str, str]] | None = None  # more headers of the answer (e.g. Link)
    library: bool = True  # a method of the library's Session
    long_running: bool = False  # may wait minutes (``?wait=``): told through ``Call.abandoned`` if the client leaves
    # The scope an API key needs for this operation (issue 20). Required, with no default, so an
    # operation that forgets it fails at import: ``scope=None`` only for public operations and the
    # few any key may call (``ANY_KEY``, checked by tests/integration/test_scopes_http.py).
    scope: Scope | None = attrs.field(kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.public and self.scope is not None:
            raise ValueError(f"{self.name}: a public operation needs no scope")
        if not self.public and self.scope is None and self.name not in ANY_KEY:
            raise ValueError(f"{self.name}: give the operation a scope (scope=Scope.READ, ...); only the "
                             f"operations in ANY_KEY may be called by every key")

    @property
    def path_parameters(self) -> tuple[str, ...]:
        return tuple(part[1:-1] for part in self.path.split("/") if part.startswith("{"))

    def authorize(self, caller: Caller | None) -> None:
        """Refuse (``InsufficientScope``, naming it) a caller whose key lacks this operation's scope.
        The only place scopes are checked: every door calls it through ``execute`` (the HTTP layer
        also calls it before reading the body, so a refused key's body is never parsed)."""
        if self.scope is None:
            return
        if caller is None:
            raise AssertionError(f"{self.name} was called without a caller")
        if self.scope not in caller.scopes:
            raise errors.InsufficientScope(self.scope.value)

    async def execute(self, portal: Portal, call: Call) -> Any:
        """Check the caller's scope, then run the use case."""
        assert self.run is not None, f"{self.name} is answered by the HTTP layer itself"
        self.authorize(call.caller)
        return await self.run(portal, call)


# ---------------------------------------------------------------------- error groups

BODY_ERRORS: tuple[type[PortalError], ...] = (errors.MalformedBody, errors.BodyTooLarge,
                                               errors.UnsupportedMediaType, ValidationFailed)
AGENT_ERRORS: tuple[type[PortalError], ...] = (errors.AgentNotFound, ValidationFailed, errors.AgentAddressRefused)
REMOTE_ERRORS: tuple[type[PortalError], ...] = (*AGENT_ERRORS, errors.VmNotFound, errors.RemoteError,
                                                errors.RemoteTimeout, errors.AgentChanged,
                                                errors.TooManyOperations)
VM_STATE_ERRORS: tuple[type[PortalError], ...] = (errors.VmAlreadyRunning, errors.VmNotRunning,
                                                  errors.VmStateConflict)
SNAPSHOT_ERRORS: tuple[type[PortalError], ...] = (*REMOTE_ERRORS, errors.SnapshotNotFound,
                                                  errors.SnapshotNameTaken, errors.SnapshotUnsupported,
                                                  *VM_STATE_ERRORS)

# ---------------------------------------------------------------------- query parameters

WAIT = Query("wait", "Seconds to wait for the VM to reach the action's state (start, resume, reboot: running; "
                     "shutdown, force-stop: shut off; suspend: paused). 200 with the state once reached; 504 "
                     "wait_timeout with the state it is in when the time is up. Without it, answer at once. "
                     "Give it once.",
             {"type": "integer", "minimum": 0, "maximum": WAIT_MAX})
AUDIT_LIMIT = Query("limit", "How many events at most.",
                    {"type": "integer", "minimum": 1, "maximum": AUDIT_PAGE_MAX, "default": AUDIT_PAGE_DEFAULT})
AUDIT_BEFORE = Query("before", "Return events with an id below this (the previous page's next_before).",
                     {"type": "integer", "minimum": 1})
AGENTS_AFTER = Query("after", "Only agents with an id above this: the last id of the previous page (the Link "
                               "header's rel=\"next\" says it).",
                     {"type": "integer", "minimum": 0, "maximum": 2147483647})
AGENTS_LIMIT = Query("limit", "How many agents at most.",
                     {"type": "integer", "minimum": 1, "maximum": AGENT_PAGE_MAX, "default": AGENT_PAGE_MAX})
FLEET_AGENT = Query("agent", "Only these agents (repeat the parameter for several); ids that are not yours are "
                             "ignored.",
                    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 2147483647}},
                    repeat=True)
FLEET_STATE = Query("state", "Only VMs in these states (repeatable), as virsh prints them.",
                    {"type": "array", "items": {"type": "string", "enum": list(VM_STATES)}}, repeat=True)

# issue 18
FRESH = Query("fresh", "true: ask the host (virsh list) even when the agent's live mirror is fresh.",
              {"type": "string", "enum": ["true", "false"], "default": "false"})
EVENTS_AFTER = Query("after", "Only events with an id above this (the last id you saw; the stream's Last-Event-ID).",
                     {"type": "integer", "minimum": 0, "default": 0})
EVENTS_AGENT = Query("agent", "Only events of this agent.", {"type": "integer", "minimum": 1, "maximum": 2147483647})
EVENTS_VM = Query("vm", "Only events of this VM.", {"type": "string", "minLength": 1, "maxLength": VM_NAME_MAX})
EVENTS_TYPE = Query("type", "Only events of these types (repeatable), e.g. vm.started, agent.unreachable, "
                            "action.start.",
                    {"type": "array", "items": {"type": "string", "maxLength": 64}}, repeat=True)
EVENTS_LIMIT = Query("limit", "How many events at most.",
                     {"type": "integer", "minimum": 1, "maximum": EVENT_PAGE_MAX, "default": EVENT_PAGE_DEFAULT})


def _fresh(call: Call) -> bool:
    value = call.query.get("fresh") or "false"
    if value not in ("true", "false"):
        raise ValidationFailed.one("fresh", "must be true or false")
    return bool(value == "true")


# Path parameters, as OpenAPI describes them.
PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "agent_id": {"name": "agent_id", "in": "path", "required": True,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 2147483647}},
    "vm": {"name": "vm", "in": "path", "required": True,
           "description": "VM (libvirt domain) name: letters, digits, spaces and . _ - + : @ , = %; "
                          "no leading '-'; not only digits and not UUID-shaped (virsh would take it for a "
                          "domain id or UUID). Percent-encode spaces.",
           "schema": {"type": "string", "minLength": 1, "maxLength": VM_NAME_MAX}},
    "key_id": {"name": "key_id", "in": "path", "required": True,
               "schema": {"type": "integer", "minimum": 1, "maximum": 2147483647}},
    "snapshot": {"name": "snapshot", "in": "path", "required": True,
                 "description": "Snapshot name (same rules as VM names). Percent-encode spaces.",
                 "schema": {"type": "string", "minLength": 1, "maxLength": VM_NAME_MAX}},
    "webhook_id": {"name": "webhook_id", "in": "path", "required": True,
                   "schema": {"type": "integer", "minimum": 1, "maximum": 2147483647}},
    "pool": {"name": "pool", "in": "path", "required": True,
             "description": "Storage pool name (same character rules as VM names). Percent-encode spaces.",
             "schema": {"type": "string", "minLength": 1, "maxLength": VM_NAME_MAX}},
}


# ---------------------------------------------------------------------- how operations call use cases


def _action(action: VmAction) -> Run:
    """A lifecycle action, and with ``?wait=`` the wait for the state it leads to."""
    async def run(portal: Portal, call: Call) -> Any:
        wait = call.query.get("wait")
        if wait is None:
            return await portal.vms.vm_action(call.me, call.agent_id, call.vm, action)
        return await portal.vms.vm_action_and_wait(call.me, call.agent_id, call.vm, action, wait,
                                                   abandoned=call.abandoned)
    return run


def _action_view(result: Any, _call: Call) -> CommandView | WaitedActionView:
    return WaitedActionView.of_waited(result) if isinstance(result, WaitedAction) else CommandView.of(result)


def _audit_page(events: Any, call: Call) -> AuditPage:
    next_before = events[-1].id if events and len(events) == call.query["limit"] else None
    return AuditPage(events=[AuditEventView.of(e) for e in events], next_before=next_before)


async def _current_user(_portal: Portal, call: Call) -> User:
    return call.me.user


def _next_agents_page(agents: Any, call: Call) -> dict[str, str]:
    """A full page may have a next one: say where it starts (RFC 8288 ``Link``)."""
    limit = call.query["limit"]
    if not agents or len(agents) < limit:
        return {}
    return {"Link": f'</agents?after={agents[-1].id}&limit={limit}>; rel="next"'}


def _path_part(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _new_vm_location(_created: Any, call: Call) -> dict[str, str]:
    """Where the new VM (created or cloned) is read from now (``Location`` of the 201)."""
    return {"Location": f"/agents/{call.agent_id}/vms/{_path_part(call.body.name)}"}


def _new_snapshot_location(_snapshot: Any, call: Call) -> dict[str, str]:
    return {"Location": f"/agents/{call.agent_id}/vms/{_path_part(call.vm)}/snapshots/{_path_part(call.body.name)}"}


def _each(view: Callable[[Any], Any]) -> View:
    return lambda values, _call: [view(value) for value in values]


def _one(view: Callable[[Any], Any]) -> View:
    return lambda value, _call: view(value)


def _with_key(created: NewApiKey, _call: Call) -> UserWithKeyView:
    return UserWithKeyView.with_key(created.user, created.api_key)


async def _fleet_exposition(portal: Portal, call: Call) -> Exposition:
    """The caller's fleet sampled, then written out in a worker thread: formatting a few hundred VMs
    takes milliseconds of CPU that the event loop (every other request) should not wait for."""
    sample = await invoke(portal.metrics.fleet_sample, call.me)
    return await asyncio.to_thread(Exposition.of_fleet, sample)


_ACTIONS = {
    VmAction.START: ("start_vm", "Start a VM (virsh start)"),
    VmAction.SHUTDOWN: ("shutdown_vm", "Ask a VM to shut down gracefully (virsh shutdown, ACPI)"),
    VmAction.FORCE_STOP: ("force_stop_vm", "Force a VM off (virsh destroy)"),
    VmAction.REBOOT: ("reboot_vm", "Reboot a VM (virsh reboot)"),
    VmAction.SUSPEND: ("suspend_vm", "Pause a VM's CPUs, keeping its memory (virsh suspend)"),
    VmAction.RESUME: ("resume_vm", "Resume a paused VM (virsh resume)"),
}

# --- provisioning (issue 16)

PROVISIONING_ERRORS: tuple[type[PortalError], ...] = (*REMOTE_ERRORS, errors.PoolNotFound, errors.VolumeNotFound,
                                                      errors.NetworkNotFound)
CREATE_WAIT = Query("wait", "Seconds to wait for the new VM to be running (when it is started). 201 with the state "
                            "once reached; 504 wait_timeout otherwise (the VM stays). Give it once.",
                    {"type": "integer", "minimum": 0, "maximum": WAIT_MAX})
FORCE = Query("force", "true: destroy a running VM first (else a running VM is refused with 409 vm_running).",
              {"type": "string", "enum": ["true", "false"], "default": "false"})
REMOVE_STORAGE = Query("remove_storage", "true: also delete the pool volumes the VM's disks use (refused with 409 "
                                         "volume_in_use when another defined VM uses one, e.g. a base image).",
                       {"type": "string", "enum": ["true", "false"], "default": "false"})
INTERFACE_SOURCE = Query("source", "Where addresses come from: agent (qemu guest agent), lease (the libvirt "
                                   "network's DHCP leases) or arp (the host's ARP table). Default: the agent, then "
                                   "the leases.",
                         {"type": "string", "enum": list(INTERFACE_SOURCES)})


def _true(call: Call, name: str) -> bool:
    value = call.query.get(name)
    if value not in (None, "true", "false"):
        raise ValidationFailed.one(name, "must be true or false")
    return value == "true"


async def _create_vm(portal: Portal, call: Call) -> Any:
    return await portal.provisioning.create_vm(call.me, call.agent_id, call.body, wait=call.query.get("wait"),
                                               abandoned=call.abandoned)


async def _delete_vm(portal: Portal, call: Call) -> Any:
    return await portal.provisioning.delete_vm(call.me, call.agent_id, call.vm, force=_true(call, "force"),
                                               remove_storage=_true(call, "remove_storage"))


PROVISIONING_OPERATIONS: tuple[Operation, ...] = (
    Operation("list_pools", "GET", "/agents/{agent_id}/pools", "provisioning",
              "The host's storage pools with their sizes (virsh pool-list, pool-info)",
              lambda p, c: invoke(p.provisioning.list_pools, c.me, c.agent_id), _each(PoolView.of), list[PoolView],
              errors=PROVISIONING_ERRORS, scope=Scope.READ),
    Operation("list_volumes", "GET", "/agents/{agent_id}/pools/{pool}/volumes", "provisioning",
              "The volumes of a storage pool (virsh vol-list, vol-dumpxml)",
              lambda p, c: invoke(p.provisioning.list_volumes, c.me, c.agent_id, c.pool), _each(VolumeView.of),
              list[VolumeView], errors=PROVISIONING_ERRORS, scope=Scope.READ),
    Operation("list_networks", "GET", "/agents/{agent_id}/networks", "provisioning",
              "The host's libvirt networks (virsh net-list, net-info)",
              lambda p, c: invoke(p.provisioning.list_networks, c.me, c.agent_id), _each(NetworkView.of),
              list[NetworkView], errors=PROVISIONING_ERRORS, scope=Scope.READ),
    Operation("create_vm", "POST", "/agents/{agent_id}/vms", "provisioning",
              "Create a VM: a disk from a base image, a cloud-init seed, domain XML written by the portal",
              _create_vm, _one(CreatedVmView.of_created), CreatedVmView, NewVm, ok=201,
              errors=(*BODY_ERRORS, *PROVISIONING_ERRORS, errors.VmNameTaken, errors.VolumeNameTaken,
                      errors.InsufficientStorage, errors.WaitTimedOut),
              query=(CREATE_WAIT,), long_running=True, headers=_new_vm_location, scope=Scope.PROVISION),
    Operation("delete_vm", "DELETE", "/agents/{agent_id}/vms/{vm}", "provisioning",
              "Undefine a VM (snapshots' metadata, NVRAM), optionally with its volumes",
              _delete_vm, ok=204, errors=(*PROVISIONING_ERRORS, errors.VmRunning, errors.VolumeInUse),
              query=(FORCE, REMOVE_STORAGE), scope=Scope.PROVISION),
    Operation("clone_vm", "POST", "/agents/{agent_id}/vms/{vm}/clone", "provisioning",
              "Clone a shut-off VM: disks copied as new volumes, new UUID and MAC addresses",
              lambda p, c: invoke(p.provisioning.clone_vm, c.me, c.agent_id, c.vm, c.body),
              _one(CreatedVmView.of_created), CreatedVmView, CloneRequest, ok=201,
              errors=(*BODY_ERRORS, *PROVISIONING_ERRORS, errors.VmNameTaken, errors.VolumeNameTaken,
                      errors.VmRunning), headers=_new_vm_location, scope=Scope.PROVISION),
    Operation("list_vm_interfaces", "GET", "/agents/{agent_id}/vms/{vm}/interfaces", "provisioning",
              "The guest's interfaces and addresses (virsh domifaddr: guest agent, then DHCP lease)",
              lambda p, c: invoke(p.provisioning.interfaces, c.me, c.agent_id, c.vm, c.query.get("source")),
              _each(GuestInterfaceView.of), list[GuestInterfaceView],
              errors=(*REMOTE_ERRORS, *VM_STATE_ERRORS), query=(INTERFACE_SOURCE,), scope=Scope.READ),
)

# ---------------------------------------------------------------------- the table

OPERATIONS: tuple[Operation, ...] = (
    # the service itself
    Operation("get_health", "GET", "/health", "service", "Service readiness ping", None, public=True,
              library=False, scope=None),
    Operation("head_health", "HEAD", "/health", "service", "Service readiness ping, headers only", None,
              public=True, library=False, scope=None),
    Operation("get_openapi", "GET", "/openapi.json", "service", "This document", None, public=True, library=False,
              scope=None),
    # users and API keys
    Operation("sign_up", "POST", "/users", "users", "Create a user and receive its API key (once)",
              lambda p, c: invoke(p.users.sign_up, c.body, c.origin), _with_key, UserWithKeyView, NewUser,
              ok=201, errors=(*BODY_ERRORS, errors.SignupRefused, errors.EmailTaken, errors.HttpsRequired),
              public=True, no_store=True,
              library=False, scope=None),
    Operation("get_current_user", "GET", "/users/me", "users", "The authenticated user's profile", _current_user,
              _one(UserView.of), UserView, library=False, scope=Scope.READ),
    Operation("rotate_api_key", "POST", "/users/me/api-key/rotate", "users",
              "Issue a new API key; the old one dies at once", lambda p, c: invoke(p.users.rotate_api_key, c.me),
              _with_key, UserWithKeyView, no_store=True, library=False, scope=Scope.KEYS),
    Operation("list_audit_events", "GET", "/users/me/audit", "users", "The caller's audit events, newest first",
              lambda p, c: invoke(p.audit.audit_events, c.me, limit=c.query["limit"], before=c.query["before"]),
              _audit_page, AuditPage, errors=(ValidationFailed,), query=(AUDIT_LIMIT, AUDIT_BEFORE), scope=Scope.READ),
    # agents
    Operation("list_agents", "GET", "/agents", "agents", "List the caller's agents, oldest first, a page at a time",
              lambda p, c: invoke(p.agents.list_agents, c.me, after=c.query["after"], limit=c.query["limit"]),
              _each(AgentView.of), list[AgentView], errors=(ValidationFailed,), query=(AGENTS_AFTER, AGENTS_LIMIT),
              cached_per_user=True, headers=_next_agents_page, scope=Scope.READ),
    Operation("register_agent", "POST", "/agents", "agents", "Register an agent (remote hypervisor)",
              lambda p, c: invoke(p.agents.register_agent, c.me, c.body), _one(AgentView.of), AgentView, NewAgent,
              ok=201, errors=(*BODY_ERRORS, errors.AgentNameTaken, errors.AgentLimitReached,
                              errors.AgentAddressRefused),
              location=lambda agent: f"/agents/{agent.id}", scope=Scope.AGENTS),
    Operation("get_agent", "GET", "/agents/{agent_id}", "agents", "One agent",
              lambda p, c: invoke(p.agents.get_agent, c.me, c.agent_id), _one(AgentView.of), AgentView,
              errors=(errors.AgentNotFound,), scope=Scope.READ),
    Operation("update_agent", "PATCH", "/agents/{agent_id}", "agents", "Change some of an agent's fields",
              lambda p, c: invoke(p.agents.update_agent, c.me, c.agent_id, c.body), _one(AgentView.of), AgentView,
              AgentChanges, errors=(*BODY_ERRORS, errors.AgentNotFound, errors.AgentNameTaken, errors.AgentChanged,
                                   errors.AgentAddressRefused), scope=Scope.AGENTS),
    Operation("delete_agent", "DELETE", "/agents/{agent_id}", "agents", "Remove an agent and its credentials",
              lambda p, c: invoke(p.agents.delete_agent, c.me, c.agent_id), ok=204, errors=(errors.AgentNotFound,),
              scope=Scope.AGENTS),
    Operation("read_credentials", "GET", "/agents/{agent_id}/credentials", "agents",
              "The agent's SSH key material (audited)",
              lambda p, c: invoke(p.agents.read_credentials, c.me, c.agent_id), _one(CredentialsView.of_credentials),
              CredentialsView, errors=(errors.AgentNotFound, errors.KeyNotExportable), no_store=True,
              scope=Scope.CREDENTIALS),
    Operation("get_public_key", "GET", "/agents/{agent_id}/public-key", "agents",
              "The agent's SSH public key, for authorized_keys",
              lambda p, c: invoke(p.agents.get_agent, c.me, c.agent_id), _one(PublicKeyView.of), PublicKeyView,
              errors=(errors.AgentNotFound,), scope=Scope.AGENTS),
    Operation("rotate_agent_key", "POST", "/agents/{agent_id}/rotate-key", "agents",
              "Replace the agent's key with a new generated ed25519 pair (audited)",
              lambda p, c: invoke(p.agents.rotate_agent_key, c.me, c.agent_id), _one(AgentView.of), AgentView,
              errors=(errors.AgentNotFound, errors.AgentChanged), scope=Scope.AGENTS),
    Operation("get_host", "GET", "/agents/{agent_id}/host", "agents",
              "The host's name, processors, memory and libvirt/QEMU versions",
              lambda p, c: invoke(p.fleet.host_facts, c.me, c.agent_id), _one(HostFactsView.of), HostFactsView,
              errors=REMOTE_ERRORS, scope=Scope.READ),
    Operation("check_agent", "POST", "/agents/{agent_id}/check", "agents",
              "Can the portal reach the host, log in and reach libvirt? 200 with the reason, whatever the host "
              "answered",
              lambda p, c: invoke(p.fleet.check_agent, c.me, c.agent_id), _one(AgentCheckView.of), AgentCheckView,
              errors=(errors.AgentNotFound, errors.AgentChanged, errors.TooManyOperations), scope=Scope.READ),
    # VMs: lifecycle
    Operation("list_vms", "GET", "/agents/{agent_id}/vms", "vms", "List the agent's VMs (virsh list --all)",
              lambda p, c: invoke(p.vms.list_vms, c.me, c.agent_id, fresh=_fresh(c)), _each(VmView.of),
              list[VmView], errors=REMOTE_ERRORS, query=(FRESH,), scope=Scope.READ),
    Operation("get_vm", "GET", "/agents/{agent_id}/vms/{vm}", "vms", "virsh dominfo for a VM, typed and raw",
              lambda p, c: invoke(p.vms.vm_info, c.me, c.agent_id, c.vm), _one(VmInfoView.of), VmInfoView,
              errors=REMOTE_ERRORS, scope=Scope.READ),
    *(Operation(name, "POST", f"/agents/{{agent_id}}/vms/{{vm}}/{action.value}", "vms", summary, _action(action),
                _action_view, CommandView | WaitedActionView, errors=(*REMOTE_ERRORS, *VM_STATE_ERRORS,
                                                                      errors.WaitTimedOut), query=(WAIT,),
                long_running=True, scope=Scope.OPERATE)
      for action, (name, summary) in _ACTIONS.items()),
    Operation("set_autostart", "PUT", "/agents/{agent_id}/vms/{vm}/autostart", "vms",
              "Start the VM with the host, or not (virsh autostart)",
              lambda p, c: invoke(p.vms.set_autostart, c.me, c.agent_id, c.vm, c.body.enabled),
              lambda result, c: AutostartView(vm=c.vm, enabled=c.body.enabled, result=CommandView.of(result)),
              AutostartView, AutostartChange, errors=(*BODY_ERRORS, *REMOTE_ERRORS, *VM_STATE_ERRORS),
              scope=Scope.OPERATE),
    Operation("get_vm_stats", "GET", "/agents/{agent_id}/vms/{vm}/stats", "vms",
              "virsh domstats: state, CPU time, vCPUs, balloon memory, disk and network counters",
              lambda p, c: invoke(p.vms.vm_stats, c.me, c.agent_id, c.vm), _one(VmStatsView.of), VmStatsView,
              errors=REMOTE_ERRORS, scope=Scope.READ),
    # VMs: snapshots
    Operation("list_snapshots", "GET", "/agents/{agent_id}/vms/{vm}/snapshots", "snapshots",
              "The VM's internal snapshots (virsh snapshot-list)",
              lambda p, c: invoke(p.snapshots.list_snapshots, c.me, c.agent_id, c.vm), _each(SnapshotView.of),
              list[SnapshotView], errors=SNAPSHOT_ERRORS, scope=Scope.READ),
    Operation("create_snapshot", "POST", "/agents/{agent_id}/vms/{vm}/snapshots", "snapshots",
              "Take an internal snapshot (virsh snapshot-create-as)",
              lambda p, c: invoke(p.snapshots.create_snapshot, c.me, c.agent_id, c.vm, c.body),
              _one(SnapshotView.of), SnapshotView, NewSnapshot, ok=201, errors=(*BODY_ERRORS, *SNAPSHOT_ERRORS),
              headers=_new_snapshot_location, scope=Scope.OPERATE),
    Operation("get_snapshot", "GET", "/agents/{agent_id}/vms/{vm}/snapshots/{snapshot}", "snapshots",
              "One snapshot, as the list shows it",
              lambda p, c: invoke(p.snapshots.get_snapshot, c.me, c.agent_id, c.vm, c.snapshot),
              _one(SnapshotView.of), SnapshotView, errors=SNAPSHOT_ERRORS, scope=Scope.READ),
    Operation("delete_snapshot", "DELETE", "/agents/{agent_id}/vms/{vm}/snapshots/{snapshot}", "snapshots",
              "Delete a snapshot (virsh snapshot-delete)",
              lambda p, c: invoke(p.snapshots.delete_snapshot, c.me, c.agent_id, c.vm, c.snapshot), ok=204,
              errors=SNAPSHOT_ERRORS, scope=Scope.OPERATE),
    Operation("revert_snapshot", "POST", "/agents/{agent_id}/vms/{vm}/snapshots/{snapshot}/revert", "snapshots",
              "Revert the VM to a snapshot (virsh snapshot-revert)",
              lambda p, c: invoke(p.snapshots.revert_snapshot, c.me, c.agent_id, c.vm, c.snapshot),
              _one(CommandView.of), CommandView, errors=SNAPSHOT_ERRORS, scope=Scope.OPERATE),
    # the fleet
    Operation("list_fleet", "GET", "/vms", "fleet", "Every VM on every agent of the caller; a failing agent "
                                                    "carries its error",
              lambda p, c: invoke(p.fleet.fleet, c.me, agent_ids=c.query["agent"], states=c.query["state"],
                                  fresh=_fresh(c)),
              _each(FleetEntryView.of), list[FleetEntryView], errors=(ValidationFailed,),
              query=(FLEET_AGENT, FLEET_STATE, FRESH), scope=Scope.READ),
    # --- API keys and scopes (issue 20)
    Operation("list_api_keys", "GET", "/users/me/keys", "users",
              "Your API keys (those the calling key covers), oldest first; never the keys themselves",
              lambda p, c: invoke(p.keys.list_keys, c.me), _each(ApiKeyView.of), list[ApiKeyView],
              scope=Scope.KEYS),
    Operation("create_api_key", "POST", "/users/me/keys", "users",
              "Create a named API key with some scopes, agents and an expiry (the key is shown once); never "
              "more than the calling key may do",
              lambda p, c: invoke(p.keys.create_key, c.me, c.body),
              lambda created, _c: NewApiKeyView.with_key(created.key, created.api_key), NewApiKeyView, NewKey,
              ok=201, errors=(*BODY_ERRORS, errors.InsufficientScope, errors.KeyLimitedToAgents,
                              errors.ApiKeyLimitReached),
              no_store=True, location=lambda created: f"/users/me/keys/{created.key.id}", scope=Scope.KEYS),
    Operation("get_current_api_key", "GET", "/users/me/keys/current", "users",
              "What the calling key may do: its scopes, agents and expiry (any key may ask)",
              lambda p, c: invoke(p.keys.current_key, c.me), _one(ApiKeyView.of), ApiKeyView, scope=None),
    Operation("revoke_api_key", "DELETE", "/users/me/keys/{key_id}", "users",
              "Revoke an API key: refused at its very next request, on every worker and instance",
              lambda p, c: invoke(p.keys.revoke_key, c.me, c.key_id), ok=204,
              errors=(errors.ApiKeyNotFound, errors.FullKeyNotRevocable), scope=Scope.KEYS),
    # --- metrics (issue 21)
    # scope: none (no API key: loopback clients, or MANAGEMENT_METRICS_TOKEN, checked by the HTTP layer)
    Operation("get_portal_metrics", "GET", "/metrics", "service",
              "The portal's own metrics in the Prometheus text format (every worker summed). Served to loopback "
              "clients that did not come through a proxy, or with 'Authorization: Bearer "
              "<MANAGEMENT_METRICS_TOKEN>'", None, response=Exposition,
              errors=(errors.MetricsForbidden, errors.HttpsRequired),
              public=True, library=False, scope=None),
    Operation("get_fleet_metrics", "GET", "/metrics/vms", "fleet",
              "The caller's fleet in the Prometheus text format: per agent up, scrape duration and host facts; "
              "per VM state, vCPUs, memory, CPU time, disk and network counters. Each host is asked at most "
              "once per MANAGEMENT_METRICS_MIN_INTERVAL; an unreachable one is playr_agent_up 0",
              _fleet_exposition, lambda exposition, _call: exposition, Exposition, scope=Scope.READ),
    # --- consoles (issue 17)
    Operation("open_console", "POST", "/agents/{agent_id}/vms/{vm}/console", "consoles",
              "A one-time ticket (30 s) to open the VM's serial or VNC console as a WebSocket at GET /console/{ticket}",
              lambda p, c: invoke(p.consoles.open_ticket, c.me, c.agent_id, c.vm, c.body.kind),
              _one(ConsoleTicketView.of), ConsoleTicketView, NewConsole, ok=201, no_store=True,
              errors=(*BODY_ERRORS, *REMOTE_ERRORS, errors.VmNotRunning, errors.ConsoleUnavailable,
                      errors.TooManyConsoles), scope=Scope.OPERATE),
)

# --- live state and events (issue 18)
OPERATIONS += (
    Operation("list_events", "GET", "/events", "events",
              "The caller's events (host events, watcher events, the portal's own VM actions), oldest first, "
              "after an id",
              lambda p, c: invoke(p.events.list_events, c.me, after=c.query["after"], agent_id=c.query["agent"],
                                  vm=c.query["vm"], types=c.query["type"], limit=c.query["limit"]),
              lambda events, c: EventPage(events=[EventView.of(e) for e in events],
                                          last_id=events[-1].id if events else c.query["after"] or 0),
              EventPage, errors=(ValidationFailed,),
              query=(EVENTS_AFTER, EVENTS_AGENT, EVENTS_VM, EVENTS_TYPE, EVENTS_LIMIT), scope=Scope.READ),
)

# --- webhooks (issue 18). Reading them needs "read"; making, changing, deleting them and their secrets
# needs "keys" (and "read"): a webhook hands the caller's events to a URL, a standing grant like a key.
DELIVERIES_LIMIT = Query("limit", "How many deliveries at most (newest first).",
                         {"type": "integer", "minimum": 1, "maximum": DELIVERY_PAGE_MAX,
                          "default": DELIVERY_PAGE_DEFAULT})
DELIVERIES_BEFORE = Query("before", "Only deliveries with an id below this (the last id of the previous page).",
                          {"type": "integer", "minimum": 1})
WEBHOOK_ERRORS: tuple[type[PortalError], ...] = (errors.WebhookNotFound,)
OPERATIONS += (
    Operation("list_webhooks", "GET", "/webhooks", "webhooks", "Your webhooks, oldest first (never their secrets)",
              lambda p, c: invoke(p.webhooks.list_webhooks, c.me), _each(WebhookView.of), list[WebhookView],
              scope=Scope.READ),
    Operation("create_webhook", "POST", "/webhooks", "webhooks",
              "Create a webhook: the portal POSTs each matching event, signed (X-Playr-Signature); the secret is "
              "shown once",
              lambda p, c: invoke(p.webhooks.create_webhook, c.me, c.body), _one(NewWebhookView.with_secret),
              NewWebhookView, NewWebhook, ok=201, no_store=True,
              errors=(*BODY_ERRORS, errors.WebhookTargetRefused, errors.WebhookLimitReached,
                      errors.KeyLimitedToAgents, errors.InsufficientScope),
              location=lambda created: f"/webhooks/{created.webhook.id}", scope=Scope.KEYS),
    Operation("get_webhook", "GET", "/webhooks/{webhook_id}", "webhooks", "One webhook",
              lambda p, c: invoke(p.webhooks.get_webhook, c.me, c.webhook_id), _one(WebhookView.of), WebhookView,
              errors=WEBHOOK_ERRORS, scope=Scope.READ),
    Operation("update_webhook", "PATCH", "/webhooks/{webhook_id}", "webhooks",
              "Change a webhook's URL, event types, agents or whether it is active",
              lambda p, c: invoke(p.webhooks.update_webhook, c.me, c.webhook_id, c.body), _one(WebhookView.of),
              WebhookView, WebhookChanges,
              errors=(*BODY_ERRORS, *WEBHOOK_ERRORS, errors.WebhookTargetRefused, errors.KeyLimitedToAgents,
                      errors.InsufficientScope), scope=Scope.KEYS),
    Operation("delete_webhook", "DELETE", "/webhooks/{webhook_id}", "webhooks",
              "Delete a webhook and its pending deliveries",
              lambda p, c: invoke(p.webhooks.delete_webhook, c.me, c.webhook_id), ok=204,
              errors=WEBHOOK_ERRORS, scope=Scope.KEYS),
    Operation("rotate_webhook_secret", "POST", "/webhooks/{webhook_id}/rotate-secret", "webhooks",
              "Give a webhook a new secret (shown once); the old one signs nothing from now on",
              lambda p, c: invoke(p.webhooks.rotate_secret, c.me, c.webhook_id), _one(NewWebhookView.with_secret),
              NewWebhookView, no_store=True, errors=WEBHOOK_ERRORS, scope=Scope.KEYS),
    Operation("list_webhook_deliveries", "GET", "/webhooks/{webhook_id}/deliveries", "webhooks",
              "The webhook's deliveries, newest first, each with its attempts: status code, answer, error, duration",
              lambda p, c: invoke(p.webhooks.list_deliveries, c.me, c.webhook_id, limit=c.query["limit"],
                                  before=c.query["before"]),
              _each(DeliveryView.of), list[DeliveryView], errors=(*WEBHOOK_ERRORS, ValidationFailed),
              query=(DELIVERIES_LIMIT, DELIVERIES_BEFORE), scope=Scope.READ),
)

OPERATIONS += PROVISIONING_OPERATIONS  # issue 16

BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}


def operation(name: str) -> Operation:
    return BY_NAME[name]


# --- method names of the library and the HTTP client (issue 15)
# Names kept from before the operation table (``session.vms(1)`` is ``session.list_vms(1)``); the
# in-process library (entrypoints/library.py) and the HTTP client (entrypoints/client.py) both take them.
ALIASES = {"agents": "list_agents", "agent": "get_agent", "credentials": "read_credentials", "vms": "list_vms",
           "vm_info": "get_vm", "vm_stats": "get_vm_stats", "snapshots": "list_snapshots", "host": "get_host",
           "audit_events": "list_audit_events"}
