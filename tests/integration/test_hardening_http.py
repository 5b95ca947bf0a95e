"""Issue 14 over HTTP, with the real app, storage and SSH adapter: an agent whose address the
operator's ``MANAGEMENT_AGENT_NETWORKS`` refuses is never connected to (item 4), and a user past
the concurrent-operation limit gets 429 with ``Retry-After`` (item 5)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.memory import ScriptedShell
from core.errors import TooManyOperations
from core.ports import CommandResult
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from tests.support import Api, KeyMaterial, assert_problem, make_settings, portal_client


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback port that records whether anything connected to it (nothing should)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def nobody_connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def test_item4_an_agent_outside_the_allowed_networks_is_refused_at_connect_time_422(
        tmp_path: Path, keys: KeyMaterial, listener: socket.socket) -> None:
    """Registered while loopback was allowed; then the operator goes back to the default policy
    (or the name starts resolving to loopback): every route refuses before connecting."""
    permissive = bootstrap.build_runtime(make_settings(tmp_path))
    api = Api(portal_client(create_app(permissive)))
    key = api.sign_up()["api_key"]
    port = listener.getsockname()[1]
    body = api.agent_body(keys, hostname="127.0.0.1", port=port, host_key=keys.host_key)
    created = api.call("POST", "/agents", key, json=body)
    assert created.status_code == 201, created.text
    agent_id = created.json["id"]
    permissive.close()

    strict = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_AGENT_NETWORKS=""))
    try:
        api = Api(portal_client(create_app(strict)))
        # (POST /check answers 200 with the refusal as its error: see test_agent_address_services.py)
        for method, path in (("GET", f"/agents/{agent_id}/vms"), ("GET", f"/agents/{agent_id}/host"),
                             ("POST", f"/agents/{agent_id}/vms/web1/start")):
            problem = assert_problem(api.call(method, path, key), 422, "agent_address_refused")
            assert problem["errors"][0]["field"] == "hostname"
            assert "127.0.0.1" in problem["detail"] and "MANAGEMENT_AGENT_NETWORKS" in problem["detail"]
        fleet = api.call("GET", "/vms", key)
        assert fleet.status_code == 200, fleet.text
        assert fleet.json[0]["error"]["code"] == "agent_address_refused"
        audit = api.call("GET", "/users/me/audit", key).json["events"]
        assert audit[0]["action"] == "vm.start" and audit[0]["outcome"] == "agent_address_refused"
    finally:
        strict.close()
    assert nobody_connected(listener)


class BusyShell(ScriptedShell):
    async def run(self, target: Any, argv: Any, *, pin: Any = None, counted: bool = True,
                  fresh: bool = False) -> CommandResult:
        raise TooManyOperations("you already have 16 SSH operations running", retry_after=3)


def test_item5_too_many_operations_is_429_with_retry_after(tmp_path: Path, keys: KeyMaterial) -> None:
    runtime = bootstrap.build_runtime(make_settings(tmp_path), shell=BusyShell())
    try:
        api = Api(portal_client(create_app(runtime)))
        key = api.sign_up()["api_key"]
        agent = api.call("POST", "/agents", key, json=api.agent_body(keys, host_key=keys.host_key)).json
        limited = api.call("GET", f"/agents/{agent['id']}/vms", key)
        assert_problem(limited, 429, "too_many_operations")
        assert limited.headers["retry-after"] == "3"
    finally:
        runtime.close()
