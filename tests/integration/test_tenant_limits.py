"""One tenant must not starve the others (issue 14, item 5): a bounded number of agents per user,
the agent list a page at a time, and a ``?wait=`` that stops when its client goes away."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from falcon import testing

from adapters.memory import ScriptedShell
from core.ports import CommandResult
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from tests.support import Api, KeyMaterial, assert_problem, make_settings, portal_client

URI = "qemu:///system"


@pytest.fixture
def shell() -> ScriptedShell:
    return ScriptedShell()


STATE = ("virsh", "--connect", URI, "domstats", "--domain", "vm1", "--state")


def polls(shell: ScriptedShell) -> int:
    return sum(1 for _, command in shell.calls if command == STATE)


@pytest.fixture
def client(tmp_path: Path, shell: ScriptedShell) -> Iterator[Api]:
    settings = make_settings(tmp_path, MANAGEMENT_SIGNUP="open", MANAGEMENT_MAX_AGENTS_PER_USER="3")
    runtime = bootstrap.build_runtime(settings, shell=shell)
    runtime.portal.vms.poll_interval = 0.01
    # The simulated client leaves once the host has answered three polls of the VM's state.
    yield Api(portal_client(create_app(runtime), left=lambda: polls(shell) >= 3))
    runtime.close()


def register(client: Api, key: str, keys: KeyMaterial, name: str) -> testing.Result:
    return client.call("POST", "/agents", key, json=client.agent_body(keys, name=name, host_key=keys.host_key))


def test_item5_a_user_past_the_agent_limit_is_refused_and_others_are_not(client: Api, keys: KeyMaterial) -> None:
    alice, bob = client.sign_up("alice")["api_key"], client.sign_up("bob")["api_key"]
    for name in ("hv1", "hv2", "hv3"):
        assert register(client, alice, keys, name).status_code == 201
    refused = assert_problem(register(client, alice, keys, "hv4"), 409, "agent_limit_reached")
    assert "MANAGEMENT_MAX_AGENTS_PER_USER" in refused["detail"]
    assert [a["name"] for a in client.call("GET", "/agents", alice).json] == ["hv1", "hv2", "hv3"]
    assert register(client, bob, keys, "hv1").status_code == 201  # the limit is per user
    audit = client.call("GET", "/users/me/audit", alice).json["events"]
    assert (audit[0]["action"], audit[0]["outcome"]) == ("agent.create", "agent_limit_reached")


def test_item5_agents_come_a_page_at_a_time_with_a_link_to_the_next(client: Api, keys: KeyMaterial) -> None:
    key = client.sign_up()["api_key"]
    ids = [register(client, key, keys, name).json["id"] for name in ("hv1", "hv2", "hv3")]
    first = client.call("GET", "/agents", key, params={"limit": "2"})
    assert [a["id"] for a in first.json] == ids[:2]
    assert first.headers["link"] == f'</agents?after={ids[1]}&limit=2>; rel="next"'
    second = client.call("GET", "/agents", key, params={"after": str(ids[1]), "limit": "2"})
    assert [a["id"] for a in second.json] == ids[2:]
    assert "link" not in second.headers
    assert [a["id"] for a in client.call("GET", "/agents", key).json] == ids  # default: one page of all
    assert_problem(client.call("GET", "/agents", key, params={"limit": "0"}), 422, "validation_failed")
    assert_problem(client.call("GET", "/agents", key, params={"limit": "1001"}), 422, "validation_failed")


def test_item5_a_wait_stops_polling_when_the_client_goes_away(client: Api, shell: ScriptedShell,
                                                              keys: KeyMaterial) -> None:
    key = client.sign_up()["api_key"]
    agent = register(client, key, keys, "hv1").json
    shell.results[STATE] = CommandResult(command=STATE, exit_status=0, stdout="Domain: 'vm1'\n  state.state=1\n\n",
                                         stderr="")  # running, and it never shuts down
    # It asked to wait up to 30 s for "shut off"; the client leaves after the third poll.
    result = client.call("POST", f"/agents/{agent['id']}/vms/vm1/shutdown", key, params={"wait": "30"})
    # Without the watch, the wait would run its 30 s and end 504 wait_timeout after ~3000 polls;
    # with it, polling stops within one interval of the client leaving.
    assert result.status_code == 200, result.text
    assert result.json["state"] == "running"
    assert 3 <= polls(shell) <= 5
    events = client.call("GET", "/users/me/audit", key).json["events"]
    assert (events[0]["action"], events[0]["outcome"]) == ("vm.shutdown", "ok")  # the action itself stands
