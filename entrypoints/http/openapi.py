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

from core.commands import AgentChanges, NewAgent, NewUser
from core.services import AUDIT_PAGE_MAX
from core.virsh import VM_NAME_MAX, VmAction
from entrypoints.http.errors import CODE_OF_STATUS
from entrypoints.shapes import (
    AgentView,
    AuditPage,
    CommandView,
    CredentialsView,
    Health,
    UserView,
    UserWithKeyView,
    VmInfoView,
    VmView,
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
                      "no leading '-'. Percent-encode spaces.",
       "schema": {"type": "string", "minLength": 1, "maxLength": VM_NAME_MAX}}
_REMOTE_ERRORS = (404, 422, 502, 504)
_ACTION_SUMMARY = {
    VmAction.START: "Start a VM (virsh start)",
    VmAction.SHUTDOWN: "Ask a VM to shut down gracefully (virsh shutdown, ACPI)",
    VmAction.FORCE_STOP: "Force a VM off (virsh destroy)",
    VmAction.REBOOT: "Reboot a VM (virsh reboot)",
}

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
    Operation("get", "/agents/{agent_id}/vms", "List the agent's VMs (virsh list --all)", 200, list[VmView],
              errors=(404, 502, 504), parameters=(_AGENT_ID,)),
    Operation("get", "/agents/{agent_id}/vms/{vm}", "virsh dominfo for a VM, parsed and raw", 200, VmInfoView,
              errors=_REMOTE_ERRORS, parameters=(_AGENT_ID, _VM)),
    *(Operation("post", f"/agents/{{agent_id}}/vms/{{vm}}/{action.value}", summary, 200, CommandView,
                errors=(404, 409, 422, 502, 504), parameters=(_AGENT_ID, _VM))
      for action, summary in _ACTION_SUMMARY.items()),
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
    return schema


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
