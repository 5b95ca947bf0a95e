"""The fleet as metrics (issue 21): one ``virsh domstats`` per host for all its VMs, parsed
robustly; each host asked at most once per interval however many requests ask at once; a host that
fails is ``up 0``, never a failed answer; the exposition is valid Prometheus text."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from core import virsh
from core.errors import AgentUnreachable
from core.model import DEFAULT_LIBVIRT_URI as URI
from core.model import Agent, Caller
from entrypoints.exposition import render_fleet
from tests.unit.world import World, make_caller, register, script

STATS = virsh.host_stats_command(URI)


def domstats(*domains: tuple[str, dict[str, Any]]) -> str:
    """What ``virsh domstats`` prints for these domains and fields."""
    blocks = []
    for name, fields in domains:
        blocks.append(f"Domain: '{name}'\n" + "".join(f"  {key}={value}\n" for key, value in fields.items()))
    return "\n".join(blocks) + "\n"


RUNNING = {"state.state": 1, "state.reason": 1, "cpu.time": 2_500_000_000, "cpu.user": 1_000_000_000,
           "cpu.system": 500_000_000, "balloon.current": 131072, "balloon.maximum": 262144, "vcpu.current": 2,
           "vcpu.maximum": 4, "net.count": 1, "net.0.name": "vnet0", "net.0.rx.bytes": 1000, "net.0.rx.pkts": 10,
           "net.0.rx.errs": 0, "net.0.rx.drop": 0, "net.0.tx.bytes": 2000, "net.0.tx.pkts": 20,
           "net.0.tx.errs": 0, "net.0.tx.drop": 0, "block.count": 2, "block.0.name": "vda",
           "block.0.rd.reqs": 5, "block.0.rd.bytes": 4096, "block.0.wr.reqs": 3, "block.0.wr.bytes": 8192,
           "block.0.capacity": 10737418240, "block.1.name": "sda", "block.1.rd.reqs": 1, "block.1.rd.bytes": 512}
SHUT_OFF = {"state.state": 5, "state.reason": 1, "balloon.maximum": 131072, "vcpu.maximum": 1}


def families(text: str) -> dict[str, Any]:
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in found, f"{family.name} declared twice"
        found[family.name] = family
    return found


def series(text: str) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    return [(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def sample_now(world: World, caller: Caller) -> Any:
    return asyncio.run(world.portal.metrics.fleet_sample(caller))


# ---------------------------------------------------------------------------------------- parsing


def test_one_domstats_of_a_whole_host_parses_every_vm_in_order() -> None:
    vms = virsh.parse_host_stats(domstats(("web 01", RUNNING), ("db", SHUT_OFF)))
    assert [vm.name for vm in vms] == ["web 01", "db"]
    web, db = vms
    assert web.state == "running" and web.cpu.time_ns == 2_500_000_000 and web.vcpus.current == 2
    assert [b.name for b in web.block] == ["vda", "sda"] and web.block[0].write_bytes == 8192
    assert [n.name for n in web.net] == ["vnet0"] and web.net[0].tx_packets == 20
    assert db.state == "shut off" and db.cpu.time_ns is None and db.block == [] and db.net == []


def test_a_whole_host_parse_ignores_lines_outside_a_domain_and_repeated_domains() -> None:
    text = "  stray=1\nerror: something\n" + domstats(("a", RUNNING), ("a", SHUT_OFF))
    assert [(vm.name, vm.state) for vm in virsh.parse_host_stats(text)] == [("a", "running")]
    assert virsh.parse_host_stats("") == []


names = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029'"),
                min_size=1, max_size=30).filter(lambda n: n.strip() == n and not n[0].isspace())


@given(st.lists(st.tuples(names, st.integers(0, 7), st.integers(0, 2**64)), max_size=8, unique_by=lambda d: d[0]))
def test_every_domain_printed_is_parsed_with_its_counters(domains: list[tuple[str, int, int]]) -> None:
    text = domstats(*((name, {"state.state": state, "cpu.time": cpu}) for name, state, cpu in domains))
    parsed = virsh.parse_host_stats(text)
    assert [(vm.name, vm.state, vm.cpu.time_ns) for vm in parsed] == [
        (name, virsh.state_name(state), cpu) for name, state, cpu in domains]


@given(st.text(max_size=2000))
def test_any_output_parses_without_error(text: str) -> None:
    for vm in virsh.parse_host_stats(text):
        assert vm.name


def test_metric_labels_name_only_the_virsh_subcommand() -> None:
    assert virsh.subcommand_of(STATS) == "domstats"
    assert virsh.subcommand_of(("virsh", "--connect", URI, "Weird;cmd")) == "other"
    assert virsh.subcommand_of(("sh", "-c", "id")) == "other"


# ---------------------------------------------------------------------------------------- sampling


@pytest.fixture
def fleet(world: World, alice: Caller, agent: Agent) -> Agent:
    script(world, STATS, stdout=domstats(("web 01", RUNNING), ("db", SHUT_OFF)))
    script(world, virsh.nodeinfo_command(URI), stdout="CPU model:           x86_64\nCPU(s):              8\n"
                                                      "CPU frequency:       2400 MHz\nMemory size:         "
                                                      "16384000 KiB\n")
    script(world, virsh.version_command(URI), stdout="Compiled against library: libvirt 9.0.0\nUsing library: "
                                                     "libvirt 9.0.0\nUsing API: QEMU 9.0.0\nRunning hypervisor: "
                                                     "QEMU 7.2.0\nRunning against daemon: 9.0.0\n")
    return agent


def asked(world: World, command: tuple[str, ...]) -> int:
    return sum(1 for _, argv in world.shell.calls if argv == command)


def test_a_hundred_concurrent_samples_ask_each_host_once(world: World, alice: Caller, fleet: Agent) -> None:
    second = register(world, alice, name="hv2", hostname="192.0.2.16")

    async def scrape_many() -> list[Any]:
        return await asyncio.gather(*(world.portal.metrics.fleet_sample(alice) for _ in range(100)))

    samples = asyncio.run(scrape_many())
    assert asked(world, STATS) == 2  # one per host, not 200
    assert {call[0] for call in world.shell.calls if call[1] == STATS} == {fleet.id, second.id}
    assert all(len(s.hosts) == 2 and all(h.up for h in s.hosts) for s in samples)


def test_a_host_is_asked_again_only_once_the_interval_has_passed(world: World, alice: Caller, fleet: Agent) -> None:
    metrics = world.portal.metrics
    sample_now(world, alice)
    world.time.now += metrics.min_interval - 0.5
    sample_now(world, alice)
    assert asked(world, STATS) == 1
    world.time.now += 1
    sample_now(world, alice)
    assert asked(world, STATS) == 2


def test_host_facts_are_asked_far_less_often_than_statistics(world: World, alice: Caller, fleet: Agent) -> None:
    for _ in range(5):
        sample_now(world, alice)
        world.time.now += world.portal.metrics.min_interval
    assert asked(world, STATS) == 5
    assert asked(world, virsh.nodeinfo_command(URI)) == 1 and asked(world, virsh.version_command(URI)) == 1


def test_a_failing_host_is_down_and_the_others_are_still_answered(world: World, alice: Caller,
                                                                  fleet: Agent) -> None:
    dead = register(world, alice, name="dead", hostname="192.0.2.99")
    world.shell.failures[dead.id] = AgentUnreachable("192.0.2.99:22 refused the connection")
    hosts = {h.agent_name: h for h in sample_now(world, alice).hosts}
    assert hosts["hv1"].up and len(hosts["hv1"].vms) == 2
    assert not hosts["dead"].up and hosts["dead"].vms == () and hosts["dead"].error is not None


def test_a_host_slower_than_the_deadline_is_down_until_it_answers(world: World, alice: Caller, fleet: Agent) -> None:
    world.portal.metrics.deadline = 0.05
    world.shell.hang_after[STATS] = 0  # the host never answers
    (host,) = sample_now(world, alice).hosts
    assert not host.up and host.error is not None


def test_samples_are_shared_only_between_callers_of_the_same_agents(world: World, alice: Caller,
                                                                   fleet: Agent) -> None:
    bob = make_caller(world, "bob")
    assert sample_now(world, bob).hosts == ()
    assert [h.agent_id for h in sample_now(world, alice).hosts] == [fleet.id]


# ---------------------------------------------------------------------------------------- the exposition


def test_the_exposition_is_valid_prometheus_text_with_counters_and_units(world: World, alice: Caller,
                                                                         fleet: Agent) -> None:
    text = render_fleet(sample_now(world, alice))
    found = families(text)
    assert found["playr_agent_up"].type == "gauge"
    assert found["playr_vm_cpu_seconds"].type == "counter"
    assert found["playr_vm_block_read_bytes"].type == "counter"
    assert found["playr_vm_network_transmit_packets"].type == "counter"
    assert found["playr_vm_memory_max_bytes"].type == "gauge"
    every = series(text)
    assert len(every) == len(set((name, labels) for name, labels, _ in every)), "a series appears twice"
    values = {(name, labels): value for name, labels, value in every}
    agent = (("agent", "hv1"), ("agent_id", str(fleet.id)))
    web = (*agent, ("vm", "web 01"))
    assert values[("playr_agent_up", agent)] == 1
    assert values[("playr_vm_cpu_seconds_total", web)] == 2.5
    assert values[("playr_vm_memory_current_bytes", web)] == 131072 * 1024
    assert values[("playr_vm_block_written_bytes_total", tuple(sorted((*web, ("disk", "vda")))))] == 8192
    assert values[("playr_vm_network_receive_bytes_total", tuple(sorted((*web, ("interface", "vnet0")))))] == 1000
    assert values[("playr_vm_state", tuple(sorted((*agent, ("vm", "db"), ("state", "shut off")))))] == 1
    assert values[("playr_agent_memory_bytes", agent)] == 16384000 * 1024
    for family in found.values():
        if family.type == "counter":
            assert all(s.name == f"{family.name}_total" for s in family.samples), family.name


def test_a_down_host_shows_up_zero_and_none_of_its_other_series(world: World, alice: Caller, fleet: Agent) -> None:
    world.shell.failures[fleet.id] = AgentUnreachable("refused")
    every = series(render_fleet(sample_now(world, alice)))
    names = {name for name, _, _ in every}
    assert ("playr_agent_up", (("agent", "hv1"), ("agent_id", str(fleet.id))), 0) in every
    assert not any(name.startswith("playr_vm_") for name in names)
    assert "playr_agent_cpus" not in names


@given(agent=st.text(min_size=1, max_size=20), vm=st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
       cpu=st.integers(0, 2**63))
def test_any_names_and_counters_round_trip_through_the_prometheus_parser(agent: str, vm: str, cpu: int) -> None:
    from core.metrics import FleetSample, HostSample

    stats = virsh.stats_of_fields({"state.state": "1", "cpu.time": str(cpu)}, vm)
    host = HostSample(agent_id=7, agent_name=agent, up=True, duration_seconds=0.5, taken_at=1.0, vms=(stats,))
    every = series(render_fleet(FleetSample(hosts=(host,), now=3.0)))
    labels = tuple(sorted({"agent": agent[:256], "agent_id": "7", "vm": vm[:256]}.items()))
    assert ("playr_vm_cpu_seconds_total", labels, pytest.approx(cpu / 1e9)) in every
    assert ("playr_agent_sample_age_seconds", labels[:2], 2.0) in every
