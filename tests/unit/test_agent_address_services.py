"""Issue 14 item 4 (SSRF) in the use cases: an agent's address is checked through the
``AgentAddresses`` port when it is registered or changed (a refusal is a 422, audited, and stores
nothing), and an agent check reports a refused address instead of raising."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from adapters.memory import (
    CountingKeyHasher,
    FakeAgentAddresses,
    FakeSshKeys,
    InMemoryStorage,
    ManualClock,
    ReversibleSecretBox,
    ScriptedShell,
)
from core.commands import AgentChanges, NewAgent, NewUser
from core.errors import AgentAddressRefused
from core.model import AgentCredentials, Caller, Origin, SignupPolicy
from core.networks import AgentNetworks
from core.portal import Portal, assemble
from core.ports import CommandResult, PinHostKey

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a real key\n-----END OPENSSH PRIVATE KEY-----\n"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyNumberOne host1"


class RefusingShell(ScriptedShell):
    """A shell whose every connection finds the address refused (the adapter's connect-time check)."""

    async def run(self, target: AgentCredentials, argv: Sequence[str], *,
                  pin: PinHostKey | None = None, counted: bool = True, fresh: bool = False) -> CommandResult:
        raise AgentAddressRefused(f"{target.agent.hostname} resolves to 127.0.0.1, which agents may not point at")


@pytest.fixture
def addresses() -> FakeAgentAddresses:
    return FakeAgentAddresses(AgentNetworks(), names={"metadata.internal": ["169.254.169.254"]})


@pytest.fixture
def storage() -> InMemoryStorage:
    return InMemoryStorage()


@pytest.fixture
def portal(storage: InMemoryStorage, addresses: FakeAgentAddresses) -> Portal:
    return assemble(storage=storage, hasher=CountingKeyHasher(), secrets=ReversibleSecretBox(),
                    ssh_keys=FakeSshKeys(), clock=ManualClock(), signup=SignupPolicy.OPEN, shell=RefusingShell(),
                    addresses=addresses)


@pytest.fixture
def alice(portal: Portal) -> Caller:
    user = portal.users.create_user(NewUser(name="alice"), Origin("cli", "local")).user
    return Caller(user=user, request_id="req-1", client_address="198.51.100.10")


def new_agent(hostname: str, **fields: object) -> NewAgent:
    return NewAgent(name="hv1", hostname=hostname, username="qemu", private_key=KEY, host_key=HOST_KEY,
                    **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("hostname", ["127.0.0.1", "169.254.169.254", "::1", "metadata.internal"])
def test_item4_registering_a_refused_address_is_422_audited_and_stores_nothing(
        portal: Portal, storage: InMemoryStorage, alice: Caller, addresses: FakeAgentAddresses,
        hostname: str) -> None:
    with pytest.raises(AgentAddressRefused) as refused:
        portal.agents.register_agent(alice, new_agent(hostname, port=2222))
    assert [e.field for e in refused.value.errors] == ["hostname"]
    assert addresses.checked == [(hostname, 2222)]
    assert portal.agents.list_agents(alice) == []
    events = list(storage.state.events.values())
    assert [(e.action, e.outcome) for e in events if e.action == "agent.create"] == \
        [("agent.create", "agent_address_refused")]


def test_item4_an_allowed_address_registers_and_an_invalid_one_is_not_even_looked_up(
        portal: Portal, alice: Caller, addresses: FakeAgentAddresses) -> None:
    portal.agents.register_agent(alice, new_agent("192.0.2.15"))
    assert addresses.checked == [("192.0.2.15", 22)]
    with pytest.raises(Exception) as invalid:
        portal.agents.register_agent(alice, new_agent("-oProxyCommand=x", name="hv2"))
    assert not isinstance(invalid.value, AgentAddressRefused)
    assert addresses.checked == [("192.0.2.15", 22)]


def test_item4_changing_the_address_is_checked_with_the_other_half_kept(
        portal: Portal, alice: Caller, addresses: FakeAgentAddresses) -> None:
    agent = portal.agents.register_agent(alice, new_agent("192.0.2.15"))
    with pytest.raises(AgentAddressRefused):
        portal.agents.update_agent(alice, agent.id, AgentChanges(hostname="metadata.internal"))
    portal.agents.update_agent(alice, agent.id, AgentChanges(port=2200))
    portal.agents.update_agent(alice, agent.id, AgentChanges(name="renamed"))  # not an address change: no check
    assert addresses.checked == [("192.0.2.15", 22), ("metadata.internal", 22), ("192.0.2.15", 2200)]
    assert portal.agents.get_agent(alice, agent.id).hostname == "192.0.2.15"


def test_item4_a_check_reports_a_refused_address_as_never_reached(portal: Portal, alice: Caller) -> None:
    agent = portal.agents.register_agent(alice, new_agent("192.0.2.15"))
    check = asyncio.run(portal.fleet.check_agent(alice, agent.id))
    assert (check.reachable, check.authenticated, check.libvirt_reachable) == (False, False, False)
    assert check.error is not None and check.error.code == "agent_address_refused"
    assert check.round_trip_ms is None
