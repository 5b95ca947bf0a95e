"""End to end on the lab (issue 16): the portal under gunicorn creates a VM from the lab's cloud
image (``scripts/lab.sh``: pool ``playr-lab-pool``, isolated network ``playr-lab-net``, base volume
``lab-cloud-base.qcow2``) with a cloud-init seed, the guest boots from its overlay and says on its
serial console the host name and SSH key it read, the DHCP lease shows in ``interfaces``; then a
clone, deletes that leave the pool as it was, and failures midway (an upload cut on the channel, a
define the host refuses) that leave nothing behind. Nothing connects to a guest's address.

Every VM and volume made here is named ``prov-…`` and removed, whatever happens."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import LAB_AGENT_NETWORKS, Lab, register, vm_path
from tests.support import Server

pytestmark = pytest.mark.lab

POOL = "playr-lab-pool"
NETWORK = "playr-lab-net"
BASE = "lab-cloud-base.qcow2"
SERIAL_LOG = "/var/log/libvirt/qemu/{}-serial0.log"


def remove_prov_leftovers(lab: Lab) -> None:
    """Every prov- VM and volume, gone (also after an earlier run that failed midway)."""
    listed = lab.virsh("list", "--all", "--name").stdout.split()
    for name in (n for n in listed if n.startswith("prov-")):
        lab.virsh("destroy", "--domain", name)
        lab.virsh("undefine", "--domain", name, "--snapshots-metadata")
    for name in pool_volumes(lab):
        if name.startswith("prov-"):
            lab.virsh("vol-delete", "--pool", POOL, "--vol", name)
    for log in Path(SERIAL_LOG).parent.glob("prov-*"):
        log.unlink(missing_ok=True)  # serial and QEMU logs libvirt kept for the test VMs


def pool_volumes(lab: Lab) -> set[str]:
    lines = lab.virsh("vol-list", "--pool", POOL).stdout.splitlines()[2:]
    return {line.split()[0] for line in lines if line.strip()}


@pytest.fixture(scope="module")
def portal(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The portal under gunicorn, creating TCG guests (the lab has no usable KVM)."""
    remove_prov_leftovers(lab)
    server = Server(tmp_path_factory.mktemp("portal"), MANAGEMENT_WORKERS="1",
                    MANAGEMENT_SSH_CONNECT_TIMEOUT="3", MANAGEMENT_SSH_COMMAND_TIMEOUT="30",
                    MANAGEMENT_SIGNUP="open", MANAGEMENT_AGENT_NETWORKS=LAB_AGENT_NETWORKS,
                    MANAGEMENT_VM_DOMAIN_TYPE="qemu").start()
    yield server
    server.stop()
    remove_prov_leftovers(lab)


@pytest.fixture(scope="module")
def agent(portal: Server, api_key: str, lab: Lab) -> dict[str, Any]:
    return register(portal, api_key, lab, name="lab-prov")


def new_vm(name: str, **changes: Any) -> dict[str, Any]:
    return {"name": name, "vcpus": 1, "memory_mib": 128,
            "disk": {"pool": POOL, "size_gib": 1, "base_volume": BASE}, "network": NETWORK, **changes}


def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def serial_log(name: str) -> str:
    path = Path(SERIAL_LOG.format(name))
    return path.read_text(errors="replace") if path.exists() else ""


def figure(text: str) -> None:
    print(f"[figures] {text}", file=sys.stderr)


def test_the_lab_offers_its_pool_cloud_image_and_isolated_network(portal: Server, api_key: str,
                                                                 agent: dict[str, Any]) -> None:
    status, pools, _ = portal.request("GET", f"/agents/{agent['id']}/pools", api_key)
    assert status == 200, pools
    [pool] = [p for p in pools if p["name"] == POOL]
    assert pool["state"] == "running" and pool["available_bytes"] > 0 and pool["capacity_bytes"] > 0
    status, volumes, _ = portal.request("GET", f"/agents/{agent['id']}/pools/{POOL}/volumes", api_key)
    assert status == 200, volumes
    [base] = [v for v in volumes if v["name"] == BASE]
    assert base["format"] == "qcow2" and base["path"].endswith("/" + BASE) and base["capacity_bytes"] > 0
    status, networks, _ = portal.request("GET", f"/agents/{agent['id']}/networks", api_key)
    assert status == 200, networks
    [network] = [n for n in networks if n["name"] == NETWORK]
    assert network == {"name": NETWORK, "state": "active", "autostart": False, "bridge": "virbr-playr"}
    status, problem, _ = portal.request("GET", f"/agents/{agent['id']}/pools/no-such-pool/volumes", api_key)
    assert (status, problem["code"]) == (404, "pool_not_found")


def test_create_boot_with_cloud_init_lease_clone_and_delete_leave_the_pool_as_before(
        portal: Server, api_key: str, agent: dict[str, Any], lab: Lab) -> None:
    before = pool_volumes(lab)
    name = f"prov-{uuid.uuid4().hex[:6]}"
    hostname = f"{name}-host"
    key = Path(f"{lab.key_path}.pub").read_text().strip()
    started = time.monotonic()
    status, created, _ = portal.request("POST", f"/agents/{agent['id']}/vms?wait=60", api_key, new_vm(
        name, cloud_init={"hostname": hostname, "ssh_authorized_keys": [key],
                          "user_data": "#cloud-config\npackages: [htop]\n"}))
    running_after = time.monotonic() - started
    assert status == 201, created
    assert created["state"] == "running" and created["dominfo"]["name"] == name
    assert [(v["pool"], v["name"]) for v in created["volumes"]] == [(POOL, f"{name}.qcow2"),
                                                                    (POOL, f"{name}-seed.iso")]
    figure(f"create from the base image with a cloud-init seed, request to running: {running_after:.2f} s")
    # the guest booted from the overlay, read the seed and said so on its serial console
    log = wait_for("the guest's cloud-init report", lambda: (lambda text: text if "playr-cloud: ready" in text
                                                             else None)(serial_log(name)), 90)
    figure(f"create to the guest's 'ready' on its serial console: {time.monotonic() - started:.2f} s")
    assert f"playr-cloud: hostname={hostname}" in log
    assert f"playr-cloud: key={' '.join(key.split()[:2])}" in log
    assert "playr-cloud: dhcp on eth0: ok" in log
    overlay = lab.virsh("vol-dumpxml", "--pool", POOL, "--vol", f"{name}.qcow2").stdout
    assert f"/{BASE}</path>" in overlay  # backed by the cloud image
    # its address, from the isolated network's DHCP lease (no guest agent in this image)
    status, interfaces, _ = portal.request("GET", vm_path(agent, name, "interfaces"), api_key)
    assert status == 200, interfaces
    [interface] = interfaces
    assert interface["network"] == NETWORK and interface["mac"]
    [address] = interface["addresses"]
    assert address["type"] == "ipv4" and address["address"].startswith("192.168.123.") and address["prefix"] == 24
    # clone: refused while running, then copies the disk with a new UUID and MAC
    status, problem, _ = portal.request("POST", vm_path(agent, name, "clone"), api_key, {"name": f"{name}-c"})
    assert (status, problem["code"]) == (409, "vm_running")
    status, problem, _ = portal.request("DELETE", vm_path(agent, name), api_key)
    assert (status, problem["code"]) == (409, "vm_running")
    assert portal.request("POST", vm_path(agent, name, "force-stop") + "?wait=30", api_key)[0] == 200
    status, clone, _ = portal.request("POST", vm_path(agent, name, "clone"), api_key, {"name": f"{name}-c"})
    assert status == 201, clone
    assert [v["name"] for v in clone["volumes"]] == [f"{name}-c.qcow2"]
    source_xml = lab.virsh("dumpxml", "--domain", name).stdout
    clone_xml = lab.virsh("dumpxml", "--domain", f"{name}-c").stdout
    assert _between(source_xml, "<uuid>", "</uuid>") != _between(clone_xml, "<uuid>", "</uuid>")
    assert _between(source_xml, "<mac address='", "'") != _between(clone_xml, "<mac address='", "'")
    assert f"volume='{name}-c.qcow2'" in clone_xml and f"{name}-seed.iso" not in clone_xml
    # deleting both with their storage leaves the pool as it was (the base image stays)
    for vm in (f"{name}-c", name):
        status, answer, _ = portal.request("DELETE", vm_path(agent, vm) + "?remove_storage=true", api_key)
        assert status == 204, answer
    assert lab.virsh("dominfo", "--domain", name).returncode != 0
    assert pool_volumes(lab) == before


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_removing_storage_another_vm_uses_is_refused_and_changes_nothing(portal: Server, api_key: str,
                                                                         agent: dict[str, Any], lab: Lab) -> None:
    name = f"prov-{uuid.uuid4().hex[:6]}"
    status, created, _ = portal.request("POST", f"/agents/{agent['id']}/vms", api_key,
                                        new_vm(name, start=False, network=None))
    assert status == 201, created
    # a second VM, made by hand, whose disk is the first one's volume
    other = f"{name}-other"
    xml = (f"<domain type='qemu'><name>{other}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>"
           f"<devices><disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
           f"<source pool='{POOL}' volume='{name}.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
    defined = subprocess.run(["virsh", "-c", "qemu:///system", "define", "/dev/stdin"], input=xml, text=True,
                             capture_output=True, timeout=60)
    assert defined.returncode == 0, defined.stderr
    status, problem, _ = portal.request("DELETE", vm_path(agent, name) + "?remove_storage=true", api_key)
    assert (status, problem["code"]) == (409, "volume_in_use")
    assert other in problem["detail"]
    assert lab.virsh("dominfo", "--domain", name).returncode == 0 and f"{name}.qcow2" in pool_volumes(lab)
    lab.virsh("undefine", "--domain", other)
    assert portal.request("DELETE", vm_path(agent, name) + "?remove_storage=true", api_key)[0] == 204
    assert f"{name}.qcow2" not in pool_volumes(lab)


@pytest.mark.parametrize(("changes", "status", "code"), [
    ({"name": "--help"}, 422, "validation_failed"),
    ({"name": "prov-x; reboot"}, 422, "validation_failed"),
    ({"network": "--help"}, 422, "validation_failed"),
    ({"network": {"bridge": "br0 && id"}}, 422, "validation_failed"),
    ({"xml": "<domain type='qemu'><devices><hostdev/></devices></domain>"}, 422, "validation_failed"),
    ({"cloud_init": {"user_data": "#cloud-config\nruncmd: [unclosed\n"}}, 422, "validation_failed"),
    ({"cloud_init": {"ssh_authorized_keys": ["ssh-ed25519 not-base64"]}}, 422, "validation_failed"),
    ({"vcpus": 4096}, 422, "validation_failed"),
    ({"disk": {"pool": "no-such-pool", "size_gib": 1}}, 404, "pool_not_found"),
    ({"disk": {"pool": POOL, "size_gib": 1, "base_volume": "no-such.qcow2"}}, 404, "volume_not_found"),
    ({"network": "no-such-net"}, 404, "network_not_found"),
    ({"disk": {"pool": POOL, "size_gib": 65536}}, 409, "insufficient_storage"),
    ({"name": "lab-guest1"}, 409, "vm_name_taken"),
])
def test_hostile_and_impossible_requests_are_refused_and_leave_nothing(
        portal: Server, api_key: str, agent: dict[str, Any], lab: Lab, changes: dict[str, Any], status: int,
        code: str) -> None:
    before = pool_volumes(lab)
    answer_status, problem, _ = portal.request("POST", f"/agents/{agent['id']}/vms", api_key,
                                               {**new_vm(f"prov-{uuid.uuid4().hex[:6]}"), **changes})
    assert (answer_status, problem["code"]) == (status, code), problem
    assert pool_volumes(lab) == before


# ---------------------------------------------------------------------- failures midway, on a real channel

FAULT = """#!/bin/sh
# A forced command for a test key of the lab user: runs the portal's command, except the one that
# this fault names ({fault}), which fails as a cut upload or a refused definition would.
case "$SSH_ORIGINAL_COMMAND" in
    *" vol-upload "*) [ {fault} = upload ] &&
        {{ head -c 2048 >/dev/null; echo "error: upload stream cut" >&2; exit 1; }} ;;
    *" define "*) [ {fault} = define ] &&
        {{ cat >/dev/null; echo "error: XML error: refused by the host" >&2; exit 1; }} ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""


@pytest.fixture
def faulty_agent(portal: Server, api_key: str, lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[
        dict[str, Any]]:
    """An agent of the lab host whose key's forced command fails one step (``request.param``)."""
    fault = request.param
    script = Path(f"/var/tmp/playr-lab/prov-fault-{fault}.sh")
    script.write_text(FAULT.format(fault=fault))
    script.chmod(0o755)
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = Path("/home") / lab.user / ".ssh" / "authorized_keys"
    line = f'restrict,command="{script}" {key.with_suffix(".pub").read_text().strip()}\n'
    with authorized.open("a") as file:
        file.write(line)
    try:
        yield register(portal, api_key, lab, private_key=key.read_text())
    finally:
        authorized.write_text("".join(x for x in authorized.read_text().splitlines(keepends=True) if x != line))
        script.unlink()


@pytest.mark.parametrize("faulty_agent", ["upload", "define"], indirect=True)
def test_a_cut_upload_or_a_refused_define_leaves_no_volume_and_the_audit_says_so(
        portal: Server, api_key: str, faulty_agent: dict[str, Any], lab: Lab) -> None:
    before = pool_volumes(lab)
    name = f"prov-{uuid.uuid4().hex[:6]}"
    status, problem, _ = portal.request("POST", f"/agents/{faulty_agent['id']}/vms", api_key, new_vm(
        name, cloud_init={"hostname": "prov"}))
    assert (status, problem["code"]) == (502, "virsh_failed"), problem
    assert pool_volumes(lab) == before
    assert lab.virsh("dominfo", "--domain", name).returncode != 0
    _, page, _ = portal.request("GET", "/users/me/audit?limit=5", api_key)
    [event] = [e for e in page["events"] if e["action"] == "vm.create" and e["vm"] == name]
    assert event["outcome"] == "virsh_failed"
    assert f"removed {POOL}/{name}-seed.iso, {POOL}/{name}.qcow2" in event["detail"]



def test_the_command_line_lists_creates_with_progress_and_deletes(portal: Server, api_key: str,
                                                                  agent: dict[str, Any], lab: Lab) -> None:
    before = pool_volumes(lab)
    env = {**portal.env, "MANAGEMENT_API_KEY": api_key}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], cwd=portal.workdir, env=env,
                              capture_output=True, text=True, timeout=120)

    pools = cli("pools", "list", str(agent["id"]))
    assert pools.returncode == 0, pools.stderr
    assert pools.stdout.splitlines()[0].split()[:3] == ["NAME", "STATE", "AUTOSTART"] and POOL in pools.stdout
    networks = cli("networks", "list", str(agent["id"]), "--json")
    assert {"name": NETWORK, "state": "active", "autostart": False, "bridge": "virbr-playr"} in \
        json.loads(networks.stdout)
    assert BASE in cli("volumes", "list", str(agent["id"]), POOL).stdout
    name = f"prov-{uuid.uuid4().hex[:6]}"
    created = cli("vms", "create", str(agent["id"]), name, "--memory-mib", "128", "--pool", POOL, "--size-gib", "1",
                  "--base-volume", BASE, "--network", NETWORK, "--no-start")
    assert created.returncode == 0, created.stderr
    assert f"{name}: creating the disk" in created.stderr and f"{name}: defining the VM" in created.stderr
    assert f"volume {POOL}/{name}.qcow2" in created.stdout and f"{name}-seed.iso" in created.stdout
    deleted = cli("vms", "delete", str(agent["id"]), name, "--remove-storage")
    assert deleted.returncode == 0, deleted.stderr
    assert pool_volumes(lab) == before
    refused = cli("vms", "create", str(agent["id"]), "--help-me", "--pool", POOL, "--size-gib", "1")
    assert refused.returncode != 0
