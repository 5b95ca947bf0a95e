"""The HTTP side of waits, suspend/resume, autostart, stats, snapshots, the fleet view, host facts
and checks: query parameters, bodies, status codes and problem documents, with the real app and
storage and a scripted remote shell."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.memory import ScriptedShell
from core.errors import AgentUnreachable
from core.ports import CommandResult
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from tests.support import Api, KeyMaterial, assert_problem, make_settings, portal_client

URI = "qemu:///system"


class Shell(ScriptedShell):
    def __init__(self) -> None:
        super().__init__()
        self.dead: set[int] = set()

    async def run(self, target: Any, argv: Any, *, pin: Any = None, counted: bool = True,
                  fresh: bool = False) -> CommandResult:
        if target.agent.id in self.dead:
            raise AgentUnreachable(f"{target.agent.hostname}:{target.agent.port} refused the connection")
        return await super().run(target, argv, pin=pin)


@pytest.fixture
def shell() -> Shell:
    return Shell()


@pytest.fixture
def client(tmp_path: Path, shell: Shell) -> Iterator[Api]:
    runtime = bootstrap.build_runtime(make_settings(tmp_path), shell=shell)
    runtime.portal.vms.poll_interval = 0.01
    yield Api(portal_client(create_app(runtime)))
    runtime.close()


@pytest.fixture
def key(client: Api) -> str:
    return str(client.sign_up()["api_key"])


@pytest.fixture
def agent(client: Api, key: str, keys: KeyMaterial) -> dict[str, Any]:
    result = client.call("POST", "/agents", key, json=client.agent_body(keys, host_key=keys.host_key))
    assert result.status_code == 201, result.text
    return dict(result.json)


def script(shell: Shell, *args: str, stdout: str = "", stderr: str = "", status: int = 0) -> None:
    command = ("virsh", "--connect", URI, *args)
    shell.results[command] = CommandResult(command=command, exit_status=status, stdout=stdout, stderr=stderr)


def test_without_wait_an_action_answers_the_command_result(client: Api, key: str, agent: dict[str, Any]) -> None:
    result = client.call("POST", f"/agents/{agent['id']}/vms/vm1/suspend", key)
    assert result.status_code == 200, result.text
    assert result.json == {"command": ["virsh", "--connect", URI, "suspend", "--domain", "vm1"], "exit_status": 0,
                           "stdout": "", "stderr": ""}


def test_with_wait_the_body_carries_the_state_reached(client: Api, shell: Shell, key: str,
                                                      agent: dict[str, Any]) -> None:
    script(shell, "domstats", "--domain", "vm1", "--state", stdout="Domain: 'vm1'\n  state.state=3\n\n")
    result = client.call("POST", f"/agents/{agent['id']}/vms/vm1/suspend", key, params={"wait": "5"})
    assert result.status_code == 200, result.text
    assert result.json["state"] == "paused" and result.json["waited_seconds"] >= 0
    assert result.json["command"][-3:] == ["suspend", "--domain", "vm1"]


def test_a_wait_that_runs_out_is_504_with_the_state(client: Api, shell: Shell, key: str,
                                                    agent: dict[str, Any]) -> None:
    script(shell, "domstats", "--domain", "vm1", "--state", stdout="Domain: 'vm1'\n  state.state=1\n\n")
    result = client.call("POST", f"/agents/{agent['id']}/vms/vm1/shutdown", key, params={"wait": "0"})
    body = assert_problem(result, 504, "wait_timeout")
    assert (body["state"], body["target_state"]) == ("running", "shut off")


@pytest.mark.parametrize("query", ["wait=301", "wait=-1", "wait=abc", "wait=1.5", "wait=", "wait=1e9",
                                   "wait=%EF%BC%91", "wait=99999999999999999999", "wait=1&wait=300"])
def test_an_invalid_wait_is_422_and_nothing_runs(client: Api, shell: Shell, key: str, agent: dict[str, Any],
                                                 query: str) -> None:
    result = client.call("POST", f"/agents/{agent['id']}/vms/vm1/start", key, query_string=query)
    body = assert_problem(result, 422, "validation_failed")
    assert body["errors"][0]["field"] == "wait"
    assert shell.calls == []


def test_a_wait_out_of_range_is_audited_like_any_refused_action(client: Api, key: str,
                                                                agent: dict[str, Any]) -> None:
    assert client.call("POST", f"/agents/{agent['id']}/vms/vm1/reboot", key, params={"wait": "301"}).status_code == 422
    [event] = client.call("GET", "/users/me/audit", key, params={"limit": "1"}).json["events"]
    assert (event["action"], event["outcome"], event["vm"]) == ("vm.reboot", "validation_failed", "vm1")


def test_autostart_takes_a_boolean(client: Api, key: str, agent: dict[str, Any]) -> None:
    path = f"/agents/{agent['id']}/vms/vm1/autostart"
    result = client.call("PUT", path, key, json={"enabled": False})
    assert result.status_code == 200, result.text
    assert result.json["enabled"] is False and result.json["result"]["command"][-1] == "--disable"
    assert_problem(client.call("PUT", path, key, json={"enabled": "yes"}), 422, "validation_failed")
    assert_problem(client.call("PUT", path, key, json={}), 422, "validation_failed")
    assert_problem(client.call("PUT", path, key, json={"enabled": True, "x": 1}), 422, "validation_failed")


def test_snapshot_create_is_201_with_its_location_delete_204_and_a_missing_one_404(
        client: Api, shell: Shell, key: str, agent: dict[str, Any]) -> None:
    base = f"/agents/{agent['id']}/vms/lab-disk/snapshots"
    script(shell, "snapshot-list", "--domain", "lab-disk", "--parent",
           stdout=" Name   Creation Time               State     Parent\n"
                  "------------------------------------------------------\n"
                  " s 1    2026-11-26 15:48:22 +0000   shutoff   \n\n")
    script(shell, "snapshot-current", "--domain", "lab-disk", "--name", stdout="s 1\n")
    created = client.call("POST", base, key, json={"name": "s 1", "description": "before the upgrade"})
    assert created.status_code == 201, created.text
    assert created.headers["Location"] == f"{base}/s%201"
    assert created.json == {"name": "s 1", "created_at": "2026-11-26T15:48:22Z", "state": "shutoff",
                            "parent": None, "current": True}
    assert client.call("GET", base, key).json == [created.json]
    assert client.call("GET", created.headers["Location"], key).json == created.json
    assert_problem(client.call("GET", f"{base}/other", key), 404, "snapshot_not_found")
    assert client.call("DELETE", f"{base}/s%201", key).status_code == 204
    script(shell, "snapshot-revert", "--domain", "lab-disk", "--snapshotname", "gone", status=1,
           stderr="error: Domain snapshot not found: no domain snapshot with matching name 'gone'")
    assert_problem(client.call("POST", f"{base}/gone/revert", key), 404, "snapshot_not_found")
    problem = assert_problem(client.call("POST", f"{base}/--help/revert", key), 422, "validation_failed")
    assert problem["errors"][0]["field"] == "snapshot"
    # a percent-encoded name reaches virsh decoded, as one argument; an encoded '/' or line break never does
    assert client.call("POST", f"{base}/a%25b%3Dc/revert", key).json["command"][-1] == "a%b=c"
    for encoded in ("a%2Fb", "a%0Ab", "%2D%2Dhelp", "%FF"):
        assert client.call("POST", f"{base}/{encoded}/revert", key).status_code in (404, 422), encoded
    script(shell, "snapshot-create-as", "--domain", "lab-disk", "--name", "s 1", status=1,
           stderr="error: operation failed: domain moment s 1 already exists")
    assert_problem(client.call("POST", base, key, json={"name": "s 1"}), 409, "snapshot_name_taken")
    for body in ({}, {"name": None}, {"name": "s", "description": 5}, {"name": "s", "extra": 1},
                 {"name": "s", "description": "x" * 1001}, {"name": "s", "description": "a\nb"}):
        assert_problem(client.call("POST", base, key, json=body), 422, "validation_failed")


def test_the_fleet_view_keeps_a_dead_agent_as_an_entry(client: Api, shell: Shell, key: str, keys: KeyMaterial,
                                                       agent: dict[str, Any]) -> None:
    dead = client.call("POST", "/agents", key, json=client.agent_body(keys, name="dead", port=1,
                                                                      host_key=keys.host_key)).json
    shell.dead.add(dead["id"])
    script(shell, "list", "--all", stdout=" Id   Name   State\n--------------------\n 1    a      running\n"
                                          " -    b      shut off\n\n")
    result = client.call("GET", "/vms", key)
    assert result.status_code == 200, result.text
    # every row says it came from the host just now (issue 18); the rest is virsh's
    entries = result.json
    assert {(vm.pop("source"), bool(vm.pop("observed_at"))) for e in entries for vm in e["vms"] or []} == {
        ("host", True)}
    assert entries == [
        {"agent_id": agent["id"], "agent_name": "hv1", "error": None,
         "vms": [{"name": "a", "state": "running", "id": 1}, {"name": "b", "state": "shut off", "id": None}]},
        {"agent_id": dead["id"], "agent_name": "dead", "vms": None,
         "error": {"code": "agent_unreachable", "detail": "192.0.2.15:1 refused the connection"}},
    ]
    filtered = client.call("GET", "/vms", key, query_string=f"agent={agent['id']}&state=shut+off")
    narrowed = filtered.json
    for vm in narrowed[0]["vms"]:
        del vm["source"], vm["observed_at"]
    assert narrowed == [{"agent_id": agent["id"], "agent_name": "hv1", "error": None,
                              "vms": [{"name": "b", "state": "shut off", "id": None}]}]
    both = client.call("GET", "/vms", key, query_string=f"agent={agent['id']}&agent={dead['id']}&state=running")
    assert [e["agent_id"] for e in both.json] == [agent["id"], dead["id"]]
    for query in ("agent=x", "agent=0", "state=sleeping"):
        assert_problem(client.call("GET", "/vms", key, query_string=query), 422, "validation_failed")


def test_check_is_200_for_a_dead_agent(client: Api, shell: Shell, key: str, agent: dict[str, Any]) -> None:
    shell.dead.add(agent["id"])
    result = client.call("POST", f"/agents/{agent['id']}/check", key)
    assert result.status_code == 200, result.text
    assert result.json["reachable"] is False and result.json["error"]["code"] == "agent_unreachable"
    assert result.json["host_key_fingerprint"] == agent["host_key_fingerprint"]
    assert_problem(client.call("POST", "/agents/999/check", key), 404, "agent_not_found")
    assert_problem(client.call("GET", f"/agents/{agent['id']}/host", key), 502, "agent_unreachable")
