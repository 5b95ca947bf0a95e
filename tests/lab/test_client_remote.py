"""The HTTP client and the command line in remote mode against the lab: a guest of this module's
own (``client-guest``, defined here and removed afterwards) is listed, started with ``--wait``,
stopped, snapshotted and seen in the fleet through ``MANAGEMENT_URL``, and the same commands print
the same locally (the portal's database, in-process) and remotely."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import errors
from entrypoints import remote
from entrypoints.client import ApiError, Client
from entrypoints.shapes import SnapshotView, VmStatsView, WaitedActionView
from tests.lab.conftest import Lab, register
from tests.support import REPO, Server, run_cli

pytestmark = pytest.mark.lab

GUEST = "client-guest"


@pytest.fixture(scope="module")
def guest(lab: Lab) -> Iterator[str]:
    """``client-guest``: lab-disk's definition with a disk (qcow2, for snapshots) of its own."""
    state_dir = lab.key_path.parent
    disk = state_dir / f"{GUEST}.qcow2"
    _remove(lab, disk)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, timeout=60)
    xml = lab.virsh("dumpxml", "--domain", "lab-disk").stdout
    assert "<name>lab-disk</name>" in xml, xml
    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml).replace("<name>lab-disk</name>", f"<name>{GUEST}</name>")
    xml = re.sub(r"<source file='[^']*lab-disk\.qcow2'/>", f"<source file='{disk}'/>", xml)
    xml = xml.replace("console-lab-disk.log", f"console-{GUEST}.log")
    definition = state_dir / f"{GUEST}.xml"
    definition.write_text(xml)
    defined = lab.virsh("define", "--file", str(definition))
    assert defined.returncode == 0, defined.stderr
    yield GUEST
    _remove(lab, disk)


def _remove(lab: Lab, disk: Path) -> None:
    lab.virsh("destroy", "--domain", GUEST)
    lab.virsh("undefine", "--domain", GUEST, "--snapshots-metadata")
    disk.unlink(missing_ok=True)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("MANAGEMENT_URL", "MANAGEMENT_API_KEY")}
    return subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], capture_output=True, text=True,
                          env={**environment, "PYTHONPATH": str(REPO), **env}, timeout=120)


def remote_env(portal: Server, api_key: str, home: Path) -> dict[str, str]:
    return {"MANAGEMENT_URL": f"http://127.0.0.1:{portal.port}", "MANAGEMENT_API_KEY": api_key,
            "XDG_CONFIG_HOME": str(home)}


def local_env(portal: Server, api_key: str, home: Path) -> dict[str, str]:
    return {"MANAGEMENT_DB_PATH": str(portal.workdir / "data" / "management.sqlite3"),
            "MANAGEMENT_AGENT_NETWORKS": portal.env["MANAGEMENT_AGENT_NETWORKS"], "MANAGEMENT_API_KEY": api_key,
            "XDG_CONFIG_HOME": str(home)}


def mine(text: str) -> list[str]:
    """The lines about this module's guest (other tests drive the other lab guests meanwhile)."""
    return [line for line in text.splitlines() if GUEST in line]


def test_the_remote_command_line_lists_starts_with_wait_snapshots_and_sees_the_fleet(
        portal: Server, api_key: str, agent: dict[str, Any], guest: str, lab: Lab, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    there, here = remote_env(portal, api_key, tmp_path), local_env(portal, api_key, tmp_path)
    agent_id = str(agent["id"])
    lab.virsh("destroy", "--domain", guest)  # the state this test starts from: shut off

    listed = cli("vms", "list", agent_id, **there)
    assert listed.returncode == 0, listed.stderr
    assert re.fullmatch(rf"\s+-\s+{guest}\s+shut off", "\n".join(mine(listed.stdout))), listed.stdout
    assert mine(run_cli(monkeypatch, capsys, ["vms", "list", agent_id], here)[1]) == mine(listed.stdout)

    started = cli("vms", "start", agent_id, guest, "--wait", "60", **there)
    assert started.returncode == 0, started.stderr
    assert re.search(r"; running after \d+\.\d s$", started.stdout.strip()), started.stdout
    assert f"waiting for {guest}: running" in started.stderr  # progress on stderr, as locally
    again = cli("vms", "start", agent_id, guest, **there)
    assert again.returncode == remote.EXIT_CONFLICT
    assert again.stderr.startswith("error: vm_already_running:") and len(again.stderr.splitlines()) == 1

    fleet = cli("vms", "fleet", "--agent", agent_id, "--state", "running", "--json", **there)
    assert fleet.returncode == 0, fleet.stderr
    [entry] = json.loads(fleet.stdout)
    assert {"name": guest, "state": "running"}.items() <= next(v for v in entry["vms"] if v["name"] == guest).items()
    assert re.search(rf"lab \({agent_id}\)\s+\d+\s+{guest}\s+running",
                     run_cli(monkeypatch, capsys, ["vms", "fleet", "--agent", agent_id], there)[1])

    stopped = cli("vms", "force-stop", agent_id, guest, "--wait", "30", "--json", **there)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["state"] == "shut off", stopped.stderr

    created = cli("vms", "snapshots", "create", agent_id, guest, "client snap", "--description", "remote", **there)
    assert created.returncode == 0, created.stderr
    assert created.stdout == "snapshot client snap created (shutoff)\n"
    for command in (["vms", "snapshots", "list", agent_id, guest], ["vms", "snapshots", "list", agent_id, guest,
                                                                     "--json"],
                    ["vms", "info", agent_id, guest], ["agents", "host", agent_id], ["agents", "list"]):
        local, far = run_cli(monkeypatch, capsys, command, here), run_cli(monkeypatch, capsys, command, there)
        assert far == local and far[0] == 0 and far[1], command
    assert re.search(r"^\* client snap\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+shutoff\s+-$",
                     run_cli(monkeypatch, capsys, ["vms", "snapshots", "list", agent_id, guest], there)[1], re.M)
    reverted = cli("vms", "snapshots", "revert", agent_id, guest, "client snap", **there)
    assert reverted.returncode == 0, reverted.stderr
    deleted = cli("vms", "snapshots", "delete", agent_id, guest, "client snap", "--json", **there)
    assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"deleted": "client snap"}
    gone = cli("vms", "snapshots", "delete", agent_id, guest, "client snap", **there)
    assert gone.returncode == remote.EXIT_NOT_FOUND and gone.stderr.startswith("error: snapshot_not_found:")


def test_the_client_library_drives_the_guest_with_typed_answers_and_errors(
        portal: Server, api_key: str, agent: dict[str, Any], guest: str, lab: Lab) -> None:
    lab.virsh("destroy", "--domain", guest)
    seen: list[str | None] = []
    with Client(f"http://127.0.0.1:{portal.port}", api_key) as client:
        started = client.vm_action_and_wait(agent["id"], guest, "start", 60, lambda state, _s: seen.append(state))
        assert isinstance(started, WaitedActionView) and started.state == "running" and seen[-1] == "running"
        with pytest.raises(errors.VmAlreadyRunning) as conflict:
            client.start_vm(agent["id"], guest)
        assert isinstance(conflict.value, ApiError) and conflict.value.status == 409
        stats = client.vm_stats(agent["id"], guest)
        assert isinstance(stats, VmStatsView) and stats.name == guest and stats.state == "running"
        assert client.force_stop_vm(agent["id"], guest, wait=30).state == "shut off"
        snapshot = client.create_snapshot(agent["id"], guest, "client-lib", description="typed")
        assert isinstance(snapshot, SnapshotView) and snapshot.name == "client-lib" and snapshot.state == "shutoff"
        assert [s.name for s in client.snapshots(agent["id"], guest)] == ["client-lib"]
        assert client.delete_snapshot(agent["id"], guest, "client-lib") is None
        with pytest.raises(errors.SnapshotNotFound):
            client.revert_snapshot(agent["id"], guest, "client-lib")
        broken = register(portal, api_key, lab, libvirt_uri="qemu:///nowhere")
        with pytest.raises(errors.RemoteError) as failed:
            client.list_vms(broken["id"])
        assert failed.value.status == 502 and failed.value.code in {  # type: ignore[attr-defined]
            errors.LibvirtUnavailable.code, errors.VirshFailed.code}
