"""The lab: a real OpenSSH server, libvirtd and TCG QEMU guests on loopback, brought up once per
test session by ``scripts/lab.sh`` and torn down afterwards if this session started it.

Without root (or on a machine that is not Debian-like) the lab tests skip with the reason; under
``CI=true`` they must run, so a missing requirement fails the session instead."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest

from tests.support import REPO, Server

# MANAGEMENT_AGENT_NETWORKS of the lab's portal: the lab's sshd listens on loopback, which the
# default refuses; tests also register TEST-NET-1 addresses (192.0.2.0/24) they never connect to.
LAB_AGENT_NETWORKS = "127.0.0.0/8,::1/128,192.0.2.0/24"

LAB_SCRIPT = REPO / "scripts" / "lab.sh"


@attrs.frozen
class Lab:
    host: str
    port: int
    user: str
    key_path: Path
    host_key: str
    sshd_log: Path
    guests: tuple[str, ...]

    @property
    def private_key(self) -> str:
        return self.key_path.read_text()

    def accepted_logins(self) -> int:
        """How many SSH logins the lab's sshd has accepted so far (from its log)."""
        return self.sshd_log.read_text(errors="replace").count(f"Accepted publickey for {self.user}")

    def wait_ready(self, guest: str, timeout: int = 60) -> None:
        """Until the guest's init listens for the ACPI power button (earlier, a shutdown is lost)."""
        subprocess.run(["bash", str(LAB_SCRIPT), "wait-ready", guest, str(timeout)], check=True,
                       capture_output=True, timeout=timeout + 10)

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        """virsh on the lab host directly (not through the portal), to set up or check a state."""
        return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True,
                              timeout=60)


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux"
    if os.geteuid() != 0:
        return "the lab needs root (it installs packages and starts sshd and libvirtd)"
    if shutil.which("apt-get") is None and shutil.which("virsh") is None:
        return "the lab needs apt-get (Debian/Ubuntu) to install openssh-server, libvirt and QEMU"
    return None


def _parse_env(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("LAB_"):
            values[name] = " ".join(shlex.split(value))
    return values


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires the lab, but {missing}")
        pytest.skip(missing)
    already_up = subprocess.run(["bash", str(LAB_SCRIPT), "status"], capture_output=True).returncode == 0
    started = time.monotonic()
    up = subprocess.run(["bash", str(LAB_SCRIPT), "up"], capture_output=True, text=True, timeout=1800)
    if up.returncode != 0:
        message = f"scripts/lab.sh up failed ({up.returncode}):\n{up.stderr[-3000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    print(f"lab up in {time.monotonic() - started:.1f} s", file=sys.stderr)
    env = _parse_env(up.stdout)
    yield Lab(
        host=env["LAB_HOST"],
        port=int(env["LAB_SSH_PORT"]),
        user=env["LAB_USER"],
        key_path=Path(env["LAB_KEY"]),
        host_key=env["LAB_HOST_KEY"],
        sshd_log=Path(env["LAB_SSHD_LOG"]),
        guests=tuple(env["LAB_GUESTS"].split()),
    )
    if not already_up:
        subprocess.run(["bash", str(LAB_SCRIPT), "down"], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def portal(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The portal under gunicorn with one worker (so one SSH pool serves every request)."""
    server = Server(tmp_path_factory.mktemp("portal"), MANAGEMENT_WORKERS="1",
                    MANAGEMENT_SSH_CONNECT_TIMEOUT="3", MANAGEMENT_SSH_COMMAND_TIMEOUT="30",
                    MANAGEMENT_SIGNUP="open", MANAGEMENT_AGENT_NETWORKS=LAB_AGENT_NETWORKS,
                    MANAGEMENT_VM_DOMAIN_TYPE="qemu").start()  # TCG guests: nested KVM hangs here (issue 16)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_key(portal: Server) -> str:
    """A user of the module's portal (signed up through the API)."""
    status, user, _ = portal.request("POST", "/users", body={"name": "lab-operator"})
    assert status == 201, user
    return str(user["api_key"])


def register(portal: Server, api_key: str, lab: Lab, **fields: Any) -> dict[str, Any]:
    """Register the lab host as an agent (a fresh name unless given), pinned to its host key."""
    body = {"name": f"lab-{uuid.uuid4().hex[:8]}", "hostname": lab.host, "port": lab.port,
            "username": lab.user, "private_key": lab.private_key, "host_key": lab.host_key, **fields}
    status, agent, _ = portal.request("POST", "/agents", api_key, body)
    assert status == 201, agent
    return dict(agent)


@pytest.fixture(scope="module")
def agent(portal: Server, api_key: str, lab: Lab) -> dict[str, Any]:
    return register(portal, api_key, lab, name="lab")


def vm_path(agent: dict[str, Any], vm: str, action: str = "") -> str:
    return f"/agents/{agent['id']}/vms/{quote(vm, safe='')}" + (f"/{action}" if action else "")

