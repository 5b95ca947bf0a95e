"""Webhooks end to end (issue 18): ``python main.py`` (gunicorn, two workers, each running the
delivery worker) posts to a real receiver on loopback (allowed by MANAGEMENT_WEBHOOK_ALLOW).
Events come from the portal's own VM actions: an agent whose port is closed makes each start an
``action.start`` event with its error, no lab needed.

- deliveries are signed and verify with the receiver snippet from docs/events.md;
- a receiver that fails three times then succeeds gets the event once per attempt (four), each with
  the same ``X-Playr-Delivery`` id and body, and ``GET /webhooks/{id}/deliveries`` shows the answers;
- a portal stopped while its receiver is down, with deliveries pending, delivers every one of them
  once it is started again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import KeyMaterial, Server, free_port
from tests.webhook_receiver import Received, Receiver

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"MANAGEMENT_WORKERS": "2", "MANAGEMENT_WEBHOOK_ALLOW": "127.0.0.0/8",
            "MANAGEMENT_WEBHOOK_RETRY_BASE": "0.2", "MANAGEMENT_WEBHOOK_MAX_ATTEMPTS": "30"}


def documented_verify() -> Callable[..., bool]:
    """The receiver's verification snippet of docs/events.md, run as written."""
    text = (REPO / "docs" / "events.md").read_text()
    [snippet] = re.findall(r"<!-- verification snippet -->\n```python\n(.*?)```", text, re.S)
    scope: dict[str, Any] = {}
    exec(compile(snippet, "docs/events.md", "exec"), scope)
    verify: Callable[..., bool] = scope["verify"]
    return verify


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path, **SETTINGS).start()
    yield server
    server.stop()


def user_with_agent(server: Server, keys: KeyMaterial) -> tuple[str, int]:
    """A user and an agent on a closed loopback port (every VM action fails: an event with its error)."""
    status, user, _ = server.request("POST", "/users", body={"name": "alice"})
    assert status == 201, user
    status, agent, _ = server.request("POST", "/agents", user["api_key"], {
        "name": "closed", "hostname": "127.0.0.1", "port": free_port(), "username": "nobody",
        "private_key": keys.openssh, "host_key": keys.host_key})
    assert status == 201, agent
    return str(user["api_key"]), int(agent["id"])


def start_vm(server: Server, key: str, agent_id: int, vm: str) -> None:
    status, body, _ = server.request("POST", f"/agents/{agent_id}/vms/{vm}/start", key)
    assert status in (502, 504), body  # the host cannot be reached: the attempt is still an event


def webhook(server: Server, key: str, url: str) -> dict[str, Any]:
    status, created, _ = server.request("POST", "/webhooks", key, {"url": url, "events": ["action.*"]})
    assert status == 201, created
    return dict(created)


def deliveries(server: Server, key: str, webhook_id: int) -> list[dict[str, Any]]:
    status, found, _ = server.request("GET", f"/webhooks/{webhook_id}/deliveries?limit=100", key)
    assert status == 200, found
    return list(found)


def until(condition: Callable[[], Any], within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.1)  # polling the portal for a condition, with a deadline


def test_a_receiver_gets_signed_deliveries_that_verify(server: Server, keys: KeyMaterial) -> None:
    key, agent_id = user_with_agent(server, keys)
    verify = documented_verify()
    with Receiver() as receiver:
        hook = webhook(server, key, receiver.url)
        start_vm(server, key, agent_id, "web1")
        [request] = receiver.wait_for(lambda seen: len(seen) >= 1)
        event = json.loads(request.body)
        assert event["type"] == "action.start" and event["vm"] == "web1" and event["agent_id"] == agent_id
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["X-Playr-Event"] == "action.start"
        assert verify(hook["secret"], request.headers["X-Playr-Signature"], request.body)
        assert not verify(hook["secret"], request.headers["X-Playr-Signature"], request.body + b" ")
        assert not verify("whsec_another", request.headers["X-Playr-Signature"], request.body)
        [delivery] = until(lambda: [d for d in deliveries(server, key, hook["id"]) if d["status"] == "delivered"])
        assert str(delivery["id"]) == request.headers["X-Playr-Delivery"] and delivery["event_id"] == event["id"]
        assert [(a["number"], a["status_code"]) for a in delivery["attempts"]] == [(1, 200)]
        assert delivery["attempts"][0]["response"] == "thanks"
    # the same through the HTTP client and the command line, from anywhere
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("MANAGEMENT_")},
                   "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(server.workdir),
                   "MANAGEMENT_URL": f"http://127.0.0.1:{server.port}", "MANAGEMENT_API_KEY": key}
    shown = subprocess.run([sys.executable, "-m", "entrypoints.cli", "webhooks", "deliveries", str(hook["id"]),
                            "--json"], capture_output=True, text=True, env=environment, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert [d["status"] for d in json.loads(shown.stdout)] == ["delivered"]
    listed = subprocess.run([sys.executable, "-m", "entrypoints.cli", "webhooks", "list"], capture_output=True,
                            text=True, env=environment, timeout=60)
    assert listed.returncode == 0 and receiver.url in listed.stdout and hook["secret"] not in listed.stdout


def test_a_receiver_failing_three_times_gets_the_event_once_per_attempt_with_one_idempotency_id(
        server: Server, keys: KeyMaterial) -> None:
    key, agent_id = user_with_agent(server, keys)
    verify = documented_verify()
    with Receiver(fail_first=3) as receiver:
        hook = webhook(server, key, receiver.url)
        start_vm(server, key, agent_id, "web1")
        [delivery] = until(lambda: [d for d in deliveries(server, key, hook["id"]) if d["status"] == "delivered"])
        seen: list[Received] = list(receiver.requests)
    assert len(seen) == 4
    assert {r.headers["X-Playr-Delivery"] for r in seen} == {str(delivery["id"])}
    assert len({r.body for r in seen}) == 1
    assert all(verify(hook["secret"], r.headers["X-Playr-Signature"], r.body) for r in seen)
    assert [(a["number"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 500), (3, 500), (4, 200)]
    assert delivery["attempts"][0]["error"] == "the receiver answered 500"
    assert delivery["attempts"][0]["response"] == "not now"
    gaps = [later["at"] > earlier["at"] for earlier, later in zip(delivery["attempts"], delivery["attempts"][1:],
                                                                  strict=False)]
    assert all(gaps)


def test_pending_deliveries_survive_a_restart_and_are_all_delivered(server: Server, keys: KeyMaterial) -> None:
    key, agent_id = user_with_agent(server, keys)
    port = free_port()  # the receiver is down: nothing listens here yet
    hook = webhook(server, key, f"http://127.0.0.1:{port}/hook")
    for vm in ("web1", "web2", "web3"):
        start_vm(server, key, agent_id, vm)

    def all_attempted() -> list[dict[str, Any]] | None:
        found = [d for d in deliveries(server, key, hook["id"]) if d["attempts"]]
        return found if len(found) == 3 else None

    pending = until(all_attempted)
    assert all(d["status"] == "pending" and d["attempts"][0]["status_code"] is None for d in pending)
    server.stop()
    with Receiver(port=port) as receiver:
        server.start()
        seen = receiver.wait_for(lambda got: len({r.headers["X-Playr-Delivery"] for r in got}) == 3, within=60)
        done = until(lambda: all(d["status"] == "delivered" for d in deliveries(server, key, hook["id"])))
    assert done
    assert {r.headers["X-Playr-Delivery"] for r in seen} == {str(d["id"]) for d in pending}
    assert sorted(json.loads(r.body)["vm"] for r in seen) == ["web1", "web2", "web3"]


@pytest.mark.postgres
def test_two_instances_on_postgresql_deliver_each_event_once(postgres_url: str, tmp_path: Path,
                                                             keys: KeyMaterial) -> None:
    """Two instances with two workers each (four delivery workers) share one outbox: every event
    reaches a healthy receiver exactly once (no row attempted by two workers)."""
    from entrypoints.bootstrap import new_secret_key

    env = {**SETTINGS, "MANAGEMENT_DATABASE_URL": postgres_url, "MANAGEMENT_SECRET_KEY": new_secret_key()}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Server(tmp_path / "a", **env)
    b = Server(tmp_path / "b", **env)
    a.start()
    try:
        b.start()
        try:
            key, agent_id = user_with_agent(a, keys)
            with Receiver() as receiver:
                hook = webhook(b, key, receiver.url)
                for n in range(16):
                    start_vm(a if n % 2 else b, key, agent_id, f"web{n}")
                until(lambda: len([d for d in deliveries(a, key, hook["id"]) if d["status"] == "delivered"]) == 16,
                      within=60)
                seen = list(receiver.requests)
        finally:
            b.stop()
    finally:
        a.stop()
    ids = [r.headers["X-Playr-Delivery"] for r in seen]
    assert len(ids) == 16 and len(set(ids)) == 16
    assert sorted(json.loads(r.body)["vm"] for r in seen) == sorted(f"web{n}" for n in range(16))
