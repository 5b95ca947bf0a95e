"""The fleet view at scale (issue 22), with the real asyncssh shell against simulated hosts
(tests/simulator.py): parallelism that follows the setting (not a constant 8), commands not
refused by the per-user operation limit, and a silent host that costs one connect time-out, not
one per request (its error remembered for ``failure_ttl`` seconds)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import attrs
import pytest

from adapters.memory import CountingKeyHasher, FakeSshKeys, InMemoryStorage, ManualClock, ReversibleSecretBox
from adapters.ssh import AsyncsshShell
from core import virsh
from core.commands import NewAgent, NewUser
from core.errors import AgentConnectTimeout
from core.model import Agent, AgentCredentials, Caller, ClientKey, HostKey, Origin, SignupPolicy
from core.portal import Portal, assemble
from entrypoints import bootstrap
from tests.simulator import SimulatedFleet, SimulatedHost
from tests.support import LOOPBACK_NETWORKS, make_settings

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LIST = virsh.list_command("qemu:///system")


def target(fleet: SimulatedFleet, host: SimulatedHost, agent_id: int = 1, **changes: object) -> AgentCredentials:
    agent = Agent(id=agent_id, owner_id=1, name=f"hv{agent_id}", hostname="127.0.0.1", port=host.port,
                  username=fleet.username, allow_unknown_hosts=not host.host_key,
                  host_key=HostKey(host.host_key, "SHA256:x") if host.host_key else None,
                  libvirt_uri="qemu:///system", client_key=ClientKey("ssh-ed25519 X", "SHA256:x"),
                  sealed_private_key="", sealed_passphrase=None, created_at=NOW, updated_at=NOW)
    return AgentCredentials(attrs.evolve(agent, **changes), fleet.client_private_key, None)


async def started(hosts: int, silent: int) -> SimulatedFleet:
    return await SimulatedFleet(hosts, silent=silent, latency=0.0).start()


def test_a_silent_host_costs_one_connect_timeout_then_its_error_is_remembered() -> None:
    async def scenario() -> None:
        fleet = await started(1, silent=1)
        shell = AsyncsshShell(connect_timeout=0.3, failure_ttl=60, networks=LOOPBACK_NETWORKS)
        host = fleet.hosts[0]
        try:
            with pytest.raises(AgentConnectTimeout) as first:
                await shell.run(target(fleet, host), LIST)
            with pytest.raises(AgentConnectTimeout) as second:
                await shell.run(target(fleet, host), LIST)
            assert second.value.detail == first.value.detail
            assert host.connections == 1  # the second answer did not even try
            with pytest.raises(AgentConnectTimeout):  # an agent check tries again
                await shell.run(target(fleet, host), LIST, fresh=True)
            assert host.connections == 2
            with pytest.raises(AgentConnectTimeout):  # so do new agent settings
                await shell.run(target(fleet, host, revision=2), LIST)
            assert host.connections == 3
            shell.discard(1)  # and a discarded agent
            with pytest.raises(AgentConnectTimeout):
                await shell.run(target(fleet, host, revision=2), LIST)
            assert host.connections == 4
        finally:
            await shell.close()
            await fleet.close()

    asyncio.run(scenario())


def test_without_a_failure_ttl_every_request_connects_again() -> None:
    async def scenario() -> None:
        fleet = await started(1, silent=1)
        shell = AsyncsshShell(connect_timeout=0.2, failure_ttl=0, networks=LOOPBACK_NETWORKS)
        try:
            for _ in range(2):
                with pytest.raises(AgentConnectTimeout):
                    await shell.run(target(fleet, fleet.hosts[0]), LIST)
            assert fleet.hosts[0].connections == 2
        finally:
            await shell.close()
            await fleet.close()

    asyncio.run(scenario())


@attrs.define
class World:
    fleet: SimulatedFleet
    shell: AsyncsshShell
    portal: Portal
    caller: Caller
    agent_ids: list[int]


async def world(hosts: int, silent: int, parallelism: int, **shell_options: object) -> World:
    fleet = await started(hosts, silent)
    shell = AsyncsshShell(networks=LOOPBACK_NETWORKS, **shell_options)  # type: ignore[arg-type]
    portal = assemble(storage=InMemoryStorage(), hasher=CountingKeyHasher(), secrets=ReversibleSecretBox(),
                      ssh_keys=FakeSshKeys(), clock=ManualClock(), signup=SignupPolicy.OPEN, shell=shell,
                      fleet_parallelism=parallelism)
    created = portal.users.create_user(NewUser(name="alice"), Origin("req", "127.0.0.1"))
    caller = Caller(user=created.user, request_id="req", client_address="127.0.0.1")
    agent_ids = []
    for host in fleet.hosts:
        agent_ids.append(portal.agents.register_agent(caller, NewAgent(
            name=f"hv{host.index}", hostname="127.0.0.1", port=host.port, username=fleet.username,
            private_key=fleet.client_private_key, host_key=host.host_key or None,
            allow_unknown_hosts=not host.host_key)).id)
    return World(fleet, shell, portal, caller, agent_ids)


@pytest.mark.parametrize("parallelism", [8, 40])
def test_the_fleet_view_asks_as_many_agents_at_once_as_its_parallelism(parallelism: int) -> None:
    """40 silent hosts: every agent asked holds a connection open until its time-out, so the most
    connections open at once is the parallelism (8 was the constant before issue 22)."""
    async def scenario() -> None:
        w = await world(40, silent=40, parallelism=parallelism, connect_timeout=0.5, failure_ttl=60,
                        max_connecting=100)
        try:
            entries = await w.portal.fleet.fleet(w.caller)
            assert [e.error.code if e.error else None for e in entries] == ["agent_connect_timeout"] * 40
            assert w.fleet.most_open == parallelism
            again = await w.portal.fleet.fleet(w.caller)  # remembered: nobody is asked again
            assert [e.error for e in again] == [e.error for e in entries]
            assert w.fleet.connections_accepted() == 40
        finally:
            await w.shell.close()
            await w.fleet.close()

    asyncio.run(scenario())


def test_a_cold_fleet_view_opens_at_most_max_connecting_connections_at_once() -> None:
    """Handshakes are CPU: hundreds started together would all miss their time-out."""
    async def scenario() -> None:
        w = await world(20, silent=20, parallelism=20, connect_timeout=0.3, failure_ttl=60, max_connecting=5)
        try:
            entries = await w.portal.fleet.fleet(w.caller)
            assert {e.error.code for e in entries if e.error} == {"agent_connect_timeout"}
            assert w.fleet.most_open == 5 and w.fleet.connections_accepted() == 20
        finally:
            await w.shell.close()
            await w.fleet.close()

    asyncio.run(scenario())


def test_a_fleet_larger_than_the_per_user_operation_limit_is_answered_whole() -> None:
    async def scenario() -> None:
        w = await world(30, silent=0, parallelism=30, max_operations_per_user=4)
        try:
            entries = await w.portal.fleet.fleet(w.caller)
            assert [e.error for e in entries] == [None] * 30
            assert sorted(vm.name for e in entries for vm in e.vms or []) == sorted(
                f"vm-{h.index}-{j}" for h in w.fleet.hosts for j in range(3))
            assert w.fleet.commands_run() == 30 and w.shell.operations_running(w.caller.user.id) == 0
        finally:
            await w.shell.close()
            await w.fleet.close()

    asyncio.run(scenario())


def test_a_successful_agent_check_makes_the_portal_forget_a_remembered_failure() -> None:
    async def scenario() -> None:
        w = await world(1, silent=0, parallelism=8, connect_timeout=0.5, failure_ttl=60)
        try:
            # As if the host had been silent a moment ago (it answers now).
            agent_id = w.agent_ids[0]
            stored = await w.portal.fleet.remote.target(w.caller, agent_id)
            w.shell._failures[agent_id] = ((stored.agent.owner_id, stored.agent.created_at), stored.agent.revision,
                                           AgentConnectTimeout("remembered"), float("inf"))
            entries = await w.portal.fleet.fleet(w.caller)
            assert entries[0].error is not None and entries[0].error.detail == "remembered"
            check = await w.portal.fleet.check_agent(w.caller, agent_id)
            assert check.libvirt_reachable and check.error is None
            entries = await w.portal.fleet.fleet(w.caller)
            assert entries[0].error is None and entries[0].vms
        finally:
            await w.shell.close()
            await w.fleet.close()

    asyncio.run(scenario())


def test_fleet_parallelism_is_the_setting_bounded_by_the_open_files_limit(tmp_path: object) -> None:
    settings = make_settings(tmp_path, MANAGEMENT_FLEET_PARALLELISM="300")  # type: ignore[arg-type]
    assert bootstrap.fleet_parallelism(settings, open_files_limit=65536) == 300
    assert bootstrap.fleet_parallelism(settings, open_files_limit=512) == (512 - bootstrap.FDS_RESERVED) // 2
    assert bootstrap.fleet_parallelism(settings, open_files_limit=100) == 1
