"""The caller's fleet in the Prometheus text format (``GET /metrics/vms``, issue 21).

Series are labelled ``agent`` (the agent's name), ``agent_id``, ``vm``, and ``disk`` or ``interface``.
Counters end in ``_total`` and carry their unit (``_bytes``, ``_seconds``); a host that could not be
asked has ``playr_agent_up 0`` and no other series but its scrape duration and error.

``prometheus_client`` is imported inside the functions, never when this module is imported: the
server launcher must set the client's multi-process directory before the first import of it
(``entrypoints/server.py``), and the command line imports this module long before that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from core.metrics import FleetSample, HostSample
from core.virsh import VmStats

if TYPE_CHECKING:
    from prometheus_client.core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KIB = 1024
LABEL_VALUE_MAX = 256  # characters of a label value taken from a host's answer (versions, names)


@attrs.frozen
class Exposition:
    """An answer in the Prometheus text exposition format (``text/plain; version=0.0.4``)."""

    text: str

    @classmethod
    def of_fleet(cls, sample: FleetSample) -> Exposition:
        return cls(text=render_fleet(sample))


class _Families:
    """Metric families by name, each series once (a second series with the same labels is dropped)."""

    def __init__(self) -> None:
        self.families: dict[str, Any] = {}
        self.seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(self, kind: str, name: str, documentation: str, labels: tuple[str, ...], values: tuple[str, ...],
            value: float | None) -> None:
        if value is None or (name, values) in self.seen:
            return
        self.seen.add((name, values))
        family = self.families.get(name)
        if family is None:
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

            kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
            family = self.families[name] = kinds[kind](name, documentation, labels=labels)
        family.add_metric(values, value)


AGENT = ("agent", "agent_id")
VM = (*AGENT, "vm")


def _clip(text: str | None) -> str:
    return (text or "")[:LABEL_VALUE_MAX]


def _times(value: int | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _host(out: _Families, host: HostSample, now: float) -> None:
    agent = (_clip(host.agent_name), str(host.agent_id))
    out.add("gauge", "playr_agent_up", "1 if the portal could ask the agent's host for its statistics, else 0",
            AGENT, agent, 1 if host.up else 0)
    out.add("gauge", "playr_agent_scrape_duration_seconds", "How long asking the host took", AGENT, agent,
            host.duration_seconds)
    out.add("gauge", "playr_agent_sample_age_seconds", "Age of the sample served (hosts are asked at most once "
            "per MANAGEMENT_METRICS_MIN_INTERVAL)", AGENT, agent, max(0.0, now - host.taken_at))
    if host.error is not None:
        out.add("gauge", "playr_agent_error", "Why the host could not be asked: the error code (1 while it lasts)",
                (*AGENT, "code"), (*agent, host.error.code), 1)
    if not host.up:
        return
    out.add("gauge", "playr_agent_vms", "VMs libvirt knows on the host (running or not)", AGENT, agent,
            len(host.vms))
    node = host.node
    if node is not None:
        out.add("gauge", "playr_agent_cpus", "The host's logical processors (virsh nodeinfo)", AGENT, agent,
                node.cpus)
        out.add("gauge", "playr_agent_cpu_frequency_hertz", "The host's processor frequency", AGENT, agent,
                _times(node.cpu_mhz, 1e6))
        out.add("gauge", "playr_agent_memory_bytes", "The host's memory", AGENT, agent,
                _times(node.memory_kib, KIB))
    versions = host.versions
    if versions is not None:
        out.add("gauge", "playr_agent_info", "The host's libvirt and hypervisor versions (always 1)",
                (*AGENT, "cpu_model", "libvirt_version", "hypervisor", "hypervisor_version"),
                (*agent, _clip(node.cpu_model if node else None), _clip(versions.daemon or versions.libvirt),
                 _clip(versions.hypervisor), _clip(versions.hypervisor_version)), 1)
    for vm in host.vms:
        _vm(out, agent, vm)


def _vm(out: _Families, agent: tuple[str, str], vm: VmStats) -> None:
    labels = (*agent, _clip(vm.name))
    out.add("gauge", "playr_vm_state", "The VM's state as virsh prints it (running, paused, shut off, crashed…), "
            "value 1", (*VM, "state"), (*labels, vm.state or "unknown"), 1)
    out.add("gauge", "playr_vm_vcpus", "Virtual CPUs the VM has now", VM, labels, vm.vcpus.current)
    out.add("gauge", "playr_vm_vcpus_max", "Virtual CPUs the VM may have", VM, labels, vm.vcpus.maximum)
    balloon = vm.balloon
    for name, doc, value in (
            ("playr_vm_memory_current_bytes", "Memory the VM has now (balloon current)", balloon.current_kib),
            ("playr_vm_memory_max_bytes", "Memory the VM may have (balloon maximum)", balloon.maximum_kib),
            ("playr_vm_memory_rss_bytes", "Host memory the VM's process uses (resident set)", balloon.rss_kib),
            ("playr_vm_balloon_available_bytes", "Memory the guest sees (balloon driver)", balloon.available_kib),
            ("playr_vm_balloon_usable_bytes", "Memory the guest could use without swapping (balloon driver)",
             balloon.usable_kib),
            ("playr_vm_balloon_unused_bytes", "Memory the guest leaves unused (balloon driver)", balloon.unused_kib)):
        out.add("gauge", name, doc, VM, labels, _times(value, KIB))
    out.add("counter", "playr_vm_cpu_seconds", "Host CPU time the VM used", VM, labels, _times(vm.cpu.time_ns, 1e-9))
    out.add("counter", "playr_vm_cpu_user_seconds", "Host CPU time the VM used in user mode", VM, labels,
            _times(vm.cpu.user_ns, 1e-9))
    out.add("counter", "playr_vm_cpu_system_seconds", "Host CPU time the VM used in kernel mode", VM, labels,
            _times(vm.cpu.system_ns, 1e-9))
    disk = (*VM, "disk")
    for index, block in enumerate(vm.block):
        values = (*labels, _clip(block.name) or f"#{index}")
        out.add("counter", "playr_vm_block_read_bytes", "Bytes the VM read from the disk", disk, values,
                block.read_bytes)
        out.add("counter", "playr_vm_block_written_bytes", "Bytes the VM wrote to the disk", disk, values,
                block.write_bytes)
        out.add("counter", "playr_vm_block_read_requests", "Read requests the VM made to the disk", disk, values,
                block.read_requests)
        out.add("counter", "playr_vm_block_write_requests", "Write requests the VM made to the disk", disk, values,
                block.write_requests)
        out.add("gauge", "playr_vm_block_capacity_bytes", "The disk's size as the guest sees it", disk, values,
                block.capacity)
        out.add("gauge", "playr_vm_block_allocation_bytes", "Bytes of the disk's image in use on the host", disk,
                values, block.allocation)
    interface = (*VM, "interface")
    for index, net in enumerate(vm.net):
        values = (*labels, _clip(net.name) or f"#{index}")
        for name, doc, value in (
                ("playr_vm_network_receive_bytes", "Bytes the VM received on the interface", net.rx_bytes),
                ("playr_vm_network_transmit_bytes", "Bytes the VM sent on the interface", net.tx_bytes),
                ("playr_vm_network_receive_packets", "Packets the VM received on the interface", net.rx_packets),
                ("playr_vm_network_transmit_packets", "Packets the VM sent on the interface", net.tx_packets),
                ("playr_vm_network_receive_errors", "Receive errors on the interface", net.rx_errors),
                ("playr_vm_network_transmit_errors", "Transmit errors on the interface", net.tx_errors),
                ("playr_vm_network_receive_drops", "Received packets dropped on the interface", net.rx_drops),
                ("playr_vm_network_transmit_drops", "Packets to send dropped on the interface", net.tx_drops)):
            out.add("counter", name, doc, interface, values, value)


def fleet_families(sample: FleetSample) -> list[Metric]:
    """The fleet's metric families, in a stable order (agents, then VMs, as sampled)."""
    out = _Families()
    for host in sample.hosts:
        _host(out, host, sample.now)
    return list(out.families.values())


def render_fleet(sample: FleetSample) -> str:
    """The Prometheus text exposition of ``sample``."""
    from prometheus_client import CollectorRegistry, generate_latest

    families = fleet_families(sample)

    class Fleet:
        def collect(self) -> Iterator[Metric]:
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fleet())
    return generate_latest(registry).decode("utf-8")

