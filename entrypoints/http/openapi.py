"""The OpenAPI 3.1 document served at ``GET /openapi.json``.

Request and response schemas are generated from the same attrs classes the app structures and
unstructures, so they cannot drift; ``tests/integration/test_openapi.py`` checks that every route
the app serves is described and nothing else is.
"""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Any

import attrs

from core.audit import AUDIT_PAGE_MAX
from core.commands import AgentChanges, AutostartChange, NewAgent, NewSnapshot, NewUser
from core.results import AgentCheck, HostFacts
from core.virsh import VM_NAME_MAX, VM_STATES, WAIT_MAX, Snapshot, VmAction, VmStats
from entrypoints.http.errors import CODE_OF_STATUS
from entrypoints.shapes import (
    AgentView,
    AuditPage,
    AutostartView,
    CommandView,
    CredentialsView,
    FleetEntryView,
    Health,
    PublicKeyView,
    UserView,
    UserWithKeyView,
    VmInfoView,
    VmView,
    WaitedActionView,
)

VERSION = "0.1.0"


@attrs.frozen
class Operation:
    method: str
    path: str
    summary: str
    ok: int
    response: Any = None  # an attrs class, list[cls], or None for no body
    request: type | None = None
    public: bool = False
    errors: tuple[int, ...] = ()
    parameters: tuple[dict[str, Any], ...] = ()
    no_store: bool = False


_AGENT_ID = {"name": "agent_id", "in": "path", "required": True,
             "schema": {"type": "integer", "minimum": 1, "maximum": 2147483647}}

_VM = {"name": "vm", "in": "path", "required": True,
       "description": "VM (libvirt domain) name: letters, digits, spaces and . _ - + : @ , = %; "
                      "no leading '-'; not only digits and not UUID-shaped (virsh would take it for a "
                      "domain id or UUID). Percent-encode spaces.",
       "schema": {"type": "string", "minLength": 1, "maxLength": VM_NAME_MAX}}
_REMOTE_ERRORS = (404, 422, 502, 504)
_ACTION_SUMMARY = {
    VmAction.START: "Start a VM (virsh start)",
    VmAction.SHUTDOWN: "Ask a VM to shut down gracefully (virsh shutdown, ACPI)",
    VmAction.FORCE_STOP: "Force a VM off (virsh destroy)",
    VmAction.REBOOT: "Reboot a VM (virsh reboot)",
    VmAction.SUSPEND: "Pause a VM's CPUs, keeping its memory (virsh suspend)",
    VmAction.RESUME: "Resume a paused VM (virsh resume)",
}
_WAIT = {"name": "wait", "in": "query", "required": False,
         "description": "Seconds to wait for the VM to reach the action's state (start, resume, reboot: running; "
                        "shutdown, force-stop: shut off; suspend: paused). 200 with the state once reached; 504 "
                        "wait_timeout with the state it is in when the time is up. Without it, answer at once. "
                        "Give it once.",
         "schema": {"type": "integer", "minimum": 0, "maximum": WAIT_MAX}}
_SNAPSHOT = {"name": "snapshot", "in": "path", "required": True,
             "description": "Snapshot name (same rules as VM names). Percent-encode spaces.",
             "schema": {"type": "string", "minLength": 1, "maxLength": VM_NAME_MAX}}
_FLEET_FILTERS = (
    {"name": "agent", "in": "query", "required": False, "style": "form", "explode": True,
     "description": "Only these agents (repeat the parameter for several); ids that are not yours are ignored.",
     "schema": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 2147483647}}},
    {"name": "state", "in": "query", "required": False, "style": "form", "explode": True,
     "description": "Only VMs in these states (repeatable), as virsh prints them.",
     "schema": {"type": "array", "items": {"type": "string", "enum": list(VM_STATES)}}},
)
_SNAPSHOT_ERRORS = (404, 409, 422, 502, 504)

OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/health", "Service readiness ping", 200, Health, public=True),
    Operation("head", "/health", "Service readiness ping, headers only", 200, None, public=True),
    Operation("get", "/openapi.json", "This document", 200, None, public=True),
    Operation("post", "/users", "Create a user and receive its API key (once)", 201, UserWithKeyView,
              NewUser, public=True, errors=(400, 403, 409, 413, 415, 422), no_store=True),
    Operation("get", "/users/me", "The authenticated user's profile", 200, UserView),
    Operation("post", "/users/me/api-key/rotate", "Issue a new API key; the old one dies at once", 200,
              UserWithKeyView, no_store=True),
    Operation("get", "/users/me/audit", "The caller's audit events, newest first", 200, AuditPage,
              errors=(422,), parameters=(
                  {"name": "limit", "in": "query", "required": False,
                   "schema": {"type": "integer", "minimum": 1, "maximum": AUDIT_PAGE_MAX, "default": 100}},
                  {"name": "before", "in": "query", "required": False,
                   "description": "Return events with an id below this (the previous page's next_before).",
                   "schema": {"type": "integer", "minimum": 1}},
              )),
    Operation("get", "/agents", "List the caller's agents", 200, list[AgentView]),
    Operation("post", "/agents", "Register an agent (remote hypervisor)", 201, AgentView, NewAgent,
              errors=(400, 409, 413, 415, 422)),
    Operation("get", "/agents/{agent_id}", "One agent", 200, AgentView, errors=(404,),
              parameters=(_AGENT_ID,)),
    Operation("patch", "/agents/{agent_id}", "Change some of an agent's fields", 200, AgentView, AgentChanges,
              errors=(400, 404, 409, 413, 415, 422), parameters=(_AGENT_ID,)),
    Operation("delete", "/agents/{agent_id}", "Remove an agent and its credentials", 204, None,
              errors=(404,), parameters=(_AGENT_ID,)),
    Operation("get", "/agents/{agent_id}/credentials", "The agent's SSH key material (audited)", 200,
              CredentialsView, errors=(404,), parameters=(_AGENT_ID,), no_store=True),
    Operation("get", "/agents/{agent_id}/public-key", "The agent's SSH public key, for authorized_keys", 200,
              PublicKeyView, errors=(404,), parameters=(_AGENT_ID,)),
    Operation("post", "/agents/{agent_id}/rotate-key",
              "Replace the agent's key with a new generated ed25519 pair (audited)", 200, AgentView,
              errors=(404, 409), parameters=(_AGENT_ID,)),
    Operation("get", "/agents/{agent_id}/vms", "List the agent's VMs (virsh list --all)", 200, list[VmView],
              errors=(404, 502, 504), parameters=(_AGENT_ID,)),
    Operation("get", "/agents/{agent_id}/vms/{vm}", "virsh dominfo for a VM, parsed and raw", 200, VmInfoView,
              errors=_REMOTE_ERRORS, parameters=(_AGENT_ID, _VM)),
    *(Operation("post", f"/agents/{{agent_id}}/vms/{{vm}}/{action.value}", summary, 200,
                CommandView | WaitedActionView, errors=(404, 409, 422, 502, 504), parameters=(_AGENT_ID, _VM, _WAIT))
      for action, summary in _ACTION_SUMMARY.items()),
    Operation("put", "/agents/{agent_id}/vms/{vm}/autostart", "Start the VM with the host, or not (virsh autostart)",
              200, AutostartView, AutostartChange, errors=(400, 404, 409, 413, 415, 422, 502, 504),
              parameters=(_AGENT_ID, _VM)),
    Operation("get", "/agents/{agent_id}/vms/{vm}/stats",
              "virsh domstats: state, CPU time, vCPUs, balloon memory, disk and network counters", 200, VmStats,
              errors=_REMOTE_ERRORS, parameters=(_AGENT_ID, _VM)),
    Operation("get", "/agents/{agent_id}/vms/{vm}/snapshots", "The VM's internal snapshots (virsh snapshot-list)",
              200, list[Snapshot], errors=_REMOTE_ERRORS, parameters=(_AGENT_ID, _VM)),
    Operation("post", "/agents/{agent_id}/vms/{vm}/snapshots", "Take an internal snapshot (virsh snapshot-create-as)",
              201, Snapshot, NewSnapshot, errors=(400, 404, 409, 413, 415, 422, 502, 504),
              parameters=(_AGENT_ID, _VM)),
    Operation("delete", "/agents/{agent_id}/vms/{vm}/snapshots/{snapshot}", "Delete a snapshot (virsh snapshot-delete)",
              204, None, errors=_SNAPSHOT_ERRORS, parameters=(_AGENT_ID, _VM, _SNAPSHOT)),
    Operation("post", "/agents/{agent_id}/vms/{vm}/snapshots/{snapshot}/revert",
              "Revert the VM to a snapshot (virsh snapshot-revert)", 200, CommandView, errors=_SNAPSHOT_ERRORS,
              parameters=(_AGENT_ID, _VM, _SNAPSHOT)),
    Operation("get", "/vms", "Every VM on every agent of the caller; a failing agent carries its error", 200,
              list[FleetEntryView], errors=(422,), parameters=_FLEET_FILTERS),
    Operation("get", "/agents/{agent_id}/host", "The host's name, processors, memory and libvirt/QEMU versions", 200,
              HostFacts, errors=(404, 502, 504), parameters=(_AGENT_ID,)),
    Operation("post", "/agents/{agent_id}/check",
              "Can the portal reach the host, log in and reach libvirt? Always 200 with the reason", 200,
              AgentCheck, errors=(404, 409), parameters=(_AGENT_ID,)),
)


def schema_of(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for a type used in a request or response class."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        non_null = [a for a in args if a is not type(None)]
        schema = schema_of(non_null[0], components) if len(non_null) == 1 else {
            "anyOf": [schema_of(a, components) for a in non_null]}
        if type(None) in args:
            if "type" in schema:
                return {**schema, "type": [schema["type"], "null"]}
            return {"anyOf": [schema, {"type": "null"}]}
        return schema
    if origin is list:
        return {"type": "array", "items": schema_of(typing.get_args(tp)[0], components)}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema_of(typing.get_args(tp)[1], components)}
    if tp is type(None):
        return {"type": "null"}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is datetime:
        return {"type": "string", "format": "date-time"}
    if attrs.has(tp):
        name = tp.__name__
        if name not in components:
            components[name] = {}  # placeholder against recursion
            components[name] = _object_schema(tp, components)
        return {"$ref": f"#/components/schemas/{name}"}
    raise TypeError(f"no schema for {tp!r}")


def _object_schema(cls: type, components: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in attrs.fields(cls):
        prop = schema_of(hints[field.name], components)
        meta = field.metadata
        if meta.get("doc"):
            prop = {**prop, "description": meta["doc"]}
        if "schema" in meta:
            prop = {**prop, **meta["schema"]}
        properties[field.name] = prop
        if field.default is attrs.NOTHING:
            required.append(field.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(cls.__doc__.split())
    return {**schema, **_CROSS_FIELD_RULES.get(cls.__name__, {})}


# Rules between fields that the per-field schemas cannot say (the use case enforces the same).
_CROSS_FIELD_RULES: dict[str, dict[str, Any]] = {
    "NewAgent": {"anyOf": [
        {"required": ["private_key"],
         "properties": {"private_key": {"type": "string"}, "generate_key": {"const": False}}},
        {"required": ["generate_key"],
         "properties": {"generate_key": {"const": True}, "private_key": {"type": "null"},
                        "private_key_passphrase": {"type": "null"}}},
    ]},
}


def _problem_response(status: int) -> dict[str, Any]:
    return {"description": CODE_OF_STATUS.get(status, "error").replace("_", " "),
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def document() -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {}
        ok: dict[str, Any] = {"description": op.summary}
        if op.response is not None:
            ok["content"] = {"application/json": {"schema": schema_of(op.response, components)}}
        elif op.path == "/openapi.json":
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        if op.no_store:
            ok["headers"] = {"Cache-Control": {"schema": {"type": "string", "const": "no-store"}}}
        responses[str(op.ok)] = ok
        statuses = set(op.errors) | ({401, 429, 503} if not op.public else set())
        if op.path == "/users":
            statuses.add(503)
        for status in sorted(statuses):
            responses[str(status)] = _problem_response(status)
        if op.public:
            responses["500"] = _problem_response(500)
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"
                           .replace(".", "_").replace("-", "_"),
            "responses": responses,
        }
        if op.public:
            operation["security"] = []
        if op.parameters:
            operation["parameters"] = list(op.parameters)
        if op.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of(op.request, components)}},
            }
        paths.setdefault(op.path, {})[op.method] = operation
    components["Problem"] = {
        "type": "object",
        "description": "RFC 9457 problem details with a stable machine-readable code.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "request_id": {"type": "string"},
            "state": {"type": ["string", "null"],
                      "description": "wait_timeout: the state the VM was last seen in"},
            "target_state": {"type": "string", "description": "wait_timeout: the state it was awaited in"},
            "errors": {"type": "array", "items": {
                "type": "object", "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "PlayrServers QEMU Management Portal",
            "version": VERSION,
            "description": "Drive virsh on remote QEMU/KVM hosts over SSH. Errors are RFC 9457 "
                           "problem details with a stable `code`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Your API key: Authorization: Bearer <key>"}},
        },
    }
