"""The OpenAPI 3.1 document served at ``GET /openapi.json``.

Every operation comes from the one table in ``entrypoints/operations.py``: its ``operationId``,
tag, parameters, request and response schemas (generated from the same attrs classes the app
structures and unstructures, so they cannot drift) and its error responses, each listing the stable
``code`` values it can carry (from the error classes of ``core/errors.py``).
"""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Any

import attrs

from core import errors as domain
from entrypoints.exposition import CONTENT_TYPE as EXPOSITION_CONTENT_TYPE
from entrypoints.exposition import Exposition
from entrypoints.http.errors import status_of_class
from entrypoints.operations import OPERATIONS, PATH_PARAMETERS, Operation

VERSION = "0.1.0"

TAGS = (
    ("users", "Users, API keys and the audit trail"),
    ("agents", "Agents: the remote hypervisors and their SSH credentials"),
    ("vms", "A VM's lifecycle: list, inspect, start, stop, reboot, suspend, autostart, statistics"),
    ("snapshots", "A VM's internal snapshots"),
    ("fleet", "Every VM on every agent at once"),
    ("provisioning", "Storage pools, volumes and networks; creating, cloning and deleting VMs; guest addresses"),
    ("events", "What happened on your agents and VMs: history and stream"),
    ("webhooks", "Signed HTTP deliveries of your events to URLs of yours, retried from a durable outbox"),
    ("service", "The portal itself"),
    # consoles (issue 17)
    ("consoles", "A VM's serial or VNC console: a one-time ticket here, then a WebSocket at GET /console/{ticket}"),
)

# Errors any authenticated request can meet, and those of every request.
_AUTH_ERRORS: tuple[type[domain.PortalError], ...] = (domain.MissingApiKey, domain.Unauthenticated,
                                                       domain.TooManyAuthFailures, domain.HttpsRequired,
                                                       domain.HeadersTooLarge)
_SERVICE_ERRORS: tuple[type[domain.PortalError], ...] = (domain.Unavailable,)


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
    return schema


def error_codes(classes: typing.Iterable[type[domain.PortalError]]) -> dict[int, list[str]]:
    """The codes ``classes`` (and their subclasses) can answer with, by HTTP status."""
    by_status: dict[int, set[str]] = {}
    for declared in classes:
        for cls in domain.error_classes():
            if issubclass(cls, declared):
                by_status.setdefault(status_of_class(cls), set()).add(cls.code)
    return {status: sorted(codes) for status, codes in sorted(by_status.items())}


def _problem_response(codes: list[str]) -> dict[str, Any]:
    return {"description": "Problem details; code: " + ", ".join(codes),
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _operation(op: Operation, components: dict[str, Any]) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": op.summary}
    if op.response is Exposition:  # Prometheus text, not JSON (issue 21)
        ok["content"] = {EXPOSITION_CONTENT_TYPE: {"schema": {"type": "string"}}}
    elif op.response is not None:
        ok["content"] = {"application/json": {"schema": schema_of(op.response, components)}}
    elif op.name == "get_openapi":
        ok["content"] = {"application/json": {"schema": {"type": "object"}}}
    if op.no_store:
        ok["headers"] = {"Cache-Control": {"schema": {"type": "string", "const": "no-store"}}}
    declared = (*op.errors, *_SERVICE_ERRORS, *(() if op.public else _AUTH_ERRORS),
                *(() if op.scope is None else (domain.InsufficientScope,)))
    responses: dict[str, Any] = {str(op.ok): ok}
    for status, codes in error_codes(declared).items():
        responses[str(status)] = _problem_response(codes)
    responses["500"] = _problem_response(["internal_error"])
    operation: dict[str, Any] = {"operationId": op.name, "tags": [op.tag], "summary": op.summary,
                                 "responses": responses}
    if op.public:
        operation["security"] = []
    else:  # the scope the key needs (OpenAPI 3.1 allows scopes, "roles", for any scheme); [] = any key
        operation["security"] = [{"bearer": [] if op.scope is None else [op.scope.value]}]
    parameters = [PATH_PARAMETERS[name] for name in op.path_parameters] + [q.openapi() for q in op.query]
    if parameters:
        operation["parameters"] = parameters
    if op.request is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": schema_of(op.request, components)}}}
    return operation


def document() -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, components)
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
            "scope": {"type": "string", "description": "insufficient_scope: the scope the operation needs"},
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
        "tags": [{"name": name, "description": description} for name, description in TAGS],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "Your API key: Authorization: Bearer <key>. Each operation's security names the "
                               "scope the key needs (read, operate, provision, agents, credentials, keys); a key "
                               "without it gets 403 insufficient_scope. The full key (sign-up, rotate) has every "
                               "scope."}},
        },
    }
