"""Live state and events on the lab (issue 18), end to end: the portal under gunicorn watches the
lab's libvirt over its real sshd; a VM started and destroyed directly with virsh on the host shows
up on the event stream and in the VM list served from the live mirror; killing the watcher's
``virsh event`` on the host is an outage event and a resync; on PostgreSQL two instances run one
watcher per agent and a stream on instance B carries what instance A's watcher saw.

The tests drive a VM of their own (``ev-live``, defined from the lab's kernel and initrd, removed
afterwards), never the shared lab guests."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from adapters.sealing import generate_key
from tests.lab.conftest import LAB_AGENT_NETWORKS, Lab, register
from tests.postgres import PostgresServer
from tests.support import Server

VM = "ev-live"
EVENT_COMMAND = "virsh --connect qemu:///system event --all --loop --timestamp"
DOMAIN_XML = f"""<domain type='qemu'><name>{VM}</name><description>issue 18 lab tests</description>
<memory unit='KiB'>131072</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type><kernel>/var/cache/playr-lab/vmlinuz</kernel>
<initrd>/var/cache/playr-lab/initrd.img</initrd><cmdline>console=ttyS0 quiet loglevel=3</cmdline></os>
<features><acpi/></features><on_poweroff>destroy</on_poweroff>
<devices><serial type='null'/><input type='mouse' bus='ps2'/></devices></domain>"""


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling an outside process's effect, not papering over a race
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last seen: {value!r})")


class StreamReader:
    """``GET /events/stream`` read in a thread: every event (parsed) as it arrives."""

    def __init__(self, server: Server, key: str, query: str = "") -> None:
        self.events: list[dict[str, Any]] = []
        self.url = f"http://127.0.0.1:{server.port}/events/stream{query}"
        self.key = key
        self.content_type = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with httpx.stream("GET", self.url, headers={"Authorization": f"Bearer {self.key}"},
                          timeout=httpx.Timeout(5, read=60)) as response:
            self.content_type = response.headers.get("content-type", "")
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))

    def seen(self, type_: str, vm: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_ and (vm is None or e["vm"] == vm)]

    def stop(self) -> None:
        self._stop.set()


def host_watchers() -> int:
    return len(subprocess.run(["pgrep", "-f", EVENT_COMMAND], capture_output=True, text=True).stdout.split())


@pytest.fixture(scope="module")
def own_vm(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    xml = tmp_path_factory.mktemp("ev") / "ev-live.xml"
    xml.write_text(DOMAIN_XML)
    lab.virsh("destroy", VM)
    lab.virsh("undefine", VM)
    defined = lab.virsh("define", str(xml))
    assert defined.returncode == 0, defined.stderr
    yield VM
    lab.virsh("destroy", VM)
    lab.virsh("undefine", VM)


@pytest.fixture(scope="module")
def live_portal(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("live"), MANAGEMENT_WORKERS="2", MANAGEMENT_SIGNUP="open",
                    MANAGEMENT_SSH_CONNECT_TIMEOUT="3", MANAGEMENT_SSH_COMMAND_TIMEOUT="30",
                    MANAGEMENT_AGENT_NETWORKS=LAB_AGENT_NETWORKS, MANAGEMENT_WATCHERS="true").start()
    yield server
    server.stop()


def list_vms(server: Server, key: str, agent: dict[str, Any], fresh: bool = False) -> list[dict[str, Any]]:
    status, vms, _ = server.request("GET", f"/agents/{agent['id']}/vms" + ("?fresh=true" if fresh else ""), key)
    assert status == 200, vms
    return list(vms)


def state_of(vms: list[dict[str, Any]], name: str) -> tuple[str, str] | None:
    return next(((vm["state"], vm["source"]) for vm in vms if vm["name"] == name), None)


def wait_listed(server: Server, key: str, agent: dict[str, Any], vm: str, expected: tuple[str, str]) -> None:
    """Until the agent's list says ``expected`` (state, source) for ``vm``; a time-out says what it said."""
    said: list[tuple[str, str] | None] = []

    def listed() -> bool:
        said.append(state_of(list_vms(server, key, agent), vm))
        return said[-1] == expected

    try:
        wait_for(listed, what=", ".join(expected))
    except AssertionError as error:
        raise AssertionError(f"{error}; the list said {sorted(set(map(str, said)))}") from None


def test_a_vm_started_and_destroyed_with_virsh_on_the_host_is_streamed_and_listed_live(
        lab: Lab, live_portal: Server, own_vm: str) -> None:
    status, user, _ = live_portal.request("POST", "/users", body={"name": "ev-operator"})
    key = user["api_key"]
    agent = register(live_portal, key, lab, name="ev-lab")
    # once the watcher is up, lists come from the mirror (nothing runs on the host)
    wait_listed(live_portal, key, agent, own_vm, ("shut off", "live"))
    stream = StreamReader(live_portal, key, f"?agent={agent['id']}")
    try:
        wait_for(lambda: stream.content_type, what="the stream to open")
        assert stream.content_type.startswith("text/event-stream")
        assert lab.virsh("start", own_vm).returncode == 0
        wait_for(lambda: stream.seen("vm.started", own_vm), what="vm.started on the stream")
        wait_listed(live_portal, key, agent, own_vm, ("running", "live"))
        assert state_of(list_vms(live_portal, key, agent, fresh=True), own_vm) == ("running", "host")
        assert lab.virsh("destroy", own_vm).returncode == 0
        wait_for(lambda: stream.seen("vm.stopped", own_vm), what="vm.stopped on the stream")
        wait_listed(live_portal, key, agent, own_vm, ("shut off", "live"))
        # the history has them too, in id order, filterable
        status, page, _ = live_portal.request("GET", f"/events?agent={agent['id']}&vm={own_vm}&type=vm.started", key)
        assert status == 200 and [e["type"] for e in page["events"]] and {e["type"] for e in page["events"]} == {
            "vm.started"}
        status, problem, _ = live_portal.request("GET", "/events?type=Started", key)
        assert status == 422, problem

        # the watcher's stream dies on the host: an outage event, then a reconnection with a resync
        subprocess.run(["pkill", "-f", EVENT_COMMAND], check=False)
        wait_for(lambda: stream.seen("agent.unreachable"), what="agent.unreachable on the stream")
        wait_for(lambda: [e for e in stream.seen("agent.watching") if "reconnected" in e["detail"]],
                 timeout=30, what="the watcher to reconnect and resync")
        wait_listed(live_portal, key, agent, own_vm, ("shut off", "live"))
        assert host_watchers() == 1  # two workers, one watcher
    finally:
        stream.stop()


@pytest.fixture(scope="module")
def pg_instances(postgres: PostgresServer, live_portal: Server, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[Server, Server]]:
    live_portal.stop()  # its watchers would count on the host too
    url = postgres.create_database()
    env = {"MANAGEMENT_DATABASE_URL": url, "MANAGEMENT_SECRET_KEY": generate_key(), "MANAGEMENT_SIGNUP": "open",
           "MANAGEMENT_WORKERS": "2", "MANAGEMENT_SSH_CONNECT_TIMEOUT": "3",
           "MANAGEMENT_AGENT_NETWORKS": LAB_AGENT_NETWORKS, "MANAGEMENT_WATCHERS": "true"}
    a = Server(tmp_path_factory.mktemp("pg-a"), **env).start()
    b = Server(tmp_path_factory.mktemp("pg-b"), **env).start()
    yield a, b
    a.stop()
    b.stop()
    postgres.drop_database(url)


def test_two_instances_on_postgresql_run_one_watcher_and_a_stream_on_b_sees_what_a_saw(
        lab: Lab, pg_instances: tuple[Server, Server], own_vm: str) -> None:
    a, b = pg_instances
    _, user, _ = a.request("POST", "/users", body={"name": "ev-pg"})
    key = user["api_key"]
    agent = register(a, key, lab, name="ev-pg-lab")
    wait_for(lambda: state_of(list_vms(b, key, agent), own_vm) == ("shut off", "live"), what="live list on B")
    stream = StreamReader(b, key)
    try:
        wait_for(lambda: stream.content_type, what="the stream to open")
        assert lab.virsh("start", own_vm).returncode == 0
        wait_for(lambda: stream.seen("vm.started", own_vm), what="vm.started on B's stream")
        assert lab.virsh("destroy", own_vm).returncode == 0
        wait_for(lambda: stream.seen("vm.stopped", own_vm), what="vm.stopped on B's stream")
        # (a watcher of the stopped SQLite portal exits on the host at the first event it cannot
        # deliver: sshd gives a command without a terminal no signal when its channel closes)
        wait_for(lambda: host_watchers() == 1, what="exactly one watcher on the host")
        with httpx.Client() as client:  # and exactly one lease holder in the database
            holders = {client.get(f"http://127.0.0.1:{server.port}/agents/{agent['id']}/vms",
                                  headers={"Authorization": f"Bearer {key}"}).json()[0]["source"]
                       for server in (a, b)}
        assert holders == {"live"}
    finally:
        stream.stop()


