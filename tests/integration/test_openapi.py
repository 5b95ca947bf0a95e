"""GET /openapi.json describes exactly the routes the app serves, with their methods."""

from __future__ import annotations

import re
from typing import Any

import falcon.asgi

from entrypoints.http.openapi import OPERATIONS
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
                    owner = getattr(responder, "__self__", None)
                    name = getattr(responder, "__name__", "")
                    if owner is node.resource and name.startswith("on_"):
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
    assert [rule["required"] for rule in schemas["NewAgent"]["anyOf"]] == [["private_key"], ["generate_key"]]
    assert "required" not in schemas["AgentChanges"]
    assert "private_key" not in schemas["AgentView"]["properties"]
    assert {"private_key", "private_key_passphrase"} <= set(schemas["CredentialsView"]["properties"])


def test_operation_table_has_no_duplicates() -> None:
    pairs = [(op.method, op.path) for op in OPERATIONS]
    assert len(pairs) == len(set(pairs))
