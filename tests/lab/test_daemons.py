"""The lab shares libvirtd with whatever else runs on the machine (issue 13 item 7): a libvirtd that
ran before the lab (installed by the distribution, started by another tool) is used as it is, and
when a test stops it through ``scripts/lab.sh stop-daemon`` it comes back exactly as it ran: same
binary, arguments, environment and working directory, and still not the lab's."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import attrs
import pytest

from tests.lab.conftest import LAB_SCRIPT, Lab

pytestmark = pytest.mark.lab

SOCKET = "/run/libvirt/libvirt-sock"


@attrs.frozen
class Daemon:
    pid: int
    argv: bytes
    exe: str
    environ: bytes
    cwd: str
    owner: str  # the line `lab.sh status` prints for it, without the pid


def serving_libvirtd() -> Daemon | None:
    listing = subprocess.run(["ss", "-Hxlp", "src", SOCKET], capture_output=True, text=True, check=False).stdout
    found = re.search(r'\("libvirtd",pid=(\d+)', listing)
    if found is None:
        return None
    pid = int(found.group(1))
    proc = Path(f"/proc/{pid}")
    status = subprocess.run(["bash", str(LAB_SCRIPT), "status"], capture_output=True, text=True, check=False).stdout
    line = next(line for line in status.splitlines() if line.startswith("libvirtd:"))
    return Daemon(pid=pid, argv=(proc / "cmdline").read_bytes(), exe=os.readlink(proc / "exe"),
                  environ=(proc / "environ").read_bytes(), cwd=os.readlink(proc / "cwd"),
                  owner=line.replace(f"pid {pid}", "pid N"))


def test_issue13_item7_the_libvirtd_the_lab_stops_comes_back_as_it_ran(lab: Lab) -> None:
    before = serving_libvirtd()
    assert before is not None, "no libvirtd serves qemu:///system"
    stopped = subprocess.run(["bash", str(LAB_SCRIPT), "stop-daemon", "libvirtd"], capture_output=True, text=True,
                             timeout=60, check=False)
    try:
        assert stopped.returncode == 0, stopped.stderr
        assert serving_libvirtd() is None
        assert lab.virsh("version").returncode != 0  # really gone, not restarted behind our back
        assert "stopped by stop-daemon" in subprocess.run(["bash", str(LAB_SCRIPT), "status"], capture_output=True,
                                                          text=True, check=False).stdout
    finally:
        up = subprocess.run(["bash", str(LAB_SCRIPT), "up"], capture_output=True, text=True, timeout=300, check=False)
    assert up.returncode == 0, up.stderr
    after = serving_libvirtd()
    assert after is not None and after.pid != before.pid
    assert attrs.evolve(after, pid=before.pid) == before  # binary, argv, environment, cwd, ownership
    assert lab.virsh("list", "--all").returncode == 0
