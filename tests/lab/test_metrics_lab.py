"""GET /metrics/vms against the lab's real sshd and libvirt (issue 21): a guest of this test's own
(a transient TCG domain, ``metrics-…``, removed afterwards) appears running, with its CPU time
growing from one sample to the next; another user sees none of it."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lab.conftest import LAB_AGENT_NETWORKS, Lab, register
from tests.support import Server

pytestmark = [pytest.mark.lab, pytest.mark.e2e]


@pytest.fixture(scope="module")
def portal(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One worker, hosts asked at most once a second (the default is 10 s)."""
    server = Server(tmp_path_factory.mktemp("metrics-lab"), MANAGEMENT_WORKERS="1", MANAGEMENT_SIGNUP="open",
                    MANAGEMENT_SSH_CONNECT_TIMEOUT="5", MANAGEMENT_METRICS_MIN_INTERVAL="1",
                    MANAGEMENT_AGENT_NETWORKS=LAB_AGENT_NETWORKS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guest(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running transient guest of this module (the lab's kernel and initrd, no disk)."""
    template = lab.virsh("dumpxml", "lab-guest1").stdout
    kernel = re.search(r"<kernel>([^<]+)</kernel>", template)
    initrd = re.search(r"<initrd>([^<]+)</initrd>", template)
    assert kernel and initrd, template
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("metrics-guest")
    workdir.chmod(0o755)
    xml = Path(workdir / f"{name}.xml")
    xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>96</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel.group(1)}</kernel>
    <initrd>{initrd.group(1)}</initrd><cmdline>console=ttyS0 quiet loglevel=3</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><controller type='usb' model='none'/>
    <memballoon model='none'/></devices>
</domain>
""")
    created = lab.virsh("create", str(xml))
    assert created.returncode == 0, created.stderr
    try:
        yield name
    finally:
        lab.virsh("destroy", name)


def scrape(portal: Server, key: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    request = urllib.request.Request(f"http://127.0.0.1:{portal.port}/metrics/vms",
                                     headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series = (sample.name, tuple(sorted(sample.labels.items())))
            assert series not in found, f"{series} given twice"
            found[series] = sample.value
    return found


def of(found: dict[Any, float], name: str, **labels: str) -> float | None:
    for (series, pairs), number in found.items():
        if series == name and all(dict(pairs).get(k) == v for k, v in labels.items()):
            return number
    return None


def sign_up(portal: Server, name: str) -> str:
    status, user, _ = portal.request("POST", "/users", body={"name": name})
    assert status == 201, user
    return str(user["api_key"])


def test_the_running_guest_appears_with_its_cpu_time_growing(portal: Server, lab: Lab, guest: str) -> None:
    key = sign_up(portal, "metrics-lab")
    agent = register(portal, key, lab)
    first = scrape(portal, key)
    agent_id = str(agent["id"])
    assert of(first, "playr_agent_up", agent_id=agent_id) == 1
    assert of(first, "playr_vm_state", agent_id=agent_id, vm=guest, state="running") == 1
    assert (of(first, "playr_agent_cpus", agent_id=agent_id) or 0) >= 1
    start = of(first, "playr_vm_cpu_seconds_total", agent_id=agent_id, vm=guest)
    assert start is not None
    deadline = time.monotonic() + 60
    while True:  # the next sample comes once the 1 s interval has passed
        later = of(scrape(portal, key), "playr_vm_cpu_seconds_total", agent_id=agent_id, vm=guest)
        if later is not None and later > start:
            break
        assert time.monotonic() < deadline, f"CPU time of {guest} stayed at {start}"
        time.sleep(0.2)  # polling a condition with a bound

    other = sign_up(portal, "metrics-lab-other")
    assert not [series for series in scrape(portal, other) if series[0].startswith("playr_")]
