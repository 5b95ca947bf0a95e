"""The VM use cases (list, info, actions over SSH), trust on first use of a host key, and pooled
connections, run against the in-memory world of ``tests/unit/world.py``: the shell is scripted,
nothing leaves the process."""

from __future__ import annotations

import asyncio

import pytest

from core.commands import AgentChanges
from core.errors import Conflict, NotFound, RemoteError, RemoteTimeout, ValidationFailed
from core.model import DEFAULT_LIBVIRT_URI, Agent, Caller, HostKey
from core.results import VmInfo
from core.virsh import VmAction, VmSummary
from tests.unit.world import ENCRYPTED_KEY, PASSPHRASE, World, events, register, script

SEEN_KEY = HostKey(openssh="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISeenOnFirstUse",
                   fingerprint="SHA256:SeenOnFirstUse")
OTHER_SEEN_KEY = HostKey(openssh="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAnotherKey", fingerprint="SHA256:AnotherKey")

LIST_OUTPUT = (" Id   Name          State\n"
               "------------------------------\n"
               " 1    lab-guest1    running\n"
               " -    lab guest 2   shut off\n"
               "\n")
DOMINFO_OUTPUT = ("Id:             2\n"
                  "Name:           lab-guest1\n"
                  "UUID:           8175cf7c-903d-4947-be34-b63e2b3ccc0f\n"
                  "OS Type:        hvm\n"
                  "State:          running\n"
                  "CPU(s):         1\n"
                  "Max memory:     131072 KiB\n"
                  "\n")
HOSTILE_NAMES = [";id", "$(id)", "`id`", "--help", "-c", "a|b", "a\nb", "a'b", "a\x00b", "a/b", "a" * 201, ""]
AUDIT_ACTIONS = {VmAction.START: "vm.start", VmAction.SHUTDOWN: "vm.shutdown",
                 VmAction.FORCE_STOP: "vm.force_stop", VmAction.REBOOT: "vm.reboot",
                 VmAction.SUSPEND: "vm.suspend", VmAction.RESUME: "vm.resume"}


# ---------------------------------------------------------------------------------------- helpers


def argv(agent: Agent, *args: str) -> tuple[str, ...]:
    return ("virsh", "--connect", agent.libvirt_uri, *args)


# ---------------------------------------------------------------------------------------- list_vms


def test_list_vms_sends_virsh_list_all_with_the_unsealed_credentials_and_parses_it(
        world: World, alice: Caller, agent: Agent) -> None:
    script(world, argv(agent, "list", "--all"), stdout=LIST_OUTPUT)

    vms = asyncio.run(world.portal.vms.list_vms(alice, agent.id))

    assert vms == [VmSummary("lab-guest1", "running", 1), VmSummary("lab guest 2", "shut off", None)]
    assert world.shell.calls == [(agent.id, ("virsh", "--connect", DEFAULT_LIBVIRT_URI, "list", "--all"))]
    [target] = world.shell.targets
    assert target.agent.id == agent.id
    assert (target.private_key, target.private_key_passphrase) == (ENCRYPTED_KEY, PASSPHRASE)


def test_list_vms_uses_the_agents_own_libvirt_uri(world: World, alice: Caller) -> None:
    agent = register(world, alice, libvirt_uri="qemu:///session")
    script(world, ("virsh", "--connect", "qemu:///session", "list", "--all"), stdout=LIST_OUTPUT)

    assert len(asyncio.run(world.portal.vms.list_vms(alice, agent.id))) == 2
    assert world.shell.calls == [(agent.id, ("virsh", "--connect", "qemu:///session", "list", "--all"))]


def test_list_vms_of_an_empty_hypervisor_is_empty(world: World, alice: Caller, agent: Agent) -> None:
    script(world, argv(agent, "list", "--all"), stdout=" Id   Name   State\n--------------------\n\n")
    assert asyncio.run(world.portal.vms.list_vms(alice, agent.id)) == []


def test_list_vms_maps_a_virsh_failure(world: World, alice: Caller, agent: Agent) -> None:
    script(world, argv(agent, "list", "--all"), exit_status=1,
           stderr="error: failed to connect to the hypervisor\nerror: Failed to connect socket to "
                  "'/var/run/libvirt/libvirt-sock': No such file or directory")
    with pytest.raises(RemoteError) as raised:
        asyncio.run(world.portal.vms.list_vms(alice, agent.id))
    assert raised.value.code == "libvirt_unavailable"


# ---------------------------------------------------------------------------------------- vm_info


def test_vm_info_returns_the_parsed_dominfo_and_the_raw_result(world: World, alice: Caller, agent: Agent) -> None:
    result = script(world, argv(agent, "dominfo", "--domain", "lab-guest1"), stdout=DOMINFO_OUTPUT)

    info = asyncio.run(world.portal.vms.vm_info(alice, agent.id, "lab-guest1"))

    assert info == VmInfo(dominfo={"id": 2, "name": "lab-guest1", "uuid": "8175cf7c-903d-4947-be34-b63e2b3ccc0f",
                                   "os_type": "hvm", "state": "running", "cpus": "1", "max_memory": "131072 KiB"},
                          raw=result)
    assert world.shell.calls == [(agent.id, ("virsh", "--connect", DEFAULT_LIBVIRT_URI, "dominfo", "--domain",
                                             "lab-guest1"))]


def test_vm_info_of_an_unknown_vm_is_not_found(world: World, alice: Caller, agent: Agent) -> None:
    script(world, argv(agent, "dominfo", "--domain", "nosuch"), exit_status=1,
           stderr="error: failed to get domain 'nosuch'")
    with pytest.raises(NotFound) as raised:
        asyncio.run(world.portal.vms.vm_info(alice, agent.id, "nosuch"))
    assert raised.value.code == "vm_not_found"


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_vm_info_refuses_a_hostile_name_without_calling_the_shell(world: World, alice: Caller, agent: Agent,
                                                                  name: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        asyncio.run(world.portal.vms.vm_info(alice, agent.id, name))
    assert [e.field for e in refused.value.errors] == ["vm"]
    assert world.shell.calls == []


def test_list_and_info_are_not_audited(world: World, alice: Caller, agent: Agent) -> None:
    script(world, argv(agent, "list", "--all"), stdout=LIST_OUTPUT)
    script(world, argv(agent, "dominfo", "--domain", "lab-guest1"), stdout=DOMINFO_OUTPUT)
    before = len(events(world))

    asyncio.run(world.portal.vms.list_vms(alice, agent.id))
    asyncio.run(world.portal.vms.vm_info(alice, agent.id, "lab-guest1"))

    assert len(world.shell.calls) == 2
    assert events(world)[before:] == []


# ---------------------------------------------------------------------------------------- vm_action


@pytest.mark.parametrize("action", list(VmAction), ids=lambda a: a.value)
def test_vm_action_sends_its_subcommand_and_returns_the_command_result(world: World, alice: Caller, agent: Agent,
                                                                       action: VmAction) -> None:
    command = ("virsh", "--connect", DEFAULT_LIBVIRT_URI, action.subcommand, "--domain", "lab guest 2")
    result = script(world, command, stdout="Domain 'lab guest 2' done\n\n")

    assert asyncio.run(world.portal.vms.vm_action(alice, agent.id, "lab guest 2", action)) == result
    assert world.shell.calls == [(agent.id, command)]


@pytest.mark.parametrize("action", list(VmAction), ids=lambda a: a.value)
def test_each_vm_action_leaves_exactly_one_ok_event(world: World, alice: Caller, agent: Agent,
                                                    action: VmAction) -> None:
    before = len(events(world))

    asyncio.run(world.portal.vms.vm_action(alice, agent.id, "lab-guest1", action))

    [event] = events(world)[before:]
    assert (event.action, event.outcome) == (AUDIT_ACTIONS[action], "ok")
    assert (event.user_id, event.agent_id, event.vm) == (alice.user.id, agent.id, "lab-guest1")
    assert (event.request_id, event.client_address, event.detail) == (alice.request_id, alice.client_address, None)


def test_a_refused_vm_action_leaves_one_event_with_the_error_code(world: World, alice: Caller, agent: Agent) -> None:
    script(world, argv(agent, "start", "--domain", "lab-guest1"), exit_status=1,
           stderr="error: Domain is already active")
    before = len(events(world))

    with pytest.raises(Conflict) as raised:
        asyncio.run(world.portal.vms.vm_action(alice, agent.id, "lab-guest1", VmAction.START))

    assert raised.value.code == "vm_already_running"
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.agent_id, event.vm) == (
        "vm.start", "vm_already_running", agent.id, "lab-guest1")
    assert event.detail


@pytest.mark.parametrize("action", [VmAction.SHUTDOWN, VmAction.FORCE_STOP, VmAction.REBOOT], ids=lambda a: a.value)
def test_an_action_on_a_stopped_vm_is_a_conflict_and_audited(world: World, alice: Caller, agent: Agent,
                                                             action: VmAction) -> None:
    script(world, argv(agent, action.subcommand, "--domain", "lab-guest2"), exit_status=1,
           stderr=f"error: Failed to {action.subcommand} domain 'lab-guest2'\n"
                  "error: Requested operation is not valid: domain is not running")
    before = len(events(world))

    with pytest.raises(Conflict) as raised:
        asyncio.run(world.portal.vms.vm_action(alice, agent.id, "lab-guest2", action))

    assert raised.value.code == "vm_not_running"
    [event] = events(world)[before:]
    assert (event.action, event.outcome) == (AUDIT_ACTIONS[action], "vm_not_running")


def test_a_vm_action_the_transport_fails_is_audited_with_its_code(world: World, alice: Caller, agent: Agent) -> None:
    world.shell.failure = RemoteTimeout("the command did not finish in time")
    before = len(events(world))

    with pytest.raises(RemoteTimeout):
        asyncio.run(world.portal.vms.vm_action(alice, agent.id, "lab-guest1", VmAction.REBOOT))

    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.vm) == ("vm.reboot", "agent_timeout", "lab-guest1")


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_a_hostile_vm_name_is_refused_audited_and_never_reaches_the_shell(world: World, alice: Caller, agent: Agent,
                                                                          name: str) -> None:
    before = len(events(world))

    with pytest.raises(ValidationFailed) as refused:
        asyncio.run(world.portal.vms.vm_action(alice, agent.id, name, VmAction.START))

    assert [e.field for e in refused.value.errors] == ["vm"]
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.agent_id) == ("vm.start", "validation_failed", agent.id)
    assert world.shell.calls == []


# ---------------------------------------------------------------------------------------- ownership


def test_another_users_agent_is_not_found_and_never_reaches_the_shell(world: World, bob: Caller,
                                                                      agent: Agent) -> None:
    for call in (lambda: world.portal.vms.list_vms(bob, agent.id),
                 lambda: world.portal.vms.vm_info(bob, agent.id, "lab-guest1"),
                 lambda: world.portal.vms.vm_action(bob, agent.id, "lab-guest1", VmAction.FORCE_STOP)):
        with pytest.raises(NotFound) as raised:
            asyncio.run(call())
        assert raised.value.code == "agent_not_found"
    assert world.shell.calls == []
    assert world.shell.targets == []


def test_a_refused_action_on_another_users_agent_is_audited_for_the_caller_only(world: World, alice: Caller,
                                                                                bob: Caller, agent: Agent) -> None:
    before = len(events(world))
    with pytest.raises(NotFound):
        asyncio.run(world.portal.vms.vm_action(bob, agent.id, "lab-guest1", VmAction.START))
    [event] = events(world)[before:]
    assert (event.user_id, event.outcome) == (bob.user.id, "agent_not_found")
    assert world.portal.audit.audit_events(alice)[0].action == "agent.create"


# ---------------------------------------------------------------------------------------- trust on first use


def test_the_first_host_key_seen_is_pinned_and_audited(world: World, alice: Caller) -> None:
    agent = register(world, alice, host_key=None, allow_unknown_hosts=True)
    script(world, argv(agent, "list", "--all"), stdout=LIST_OUTPUT, host_key=SEEN_KEY)
    before = len(events(world))

    asyncio.run(world.portal.vms.list_vms(alice, agent.id))

    assert world.portal.agents.get_agent(alice, agent.id).host_key == SEEN_KEY
    [event] = events(world)[before:]
    assert (event.action, event.outcome, event.agent_id, event.user_id) == (
        "agent.pin_host_key", "ok", agent.id, alice.user.id)
    assert event.detail is not None and SEEN_KEY.fingerprint in event.detail


def test_a_vm_action_pins_the_first_host_key_too(world: World, alice: Caller) -> None:
    agent = register(world, alice, host_key=None, allow_unknown_hosts=True)
    script(world, argv(agent, "start", "--domain", "lab-guest1"), host_key=SEEN_KEY)
    before = len(events(world))

    asyncio.run(world.portal.vms.vm_action(alice, agent.id, "lab-guest1", VmAction.START))

    assert world.portal.agents.get_agent(alice, agent.id).host_key == SEEN_KEY
    assert [e.action for e in events(world)[before:]] == ["agent.pin_host_key", "vm.start"]


def test_a_pinned_host_key_is_not_replaced_by_another_seen_key(world: World, alice: Caller, agent: Agent) -> None:
    pinned = agent.host_key
    assert pinned is not None
    script(world, argv(agent, "list", "--all"), stdout=LIST_OUTPUT, host_key=OTHER_SEEN_KEY)
    before = len(events(world))

    asyncio.run(world.portal.vms.list_vms(alice, agent.id))

    assert world.portal.agents.get_agent(alice, agent.id).host_key == pinned
    assert events(world)[before:] == []


def test_a_key_pinned_on_first_use_is_not_replaced_later(world: World, alice: Caller) -> None:
    agent = register(world, alice, host_key=None, allow_unknown_hosts=True)
    script(world, argv(agent, "list", "--all"), stdout=LIST_OUTPUT, host_key=SEEN_KEY)
    asyncio.run(world.portal.vms.list_vms(alice, agent.id))
    script(world, argv(agent, "list", "--all"), stdout=LIST_OUTPUT, host_key=OTHER_SEEN_KEY)
    before = len(events(world))

    asyncio.run(world.portal.vms.list_vms(alice, agent.id))

    assert world.portal.agents.get_agent(alice, agent.id).host_key == SEEN_KEY
    assert events(world)[before:] == []


# ---------------------------------------------------------------------------------------- pooled connections


def test_changing_the_hostname_discards_pooled_connections(world: World, alice: Caller, agent: Agent) -> None:
    world.portal.agents.update_agent(alice, agent.id, AgentChanges(hostname="192.0.2.99"))
    assert world.shell.discarded == [agent.id]


def test_deleting_an_agent_discards_pooled_connections(world: World, alice: Caller, agent: Agent) -> None:
    world.portal.agents.delete_agent(alice, agent.id)
    assert world.shell.discarded == [agent.id]


def test_a_rename_keeps_pooled_connections(world: World, alice: Caller, agent: Agent) -> None:
    world.portal.agents.update_agent(alice, agent.id, AgentChanges(name="renamed"))
    assert world.shell.discarded == []
