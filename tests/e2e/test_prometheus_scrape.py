"""A real Prometheus (Debian's package, unpacked by ``scripts/prometheus.sh``) scrapes both
endpoints of a real portal for a few cycles (issue 21): the format as the consumer reads it. Its
``promtool`` also lints both expositions and checks the alert rules of docs/."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet_hypervisor import FleetHypervisor
from tests.support import REPO, Server, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    result = subprocess.run(["bash", str(REPO / "scripts" / "prometheus.sh"), "install"], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        message = f"scripts/prometheus.sh install failed: {result.stderr[-2000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return dict(line.split("=", 1) for line in result.stdout.split())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, list[dict[str, Any]]]]:
    fleet = FleetHypervisor(vms=3).start()
    server = Server(tmp_path_factory.mktemp("prometheus-portal"), MANAGEMENT_WORKERS="2", MANAGEMENT_SIGNUP="open",
                    MANAGEMENT_METRICS_MIN_INTERVAL="1").start()
    try:
        status, user, _ = server.request("POST", "/users", body={"name": "prometheus"})
        assert status == 201, user
        agents = []
        for name in ("prom-a", "prom-b"):
            body = {"name": name, "hostname": "127.0.0.1", "port": fleet.port, "username": name,
                    "private_key": fleet.private_key, "host_key": fleet.host_key_line}
            status, agent, _ = server.request("POST", "/agents", user["api_key"], body)
            assert status == 201, agent
            agents.append(agent)
        yield server, user["api_key"], agents
    finally:
        server.stop()
        fleet.stop()


def fetch(url: str, key: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(response.read().decode())


def test_promtool_accepts_both_expositions_and_the_alert_rules(tools: dict[str, str],
                                                              setup: tuple[Server, str, Any]) -> None:
    server, key, _ = setup
    base = f"http://127.0.0.1:{server.port}"
    for text in (fetch(f"{base}/metrics"), fetch(f"{base}/metrics/vms", key)):
        lint = subprocess.run([tools["PROMTOOL"], "check", "metrics"], input=text, capture_output=True, text=True,
                              timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    rules = subprocess.run([tools["PROMTOOL"], "check", "rules", str(REPO / "docs" / "prometheus-alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_a_real_prometheus_scrapes_the_portal_and_the_fleet(tools: dict[str, str], setup: tuple[Server, str, Any],
                                                           tmp_path: Path) -> None:
    server, key, agents = setup
    key_file = tmp_path / "api-key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "docs" / "prometheus-alerts.yml")],
        "scrape_configs": [
            {"job_name": "playr-portal", "metrics_path": "/metrics",
             "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]},
            {"job_name": "playr-fleet", "metrics_path": "/metrics/vms",
             "authorization": {"type": "Bearer", "credentials_file": str(key_file)},
             "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]},
        ]}))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen([tools["PROMETHEUS"], f"--config.file={config}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return list(json.loads(fetch(url))["data"]["result"])
        except OSError:
            return []

    try:
        deadline = time.monotonic() + 60
        while True:  # a few scrape cycles: both jobs up, the fleet's counters rising
            up = {r["metric"]["job"]: r["value"][1] for r in query("up")}
            rising = query("rate(playr_vm_cpu_seconds_total[5s]) > 0")
            if up == {"playr-portal": "1", "playr-fleet": "1"} and len(rising) == 6:
                break
            tail = (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"up={up}, rising={len(rising)}: {tail}"
            time.sleep(0.5)  # polling Prometheus for a condition, with a bound
        hosts = {r["metric"]["agent_id"]: r["value"][1] for r in query("playr_agent_up")}
        assert hosts == {str(a["id"]): "1" for a in agents}
        assert query('sum(playr_portal_http_requests_total{route="/metrics/vms",status="200"}) > 0')
        assert not query('ALERTS{alertname="PlayrHostDown"}')
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
