"""Unit tests of the users, agents and audit use cases (``core/users.py``, ``core/agents.py``,
``core/audit.py``), run against the in-memory fakes of ``adapters/memory.py`` (no disk, no network,
no real cryptography)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest

from adapters.memory import FakeSshKeys, InMemoryTransaction
from core.commands import AgentChanges, NewAgent, NewUser
from core.errors import (
    AgentNotFound,
    Conflict,
    KeyNotExportable,
    NotFound,
    PortalError,
    SecretUnreadable,
    SignupRefused,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)
from core.model import DEFAULT_LIBVIRT_URI, Agent, AuditEvent, Caller, HostKey, Origin, SignupPolicy, api_key_prefix
from core.portal import Portal
from tests.unit.world import (
    ENCRYPTED_KEY,
    HOST_KEY,
    OPERATOR,
    PASSPHRASE,
    FakeShell,
    World,
    events,
    make_world,
    new_events,
)

PLAIN_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
OTHER_PLAIN_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEBBBB\n-----END OPENSSH PRIVATE KEY-----\n"
OTHER_ENCRYPTED_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nENCRYPTED:hunter2 b3BlbnNzaC1rZXktdjEDDDD\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
OTHER_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyNumberTwo host1"

SIGNUP_ORIGIN = Origin(request_id="req-signup", client_address="203.0.113.7")


# ---------------------------------------------------------------------------------------- fixtures


def new_agent(**fields: Any) -> NewAgent:
    """An agent with a plain key and no host key; ``fields`` change it."""
    base: dict[str, Any] = {
        "name": "hv1",
        "hostname": "192.0.2.15",
        "username": "qemu-admin",
        "private_key": PLAIN_KEY,
    }
    base.update(fields)
    return NewAgent(**base)


@pytest.fixture
def alice_agent(world: World, alice: Caller) -> Agent:
    return world.portal.agents.register_agent(alice, new_agent())


def everything_but_events(world: World) -> tuple[object, ...]:
    state = world.storage.state
    return (dict(state.users), dict(state.email_keys), dict(state.keys), dict(state.agents))


def fields_of(error: ValidationFailed) -> list[str]:
    return [e.field for e in error.errors]


# ---------------------------------------------------------------------------------------- sign-up


def test_open_signup_creates_every_user() -> None:
    world = make_world(signup=SignupPolicy.OPEN)
    first = world.portal.users.sign_up(NewUser(name="alice"), SIGNUP_ORIGIN)
    second = world.portal.users.sign_up(NewUser(name="bob"), SIGNUP_ORIGIN)
    assert first.user.id != second.user.id
    assert [u.name for u in world.portal.users.list_users()] == ["alice", "bob"]


def test_first_signup_creates_the_first_user_then_refuses_and_says_how() -> None:
    world = make_world(signup=SignupPolicy.FIRST)
    world.portal.users.sign_up(NewUser(name="alice"), SIGNUP_ORIGIN)

    with pytest.raises(SignupRefused) as refused:
        world.portal.users.sign_up(NewUser(name="mallory"), SIGNUP_ORIGIN)

    assert refused.value.code == "signup_closed"
    assert "users create" in refused.value.detail
    assert "MANAGEMENT_SIGNUP" in refused.value.detail
    assert [u.name for u in world.portal.users.list_users()] == ["alice"]


def test_closed_signup_refuses_even_the_first_user_and_says_how() -> None:
    world = make_world(signup=SignupPolicy.CLOSED)
    with pytest.raises(SignupRefused) as refused:
        world.portal.users.sign_up(NewUser(name="alice"), SIGNUP_ORIGIN)
    assert "users create" in refused.value.detail
    assert "MANAGEMENT_SIGNUP" in refused.value.detail
    assert world.portal.users.list_users() == []


@pytest.mark.parametrize("policy", [SignupPolicy.FIRST, SignupPolicy.CLOSED])
def test_operator_create_user_ignores_the_signup_policy(policy: SignupPolicy) -> None:
    world = make_world(signup=policy)
    world.portal.users.create_user(NewUser(name="alice"), OPERATOR)
    world.portal.users.create_user(NewUser(name="bob"), OPERATOR)
    assert [u.name for u in world.portal.users.list_users()] == ["alice", "bob"]


def test_sign_up_returns_a_key_that_authenticates_the_new_user(world: World) -> None:
    created = world.portal.users.sign_up(NewUser(name="alice", email="alice@example.com"), SIGNUP_ORIGIN)
    assert created.user.email == "alice@example.com"
    assert created.user.api_key_prefix == api_key_prefix(created.api_key)
    assert world.portal.users.authenticate(created.api_key) == created.user


def test_sign_up_is_audited_as_the_new_user_with_the_origin(world: World) -> None:
    created = world.portal.users.sign_up(NewUser(name="alice"), SIGNUP_ORIGIN)
    [event] = events(world)
    assert (event.user_id, event.action, event.outcome) == (created.user.id, "user.create", "ok")
    assert (event.request_id, event.client_address) == ("req-signup", "203.0.113.7")


@pytest.mark.parametrize("create", ["sign_up", "create_user"])
def test_duplicate_email_is_a_conflict_whatever_its_case(world: World, create: str) -> None:
    world.portal.users.sign_up(NewUser(name="alice", email="Alice@Example.com"), SIGNUP_ORIGIN)
    with pytest.raises(Conflict) as conflict:
        getattr(world.portal.users, create)(NewUser(name="alice2", email="aLICE@example.COM"), SIGNUP_ORIGIN)
    assert conflict.value.code == "email_taken"
    assert [u.name for u in world.portal.users.list_users()] == ["alice"]


def test_users_without_email_never_clash(world: World) -> None:
    world.portal.users.sign_up(NewUser(name="alice"), SIGNUP_ORIGIN)
    world.portal.users.sign_up(NewUser(name="alice"), SIGNUP_ORIGIN)
    assert len(world.portal.users.list_users()) == 2


@pytest.mark.parametrize(
    ("name", "email", "field"),
    [
        ("", None, "name"),
        (" alice", None, "name"),
        ("alice ", None, "name"),
        ("a" * 101, None, "name"),
        ("ali\x00ce", None, "name"),
        ("alice", "not-an-email", "email"),
        ("alice", "alice @example.com", "email"),
        ("alice", "", "email"),
    ],
)
def test_invalid_user_fields_are_refused_naming_the_field(world: World, name: str, email: str | None,
                                                         field: str) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        world.portal.users.sign_up(NewUser(name=name, email=email), SIGNUP_ORIGIN)
    assert fields_of(invalid.value) == [field]
    assert world.portal.users.list_users() == []


def test_invalid_name_and_email_are_reported_together(world: World) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        world.portal.users.create_user(NewUser(name="", email="nope"), OPERATOR)
    assert fields_of(invalid.value) == ["name", "email"]


def test_find_user_by_id_and_by_email_case_insensitively(world: World, alice: Caller) -> None:
    assert world.portal.users.find_user(user_id=alice.user.id) == alice.user
    assert world.portal.users.find_user(email="ALICE@example.com") == alice.user


@pytest.mark.parametrize("query", [{"user_id": 999}, {"email": "nobody@example.com"}, {}])
def test_find_user_reports_an_unknown_user(world: World, alice: Caller, query: dict[str, Any]) -> None:
    with pytest.raises(NotFound) as missing:
        world.portal.users.find_user(**query)
    assert missing.value.code == "user_not_found"


# ---------------------------------------------------------------------------------------- API keys


def test_authenticate_returns_the_owner_of_a_valid_key(world: World) -> None:
    alice = world.portal.users.create_user(NewUser(name="alice"), OPERATOR)
    bob = world.portal.users.create_user(NewUser(name="bob"), OPERATOR)
    assert world.portal.users.authenticate(alice.api_key) == alice.user
    assert world.portal.users.authenticate(bob.api_key) == bob.user


@pytest.mark.parametrize("text", ["", "garbage", "Bearer mgmt_", "mgmt_000000000001", "mgmt_XYZ_" + "a" * 43,
                                  "mgmt_000000000001_short", "mgmt_000000000001_" + "a" * 42 + "!"])
def test_authenticate_refuses_a_malformed_key(world: World, text: str) -> None:
    world.portal.users.create_user(NewUser(name="alice"), OPERATOR)
    assert api_key_prefix(text) is None
    with pytest.raises(Unauthenticated):
        world.portal.users.authenticate(text)


def test_authenticate_refuses_a_well_formed_but_wrong_key(world: World) -> None:
    created = world.portal.users.create_user(NewUser(name="alice"), OPERATOR)
    key = created.api_key
    same_prefix_wrong_secret = key[:-1] + ("A" if key[-1] != "A" else "B")
    unknown_prefix = "mgmt_ffffffffffff_" + key.split("_", 2)[2]
    for wrong in (same_prefix_wrong_secret, unknown_prefix):
        assert api_key_prefix(wrong) is not None  # well-formed: refused by lookup/hash, not by shape
        with pytest.raises(Unauthenticated):
            world.portal.users.authenticate(wrong)


def test_rotation_kills_the_old_key_at_once_and_the_new_key_works(world: World) -> None:
    created = world.portal.users.create_user(NewUser(name="alice"), OPERATOR)
    caller = Caller(user=created.user, request_id="req-rotate", client_address="198.51.100.10")

    rotated = world.portal.users.rotate_api_key(caller)

    assert rotated.api_key != created.api_key
    assert rotated.user.api_key_prefix == api_key_prefix(rotated.api_key)
    assert world.portal.users.authenticate(rotated.api_key).id == created.user.id
    with pytest.raises(Unauthenticated):
        world.portal.users.authenticate(created.api_key)


# ---------------------------------------------------------------------------------------- register_agent


def test_register_agent_stores_the_agent_with_defaults(world: World, alice: Caller) -> None:
    agent = world.portal.agents.register_agent(alice, new_agent())
    assert agent.id > 0
    assert agent.owner_id == alice.user.id
    assert (agent.name, agent.hostname, agent.username) == ("hv1", "192.0.2.15", "qemu-admin")
    assert agent.port == 22
    assert agent.libvirt_uri == DEFAULT_LIBVIRT_URI == "qemu:///system"
    assert agent.allow_unknown_hosts is False
    assert agent.host_key is None
    assert agent.client_key == FakeSshKeys().inspect_private_key(PLAIN_KEY, None)
    assert agent.revision == 1
    assert world.portal.agents.get_agent(alice, agent.id) == agent
    assert world.portal.agents.list_agents(alice) == [agent]


def test_register_agent_keeps_explicit_settings_and_parses_the_host_key(world: World, alice: Caller) -> None:
    agent = world.portal.agents.register_agent(alice, new_agent(
        port=2222, libvirt_uri="qemu+ssh://hv/system", allow_unknown_hosts=True, host_key=HOST_KEY))
    assert agent.port == 2222
    assert agent.libvirt_uri == "qemu+ssh://hv/system"
    assert agent.allow_unknown_hosts is True
    assert agent.host_key == FakeSshKeys().parse_host_key(HOST_KEY)


INVALID_AGENT_FIELDS = [
    pytest.param({"name": ""}, "name", id="empty-name"),
    pytest.param({"hostname": "-oProxyCommand=touch_x"}, "hostname", id="hostname-leading-dash"),
    pytest.param({"hostname": "host name"}, "hostname", id="hostname-space"),
    pytest.param({"hostname": "host\tname"}, "hostname", id="hostname-tab"),
    pytest.param({"hostname": "evil.example\n"}, "hostname", id="hostname-newline"),
    pytest.param({"port": 0}, "port", id="port-0"),
    pytest.param({"port": 65536}, "port", id="port-65536"),
    pytest.param({"username": "-oProxyCommand"}, "username", id="username-leading-dash"),
    pytest.param({"username": "root;id"}, "username", id="username-metachar"),
    pytest.param({"libvirt_uri": "not a uri"}, "libvirt_uri", id="bad-libvirt-uri"),
    pytest.param({"private_key": "hello, I am not a key"}, "private_key", id="key-not-a-key"),
    pytest.param({"private_key": "/home/alice/.ssh/id_ed25519"}, "private_key", id="key-is-a-path"),
    pytest.param({"private_key": ENCRYPTED_KEY}, "private_key_passphrase", id="encrypted-no-passphrase"),
    pytest.param({"private_key": ENCRYPTED_KEY, "private_key_passphrase": "wrong"}, "private_key_passphrase",
                 id="wrong-passphrase"),
    pytest.param({"host_key": "not a host key"}, "host_key", id="bad-host-key"),
]


@pytest.mark.parametrize(("fields", "field"), INVALID_AGENT_FIELDS)
def test_register_agent_reports_each_invalid_field_by_name(world: World, alice: Caller, fields: dict[str, Any],
                                                          field: str) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        world.portal.agents.register_agent(alice, new_agent(**fields))
    assert fields_of(invalid.value) == [field]
    assert world.portal.agents.list_agents(alice) == []


def test_register_agent_reports_several_errors_together(world: World, alice: Caller) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        world.portal.agents.register_agent(alice, new_agent(
            hostname="-bad", port=0, username="-root", libvirt_uri="nope",
            private_key="not a key", host_key="nope"))
    assert set(fields_of(invalid.value)) == {"hostname", "port", "username", "libvirt_uri", "private_key",
                                            "host_key"}


def test_register_agent_refuses_a_duplicate_name_for_the_same_owner(world: World, alice: Caller,
                                                                   alice_agent: Agent) -> None:
    with pytest.raises(Conflict) as conflict:
        world.portal.agents.register_agent(alice, new_agent(hostname="192.0.2.99"))
    assert conflict.value.code == "agent_name_taken"
    assert world.portal.agents.list_agents(alice) == [alice_agent]


def test_agent_names_are_unique_per_owner_only(world: World, alice: Caller, bob: Caller,
                                               alice_agent: Agent) -> None:
    bobs = world.portal.agents.register_agent(bob, new_agent(name=alice_agent.name))
    assert bobs.name == alice_agent.name
    assert bobs.id != alice_agent.id


def test_secrets_are_sealed_at_rest_and_read_back_in_clear(world: World, alice: Caller) -> None:
    agent = world.portal.agents.register_agent(
        alice, new_agent(private_key=ENCRYPTED_KEY, private_key_passphrase=PASSPHRASE))
    stored = world.storage.state.agents[agent.id]

    assert stored.sealed_private_key != ENCRYPTED_KEY
    assert ENCRYPTED_KEY not in stored.sealed_private_key
    assert stored.sealed_passphrase is not None
    assert PASSPHRASE not in stored.sealed_passphrase

    credentials = world.portal.agents.read_credentials(alice, agent.id)
    assert credentials.private_key == ENCRYPTED_KEY
    assert credentials.private_key_passphrase == PASSPHRASE
    assert credentials.agent == agent


def test_an_unencrypted_key_has_no_sealed_passphrase(world: World, alice: Caller, alice_agent: Agent) -> None:
    assert alice_agent.sealed_passphrase is None
    assert world.portal.agents.read_credentials(alice, alice_agent.id).private_key_passphrase is None


def test_sealed_key_is_bound_to_its_owner(world: World, alice: Caller, bob: Caller, alice_agent: Agent) -> None:
    """A sealed key copied into another user's row (e.g. by someone with database access) won't open."""
    bobs = world.portal.agents.register_agent(bob, new_agent(private_key=OTHER_PLAIN_KEY))
    world.storage.state.agents[bobs.id] = attrs.evolve(bobs, sealed_private_key=alice_agent.sealed_private_key)

    with pytest.raises(SecretUnreadable):
        world.portal.agents.read_credentials(bob, bobs.id)
    assert world.portal.agents.read_credentials(alice, alice_agent.id).private_key == PLAIN_KEY


def test_sealed_passphrase_cannot_be_opened_as_a_private_key(world: World, alice: Caller) -> None:
    agent = world.portal.agents.register_agent(
        alice, new_agent(private_key=ENCRYPTED_KEY, private_key_passphrase=PASSPHRASE))
    assert agent.sealed_passphrase is not None
    world.storage.state.agents[agent.id] = attrs.evolve(agent, sealed_private_key=agent.sealed_passphrase)
    with pytest.raises(SecretUnreadable):
        world.portal.agents.read_credentials(alice, agent.id)


# ---------------------------------------------------------------------------------------- update_agent


def test_partial_update_changes_only_the_given_field(world: World, alice: Caller) -> None:
    before = world.portal.agents.register_agent(alice, new_agent(
        port=2200, libvirt_uri="qemu:///session", allow_unknown_hosts=True, host_key=HOST_KEY,
        private_key=ENCRYPTED_KEY, private_key_passphrase=PASSPHRASE))

    after = world.portal.agents.update_agent(alice, before.id, AgentChanges(port=2222))

    assert after.updated_at > before.updated_at
    assert after == attrs.evolve(before, port=2222, revision=after.revision, updated_at=after.updated_at)
    assert world.portal.agents.get_agent(alice, before.id) == after
    credentials = world.portal.agents.read_credentials(alice, before.id)
    assert (credentials.private_key, credentials.private_key_passphrase) == (ENCRYPTED_KEY, PASSPHRASE)


def test_update_agent_validates_fields_like_registration(world: World, alice: Caller, alice_agent: Agent) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(
            name=" ", hostname="-x", port=65536, username="-u", libvirt_uri="nope", host_key="nope",
            private_key="nope"))
    assert set(fields_of(invalid.value)) == {"name", "hostname", "port", "username", "libvirt_uri", "host_key",
                                            "private_key"}
    assert world.portal.agents.get_agent(alice, alice_agent.id) == alice_agent


def test_update_agent_refuses_a_name_taken_by_another_of_the_owners_agents(world: World, alice: Caller,
                                                                         alice_agent: Agent) -> None:
    second = world.portal.agents.register_agent(alice, new_agent(name="hv2"))
    with pytest.raises(Conflict) as conflict:
        world.portal.agents.update_agent(alice, second.id, AgentChanges(name=alice_agent.name))
    assert conflict.value.code == "agent_name_taken"
    assert world.portal.agents.get_agent(alice, second.id) == second


def test_update_agent_may_keep_its_own_name_or_take_another_users_agent_name(
        world: World, alice: Caller, bob: Caller, alice_agent: Agent) -> None:
    world.portal.agents.register_agent(bob, new_agent(name="bobs-hv"))
    assert world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(name=alice_agent.name)).name == "hv1"
    assert world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(name="bobs-hv")).name == "bobs-hv"


@pytest.fixture
def encrypted_agent(world: World, alice: Caller) -> Agent:
    return world.portal.agents.register_agent(
        alice, new_agent(name="enc", private_key=ENCRYPTED_KEY, private_key_passphrase=PASSPHRASE))


@pytest.mark.parametrize("passphrase", ["wrong", None])
def test_a_new_passphrase_alone_must_open_the_stored_key(world: World, alice: Caller, encrypted_agent: Agent,
                                                        passphrase: str | None) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        world.portal.agents.update_agent(alice, encrypted_agent.id, AgentChanges(private_key_passphrase=passphrase))
    assert fields_of(invalid.value) == ["private_key_passphrase"]
    assert world.portal.agents.read_credentials(alice, encrypted_agent.id).private_key_passphrase == PASSPHRASE


def test_a_new_passphrase_alone_that_opens_the_stored_key_is_kept(world: World, alice: Caller,
                                                                 alice_agent: Agent) -> None:
    # The fake accepts any passphrase for an unencrypted key: the pair still opens, so it is stored.
    world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(private_key_passphrase="extra"))
    credentials = world.portal.agents.read_credentials(alice, alice_agent.id)
    assert (credentials.private_key, credentials.private_key_passphrase) == (PLAIN_KEY, "extra")


def test_a_new_key_without_a_passphrase_clears_the_stored_passphrase(world: World, alice: Caller,
                                                                    encrypted_agent: Agent) -> None:
    updated = world.portal.agents.update_agent(alice, encrypted_agent.id, AgentChanges(private_key=OTHER_PLAIN_KEY))
    assert updated.sealed_passphrase is None
    assert updated.client_key == FakeSshKeys().inspect_private_key(OTHER_PLAIN_KEY, None)
    credentials = world.portal.agents.read_credentials(alice, encrypted_agent.id)
    assert (credentials.private_key, credentials.private_key_passphrase) == (OTHER_PLAIN_KEY, None)


def test_a_new_encrypted_key_does_not_reuse_the_stored_passphrase(world: World, alice: Caller,
                                                                 encrypted_agent: Agent) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        world.portal.agents.update_agent(alice, encrypted_agent.id, AgentChanges(private_key=OTHER_ENCRYPTED_KEY))
    assert fields_of(invalid.value) == ["private_key_passphrase"]
    assert world.portal.agents.read_credentials(alice, encrypted_agent.id).private_key == ENCRYPTED_KEY


def test_a_new_encrypted_key_with_its_passphrase_replaces_both(world: World, alice: Caller,
                                                              alice_agent: Agent) -> None:
    world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(private_key=OTHER_ENCRYPTED_KEY,
                                                                  private_key_passphrase=PASSPHRASE))
    credentials = world.portal.agents.read_credentials(alice, alice_agent.id)
    assert (credentials.private_key, credentials.private_key_passphrase) == (OTHER_ENCRYPTED_KEY, PASSPHRASE)


def test_host_key_can_be_pinned_replaced_and_cleared(world: World, alice: Caller, alice_agent: Agent) -> None:
    pinned = world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(host_key=HOST_KEY))
    assert pinned.host_key == FakeSshKeys().parse_host_key(HOST_KEY)
    replaced = world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(host_key=OTHER_HOST_KEY))
    assert replaced.host_key == FakeSshKeys().parse_host_key(OTHER_HOST_KEY)
    cleared = world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(host_key=None))
    assert cleared.host_key is None
    assert world.portal.agents.get_agent(alice, alice_agent.id).host_key is None


def test_libvirt_uri_null_restores_the_default(world: World, alice: Caller) -> None:
    agent = world.portal.agents.register_agent(alice, new_agent(libvirt_uri="qemu:///session"))
    updated = world.portal.agents.update_agent(alice, agent.id, AgentChanges(libvirt_uri=None))
    assert updated.libvirt_uri == DEFAULT_LIBVIRT_URI


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(AgentChanges(hostname="192.0.2.16"), id="hostname"),
        pytest.param(AgentChanges(port=2222), id="port"),
        pytest.param(AgentChanges(username="other"), id="username"),
        pytest.param(AgentChanges(host_key=HOST_KEY), id="host_key"),
        pytest.param(AgentChanges(private_key=OTHER_PLAIN_KEY), id="private_key"),
        pytest.param(AgentChanges(libvirt_uri="qemu:///session"), id="libvirt_uri"),
        pytest.param(AgentChanges(allow_unknown_hosts=True), id="allow_unknown_hosts"),
    ],
)
def test_revision_increases_when_connection_settings_change(world: World, alice: Caller, alice_agent: Agent,
                                                           changes: AgentChanges) -> None:
    updated = world.portal.agents.update_agent(alice, alice_agent.id, changes)
    assert updated.revision == alice_agent.revision + 1
    assert world.portal.agents.get_agent(alice, alice_agent.id).revision == alice_agent.revision + 1


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(AgentChanges(name="renamed"), id="rename"),
        pytest.param(AgentChanges(hostname="192.0.2.15", port=22, username="qemu-admin"), id="same-values"),
        pytest.param(AgentChanges(), id="nothing"),
    ],
)
def test_revision_stays_when_no_connection_setting_changes(world: World, alice: Caller, alice_agent: Agent,
                                                          changes: AgentChanges) -> None:
    updated = world.portal.agents.update_agent(alice, alice_agent.id, changes)
    assert updated.revision == alice_agent.revision


def test_revision_keeps_increasing_across_updates(world: World, alice: Caller, alice_agent: Agent) -> None:
    world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(port=2201))
    world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(name="renamed"))
    world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(port=2202))
    assert world.portal.agents.get_agent(alice, alice_agent.id).revision == alice_agent.revision + 2


# ---------------------------------------------------------------------------------------- delete, get


def test_deleted_agent_is_gone(world: World, alice: Caller, alice_agent: Agent) -> None:
    world.portal.agents.delete_agent(alice, alice_agent.id)

    with pytest.raises(NotFound) as missing:
        world.portal.agents.get_agent(alice, alice_agent.id)
    assert missing.value.code == "agent_not_found"
    assert world.portal.agents.list_agents(alice) == []
    with pytest.raises(NotFound) as again:
        world.portal.agents.delete_agent(alice, alice_agent.id)
    assert again.value.code == "agent_not_found"


def test_getting_an_unknown_agent_is_not_found(world: World, alice: Caller) -> None:
    with pytest.raises(NotFound) as missing:
        world.portal.agents.get_agent(alice, 12345)
    assert missing.value.code == "agent_not_found"


def test_list_agents_is_oldest_first(world: World, alice: Caller) -> None:
    first = world.portal.agents.register_agent(alice, new_agent(name="a2"))
    second = world.portal.agents.register_agent(alice, new_agent(name="a1"))
    assert [a.id for a in world.portal.agents.list_agents(alice)] == [first.id, second.id]


# ---------------------------------------------------------------------------------------- isolation

FOREIGN_OPERATIONS: dict[str, Callable[[Portal, Caller, int], object]] = {
    "get": lambda portal, caller, agent_id: portal.agents.get_agent(caller, agent_id),
    "update": lambda portal, caller, agent_id: portal.agents.update_agent(caller, agent_id, AgentChanges(port=2222)),
    "update-invalid": lambda portal, caller, agent_id: portal.agents.update_agent(
        caller, agent_id, AgentChanges(hostname="-x", private_key="nope")),
    "update-clashing-name": lambda portal, caller, agent_id: portal.agents.update_agent(
        caller, agent_id, AgentChanges(name="bobs-hv")),
    "delete": lambda portal, caller, agent_id: portal.agents.delete_agent(caller, agent_id),
    "read_credentials": lambda portal, caller, agent_id: portal.agents.read_credentials(caller, agent_id),
}


@pytest.mark.parametrize("operation", FOREIGN_OPERATIONS.values(), ids=FOREIGN_OPERATIONS.keys())
def test_another_users_agent_is_not_found_and_untouched(world: World, alice: Caller, bob: Caller,
                                                       alice_agent: Agent,
                                                       operation: Callable[[Portal, Caller, int], object]) -> None:
    world.portal.agents.register_agent(bob, new_agent(name="bobs-hv"))
    with pytest.raises(NotFound) as foreign:
        operation(world.portal, bob, alice_agent.id)
    with pytest.raises(NotFound) as absent:
        operation(world.portal, bob, 99999)

    assert type(foreign.value) is AgentNotFound  # the same type as for an agent that does not exist
    assert type(absent.value) is AgentNotFound
    assert foreign.value.code == "agent_not_found"
    assert foreign.value.detail == absent.value.detail  # indistinguishable from an agent that does not exist
    assert world.portal.agents.get_agent(alice, alice_agent.id) == alice_agent
    assert world.portal.agents.read_credentials(alice, alice_agent.id).private_key == PLAIN_KEY


def test_list_agents_shows_only_the_callers_agents(world: World, alice: Caller, bob: Caller,
                                                  alice_agent: Agent) -> None:
    bobs = world.portal.agents.register_agent(bob, new_agent(name="bobs-hv"))
    assert world.portal.agents.list_agents(bob) == [bobs]
    assert world.portal.agents.list_agents(alice) == [alice_agent]


# ---------------------------------------------------------------------------------------- pin_host_key


def test_pin_host_key_pins_the_first_key_seen_and_audits_it(world: World, alice: Caller,
                                                             alice_agent: Agent) -> None:
    seen = HostKey(openssh="ssh-ed25519 AAAAseen", fingerprint="SHA256:seen")
    count_before = len(events(world))

    pinned = world.portal.remote.pin_host_key(alice, alice_agent, seen)

    assert pinned == seen
    assert world.portal.agents.get_agent(alice, alice_agent.id).host_key == seen
    [event] = new_events(world, count_before)
    assert (event.user_id, event.action, event.outcome, event.agent_id) == (
        alice.user.id, "agent.pin_host_key", "ok", alice_agent.id)
    assert event.detail is not None and "SHA256:seen" in event.detail


def test_pin_host_key_never_replaces_a_pinned_key(world: World, alice: Caller) -> None:
    agent = world.portal.agents.register_agent(alice, new_agent(host_key=HOST_KEY))
    other = HostKey(openssh="ssh-ed25519 AAAAother", fingerprint="SHA256:other")
    count_before = len(events(world))

    result = world.portal.remote.pin_host_key(alice, agent, other)

    assert result == agent.host_key  # the key already pinned wins; the caller compares
    assert world.portal.agents.get_agent(alice, agent.id).host_key == agent.host_key
    assert new_events(world, count_before) == []


def test_pin_host_key_of_a_deleted_agent_stores_nothing(world: World, alice: Caller, alice_agent: Agent) -> None:
    world.portal.agents.delete_agent(alice, alice_agent.id)
    with pytest.raises(Conflict) as changed:
        world.portal.remote.pin_host_key(alice, alice_agent,
                                         HostKey(openssh="ssh-ed25519 AAAAx", fingerprint="SHA256:x"))
    assert changed.value.code == "agent_changed"
    assert world.storage.state.agents == {}


def test_pin_host_key_of_an_agent_changed_meanwhile_stores_nothing(world: World, alice: Caller,
                                                                    alice_agent: Agent) -> None:
    world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(hostname="192.0.2.99"))
    with pytest.raises(Conflict) as changed:
        world.portal.remote.pin_host_key(alice, alice_agent,
                                         HostKey(openssh="ssh-ed25519 AAAAx", fingerprint="SHA256:x"))
    assert changed.value.code == "agent_changed"
    assert world.portal.agents.get_agent(alice, alice_agent.id).host_key == alice_agent.host_key


# ---------------------------------------------------------------------------------------- pooled connections


@pytest.mark.parametrize("changes", [AgentChanges(hostname="192.0.2.16"), AgentChanges(port=2222),
                                     AgentChanges(private_key=OTHER_PLAIN_KEY), AgentChanges(host_key=HOST_KEY)],
                         ids=["hostname", "port", "private_key", "host_key"])
def test_changing_connection_settings_drops_pooled_connections(world: World, alice: Caller, alice_agent: Agent,
                                                               shell: FakeShell,
                                                               changes: AgentChanges) -> None:
    world.portal.agents.update_agent(alice, alice_agent.id, changes)
    assert shell.discarded == [alice_agent.id]


def test_a_rename_keeps_pooled_connections(world: World, alice: Caller, alice_agent: Agent,
                                           shell: FakeShell) -> None:
    world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(name="renamed"))
    assert shell.discarded == []


def test_deleting_an_agent_drops_its_pooled_connections(world: World, alice: Caller, alice_agent: Agent,
                                                        shell: FakeShell) -> None:
    world.portal.agents.delete_agent(alice, alice_agent.id)
    assert shell.discarded == [alice_agent.id]


def test_a_refused_change_keeps_pooled_connections(world: World, alice: Caller, bob: Caller, alice_agent: Agent,
                                                   shell: FakeShell) -> None:
    with pytest.raises(ValidationFailed):
        world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(hostname="-x"))
    with pytest.raises(NotFound):
        world.portal.agents.update_agent(bob, alice_agent.id, AgentChanges(port=2222))
    with pytest.raises(NotFound):
        world.portal.agents.delete_agent(bob, alice_agent.id)
    assert shell.discarded == []


# ---------------------------------------------------------------------------------------- audit


def _register(portal: Portal, caller: Caller, agent: Agent) -> int | None:
    return portal.agents.register_agent(caller, new_agent(name="hv2")).id


def _update(portal: Portal, caller: Caller, agent: Agent) -> int | None:
    portal.agents.update_agent(caller, agent.id, AgentChanges(port=2222))
    return agent.id


def _rename(portal: Portal, caller: Caller, agent: Agent) -> int | None:
    portal.agents.update_agent(caller, agent.id, AgentChanges(name="renamed"))
    return agent.id


def _delete(portal: Portal, caller: Caller, agent: Agent) -> int | None:
    portal.agents.delete_agent(caller, agent.id)
    return agent.id


def _read_credentials(portal: Portal, caller: Caller, agent: Agent) -> int | None:
    portal.agents.read_credentials(caller, agent.id)
    return agent.id


def _rotate(portal: Portal, caller: Caller, agent: Agent) -> int | None:
    portal.users.rotate_api_key(caller)
    return None


@pytest.mark.parametrize(
    ("action", "operation"),
    [
        ("agent.create", _register),
        ("agent.update", _update),
        ("agent.update", _rename),
        ("agent.delete", _delete),
        ("agent.read_credentials", _read_credentials),
        ("user.rotate_api_key", _rotate),
    ],
)
def test_every_mutation_and_credentials_read_leaves_exactly_one_ok_event(
        world: World, alice: Caller, alice_agent: Agent, action: str,
        operation: Callable[[Portal, Caller, Agent], int | None]) -> None:
    caller = attrs.evolve(alice, request_id="req-under-test", client_address="2001:db8::7")
    before = len(events(world))

    agent_id = operation(world.portal, caller, alice_agent)

    [event] = new_events(world, before)
    assert event.user_id == alice.user.id
    assert (event.action, event.outcome, event.agent_id) == (action, "ok", agent_id)
    assert (event.request_id, event.client_address) == ("req-under-test", "2001:db8::7")
    assert event.detail is None


def test_reads_other_than_credentials_are_not_audited(world: World, alice: Caller, alice_agent: Agent) -> None:
    before = len(events(world))
    world.portal.agents.get_agent(alice, alice_agent.id)
    world.portal.agents.list_agents(alice)
    world.portal.audit.audit_events(alice)
    assert new_events(world, before) == []


def _second_agent(world: World, caller: Caller) -> Agent:
    return world.portal.agents.register_agent(caller, new_agent(name="hv2"))


REFUSALS = [
    pytest.param("agent.create", "validation_failed", None,
                 lambda w, c, a: w.portal.agents.register_agent(c, new_agent(name="hv3", port=0)), id="create-invalid"),
    pytest.param("agent.create", "agent_name_taken", None,
                 lambda w, c, a: w.portal.agents.register_agent(c, new_agent(name=a.name)), id="create-name-taken"),
    pytest.param("agent.update", "validation_failed", "own",
                 lambda w, c, a: w.portal.agents.update_agent(c, a.id, AgentChanges(hostname="-x", port=2222)),
                 id="update-invalid"),
    pytest.param("agent.update", "agent_name_taken", "own",
                 lambda w, c, a: w.portal.agents.update_agent(c, a.id, AgentChanges(name="hv2", port=2222)),
                 id="update-name-taken"),
    pytest.param("agent.update", "agent_not_found", 4242,
                 lambda w, c, a: w.portal.agents.update_agent(c, 4242, AgentChanges(port=2222)), id="update-missing"),
    pytest.param("agent.delete", "agent_not_found", 4242,
                 lambda w, c, a: w.portal.agents.delete_agent(c, 4242), id="delete-missing"),
    pytest.param("agent.read_credentials", "agent_not_found", 4242,
                 lambda w, c, a: w.portal.agents.read_credentials(c, 4242), id="read-missing"),
]


@pytest.mark.parametrize(("action", "code", "agent_ref", "attempt"), REFUSALS)
def test_a_refused_attempt_leaves_one_event_with_its_code_and_changes_nothing_else(
        world: World, alice: Caller, alice_agent: Agent, action: str, code: str, agent_ref: object,
        attempt: Callable[[World, Caller, Agent], object]) -> None:
    _second_agent(world, alice)
    caller = attrs.evolve(alice, request_id="req-refused", client_address="192.0.2.200")
    state_before = everything_but_events(world)
    count_before = len(events(world))

    with pytest.raises(PortalError) as refused:
        attempt(world, caller, alice_agent)

    assert refused.value.code == code
    [event] = new_events(world, count_before)
    expected_agent_id = alice_agent.id if agent_ref == "own" else agent_ref
    assert (event.user_id, event.action, event.outcome, event.agent_id) == (alice.user.id, action, code,
                                                                             expected_agent_id)
    assert (event.request_id, event.client_address) == ("req-refused", "192.0.2.200")
    assert event.detail
    assert everything_but_events(world) == state_before


def test_a_refused_attempt_on_another_users_agent_is_audited_for_the_caller_only(
        world: World, alice: Caller, bob: Caller, alice_agent: Agent) -> None:
    count_before = len(events(world))
    with pytest.raises(NotFound):
        world.portal.agents.read_credentials(bob, alice_agent.id)
    [event] = new_events(world, count_before)
    assert (event.user_id, event.outcome) == (bob.user.id, "agent_not_found")
    assert all(e.user_id == alice.user.id for e in world.portal.audit.audit_events(alice))


def test_the_change_and_its_audit_event_commit_together(world: World, alice: Caller,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """If the 'ok' event cannot be written, the change it records is rolled back too."""
    original = InMemoryTransaction.add_audit_event

    def refuse_ok_events(self: InMemoryTransaction, event: AuditEvent) -> AuditEvent:
        if event.outcome == "ok":
            raise Unavailable("audit log unavailable")
        return original(self, event)

    monkeypatch.setattr(InMemoryTransaction, "add_audit_event", refuse_ok_events)
    count_before = len(events(world))

    with pytest.raises(PortalError):
        world.portal.agents.register_agent(alice, new_agent())

    assert world.storage.state.agents == {}
    [event] = new_events(world, count_before)
    assert (event.action, event.outcome) == ("agent.create", "unavailable")


@pytest.fixture
def busy_alice(world: World, alice: Caller, alice_agent: Agent) -> Caller:
    """Alice with a history of nine events: sign-up, registration and seven credentials reads."""
    for n in range(7):
        world.portal.agents.read_credentials(attrs.evolve(alice, request_id=f"read-{n}"), alice_agent.id)
    return alice


def test_audit_events_are_newest_first(world: World, busy_alice: Caller) -> None:
    listed = world.portal.audit.audit_events(busy_alice)
    own = [e for e in events(world) if e.user_id == busy_alice.user.id]
    assert listed == list(reversed(own))
    assert len(listed) == 9
    assert listed[0].request_id == "read-6"
    assert listed[-1].action == "user.create"


def test_audit_events_limit_and_before_page_through_everything(world: World, busy_alice: Caller) -> None:
    everything = world.portal.audit.audit_events(busy_alice)
    pages: list[list[AuditEvent]] = []
    before = None
    for _ in range(10):  # bounded: a broken `before` must fail the test, not hang it
        page = world.portal.audit.audit_events(busy_alice, limit=2, before=before)
        if not page:
            break
        assert len(page) <= 2
        pages.append(page)
        before = page[-1].id
    assert [len(p) for p in pages] == [2, 2, 2, 2, 1]
    assert [e for page in pages for e in page] == everything


def test_audit_events_before_excludes_that_event_and_newer(world: World, busy_alice: Caller) -> None:
    everything = world.portal.audit.audit_events(busy_alice)
    pivot = everything[3]
    assert world.portal.audit.audit_events(busy_alice, before=pivot.id) == everything[4:]


@pytest.mark.parametrize("limit", [1, 500])
def test_audit_events_accepts_limits_from_1_to_500(world: World, busy_alice: Caller, limit: int) -> None:
    assert len(world.portal.audit.audit_events(busy_alice, limit=limit)) == min(limit, 9)


@pytest.mark.parametrize(("query", "field"), [({"limit": 0}, "limit"), ({"limit": 501}, "limit"),
                                              ({"limit": -1}, "limit"), ({"before": 0}, "before")])
def test_audit_events_refuses_out_of_range_paging(world: World, alice: Caller, query: dict[str, int],
                                                 field: str) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        world.portal.audit.audit_events(alice, **query)
    assert fields_of(invalid.value) == [field]


def test_a_user_never_sees_another_users_events(world: World, alice: Caller, bob: Caller,
                                                alice_agent: Agent) -> None:
    world.portal.agents.read_credentials(alice, alice_agent.id)
    bobs = world.portal.agents.register_agent(bob, new_agent())
    world.portal.agents.delete_agent(bob, bobs.id)

    alices = world.portal.audit.audit_events(alice)
    bobs_events = world.portal.audit.audit_events(bob)

    assert alices and bobs_events
    assert {e.user_id for e in alices} == {alice.user.id}
    assert {e.user_id for e in bobs_events} == {bob.user.id}
    assert [e.action for e in bobs_events] == ["agent.delete", "agent.create", "user.create"]


# ---------------------------------------------------------------------------------------- issue 14 item 7


def test_item7_a_generated_key_is_remembered_and_never_exported(world: World, alice: Caller) -> None:
    agent = world.portal.agents.register_agent(alice, new_agent(private_key=None, generate_key=True))
    assert agent.key_generated
    with pytest.raises(KeyNotExportable):
        world.portal.agents.read_credentials(alice, agent.id)
    assert (events(world)[-1].action, events(world)[-1].outcome) == ("agent.read_credentials", "key_not_exportable")


def test_item7_rotating_makes_a_key_generated_and_uploading_makes_it_exportable(
        world: World, alice: Caller, alice_agent: Agent) -> None:
    assert not alice_agent.key_generated
    assert world.portal.agents.read_credentials(alice, alice_agent.id).private_key == PLAIN_KEY
    assert world.portal.agents.rotate_agent_key(alice, alice_agent.id).key_generated
    with pytest.raises(KeyNotExportable):
        world.portal.agents.read_credentials(alice, alice_agent.id)
    updated = world.portal.agents.update_agent(alice, alice_agent.id, AgentChanges(private_key=OTHER_PLAIN_KEY))
    assert not updated.key_generated
    assert world.portal.agents.read_credentials(alice, alice_agent.id).private_key == OTHER_PLAIN_KEY
