"""docs/observability.md's Grafana dashboard and alert rules (issue 21): the dashboard is importable
JSON, and every metric they query is one the portal exports (a renamed metric breaks this test,
not the operator's dashboard)."""

from __future__ import annotations

import json
import re

from prometheus_client.parser import text_string_to_metric_families

from adapters.prometheus import PrometheusObserver
from core import virsh
from core.errors import AgentUnreachable
from core.metrics import FleetSample, HostSample
from entrypoints.exposition import render_fleet
from tests.fleet_hypervisor import NODEINFO, VERSION, domstats
from tests.support import REPO

DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
ALERTS = REPO / "docs" / "prometheus-alerts.yml"
METRIC = re.compile(r"\bplayr_[a-z_]+\b")


def exported() -> set[str]:
    """Every series name the two endpoints can carry (histograms with their suffixes)."""
    up = HostSample(agent_id=1, agent_name="hv1", up=True, duration_seconds=0.1, taken_at=0.0,
                    vms=tuple(virsh.parse_host_stats(domstats(2, 5))), node=virsh.parse_nodeinfo(NODEINFO),
                    versions=virsh.parse_version(VERSION))
    down = HostSample(agent_id=2, agent_name="hv2", up=False, duration_seconds=0.1, taken_at=0.0,
                      error=AgentUnreachable("refused"))
    texts = [render_fleet(FleetSample(hosts=(up, down), now=1.0)), PrometheusObserver().exposition().decode()]
    names: set[str] = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            if family.type == "counter":
                names.add(f"{family.name}_total")
            if family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
    return names


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]
        assert all(target["expr"] for target in panel["targets"])


def test_the_dashboard_and_alerts_query_only_metrics_the_portal_exports() -> None:
    names = exported()
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in METRIC.findall(target["expr"])}
    queried |= set(METRIC.findall(json.dumps(dashboard["templating"])))
    assert queried and queried <= names, sorted(queried - names)
    alerted = set(METRIC.findall(ALERTS.read_text()))
    assert alerted and alerted <= names, sorted(alerted - names)
    assert {"PlayrHostDown", "PlayrVmCrashed", "PlayrSshFailuresRising", "PlayrPortal5xx"} <= set(
        re.findall(r"alert: (\w+)", ALERTS.read_text()))
