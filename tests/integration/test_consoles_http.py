"""Consoles over HTTP (issue 17), with the real app, SQLite storage and a scripted remote shell:
the ticket route's answers and errors, and the WebSocket route (refused tickets, single use, bytes
relayed both ways, the console audited)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon
import falcon.asgi
import pytest
from falcon import testing

from adapters.memory import ScriptedShell
from core import virsh
from core.ports import CommandResult
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from tests.support import Api, KeyMaterial, assert_problem, make_settings, portal_client

URI = "qemu:///system"
VM = "web1"


@pytest.fixture
def shell() -> ScriptedShell:
    shell = ScriptedShell()
    for argv, stdout in ((virsh.state_command(URI, VM), "Domain: 'web1'\n  state.state=1\n"),
                         (virsh.ttyconsole_command(URI, VM), "/dev/pts/2\n"),
                         (virsh.vnc_display_command(URI, VM), "vnc://127.0.0.1:0\n")):
        shell.results[argv] = CommandResult(command=argv, exit_status=0, stdout=stdout, stderr="")
    shell.streams[virsh.serial_console_command(URI, VM)] = b"login: "
    shell.hold_streams_open = True
    return shell


@pytest.fixture
def app(tmp_path: Path, shell: ScriptedShell) -> Iterator[falcon.asgi.App[Any, Any]]:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_SIGNUP="open"), shell=shell)
    yield create_app(runtime)
    runtime.close()


@pytest.fixture
def client(app: falcon.asgi.App[Any, Any]) -> Api:
    return Api(portal_client(app))


@pytest.fixture
def key(client: Api) -> str:
    return str(client.sign_up()["api_key"])


@pytest.fixture
def agent(client: Api, key: str, keys: KeyMaterial) -> dict[str, Any]:
    result = client.call("POST", "/agents", key, json=client.agent_body(keys, host_key=keys.host_key))
    assert result.status_code == 201, result.text
    return dict(result.json)


def ticket(client: Api, key: str, agent: dict[str, Any], kind: str = "serial") -> dict[str, Any]:
    result = client.call("POST", f"/agents/{agent['id']}/vms/{VM}/console", key, json={"kind": kind})
    assert result.status_code == 201, result.text
    return dict(result.json)


def test_a_console_ticket_is_201_with_its_url_and_never_cached(client: Api, key: str, agent: dict[str, Any]) -> None:
    result = client.call("POST", f"/agents/{agent['id']}/vms/{VM}/console", key, json={"kind": "vnc"})
    assert result.status_code == 201
    body = result.json
    assert set(body) == {"ticket", "url", "expires_at", "kind"} and body["kind"] == "vnc"
    assert body["url"] == f"/console/{body['ticket']}" and len(body["ticket"]) >= 22  # >= 128 bits
    assert result.headers["cache-control"] == "no-store"


def test_an_unknown_console_kind_is_422_naming_kind(client: Api, key: str, agent: dict[str, Any]) -> None:
    body = assert_problem(client.call("POST", f"/agents/{agent['id']}/vms/{VM}/console", key,
                                      json={"kind": "spice"}), 422, "validation_failed")
    assert body["errors"][0]["field"] == "kind"


def test_another_users_agent_has_no_console(client: Api, agent: dict[str, Any]) -> None:
    other = str(client.sign_up("mallory")["api_key"])
    assert_problem(client.call("POST", f"/agents/{agent['id']}/vms/{VM}/console", other, json={"kind": "serial"}),
                   404, "agent_not_found")


def test_a_vm_without_vnc_is_409_console_unavailable(client: Api, key: str, agent: dict[str, Any],
                                                      shell: ScriptedShell) -> None:
    argv = virsh.vnc_display_command(URI, VM)
    shell.results[argv] = CommandResult(command=argv, exit_status=1, stdout="",
                                        stderr="error: No graphical display with type 'vnc' found")
    assert_problem(client.call("POST", f"/agents/{agent['id']}/vms/{VM}/console", key, json={"kind": "vnc"}),
                   409, "console_unavailable")


async def refused(app: falcon.asgi.App[Any, Any], path: str) -> bool:
    async with testing.ASGIConductor(app) as conductor:
        try:
            async with conductor.simulate_ws(path):
                return False
        except falcon.WebSocketDisconnected:
            return True


def test_a_websocket_with_an_unknown_ticket_is_refused(app: falcon.asgi.App[Any, Any]) -> None:
    assert asyncio.run(refused(app, "/console/" + "A" * 43))


def test_a_ticket_relays_bytes_both_ways_once_and_the_console_is_audited(
        app: falcon.asgi.App[Any, Any], client: Api, key: str, agent: dict[str, Any], shell: ScriptedShell) -> None:
    issued = ticket(client, key, agent)

    async def use() -> bytes:
        async with testing.ASGIConductor(app) as conductor, conductor.simulate_ws(issued["url"]) as ws:
            seen = await ws.receive_data()
            await ws.send_data(b"root\r")
            while not shell.opened[0].written:
                await asyncio.sleep(0.01)  # until the relay carried it (bounded by the test's time-out)
            await ws.close()
        return seen

    assert asyncio.run(asyncio.wait_for(use(), 10)) == b"login: "
    assert bytes(shell.opened[0].written) == b"root\r" and shell.opened[0].closed
    assert shell.ptys == [True]
    assert asyncio.run(refused(app, issued["url"]))  # single use

    def console_events() -> list[dict[str, Any]]:
        events = client.call("GET", "/users/me/audit", key).json["events"]
        return [event for event in events if event["action"] == "vm.console"]

    assert console_events(), "no vm.console audit event"
    assert "bytes_to_vm=5" in console_events()[0]["detail"]


def test_a_ticket_that_crossed_the_proxy_over_plain_http_is_refused(
        app: falcon.asgi.App[Any, Any], client: Api, key: str, agent: dict[str, Any]) -> None:
    issued = ticket(client, key, agent)

    async def attempt() -> bool:
        async with testing.ASGIConductor(app) as conductor:
            try:
                async with conductor.simulate_ws(issued["url"], headers={"X-Forwarded-Proto": "http"}):
                    return False
            except falcon.WebSocketDisconnected:
                return True

    assert asyncio.run(attempt())
