"""The simulated fleet (tests/simulator.py) is a faithful double of a real host: the lab's VM
scenarios (list, dominfo, start, suspend/resume, shutdown, force-stop, snapshots, autostart, stats,
host facts, the agent check, the fleet view, and the errors for an unknown VM, a running or a
stopped one) run through the portal against the lab and against a simulated host give the same
answers, once what differs between any two hosts (UUIDs, domain ids, times, counters, host names
and keys) is normalised.

The lab side uses a guest of its own, ``sim-fidelity`` (a copy of lab-disk's definition with a
qcow2 disk of its own), defined here and removed afterwards: other tests keep the lab's guests.

Events (issue 18's watchers, issue 22's simulator): ``virsh event --all --loop --timestamp`` read
over SSH from the lab and from a simulated host while the same VM actions run through the portal on
a guest of that test's own (``fm-events``, defined and undefined while the streams read) must print
the same lines once their times are normalised."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.lab.conftest import Lab, register
from tests.simulator import SimDomain, SimulatedFleet, ThreadedFleet
from tests.support import Server

pytestmark = pytest.mark.lab

GUEST = "sim-fidelity"
STATE_DIR = Path("/var/tmp/playr-lab")


def _remove_guest(lab: Lab) -> None:
    lab.virsh("destroy", "--domain", GUEST)
    lab.virsh("undefine", "--domain", GUEST, "--snapshots-metadata")
    (STATE_DIR / f"{GUEST}.qcow2").unlink(missing_ok=True)
    (STATE_DIR / f"console-{GUEST}.log").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def lab_guest(lab: Lab) -> Iterator[str]:
    """``sim-fidelity`` on the lab: lab-disk's definition under another name, disk and console."""
    _remove_guest(lab)  # left over by an interrupted run
    source = lab.virsh("dumpxml", "lab-disk")
    assert source.returncode == 0, source.stderr
    xml = re.sub(r"\s*<uuid>[^<]*</uuid>", "", source.stdout.replace("lab-disk", GUEST))
    xml = re.sub(r"\s*<address [^>]*/>", "", xml)
    disk = STATE_DIR / f"{GUEST}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, timeout=60)
    definition = STATE_DIR / f"{GUEST}.xml"
    definition.write_text(xml)
    defined = lab.virsh("define", "--file", str(definition))
    assert defined.returncode == 0, defined.stderr
    yield GUEST
    _remove_guest(lab)
    definition.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def fleet() -> Iterator[SimulatedFleet]:
    """One simulated host holding the same guest (shut off, a qcow2 disk, 128 MiB, 1 vCPU)."""
    threaded = ThreadedFleet(1, latency=0.005, domains_per_host=0, shutdown_delay=0.3)
    fleet = threaded.start()
    fleet.hosts[0].state.add_domain(SimDomain(GUEST, disk=f"/var/tmp/playr-lab/{GUEST}.qcow2"))
    yield fleet
    threaded.stop()


# ---------------------------------------------------------------------- the scenario

Call = Callable[..., tuple[int, Any]]


def scenario(call: Call, agent_id: int, ready: Callable[[], None]) -> list[tuple[str, int, Any]]:
    """Every step's (name, status, answer) for one agent holding ``sim-fidelity``, shut off,
    without snapshots or autostart; it is left shut off again, without snapshots."""
    vm = f"/agents/{agent_id}/vms/{quote(GUEST)}"
    unknown = f"/agents/{agent_id}/vms/sim-nope"
    steps: list[tuple[str, int, Any]] = []

    def step(name: str, method: str, path: str, body: Any = None, keep: Callable[[Any], Any] = lambda a: a) -> None:
        status, answer = call(method, path, body)
        steps.append((name, status, keep(answer) if status < 300 else answer))

    def ours(answer: Any) -> Any:  # the lab's host has other guests (other tests' and the lab's own)
        return [vm for vm in answer if vm["name"] == GUEST]

    def ours_in_fleet(answer: Any) -> Any:
        return [{**entry, "vms": ours(entry["vms"])} for entry in answer]

    step("list, shut off", "GET", f"/agents/{agent_id}/vms", keep=ours)
    step("dominfo, shut off", "GET", vm)
    step("dominfo of an unknown VM", "GET", unknown)
    step("start an unknown VM", "POST", f"{unknown}/start")
    step("snapshots of an unknown VM", "GET", f"{unknown}/snapshots")
    step("shutdown, shut off", "POST", f"{vm}/shutdown")
    step("force-stop, shut off", "POST", f"{vm}/force-stop")
    step("suspend, shut off", "POST", f"{vm}/suspend")
    step("resume, shut off", "POST", f"{vm}/resume")
    step("stats, shut off", "GET", f"{vm}/stats")
    step("no snapshots", "GET", f"{vm}/snapshots")
    step("take s1", "POST", f"{vm}/snapshots", {"name": "s1", "description": "first one"})
    step("s1 again", "POST", f"{vm}/snapshots", {"name": "s1"})
    step("take s2", "POST", f"{vm}/snapshots", {"name": "s2"})
    step("two snapshots", "GET", f"{vm}/snapshots")
    step("revert to s1", "POST", f"{vm}/snapshots/s1/revert")
    step("revert to an unknown snapshot", "POST", f"{vm}/snapshots/zz/revert")
    step("delete s2", "DELETE", f"{vm}/snapshots/s2")
    step("delete an unknown snapshot", "DELETE", f"{vm}/snapshots/zz")
    step("one snapshot", "GET", f"{vm}/snapshots")
    step("autostart on", "PUT", f"{vm}/autostart", {"enabled": True})
    step("dominfo, autostart", "GET", vm)
    step("autostart off", "PUT", f"{vm}/autostart", {"enabled": False})
    step("start, waiting", "POST", f"{vm}/start?wait=30")
    step("start, running", "POST", f"{vm}/start")
    step("resume, running", "POST", f"{vm}/resume")
    step("list, running", "GET", f"{vm.rsplit('/', 1)[0]}", keep=ours)
    step("dominfo, running", "GET", vm)
    step("stats, running", "GET", f"{vm}/stats")
    step("suspend, waiting", "POST", f"{vm}/suspend?wait=10")
    step("dominfo, paused", "GET", vm)
    step("fleet view, paused", "GET", f"/vms?agent={agent_id}", keep=ours_in_fleet)
    step("resume, waiting", "POST", f"{vm}/resume?wait=10")
    ready()
    step("shutdown, waiting", "POST", f"{vm}/shutdown?wait=30")
    step("force-stop, shut off again", "POST", f"{vm}/force-stop")
    step("start, no wait", "POST", f"{vm}/start")
    step("force-stop, running", "POST", f"{vm}/force-stop?wait=10")
    step("delete s1", "DELETE", f"{vm}/snapshots/s1")
    step("host facts", "GET", f"/agents/{agent_id}/host")
    step("agent check", "POST", f"/agents/{agent_id}/check")
    return steps


# What differs between any two hosts, or two runs on one host.
_VARIABLE_KEYS = {"uuid", "created_at", "observed_at", "waited_seconds", "round_trip_ms", "host_key_fingerprint",
                  "hostname",
                  "time_ns", "user_ns", "system_ns", "rss_kib", "cpu_mhz", "memory_kib", "cpus", "cores_per_socket",
                  "instance", "agent_id", "agent", "id", "read_requests", "read_bytes", "allocation", "physical",
                  "request_id", "path", "cpu_time_seconds", "cpu_time", "agent_name"}
_VARIABLE_TEXT = [(re.compile(r"UUID:\s+\S+"), "UUID: <uuid>"), (re.compile(r"CPU time:\s+\S+"), "CPU time: <t>"),
                  (re.compile(r"^Id:\s+\d+", re.M), "Id: <id>"), (re.compile(r"/agents/\d+"), "/agents/<id>"),
                  (re.compile(r"(?<==)\d+"), "<n>")]


def normalise(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        if "fields" in value and isinstance(value["fields"], dict):  # domstats: the same keys
            value = {**value, "fields": sorted(value["fields"])}
        return {k: normalise(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, key) for v in value]
    if key in _VARIABLE_KEYS and value is not None:
        return f"<{key}>"
    if isinstance(value, str):
        for pattern, replacement in _VARIABLE_TEXT:
            value = pattern.sub(replacement, value)
    return value


def test_the_simulator_answers_the_portal_as_the_lab_does(portal: Server, api_key: str, lab: Lab, lab_guest: str,
                                                         fleet: SimulatedFleet) -> None:
    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, answer, _ = portal.request(method, path, api_key, body)
        return status, answer

    real = register(portal, api_key, lab, name="fidelity-lab")
    host = fleet.hosts[0]
    simulated = register(portal, api_key, lab, name="fidelity-sim", port=host.port, username=fleet.username,
                         private_key=fleet.client_private_key, host_key=host.host_key)

    on_lab = scenario(call, real["id"], lambda: lab.wait_ready(GUEST))
    on_simulator = scenario(call, simulated["id"], lambda: None)

    assert [name for name, _, _ in on_lab] == [name for name, _, _ in on_simulator]
    differences = [(name, (lab_status, normalise(lab_answer)), (sim_status, normalise(sim_answer)))
                   for (name, lab_status, lab_answer), (_, sim_status, sim_answer) in zip(on_lab, on_simulator,
                                                                                          strict=True)
                   if (lab_status, normalise(lab_answer)) != (sim_status, normalise(sim_answer))]
    assert differences == [], "\n".join(f"{n}:\n  lab {a}\n  sim {b}" for n, a, b in differences)
    # The scenario did reach the simulated host, and what it saw ends as the lab's guest ends.
    assert host.commands_run >= len(on_simulator)
    assert host.state.domains[GUEST].state == "shut off" and not host.state.domains[GUEST].snapshots


# ---------------------------------------------------------------------- events (issue 18's watchers)

EVENT_GUEST = "fm-events"  # a guest of this test's own, defined and undefined while the streams read
EVENT_COMMAND = "virsh --connect qemu:///system event --all --loop --timestamp"
_EVENT_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\+0000: ")


class EventReader:
    """``virsh event --all --loop --timestamp`` run over SSH (OpenSSH's client) on a host, its lines
    for one guest collected in a thread as they come."""

    def __init__(self, port: int, user: str, key: Path, guest: str) -> None:
        self.guest = guest
        self.lines: list[str] = []
        self.other_lines = 0
        self.process = subprocess.Popen(
            ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"{user}@127.0.0.1", EVENT_COMMAND],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if f" for domain '{self.guest}'" in line:
                self.lines.append(line.rstrip("\n"))
            else:
                self.other_lines += 1

    def normalised(self) -> list[str]:
        for line in self.lines:
            assert _EVENT_TIME.match(line), line  # every line has the host's time, as the lab prints it
        return [_EVENT_TIME.sub("<time>: ", line) for line in self.lines]

    def wait_for(self, last: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lines and self.lines[-1].endswith(last):
                return
            time.sleep(0.05)  # polling another process's output with a deadline
        raise AssertionError(f"no {last!r} event within {timeout:g} s: {self.lines}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def wait_until_listening(reader: EventReader, listening: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20
    while not listening():
        assert reader.process.poll() is None, reader.process.stderr.read() if reader.process.stderr else ""
        assert time.monotonic() < deadline, "the event stream did not open"
        time.sleep(0.05)


def event_scenario(call: Call, agent_id: int, ready: Callable[[], None]) -> None:
    """VM actions through the portal on ``fm-events`` (shut off, no snapshot), left shut off."""
    vm = f"/agents/{agent_id}/vms/{quote(EVENT_GUEST)}"
    for method, path, body in [("POST", f"{vm}/start?wait=30", None), ("POST", f"{vm}/suspend?wait=10", None),
                               ("POST", f"{vm}/suspend", None), ("POST", f"{vm}/resume?wait=10", None)]:
        status, answer = call(method, path, body)
        assert status < 300, (path, answer)
    ready()
    for method, path, body in [("POST", f"{vm}/shutdown?wait=30", None),
                               ("POST", f"{vm}/snapshots", {"name": "s1"}), ("POST", f"{vm}/start?wait=30", None),
                               ("POST", f"{vm}/snapshots/s1/revert", None), ("POST", f"{vm}/start?wait=30", None),
                               ("POST", f"{vm}/suspend?wait=10", None), ("POST", f"{vm}/force-stop?wait=10", None),
                               ("DELETE", f"{vm}/snapshots/s1", None)]:
        status, answer = call(method, path, body)
        assert status < 300, (path, answer)


def _lab_event_guest_xml(lab: Lab) -> Path:
    source = lab.virsh("dumpxml", "lab-disk")
    assert source.returncode == 0, source.stderr
    xml = re.sub(r"\s*<uuid>[^<]*</uuid>", "", source.stdout.replace("lab-disk", EVENT_GUEST))
    definition = STATE_DIR / f"{EVENT_GUEST}.xml"
    definition.write_text(re.sub(r"\s*<address [^>]*/>", "", xml))
    return definition


def _remove_event_guest(lab: Lab) -> None:
    lab.virsh("destroy", "--domain", EVENT_GUEST)
    lab.virsh("undefine", "--domain", EVENT_GUEST, "--snapshots-metadata")
    for leftover in (f"{EVENT_GUEST}.qcow2", f"console-{EVENT_GUEST}.log", f"{EVENT_GUEST}.xml"):
        (STATE_DIR / leftover).unlink(missing_ok=True)


def test_the_simulator_streams_the_events_the_lab_streams_for_the_same_scenario(
        portal: Server, api_key: str, lab: Lab, tmp_path: Path) -> None:
    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, answer, _ = portal.request(method, path, api_key, body)
        return status, answer

    threaded = ThreadedFleet(1, latency=0.005, domains_per_host=0, shutdown_delay=0.3)
    fleet = threaded.start()
    host = fleet.hosts[0]
    sim_key = tmp_path / "sim-key"
    sim_key.write_text(fleet.client_private_key)
    sim_key.chmod(0o600)
    _remove_event_guest(lab)  # left over by an interrupted run
    streams_before = _lab_streams(lab)
    on_lab = EventReader(lab.port, lab.user, lab.key_path, EVENT_GUEST)
    on_simulator = EventReader(host.port, fleet.username, sim_key, EVENT_GUEST)
    try:
        wait_until_listening(on_simulator, lambda: host.state.listeners == 1)
        # The lab's stream is open once one more ``virsh event`` of the lab's user runs on the host
        # (other portals' watchers run some too).
        wait_until_listening(on_lab, lambda: _lab_streams(lab) > streams_before)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(STATE_DIR / f"{EVENT_GUEST}.qcow2"), "16M"],
                       check=True, timeout=60)
        defined = lab.virsh("define", "--file", str(_lab_event_guest_xml(lab)))
        assert defined.returncode == 0, defined.stderr
        threaded.call(_define(fleet, SimDomain(EVENT_GUEST, disk=f"/var/tmp/playr-lab/{EVENT_GUEST}.qcow2")))

        real = register(portal, api_key, lab, name="events-lab")
        simulated = register(portal, api_key, lab, name="events-sim", port=host.port, username=fleet.username,
                             private_key=fleet.client_private_key, host_key=host.host_key)
        event_scenario(call, real["id"], lambda: lab.wait_ready(EVENT_GUEST))
        event_scenario(call, simulated["id"], lambda: None)

        assert lab.virsh("undefine", "--domain", EVENT_GUEST).returncode == 0
        threaded.on_host(0, f"virsh undefine --domain {EVENT_GUEST}")
        on_lab.wait_for("Undefined Removed")
        on_simulator.wait_for("Undefined Removed")
    finally:
        on_lab.stop()
        on_simulator.stop()
        _remove_event_guest(lab)

    assert on_simulator.normalised() == on_lab.normalised()
    lifecycle = f"<time>: event 'lifecycle' for domain '{EVENT_GUEST}': "
    assert on_lab.normalised()[:3] == [lifecycle + "Defined Added", lifecycle + "Resumed Unpaused",
                                       lifecycle + "Started Booted"]
    # The simulated stream ended with its channel.
    deadline = time.monotonic() + 10
    while host.state.listeners and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.state.listeners == 0
    threaded.stop()


def _lab_streams(lab: Lab) -> int:
    """How many ``virsh event`` of the lab's user run on the lab host."""
    found = subprocess.run(["pgrep", "-c", "-u", lab.user, "-f", "^virsh --connect qemu:///system event"],
                           capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


async def _define(fleet: SimulatedFleet, domain: SimDomain) -> None:
    fleet.hosts[0].state.define(domain)
