"""End to end on the lab: suspend/resume, waiting, autostart, internal snapshots, stats (all on
``lab-disk``, the guest with a qcow2 disk, so other lab tests keep ``lab-guest1`` and
``lab-guest2``), the fleet view with a dead agent, host facts and checks.

``lab-disk`` is left as the lab makes it: shut off, no snapshots, no autostart."""

from __future__ import annotations

import html
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import asyncssh
import pytest

from tests.lab.conftest import Lab, register, vm_path
from tests.support import REPO, Server

pytestmark = pytest.mark.lab

DISK = "lab-disk"


def reset_disk_guest(lab: Lab) -> None:
    """lab-disk shut off, without snapshots or autostart (also after a failed earlier run)."""
    lab.virsh("destroy", "--domain", DISK)
    lab.virsh("autostart", "--domain", DISK, "--disable")
    names = lab.virsh("snapshot-list", "--domain", DISK, "--name").stdout.splitlines()
    for name in filter(None, (n.strip() for n in names)):
        lab.virsh("snapshot-delete", "--domain", DISK, "--snapshotname", name)


@pytest.fixture(scope="module", autouse=True)
def disk_guest(lab: Lab) -> Iterator[None]:
    reset_disk_guest(lab)
    yield
    reset_disk_guest(lab)


def timed(portal: Server, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any, float]:
    started = time.monotonic()
    status, answer, _ = portal.request(method, path, key, body)
    return status, answer, time.monotonic() - started


def host_state(lab: Lab, vm: str = DISK) -> str:
    return lab.virsh("domstate", "--domain", vm).stdout.strip()


def start_fresh(portal: Server, api_key: str, agent: dict[str, Any], lab: Lab) -> float:
    """Power lab-disk off and on again through the portal (waiting for 'running'), until its init
    listens for the power button; returns how long start?wait took."""
    lab.virsh("destroy", "--domain", DISK)
    status, result, took = timed(portal, "POST", vm_path(agent, DISK, "start") + "?wait=30", api_key)
    assert status == 200, result
    assert result["state"] == "running" and result["command"][-3:] == ["start", "--domain", DISK]
    lab.wait_ready(DISK)
    return took


def figure(text: str) -> None:
    print(f"[figures] {text}", file=sys.stderr)


# ---------------------------------------------------------------------- suspend, resume, waiting


def test_suspend_then_resume_waiting_for_each_state(portal: Server, api_key: str, agent: dict[str, Any],
                                                    lab: Lab) -> None:
    start_took = start_fresh(portal, api_key, agent, lab)
    figure(f"start?wait=30 answered 'running' in {start_took:.2f} s")

    status, result, took = timed(portal, "POST", vm_path(agent, DISK, "suspend") + "?wait=10", api_key)
    assert status == 200, result
    assert (result["state"], result["command"][-3:]) == ("paused", ["suspend", "--domain", DISK])
    assert host_state(lab) == "paused"
    figure(f"suspend?wait=10 answered 'paused' in {took:.2f} s (waited {result['waited_seconds']} s)")

    status, result, took = timed(portal, "POST", vm_path(agent, DISK, "resume") + "?wait=10", api_key)
    assert status == 200, result
    assert result["state"] == "running" and host_state(lab) == "running"
    figure(f"resume?wait=10 answered 'running' in {took:.2f} s (waited {result['waited_seconds']} s)")

    status, problem, _ = portal.request("POST", vm_path(agent, DISK, "resume"), api_key)
    assert (status, problem["code"]) == (409, "vm_already_running"), problem
    status, result, took = timed(portal, "POST", vm_path(agent, DISK, "suspend"), api_key)  # no wait: as before
    assert status == 200 and "state" not in result and result["exit_status"] == 0, result
    figure(f"suspend without wait answered in {took:.2f} s")
    assert portal.request("POST", vm_path(agent, DISK, "resume"), api_key)[0] == 200

    events = portal.request("GET", "/users/me/audit?limit=10", api_key)[1]["events"]
    assert [(e["action"], e["outcome"]) for e in events[:5]] == [
        ("vm.resume", "ok"), ("vm.suspend", "ok"), ("vm.resume", "vm_already_running"), ("vm.resume", "ok"),
        ("vm.suspend", "ok")]


def test_shutdown_waits_until_shut_off_and_a_short_wait_is_504_with_the_state(portal: Server, api_key: str,
                                                                               agent: dict[str, Any],
                                                                               lab: Lab) -> None:
    start_fresh(portal, api_key, agent, lab)
    status, result, took = timed(portal, "POST", vm_path(agent, DISK, "shutdown") + "?wait=30", api_key)
    assert status == 200, result
    assert result["state"] == "shut off" and host_state(lab) == "shut off"
    assert 0.2 < result["waited_seconds"] < 30
    figure(f"shutdown?wait=30 answered 'shut off' in {took:.2f} s (waited {result['waited_seconds']} s)")

    # A state that never comes: libvirt takes a reboot of a paused domain, which stays paused (the
    # lab's guest powers off within milliseconds of an ACPI press, too fast to catch it still running).
    start_fresh(portal, api_key, agent, lab)
    assert portal.request("POST", vm_path(agent, DISK, "suspend"), api_key)[0] == 200
    status, problem, took = timed(portal, "POST", vm_path(agent, DISK, "reboot") + "?wait=1", api_key)
    assert (status, problem["code"]) == (504, "wait_timeout"), problem
    assert (problem["state"], problem["target_state"]) == ("paused", "running")
    assert took >= 1, took  # it did wait (that it stops at the deadline is proved with a fake clock in unit tests)
    figure(f"reboot?wait=1 of a paused guest answered 504 with state 'paused' in {took:.2f} s")
    status, problem, _ = portal.request("POST", vm_path(agent, DISK, "shutdown") + "?wait=5", api_key)
    assert (status, problem["code"]) == (409, "vm_not_running"), problem  # as documented for a paused VM
    status, result, _ = portal.request("POST", vm_path(agent, DISK, "force-stop") + "?wait=5", api_key)
    assert status == 200 and result["state"] == "shut off", result
    assert host_state(lab) == "shut off"


def test_wait_is_validated_before_anything_runs(portal: Server, api_key: str, agent: dict[str, Any],
                                                lab: Lab) -> None:
    lab.virsh("destroy", "--domain", DISK)
    for query in ("wait=301", "wait=-1", "wait=soon", "wait=1.5", "wait=1&wait=2"):
        status, problem, _ = portal.request("POST", vm_path(agent, DISK, "start") + f"?{query}", api_key)
        assert (status, problem["code"], problem["errors"][0]["field"]) == (422, "validation_failed", "wait"), problem
    assert host_state(lab) == "shut off"


def test_force_stop_with_wait_answers_shut_off_at_once(portal: Server, api_key: str, agent: dict[str, Any],
                                                       lab: Lab) -> None:
    lab.virsh("start", "--domain", DISK)
    status, result, took = timed(portal, "POST", vm_path(agent, DISK, "force-stop") + "?wait=10", api_key)
    assert status == 200 and result["state"] == "shut off", result
    figure(f"force-stop?wait=10 answered 'shut off' in {took:.2f} s")


# ---------------------------------------------------------------------- autostart


def test_autostart_on_and_off_as_dominfo_shows_it(portal: Server, api_key: str, agent: dict[str, Any],
                                                  lab: Lab) -> None:
    def autostart_on_host() -> str:
        return re.search(r"Autostart:\s+(\S+)", lab.virsh("dominfo", "--domain", DISK).stdout).group(1)  # type: ignore[union-attr]

    status, result, _ = portal.request("PUT", vm_path(agent, DISK, "autostart"), api_key, {"enabled": True})
    assert status == 200, result
    assert (result["vm"], result["enabled"], result["result"]["command"][-3:]) == (
        DISK, True, ["autostart", "--domain", DISK])
    assert autostart_on_host() == "enable"
    status, result, _ = portal.request("PUT", vm_path(agent, DISK, "autostart"), api_key, {"enabled": False})
    assert status == 200 and result["result"]["command"][-1] == "--disable", result
    assert autostart_on_host() == "disable"
    events = portal.request("GET", "/users/me/audit?limit=2", api_key)[1]["events"]
    assert [(e["action"], e["detail"], e["vm"]) for e in events] == [
        ("vm.autostart", "disable", DISK), ("vm.autostart", "enable", DISK)]
    status, problem, _ = portal.request("PUT", vm_path(agent, "no-such-vm", "autostart"), api_key, {"enabled": True})
    assert (status, problem["code"]) == (404, "vm_not_found"), problem


# ---------------------------------------------------------------------- snapshots


def test_snapshots_of_the_shut_off_guest_create_list_revert_delete(portal: Server, api_key: str,
                                                                   agent: dict[str, Any], lab: Lab) -> None:
    lab.virsh("destroy", "--domain", DISK)
    base = vm_path(agent, DISK, "snapshots")
    assert portal.request("GET", base, api_key)[:2] == (200, [])

    description = "--help; $(id) `id` | tee /tmp/x & 'quoted' \"double\" <xml>"
    status, first, took = timed(portal, "POST", base, api_key, {"name": "before upgrade", "description": description})
    assert status == 201, first
    assert (first["name"], first["state"], first["parent"], first["current"]) == ("before upgrade", "shutoff", None,
                                                                                 True)
    assert first["created_at"].endswith("Z")
    figure(f"snapshot create (shut off) {took:.2f} s")
    xml = lab.virsh("snapshot-dumpxml", "--domain", DISK, "--snapshotname", "before upgrade").stdout
    assert html.unescape(re.search(r"<description>(.*)</description>", xml).group(1)) == description  # type: ignore[union-attr]

    status, problem, _ = portal.request("POST", base, api_key, {"name": "before upgrade"})
    assert (status, problem["code"]) == (409, "snapshot_name_taken"), problem

    status, second, _ = portal.request("POST", base, api_key, {"name": "s2"})
    assert status == 201 and second["parent"] == "before upgrade" and second["current"] is True, second
    listed = portal.request("GET", base, api_key)[1]
    assert {s["name"]: (s["parent"], s["current"]) for s in listed} == {
        "before upgrade": (None, False), "s2": ("before upgrade", True)}

    status, result, took = timed(portal, "POST", f"{base}/{quote('before upgrade')}/revert", api_key)
    assert status == 200 and result["command"][-2:] == ["--snapshotname", "before upgrade"], result
    figure(f"snapshot revert (to a shut-off snapshot) {took:.2f} s")
    assert [s["name"] for s in portal.request("GET", base, api_key)[1] if s["current"]] == ["before upgrade"]

    for name in ("s2", "before upgrade"):
        status, body, took = timed(portal, "DELETE", f"{base}/{quote(name)}", api_key)
        assert status == 204 and body is None, body
    figure(f"snapshot delete {took:.2f} s")
    assert portal.request("GET", base, api_key)[:2] == (200, [])
    assert lab.virsh("snapshot-list", "--domain", DISK, "--name").stdout.strip() == ""

    for method, path in [("DELETE", f"{base}/s2"), ("POST", f"{base}/nosuch/revert")]:
        status, problem, _ = portal.request(method, path, api_key)
        assert (status, problem["code"]) == (404, "snapshot_not_found"), problem
    events = portal.request("GET", "/users/me/audit?limit=8", api_key)[1]["events"]
    assert ("vm.snapshot_create", "ok", "snapshot before upgrade") in [
        (e["action"], e["outcome"], e["detail"]) for e in events]


def test_a_snapshot_of_the_running_guest_brings_it_back_running(portal: Server, api_key: str,
                                                                agent: dict[str, Any], lab: Lab) -> None:
    base = vm_path(agent, DISK, "snapshots")
    lab.virsh("destroy", "--domain", DISK)
    assert portal.request("POST", vm_path(agent, DISK, "start") + "?wait=30", api_key)[0] == 200
    status, live, took = timed(portal, "POST", base, api_key, {"name": "live"})
    assert status == 201 and live["state"] == "running", live
    figure(f"snapshot create (running) {took:.2f} s")
    assert portal.request("POST", vm_path(agent, DISK, "force-stop") + "?wait=5", api_key)[0] == 200

    status, result, took = timed(portal, "POST", f"{base}/live/revert", api_key)
    assert status == 200, result
    assert host_state(lab) == "running"  # the memory state came back with the disk
    figure(f"snapshot revert (to a running snapshot, guest off) {took:.2f} s")
    assert portal.request("DELETE", f"{base}/live", api_key)[0] == 204
    lab.virsh("destroy", "--domain", DISK)


def test_a_guest_without_a_qcow2_disk_cannot_take_snapshots(portal: Server, api_key: str,
                                                            agent: dict[str, Any]) -> None:
    status, problem, _ = portal.request("POST", vm_path(agent, "lab-guest1", "snapshots"), api_key, {"name": "x"})
    assert (status, problem["code"]) == (409, "snapshot_unsupported"), problem


def test_hostile_snapshot_names_never_reach_the_host(portal: Server, api_key: str, lab: Lab) -> None:
    fresh = register(portal, api_key, lab)
    logins = lab.accepted_logins()
    for name in ("--help", "$(id)", "a;b", "-c"):
        status, problem, _ = portal.request("POST", vm_path(fresh, DISK, "snapshots"), api_key, {"name": name})
        assert (status, problem["errors"][0]["field"]) == (422, "name"), problem
        status, problem, _ = portal.request("DELETE", vm_path(fresh, DISK, "snapshots") + f"/{quote(name)}", api_key)
        assert (status, problem["errors"][0]["field"]) == (422, "snapshot"), problem
    assert lab.accepted_logins() == logins


# ---------------------------------------------------------------------- stats


def test_stats_of_a_running_guest(portal: Server, api_key: str, agent: dict[str, Any], lab: Lab) -> None:
    lab.virsh("destroy", "--domain", DISK)
    assert portal.request("POST", vm_path(agent, DISK, "start") + "?wait=30", api_key)[0] == 200
    status, stats, took = timed(portal, "GET", vm_path(agent, DISK, "stats"), api_key)
    assert status == 200, stats
    figure(f"stats {took:.2f} s")
    assert (stats["name"], stats["state"]) == (DISK, "running")
    assert stats["cpu"]["time_ns"] > 0 and stats["vcpus"] == {"current": 1, "maximum": 1}
    assert stats["balloon"]["maximum_kib"] == 131072
    [disk] = stats["block"]
    assert (disk["name"], disk["capacity"]) == ("vda", 16 * 1024 * 1024)
    assert disk["path"].endswith("lab-disk.qcow2") and disk["read_bytes"] >= 0
    assert stats["net"] == []  # the lab's guests have no NIC
    assert stats["fields"]["state.state"] == "1"
    lab.virsh("destroy", "--domain", DISK)
    assert portal.request("GET", vm_path(agent, DISK, "stats"), api_key)[1]["state"] == "shut off"
    status, problem, _ = portal.request("GET", vm_path(agent, "no-such-vm", "stats"), api_key)
    assert (status, problem["code"]) == (404, "vm_not_found"), problem


# ---------------------------------------------------------------------- fleet, host facts, check


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections but never says a word (a hung sshd)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def test_the_fleet_view_answers_for_live_and_dead_agents_within_the_connect_timeout(
        portal: Server, api_key: str, agent: dict[str, Any], lab: Lab, silent_port: int) -> None:
    refused = register(portal, api_key, lab, name=f"refused-{uuid.uuid4().hex[:6]}", port=closed_port())
    silent = register(portal, api_key, lab, name=f"silent-{uuid.uuid4().hex[:6]}", port=silent_port)
    lab.virsh("destroy", "--domain", DISK)

    status, fleet, took = timed(portal, "GET", "/vms", api_key)
    assert status == 200, fleet
    by_id = {entry["agent_id"]: entry for entry in fleet}
    assert DISK in {vm["name"] for vm in by_id[agent["id"]]["vms"]} and by_id[agent["id"]]["error"] is None
    assert by_id[refused["id"]]["vms"] is None and by_id[refused["id"]]["error"]["code"] == "agent_unreachable"
    assert by_id[silent["id"]]["vms"] is None and by_id[silent["id"]]["error"]["code"] == "agent_connect_timeout"
    # (The silent host answering agent_connect_timeout shows the connect time-out bounded it; how
    # long the answer took is a figure, printed, not asserted.)
    figure(f"fleet view of {len(fleet)} agents (one refusing, one silent) in {took:.2f} s")

    query = f"/vms?agent={agent['id']}&agent={refused['id']}&state={quote('shut off')}"
    status, filtered, took = timed(portal, "GET", query, api_key)
    assert status == 200, filtered
    assert [e["agent_id"] for e in filtered] == [agent["id"], refused["id"]]
    assert {vm["state"] for vm in filtered[0]["vms"]} == {"shut off"}
    assert DISK in [vm["name"] for vm in filtered[0]["vms"]]
    figure(f"fleet view, one live and one refusing agent, state filter: {took:.2f} s")
    status, problem, _ = portal.request("GET", "/vms?state=shutoff", api_key)
    assert (status, problem["code"]) == (422, "validation_failed"), problem


def test_host_facts(portal: Server, api_key: str, agent: dict[str, Any]) -> None:
    status, facts, took = timed(portal, "GET", f"/agents/{agent['id']}/host", api_key)
    assert status == 200, facts
    figure(f"host facts {took:.2f} s")
    assert facts["hostname"] == socket.gethostname()
    assert facts["node"]["cpus"] == os.cpu_count() and facts["node"]["memory_kib"] > 0
    assert facts["node"]["cpu_mhz"] is None or facts["node"]["cpu_mhz"] > 0
    versions = facts["versions"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions["libvirt"]) and versions["daemon"] == versions["libvirt"]
    assert versions["hypervisor"] == "QEMU" and re.fullmatch(r"\d+\.\d+\.\d+", versions["hypervisor_version"])


def test_check_of_live_and_failing_agents(portal: Server, api_key: str, agent: dict[str, Any], lab: Lab,
                                          silent_port: int) -> None:
    fingerprint = asyncssh.import_public_key(lab.host_key).get_fingerprint("sha256")
    status, check, took = timed(portal, "POST", f"/agents/{agent['id']}/check", api_key)
    assert status == 200, check
    assert check == {"reachable": True, "authenticated": True, "host_key_fingerprint": fingerprint,
                     "libvirt_reachable": True, "round_trip_ms": check["round_trip_ms"], "error": None}
    assert check["round_trip_ms"] > 0
    figure(f"check of a live agent: round trip {check['round_trip_ms']} ms, answer in {took:.2f} s")

    cases = [
        ({"port": closed_port()}, (False, False, False), "agent_unreachable"),
        ({"port": silent_port}, (False, False, False), "agent_connect_timeout"),
        ({"username": "nobody"}, (True, False, False), "agent_auth_failed"),
        ({"host_key": None, "allow_unknown_hosts": False}, (True, False, False), "host_key_unknown"),
        # nothing to pin and nothing listening: the host's unreachability is what the check reports
        ({"host_key": None, "allow_unknown_hosts": False, "port": closed_port()}, (False, False, False),
         "agent_unreachable"),
        ({"libvirt_uri": "qemu:///nowhere"}, (True, True, False), "libvirt_unavailable"),
    ]
    for fields, expected, code in cases:
        failing = register(portal, api_key, lab, **fields)
        status, check, took = timed(portal, "POST", f"/agents/{failing['id']}/check", api_key)
        assert status == 200, check
        assert (check["reachable"], check["authenticated"], check["libvirt_reachable"]) == expected, check
        assert check["error"]["code"] == code and check["error"]["detail"], check
        figure(f"check, {code}: answered in {took:.2f} s")
    tofu = register(portal, api_key, lab, host_key=None, allow_unknown_hosts=True)
    check = portal.request("POST", f"/agents/{tofu['id']}/check", api_key)[1]
    assert check["host_key_fingerprint"] == fingerprint and check["error"] is None


# ---------------------------------------------------------------------- command line and library


def cli(portal: Server, api_key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MANAGEMENT_DB_PATH": str(portal.workdir / "data" / "management.sqlite3"),
           "MANAGEMENT_AGENT_NETWORKS": portal.env["MANAGEMENT_AGENT_NETWORKS"],
           "MANAGEMENT_API_KEY": api_key, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_the_command_line_drives_the_new_operations(portal: Server, api_key: str, agent: dict[str, Any],
                                                    lab: Lab) -> None:
    agent_id = str(agent["id"])
    lab.virsh("destroy", "--domain", DISK)
    started = cli(portal, api_key, "vms", "start", agent_id, DISK, "--wait", "30")
    assert started.returncode == 0, started.stderr
    assert "running after" in started.stdout and f"waiting for {DISK}: running" in started.stderr
    suspended = cli(portal, api_key, "vms", "suspend", agent_id, DISK, "--wait", "10", "--json")
    assert suspended.returncode == 0, suspended.stderr
    assert json.loads(suspended.stdout)["state"] == "paused"
    # libvirt takes a reboot of a paused domain, which stays paused: the wait runs out
    timeout = cli(portal, api_key, "vms", "reboot", agent_id, DISK, "--wait", "0")
    assert timeout.returncode == 1 and "error: wait_timeout:" in timeout.stderr, timeout.stderr
    assert cli(portal, api_key, "vms", "resume", agent_id, DISK).returncode == 0

    fleet = cli(portal, api_key, "vms", "fleet", "--agent", agent_id, "--state", "running")
    assert fleet.returncode == 0, fleet.stderr
    assert re.search(rf"lab \({agent_id}\)\s+\d+\s+{DISK}\s+running", fleet.stdout), fleet.stdout
    stats = cli(portal, api_key, "vms", "stats", agent_id, DISK)
    assert stats.returncode == 0 and re.search(r"block\.0\.name\s+vda", stats.stdout), stats.stdout
    checked = cli(portal, api_key, "agents", "check", agent_id, "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["libvirt_reachable"] is True, checked.stderr
    dead = register(portal, api_key, lab, port=closed_port())
    failed = cli(portal, api_key, "agents", "check", str(dead["id"]), "--json")
    assert failed.returncode == 1 and "error: agent_unreachable:" in failed.stderr, failed.stderr
    assert json.loads(failed.stdout)["reachable"] is False  # the answer is still printed, as JSON
    host = cli(portal, api_key, "agents", "host", agent_id)
    assert host.returncode == 0 and re.search(r"versions\.hypervisor\s+QEMU", host.stdout), host.stdout
    assert cli(portal, api_key, "vms", "autostart", agent_id, DISK, "on").returncode == 0
    assert cli(portal, api_key, "vms", "autostart", agent_id, DISK, "off").returncode == 0

    assert cli(portal, api_key, "vms", "force-stop", agent_id, DISK, "--wait", "5").returncode == 0
    created = cli(portal, api_key, "vms", "snapshots", "create", agent_id, DISK, "cli snap", "--description=-x")
    assert created.returncode == 0, created.stderr
    listing = cli(portal, api_key, "vms", "snapshots", "list", agent_id, DISK)
    assert re.search(r"^\* cli snap\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+shutoff\s+-$", listing.stdout, re.M), \
        listing.stdout
    assert cli(portal, api_key, "vms", "snapshots", "revert", agent_id, DISK, "cli snap").returncode == 0
    assert cli(portal, api_key, "vms", "snapshots", "delete", agent_id, DISK, "cli snap").returncode == 0
    missing = cli(portal, api_key, "vms", "snapshots", "delete", agent_id, DISK, "cli snap")
    assert missing.returncode == 3 and "snapshot_not_found" in missing.stderr


def test_the_library_drives_the_new_operations(portal: Server, api_key: str, agent: dict[str, Any],
                                               lab: Lab) -> None:
    from core.errors import ValidationFailed, WaitTimedOut
    from entrypoints.library import connect

    lab.virsh("destroy", "--domain", DISK)
    with connect({"MANAGEMENT_DB_PATH": str(portal.workdir / "data" / "management.sqlite3"),
                  "MANAGEMENT_AGENT_NETWORKS": portal.env["MANAGEMENT_AGENT_NETWORKS"]}) as library:
        me = library.login(api_key)
        seen: list[str | None] = []
        assert me.vm_action_and_wait(agent["id"], DISK, "start", 30, lambda s, _: seen.append(s)).state == "running"
        assert seen[-1] == "running"
        assert me.suspend_vm(agent["id"], DISK).exit_status == 0
        with pytest.raises(WaitTimedOut) as raised:
            me.vm_action_and_wait(agent["id"], DISK, "reboot", 0)
        assert raised.value.state == "paused"  # libvirt takes a reboot of a paused domain; it stays paused
        assert me.resume_vm(agent["id"], DISK).exit_status == 0
        assert me.vm_stats(agent["id"], DISK).state == "running"
        assert me.host(agent["id"]).versions.hypervisor == "QEMU"
        assert me.check_agent(agent["id"]).libvirt_reachable
        [entry] = me.fleet(agent_ids=[agent["id"]], states=["running"])
        assert DISK in [vm.name for vm in entry.vms or []]
        created = me.create_snapshot(agent["id"], DISK, "lib snap", "from the library")
        assert created.current and created.state == "running"
        assert [s.name for s in me.snapshots(agent["id"], DISK)] == ["lib snap"]
        me.delete_snapshot(agent["id"], DISK, "lib snap")
        assert me.set_autostart(agent["id"], DISK, False).exit_status == 0
        assert me.force_stop_vm(agent["id"], DISK).exit_status == 0
        # what a script gets wrong is refused like any bad input, not taken for something else
        for wrong in (lambda: me.set_autostart(agent["id"], DISK, "false"),  # type: ignore[arg-type]
                      lambda: me.vm_action(agent["id"], DISK, "hibernate"),
                      lambda: me.vm_action_and_wait(agent["id"], DISK, "start", 301)):
            with pytest.raises(ValidationFailed):
                wrong()
        assert host_state(lab) == "shut off"
