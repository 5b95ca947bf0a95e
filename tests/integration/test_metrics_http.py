"""GET /metrics and GET /metrics/vms through the real app (issue 21): the portal's own metrics are
valid Prometheus text, guarded (loopback without a proxy, or the operator's token), and count what
happened; the fleet's metrics need an API key, show only the caller's agents, and a dead host is
``playr_agent_up 0``. The remote shell is scripted; the storage and the Prometheus adapter are real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.memory import ScriptedShell
from core import virsh
from core.errors import AgentUnreachable
from core.ports import CommandResult
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from tests.support import Api, KeyMaterial, assert_problem, make_settings, portal_client

URI = "qemu:///system"
TOKEN = "t" * 40
DOMSTATS = ("Domain: 'web1'\n  state.state=1\n  state.reason=1\n  cpu.time=1500000000\n  vcpu.current=1\n"
            "  vcpu.maximum=2\n  balloon.current=131072\n  balloon.maximum=131072\n  block.count=1\n"
            "  block.0.name=vda\n  block.0.rd.bytes=100\n  block.0.wr.bytes=200\n  block.0.rd.reqs=1\n"
            "  block.0.wr.reqs=2\n  net.count=1\n  net.0.name=vnet0\n  net.0.rx.bytes=10\n  net.0.tx.bytes=20\n"
            "  net.0.rx.pkts=1\n  net.0.tx.pkts=2\n\nDomain: 'web2'\n  state.state=5\n")


class Shell(ScriptedShell):
    def __init__(self) -> None:
        super().__init__()
        self.dead: set[int] = set()

    async def run(self, target: Any, argv: Any, *, pin: Any = None, stdin: bytes | None = None) -> CommandResult:
        if target.agent.id in self.dead:
            raise AgentUnreachable(f"{target.agent.hostname}:{target.agent.port} refused the connection")
        return await super().run(target, argv, pin=pin)


@pytest.fixture
def shell() -> Shell:
    shell = Shell()
    command = virsh.host_stats_command(URI)
    shell.results[command] = CommandResult(command=command, exit_status=0, stdout=DOMSTATS, stderr="")
    return shell


@pytest.fixture
def client(tmp_path: Path, shell: Shell) -> Iterator[Api]:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_METRICS_TOKEN=TOKEN,
                                                           MANAGEMENT_SIGNUP="open"), shell=shell)
    yield Api(portal_client(create_app(runtime)))
    runtime.close()


@pytest.fixture
def key(client: Api) -> str:
    return str(client.sign_up()["api_key"])


def add_agent(client: Api, key: str, keys: KeyMaterial, name: str = "hv1") -> dict[str, Any]:
    result = client.call("POST", "/agents", key, json=client.agent_body(keys, name=name, host_key=keys.host_key))
    assert result.status_code == 201, result.text
    return dict(result.json)


def parse(text: str) -> dict[str, Any]:
    """Families by name; fails on a family declared twice or a series given twice."""
    found: dict[str, Any] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for family in text_string_to_metric_families(text):
        assert family.name not in found, f"{family.name} declared twice"
        found[family.name] = family
        for sample in family.samples:
            series = (sample.name, tuple(sorted(sample.labels.items())))
            assert series not in seen, f"{series} given twice"
            seen.add(series)
    return found


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    return sum(s.value for family in families.values() for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---------------------------------------------------------------------------------------- GET /metrics


def test_portal_metrics_count_requests_by_route_template_method_and_status(client: Api, key: str,
                                                                           keys: KeyMaterial) -> None:
    agent = add_agent(client, key, keys)
    for _ in range(3):
        assert client.call("GET", f"/agents/{agent['id']}", key).status_code == 200
    assert client.call("GET", "/agents/999", key).status_code == 404
    result = client.call("GET", "/metrics")
    assert result.status_code == 200, result.text
    assert result.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = parse(result.text)
    assert found["playr_portal_http_requests"].type == "counter"
    assert found["playr_portal_http_request_duration_seconds"].type == "histogram"
    assert value(found, "playr_portal_http_requests_total", route="/agents/{agent_id}", method="GET",
                 status="200") == 3
    assert value(found, "playr_portal_http_requests_total", route="/agents/{agent_id}", status="404") == 1
    assert value(found, "playr_portal_http_request_duration_seconds_count", route="/agents/{agent_id}") == 4
    assert value(found, "playr_portal_database_transaction_duration_seconds_count", kind="write",
                 outcome="committed") >= 2
    assert value(found, "playr_portal_build_info", multiprocess="false") == 1
    assert "/agents/999" not in result.text and f"/agents/{agent['id']}" not in result.text


def test_portal_metrics_name_no_user_agent_or_raw_path(client: Api, key: str, keys: KeyMaterial) -> None:
    add_agent(client, key, keys, name="secret-agent-name")
    client.call("GET", "/no/such/path/secret-path")
    text = client.call("GET", "/metrics").text
    assert "secret-agent-name" not in text and "secret-path" not in text and key not in text
    assert value(parse(text), "playr_portal_http_requests_total", route="unmatched", status="404") == 1


def test_authentication_failures_and_rate_limited_requests_are_counted(tmp_path: Path, shell: Shell) -> None:
    settings = make_settings(tmp_path, MANAGEMENT_AUTH_FAILURE_LIMIT="2")
    runtime = bootstrap.build_runtime(settings, shell=shell)
    client = Api(portal_client(create_app(runtime)))
    try:
        client.call("GET", "/agents")
        client.call("GET", "/agents", "mgmt_000000000000_" + "x" * 43)
        assert client.call("GET", "/agents", "wrong").status_code == 429
        found = parse(client.call("GET", "/metrics").text)
    finally:
        runtime.close()
    assert value(found, "playr_portal_authentication_failures_total", reason="missing_api_key") == 1
    assert value(found, "playr_portal_authentication_failures_total", reason="invalid_api_key") == 2
    assert value(found, "playr_portal_rate_limited_requests_total") == 1


@pytest.mark.parametrize("remote_addr, headers", [
    ("192.0.2.10", {}),                                   # not loopback
    ("127.0.0.1", {"X-Forwarded-For": "192.0.2.10"}),   # loopback, but relayed by a proxy
    ("127.0.0.1", {"X-Real-IP": "192.0.2.10"}),
    ("127.0.0.1", {"Authorization": "Bearer " + "u" * 40}),  # a wrong token, even from loopback
    ("192.0.2.10", {"Authorization": "Basic " + TOKEN}),
])
def test_portal_metrics_are_refused_to_anyone_else(client: Api, remote_addr: str, headers: dict[str, str]) -> None:
    result = client.client.simulate_get("/metrics", remote_addr=remote_addr, headers=headers)
    assert_problem(result, 403, "metrics_forbidden")


def test_portal_metrics_are_served_anywhere_with_the_token(client: Api) -> None:
    result = client.client.simulate_get("/metrics", remote_addr="192.0.2.10",
                                        headers={"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "192.0.2.10"})
    assert result.status_code == 200
    parse(result.text)


def test_without_a_token_configured_no_bearer_opens_the_metrics(tmp_path: Path, shell: Shell) -> None:
    runtime = bootstrap.build_runtime(make_settings(tmp_path), shell=shell)
    client = portal_client(create_app(runtime))
    try:
        result = client.simulate_get("/metrics", remote_addr="192.0.2.10", headers={"Authorization": "Bearer "})
        assert_problem(result, 403, "metrics_forbidden")
    finally:
        runtime.close()


# ---------------------------------------------------------------------------------------- GET /metrics/vms


def test_fleet_metrics_need_an_api_key(client: Api) -> None:
    assert_problem(client.call("GET", "/metrics/vms"), 401, "missing_api_key")


def test_fleet_metrics_are_the_callers_fleet_in_prometheus_text(client: Api, key: str, keys: KeyMaterial) -> None:
    agent = add_agent(client, key, keys)
    result = client.call("GET", "/metrics/vms", key)
    assert result.status_code == 200, result.text
    assert result.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = parse(result.text)
    labels = {"agent": "hv1", "agent_id": str(agent["id"]), "vm": "web1"}
    assert value(found, "playr_agent_up", agent_id=str(agent["id"])) == 1
    assert value(found, "playr_vm_cpu_seconds_total", **labels) == 1.5
    assert value(found, "playr_vm_block_written_bytes_total", disk="vda", **labels) == 200
    assert value(found, "playr_vm_network_transmit_packets_total", interface="vnet0", **labels) == 2
    assert value(found, "playr_vm_state", state="shut off", vm="web2") == 1
    assert found["playr_vm_cpu_seconds"].type == "counter" and found["playr_agent_up"].type == "gauge"


def test_a_second_user_sees_none_of_the_first_users_series(client: Api, key: str, keys: KeyMaterial,
                                                           shell: Shell) -> None:
    add_agent(client, key, keys)
    assert client.call("GET", "/metrics/vms", key).status_code == 200
    bob = client.sign_up("bob")
    result = client.call("GET", "/metrics/vms", bob["api_key"])
    assert result.status_code == 200
    text = result.text
    assert "playr_agent_up" not in text and "playr_vm_" not in text and "hv1" not in text


def test_an_unreachable_agent_is_up_zero_and_the_scrape_still_succeeds(client: Api, key: str, keys: KeyMaterial,
                                                                        shell: Shell) -> None:
    alive = add_agent(client, key, keys)
    dead = add_agent(client, key, keys, name="dead")
    shell.dead.add(dead["id"])
    result = client.call("GET", "/metrics/vms", key)
    assert result.status_code == 200
    found = parse(result.text)
    assert value(found, "playr_agent_up", agent_id=str(dead["id"])) == 0
    assert value(found, "playr_agent_error", agent_id=str(dead["id"]), code="agent_unreachable") == 1
    assert value(found, "playr_agent_up", agent_id=str(alive["id"])) == 1
    assert not [s for f in found.values() for s in f.samples
                if s.name.startswith("playr_vm_") and s.labels["agent_id"] == str(dead["id"])]


def test_both_metrics_routes_are_in_the_openapi_document_as_text(client: Api) -> None:
    paths = client.call("GET", "/openapi.json").json["paths"]
    for path in ("/metrics", "/metrics/vms"):
        content = paths[path]["get"]["responses"]["200"]["content"]
        assert list(content) == ["text/plain; version=0.0.4; charset=utf-8"]
    assert paths["/metrics"]["get"]["security"] == []
    assert "metrics_forbidden" in paths["/metrics"]["get"]["responses"]["403"]["description"]
