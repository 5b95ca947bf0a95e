"""End to end on the lab: curl-like HTTP calls to the real server, which drives virsh over a real
SSH connection to real libvirt and QEMU guests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

import asyncssh
import pytest

from tests.lab.conftest import Lab, register, vm_path
from tests.support import REPO, Server

pytestmark = pytest.mark.lab


def state_of(portal: Server, api_key: str, agent: dict[str, Any], vm: str) -> str:
    status, vms, _ = portal.request("GET", f"/agents/{agent['id']}/vms", api_key)
    assert status == 200, vms
    return next(v["state"] for v in vms if v["name"] == vm)


def wait_for_state(portal: Server, api_key: str, agent: dict[str, Any], vm: str, wanted: str,
                   timeout: float = 30) -> float:
    """Poll the portal until the VM reports ``wanted``; return how long it took."""
    started = time.monotonic()
    while True:
        if state_of(portal, api_key, agent, vm) == wanted:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{vm} did not reach {wanted!r} within {timeout} s")
        time.sleep(0.25)


def ensure_shut_off(lab: Lab, vm: str) -> None:
    lab.virsh("destroy", "--domain", vm)  # fails harmlessly when already off


# ---------------------------------------------------------------------- reading


def test_lists_the_lab_guests_with_state_and_id(portal: Server, api_key: str, agent: dict[str, Any],
                                                lab: Lab) -> None:
    ensure_shut_off(lab, "lab-guest2")
    status, vms, _ = portal.request("GET", f"/agents/{agent['id']}/vms", api_key)
    assert status == 200, vms
    assert {v["name"] for v in vms} >= set(lab.guests)
    guest2 = next(v for v in vms if v["name"] == "lab-guest2")
    assert {k: guest2[k] for k in ("name", "state", "id")} == {"name": "lab-guest2", "state": "shut off", "id": None}
    assert guest2["source"] == "host"  # this portal runs no watcher (tests/support.py): asked the host


def test_dominfo_is_parsed_and_raw(portal: Server, api_key: str, agent: dict[str, Any]) -> None:
    status, info, _ = portal.request("GET", vm_path(agent, "lab-guest1"), api_key)
    assert status == 200, info
    assert info["dominfo"]["name"] == "lab-guest1"
    assert info["dominfo"]["os_type"] == "hvm"
    assert info["raw"]["command"] == ["virsh", "--connect", "qemu:///system", "dominfo", "--domain", "lab-guest1"]
    assert info["raw"]["exit_status"] == 0 and "UUID:" in info["raw"]["stdout"]


def test_unknown_vm_is_404(portal: Server, api_key: str, agent: dict[str, Any]) -> None:
    for method, path in [("GET", vm_path(agent, "no-such-vm")), ("POST", vm_path(agent, "no-such-vm", "start"))]:
        status, problem, _ = portal.request(method, path, api_key)
        assert (status, problem["code"]) == (404, "vm_not_found"), problem


# ---------------------------------------------------------------------- lifecycle


def test_start_then_graceful_shutdown_until_the_guest_is_shut_off(portal: Server, api_key: str,
                                                                   agent: dict[str, Any], lab: Lab) -> None:
    ensure_shut_off(lab, "lab-guest1")
    status, result, _ = portal.request("POST", vm_path(agent, "lab-guest1", "start"), api_key)
    assert status == 200, result
    assert result["command"] == ["virsh", "--connect", "qemu:///system", "start", "--domain", "lab-guest1"]
    assert result["exit_status"] == 0
    assert state_of(portal, api_key, agent, "lab-guest1") == "running"

    status, problem, _ = portal.request("POST", vm_path(agent, "lab-guest1", "start"), api_key)
    assert (status, problem["code"]) == (409, "vm_already_running"), problem

    lab.wait_ready("lab-guest1")
    status, result, _ = portal.request("POST", vm_path(agent, "lab-guest1", "shutdown"), api_key)
    assert status == 200, result
    took = wait_for_state(portal, api_key, agent, "lab-guest1", "shut off")
    print(f"graceful shutdown took {took:.1f} s", file=sys.stderr)

    status, problem, _ = portal.request("POST", vm_path(agent, "lab-guest1", "shutdown"), api_key)
    assert (status, problem["code"]) == (409, "vm_not_running"), problem


def test_reboot_keeps_the_guest_running_and_force_stop_turns_it_off(portal: Server, api_key: str,
                                                                    agent: dict[str, Any], lab: Lab) -> None:
    ensure_shut_off(lab, "lab-guest2")
    assert portal.request("POST", vm_path(agent, "lab-guest2", "start"), api_key)[0] == 200
    lab.wait_ready("lab-guest2")
    domain_id = portal.request("GET", vm_path(agent, "lab-guest2"), api_key)[1]["dominfo"]["id"]
    status, result, _ = portal.request("POST", vm_path(agent, "lab-guest2", "reboot"), api_key)
    assert status == 200 and result["exit_status"] == 0, result
    lab.wait_ready("lab-guest2")  # it went down and came back up
    info = portal.request("GET", vm_path(agent, "lab-guest2"), api_key)[1]["dominfo"]
    assert info["state"] == "running" and info["id"] == domain_id

    status, result, _ = portal.request("POST", vm_path(agent, "lab-guest2", "force-stop"), api_key)
    assert status == 200, result
    assert result["command"][-3:] == ["destroy", "--domain", "lab-guest2"]
    assert state_of(portal, api_key, agent, "lab-guest2") == "shut off"  # at once, no waiting
    status, problem, _ = portal.request("POST", vm_path(agent, "lab-guest2", "force-stop"), api_key)
    assert (status, problem["code"]) == (409, "vm_not_running"), problem


def test_vm_actions_are_audited_with_the_vm_and_outcome(portal: Server, api_key: str,
                                                         agent: dict[str, Any], lab: Lab) -> None:
    ensure_shut_off(lab, "lab-guest2")
    portal.request("POST", vm_path(agent, "lab-guest2", "force-stop"), api_key)  # refused: not running
    events = portal.request("GET", "/users/me/audit?limit=5", api_key)[1]["events"]
    latest = events[0]
    assert (latest["action"], latest["vm"], latest["agent_id"], latest["outcome"]) == (
        "vm.force_stop", "lab-guest2", agent["id"], "vm_not_running")


# ---------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("name", ["a;id", "$(id)", "`id`", "--help", "-c", "a|b", "a&&b", "x\ny", "a'b", "a/b"])
def test_hostile_vm_names_are_refused_before_anything_reaches_the_host(portal: Server, api_key: str, lab: Lab,
                                                                        name: str) -> None:
    fresh = register(portal, api_key, lab)  # no pooled connection: any login would show in sshd's log
    logins = lab.accepted_logins()
    for method, action in [("POST", "start"), ("POST", "force-stop"), ("GET", "")]:
        status, problem, _ = portal.request(method, vm_path(fresh, name, action), api_key)
        assert status in (404, 422), problem  # 404 only where '/' splits the path
        if status == 422:
            assert problem["code"] == "validation_failed" and problem["errors"][0]["field"] == "vm"
    assert lab.accepted_logins() == logins


# ---------------------------------------------------------------------- connection pool


def test_sequential_requests_reuse_one_ssh_connection(portal: Server, api_key: str, lab: Lab) -> None:
    fresh = register(portal, api_key, lab)
    logins = lab.accepted_logins()
    for _ in range(5):
        assert portal.request("GET", f"/agents/{fresh['id']}/vms", api_key)[0] == 200
        assert portal.request("GET", vm_path(fresh, "lab-guest1"), api_key)[0] == 200
    assert lab.accepted_logins() == logins + 1


def test_changing_the_agent_opens_a_new_connection(portal: Server, api_key: str, lab: Lab) -> None:
    fresh = register(portal, api_key, lab)
    assert portal.request("GET", f"/agents/{fresh['id']}/vms", api_key)[0] == 200
    logins = lab.accepted_logins()
    assert portal.request("PATCH", f"/agents/{fresh['id']}", api_key, {"hostname": "localhost"})[0] == 200
    assert portal.request("GET", f"/agents/{fresh['id']}/vms", api_key)[0] == 200
    assert lab.accepted_logins() == logins + 1


# ---------------------------------------------------------------------- failures map to 502/504


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_closed_port_is_502_within_the_connect_timeout(portal: Server, api_key: str, lab: Lab) -> None:
    dead = register(portal, api_key, lab, port=_closed_port())
    started = time.monotonic()
    status, problem, _ = portal.request("GET", f"/agents/{dead['id']}/vms", api_key)
    assert (status, problem["code"]) == (502, "agent_unreachable"), problem
    assert time.monotonic() - started < 3


def test_a_wrong_user_is_502_auth_failed(portal: Server, api_key: str, lab: Lab) -> None:
    wrong = register(portal, api_key, lab, username="nobody")
    status, problem, _ = portal.request("GET", f"/agents/{wrong['id']}/vms", api_key)
    assert (status, problem["code"]) == (502, "agent_auth_failed"), problem


def test_an_unknown_host_key_is_refused_without_trust_on_first_use(portal: Server, api_key: str,
                                                                   lab: Lab) -> None:
    unpinned = register(portal, api_key, lab, host_key=None, allow_unknown_hosts=False)
    logins = lab.accepted_logins()
    status, problem, _ = portal.request("GET", f"/agents/{unpinned['id']}/vms", api_key)
    assert (status, problem["code"]) == (502, "host_key_unknown"), problem
    fingerprint = asyncssh.import_public_key(lab.host_key).get_fingerprint("sha256")
    assert fingerprint in problem["detail"]  # what the host offers, to help the operator pin it
    assert lab.accepted_logins() == logins  # never logged in


def test_a_wrong_pinned_host_key_is_refused_as_a_mismatch(portal: Server, api_key: str, lab: Lab) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().strip()
    wrong = register(portal, api_key, lab, host_key=other)
    status, problem, _ = portal.request("GET", f"/agents/{wrong['id']}/vms", api_key)
    assert (status, problem["code"]) == (502, "host_key_mismatch"), problem
    # the operator re-pins the right key and it works
    assert portal.request("PATCH", f"/agents/{wrong['id']}", api_key, {"host_key": lab.host_key})[0] == 200
    assert portal.request("GET", f"/agents/{wrong['id']}/vms", api_key)[0] == 200


def test_trust_on_first_use_pins_the_key_seen(portal: Server, api_key: str, lab: Lab) -> None:
    tofu = register(portal, api_key, lab, host_key=None, allow_unknown_hosts=True)
    assert portal.request("GET", f"/agents/{tofu['id']}/vms", api_key)[0] == 200
    status, pinned, _ = portal.request("GET", f"/agents/{tofu['id']}", api_key)
    assert status == 200, pinned
    assert pinned["host_key"] == " ".join(lab.host_key.split()[:2])
    assert pinned["host_key_fingerprint"] == asyncssh.import_public_key(lab.host_key).get_fingerprint("sha256")
    events = portal.request("GET", "/users/me/audit?limit=3", api_key)[1]["events"]
    assert any(e["action"] == "agent.pin_host_key" and e["agent_id"] == tofu["id"] for e in events)


def test_libvirt_down_is_502_carrying_virshs_message(portal: Server, api_key: str, lab: Lab) -> None:
    broken = register(portal, api_key, lab, libvirt_uri="qemu:///nowhere")
    status, problem, _ = portal.request("GET", f"/agents/{broken['id']}/vms", api_key)
    assert status == 502, problem
    assert problem["code"] in {"libvirt_unavailable", "virsh_failed"}
    assert "error:" in problem["detail"]


# ---------------------------------------------------------------------- command line and library


def test_the_command_line_lists_vms(portal: Server, api_key: str, agent: dict[str, Any]) -> None:
    env = {**os.environ, "MANAGEMENT_DB_PATH": str(portal.workdir / "data" / "management.sqlite3"),
           "MANAGEMENT_AGENT_NETWORKS": portal.env["MANAGEMENT_AGENT_NETWORKS"],
           "MANAGEMENT_API_KEY": api_key, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "entrypoints.cli", "vms", "list", str(agent["id"])],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "lab-guest1" in result.stdout and "STATE" in result.stdout


def test_the_library_drives_vms(portal: Server, api_key: str, agent: dict[str, Any], lab: Lab) -> None:
    from entrypoints.library import connect

    ensure_shut_off(lab, "lab-guest2")
    with connect({"MANAGEMENT_DB_PATH": str(portal.workdir / "data" / "management.sqlite3"),
                  "MANAGEMENT_AGENT_NETWORKS": portal.env["MANAGEMENT_AGENT_NETWORKS"]}) as library:
        me = library.login(api_key)
        assert "lab-guest2" in [vm.name for vm in me.vms(agent["id"])]
        assert me.start_vm(agent["id"], "lab-guest2").exit_status == 0
        assert me.vm_info(agent["id"], "lab-guest2").dominfo["state"] == "running"
        assert me.force_stop_vm(agent["id"], "lab-guest2").exit_status == 0


def test_stopping_the_server_closes_its_ssh_connections_cleanly(lab: Lab, tmp_path: Any) -> None:
    server = Server(tmp_path, MANAGEMENT_WORKERS="1").start()
    try:
        key = server.request("POST", "/users", body={"name": "alice"})[1]["api_key"]
        agent = register(server, key, lab)
        assert server.request("GET", f"/agents/{agent['id']}/vms", key)[0] == 200
        goodbyes = lab.sshd_log.read_text(errors="replace").count("Disconnected by application")
    finally:
        server.stop()
    # the worker said goodbye on the SSH connection instead of dropping it (sshd logs it a moment later)
    deadline = time.monotonic() + 5
    while lab.sshd_log.read_text(errors="replace").count("Disconnected by application") == goodbyes:
        assert time.monotonic() < deadline, "sshd never saw the portal disconnect"
        time.sleep(0.05)
