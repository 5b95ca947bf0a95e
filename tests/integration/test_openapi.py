"""GET /openapi.json describes exactly the routes the app serves, with their methods."""

from __future__ import annotations

import re
from typing import Any

import falcon.asgi

from entrypoints.operations import OPERATIONS
from tests.support import Api

_METHODS = ("get", "head", "post", "put", "patch", "delete")


def served_routes(app: falcon.asgi.App) -> set[tuple[str, str]]:
    """(method, path template) for every responder the router really dispatches to."""
    routes: set[tuple[str, str]] = set()

    def walk(nodes: list[Any]) -> None:
        for node in nodes:
            if node.resource is not None:
                template = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", node.uri_template)
                for method, responder in node.method_map.items():
                    # Responders made from the operation table carry their operation; Falcon's own
                    # (405 for methods a path does not have) do not.
                    if getattr(responder, "operation", None) is not None:
                        routes.add((method.lower(), template))
            walk(node.children)

    walk(app._router._roots)
    return routes


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item if method in _METHODS}


def test_the_document_describes_every_served_route_and_nothing_else(api: Api) -> None:
    document = api.call("GET", "/openapi.json").json
    assert document["openapi"].startswith("3.1")
    assert documented_routes(document) == served_routes(api.client.app)


def test_every_operation_declares_its_errors_as_problem_details(api: Api) -> None:
    document = api.call("GET", "/openapi.json").json
    for path, item in document["paths"].items():
        for method, operation in item.items():
            public = operation.get("security") == []
            if not public:
                assert "401" in operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert "application/problem+json" in response["content"], (method, path, status)


def test_request_schemas_reject_unknown_fields_and_name_required_ones(api: Api) -> None:
    schemas = api.call("GET", "/openapi.json").json["components"]["schemas"]
    assert schemas["NewAgent"]["additionalProperties"] is False
    assert set(schemas["NewAgent"]["required"]) == {"name", "hostname", "username"}
    assert "exactly one of them" in schemas["NewAgent"]["description"]  # private_key or generate_key
    assert "required" not in schemas["AgentChanges"]
    assert "private_key" not in schemas["AgentView"]["properties"]
    assert {"private_key", "private_key_passphrase"} <= set(schemas["CredentialsView"]["properties"])


def test_operation_table_has_no_duplicates() -> None:
    pairs = [(op.method, op.path) for op in OPERATIONS]
    assert len(pairs) == len(set(pairs))


def test_operation_ids_are_the_declared_names_and_every_operation_is_tagged(api: Api) -> None:
    document = api.call("GET", "/openapi.json").json
    operations = {op["operationId"]: op for item in document["paths"].values() for op in item.values()}
    assert len(operations) == len(OPERATIONS)
    assert {"list_vms", "start_vm", "create_snapshot", "register_agent", "list_fleet", "get_host"} <= set(operations)
    assert operations["start_vm"]["tags"] == ["vms"]
    assert operations["create_snapshot"]["tags"] == ["snapshots"]
    declared_tags = {tag["name"] for tag in document["tags"]}
    assert all(set(op["tags"]) <= declared_tags for op in operations.values())


def test_each_error_response_lists_the_codes_it_can_carry(api: Api) -> None:
    document = api.call("GET", "/openapi.json").json
    start = document["paths"]["/agents/{agent_id}/vms/{vm}/start"]["post"]["responses"]
    assert "vm_already_running" in start["409"]["description"]
    assert "agent_not_found" in start["404"]["description"] and "vm_not_found" in start["404"]["description"]
    assert "host_key_mismatch" in start["502"]["description"]
    assert "wait_timeout" in start["504"]["description"]
    assert "too_many_operations" in start["429"]["description"]  # one user's SSH operations at once
    register = document["paths"]["/agents"]["post"]["responses"]
    assert "agent_name_taken" in register["409"]["description"]
    assert "missing_api_key" in register["401"]["description"]
