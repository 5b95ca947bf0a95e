"""The caller's fleet in the Prometheus text format (``GET /metrics/vms``, issue 21).

Series are labelled ``agent`` (the agent's name), ``agent_id``, ``vm``, and ``disk`` or ``interface``.
Counters end in ``_total`` and carry their unit (``_bytes``, ``_seconds``); a host that could not be
asked has ``playr_agent_up 0`` and no other series but its scrape duration and error.

The text is written here (see ``render_fleet``), not with ``prometheus_client``; this module must
not import that client anyway: the server launcher sets its multi-process directory before its
first import (``entrypoints/server.py``), and the command line imports this module long before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import attrs

from core.metrics import FleetSample, HostSample
from core.virsh import VmStats

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
    """One host's series, as exposition lines by family name; each series once (a second series
    with the same name and labels is dropped)."""

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {}
        self.seen: set[tuple[str, str]] = set()

    def add(self, kind: str, name: str, documentation: str, labels: str, value: float | None) -> None:
        """One series; ``labels`` as ``_labels`` formats them."""
        if value is None or (name, labels) in self.seen:
            return
        self.seen.add((name, labels))
        full = f"{name}_total" if kind == "counter" else name
        _declare(full, kind, documentation)
        self.lines.setdefault(full, []).append(f"{full}{{{labels}}} {_number(value)}\n")


# Every family ever rendered, in the order first seen (a fixed order: the code declares them in
# the same order every time), with its TYPE and HELP.
_DECLARED: dict[str, tuple[str, str]] = {}


def _declare(name: str, kind: str, documentation: str) -> None:
    if name not in _DECLARED:
        _DECLARED[name] = (kind, documentation)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    """``agent="hv1",agent_id="7"``: formatted once per agent, VM, disk or interface."""
    return ",".join(f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True))


def _escape(text: str) -> str:
    """A label value as the text format quotes it."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**63):
        return str(int(value))
    return repr(float(value))


AGENT = ("agent", "agent_id")
VM = (*AGENT, "vm")


def _clip(text: str | None) -> str:
    return (text or "")[:LABEL_VALUE_MAX]


def _times(value: int | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _host(out: _Families, host: HostSample) -> None:
    agent = (_clip(host.agent_name), str(host.agent_id))
    a = _labels(AGENT, agent)
    out.add("gauge", "playr_agent_up", "1 if the portal could ask the agent's host for its statistics, else 0",
            a, 1 if host.up else 0)
    out.add("gauge", "playr_agent_scrape_duration_seconds", "How long asking the host took", a,
            host.duration_seconds)
    if host.error is not None:
        out.add("gauge", "playr_agent_error", "Why the host could not be asked: the error code (1 while it lasts)",
                _labels((*AGENT, "code"), (*agent, host.error.code)), 1)
    if not host.up:
        return
    out.add("gauge", "playr_agent_vms", "VMs libvirt knows on the host (running or not)", a,
            len(host.vms))
    node = host.node
    if node is not None:
        out.add("gauge", "playr_agent_cpus", "The host's logical processors (virsh nodeinfo)", a,
                node.cpus)
        out.add("gauge", "playr_agent_cpu_frequency_hertz", "The host's processor frequency", a,
                _times(node.cpu_mhz, 1e6))
        out.add("gauge", "playr_agent_memory_bytes", "The host's memory", a,
                _times(node.memory_kib, KIB))
    versions = host.versions
    if versions is not None:
        out.add("gauge", "playr_agent_info", "The host's libvirt and hypervisor versions (always 1)",
                _labels((*AGENT, "cpu_model", "libvirt_version", "hypervisor", "hypervisor_version"),
                        (*agent, _clip(node.cpu_model if node else None), _clip(versions.daemon or versions.libvirt),
                         _clip(versions.hypervisor), _clip(versions.hypervisor_version))), 1)
    for vm in host.vms:
        _vm(out, agent, vm)


def _vm(out: _Families, agent: tuple[str, str], vm: VmStats) -> None:
    labels = _labels(VM, (*agent, _clip(vm.name)))
    out.add("gauge", "playr_vm_state", "The VM's state as virsh prints it (running, paused, shut off, crashed…), "
            "value 1", f'{labels},state="{_escape(vm.state or "unknown")}"', 1)
    out.add("gauge", "playr_vm_vcpus", "Virtual CPUs the VM has now", labels, vm.vcpus.current)
    out.add("gauge", "playr_vm_vcpus_max", "Virtual CPUs the VM may have", labels, vm.vcpus.maximum)
    balloon = vm.balloon
    for name, doc, value in (
            ("playr_vm_memory_current_bytes", "Memory the VM has now (balloon current)", balloon.current_kib),
            ("playr_vm_memory_max_bytes", "Memory the VM may have (balloon maximum)", balloon.maximum_kib),
            ("playr_vm_memory_rss_bytes", "Host memory the VM's process uses (resident set)", balloon.rss_kib),
            ("playr_vm_balloon_available_bytes", "Memory the guest sees (balloon driver)", balloon.available_kib),
            ("playr_vm_balloon_usable_bytes", "Memory the guest could use without swapping (balloon driver)",
             balloon.usable_kib),
            ("playr_vm_balloon_unused_bytes", "Memory the guest leaves unused (balloon driver)", balloon.unused_kib)):
        out.add("gauge", name, doc, labels, _times(value, KIB))
    out.add("counter", "playr_vm_cpu_seconds", "Host CPU time the VM used", labels, _times(vm.cpu.time_ns, 1e-9))
    out.add("counter", "playr_vm_cpu_user_seconds", "Host CPU time the VM used in user mode", labels,
            _times(vm.cpu.user_ns, 1e-9))
    out.add("counter", "playr_vm_cpu_system_seconds", "Host CPU time the VM used in kernel mode", labels,
            _times(vm.cpu.system_ns, 1e-9))
    for index, block in enumerate(vm.block):
        disk = f'{labels},disk="{_escape(_clip(block.name) or f"#{index}")}"'
        out.add("counter", "playr_vm_block_read_bytes", "Bytes the VM read from the disk", disk,
                block.read_bytes)
        out.add("counter", "playr_vm_block_written_bytes", "Bytes the VM wrote to the disk", disk,
                block.write_bytes)
        out.add("counter", "playr_vm_block_read_requests", "Read requests the VM made to the disk", disk,
                block.read_requests)
        out.add("counter", "playr_vm_block_write_requests", "Write requests the VM made to the disk", disk,
                block.write_requests)
        out.add("gauge", "playr_vm_block_capacity_bytes", "The disk's size as the guest sees it", disk,
                block.capacity)
        out.add("gauge", "playr_vm_block_allocation_bytes", "Bytes of the disk's image in use on the host", disk,
                block.allocation)
    for index, net in enumerate(vm.net):
        interface = f'{labels},interface="{_escape(_clip(net.name) or f"#{index}")}"'
        for name, doc, value in (
                ("playr_vm_network_receive_bytes", "Bytes the VM received on the interface", net.rx_bytes),
                ("playr_vm_network_transmit_bytes", "Bytes the VM sent on the interface", net.tx_bytes),
                ("playr_vm_network_receive_packets", "Packets the VM received on the interface", net.rx_packets),
                ("playr_vm_network_transmit_packets", "Packets the VM sent on the interface", net.tx_packets),
                ("playr_vm_network_receive_errors", "Receive errors on the interface", net.rx_errors),
                ("playr_vm_network_transmit_errors", "Transmit errors on the interface", net.tx_errors),
                ("playr_vm_network_receive_drops", "Received packets dropped on the interface", net.rx_drops),
                ("playr_vm_network_transmit_drops", "Packets to send dropped on the interface", net.tx_drops)):
            out.add("counter", name, doc, interface, value)


# A host's lines, kept while its sample is the one served (samples are shared by every scrape of
# the interval, so a burst of scrapes formats each host once). Keyed by the sample's identity.
_HOST_LINES: OrderedDict[int, tuple[HostSample, dict[str, list[str]]]] = OrderedDict()
HOST_LINES_KEPT = 4096


def _host_lines(host: HostSample) -> dict[str, list[str]]:
    cached = _HOST_LINES.get(id(host))
    if cached is not None and cached[0] is host:
        _HOST_LINES.move_to_end(id(host))
        return cached[1]
    out = _Families()
    _host(out, host)
    _HOST_LINES[id(host)] = (host, out.lines)
    while len(_HOST_LINES) > HOST_LINES_KEPT:
        _HOST_LINES.popitem(last=False)
    return out.lines


def render_fleet(sample: FleetSample) -> str:
    """The Prometheus text exposition (format 0.0.4) of ``sample``: every family once, with its
    HELP and TYPE, its series from every host (agents, then their VMs, as sampled).

    Written here rather than with ``prometheus_client.generate_latest``: the client re-validates
    and re-formats every label of every series on every scrape (about 8 ms for 30 VMs on the
    development machine, docs/performance.md), while a host's lines are the same for every
    scrape of an interval and are formatted once. Tests parse the result with the client's own
    parser (valid format, one series each, types right)."""
    with _RENDERING:  # the caches below are shared by the worker threads that render
        return _render(sample)


_RENDERING = threading.Lock()


def _render(sample: FleetSample) -> str:
    per_host = [_host_lines(host) for host in sample.hosts]
    age = _Families()
    for host in sample.hosts:
        age.add("gauge", "playr_agent_sample_age_seconds", "Age of the sample served (hosts are asked at most once "
                "per MANAGEMENT_METRICS_MIN_INTERVAL)", _labels(AGENT, (_clip(host.agent_name), str(host.agent_id))),
                round(max(0.0, sample.now - host.taken_at), 3))
    per_host.append(age.lines)
    parts: list[str] = []
    for name, (kind, documentation) in _DECLARED.items():
        lines = [line for lines in per_host for line in lines.get(name, ())]
        if lines:
            help_text = documentation.replace("\\", "\\\\").replace("\n", "\\n")
            parts.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            parts.extend(lines)
    return "".join(parts)
