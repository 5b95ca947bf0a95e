"""The rules of scoped keys (core/keys.py, core.model.ApiKey), on the in-memory world: a key never
creates a key with more power than its own, a request within its power always succeeds, and a key
limited to agents sees the user's other agents as missing."""

from __future__ import annotations

from datetime import timedelta

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.commands import NewKey
from core.errors import AgentNotFound, InsufficientScope, KeyLimitedToAgents, ValidationFailed
from core.keys import parse_expiry, parse_scopes
from core.model import ALL_SCOPES, ApiKey, Caller, Scope
from tests.unit.world import World, make_caller, make_world, register

SCOPES = st.frozensets(st.sampled_from(list(Scope)), min_size=1)
AGENT_CHOICES = st.none() | st.frozensets(st.integers(1, 3), min_size=1)
EXPIRY_DAYS = st.none() | st.integers(1, 30)


def caller_with(world: World, caller: Caller, scopes: frozenset[Scope], agents: frozenset[int] | None,
                days: int | None) -> Caller:
    """``caller`` holding a stored key with these powers."""
    now = world.clock.current
    with world.storage.transaction(write=True) as tx:
        key = tx.add_api_key(ApiKey(user_id=caller.user.id, prefix=f"mgmt_{tx.count_api_keys(caller.user.id):012x}",
                                    digest="x", created_at=now, name="creator", scopes=scopes, agents=agents,
                                    expires_at=None if days is None else now + timedelta(days=days), full=False))
    return attrs.evolve(caller, key=key)


def three_agents(world: World) -> Caller:
    alice = make_caller(world, "alice")
    for name in ("hv1", "hv2", "hv3"):
        register(world, alice, name=name)
    return alice


@settings(max_examples=150, deadline=None)
@given(creator_scopes=SCOPES, creator_agents=AGENT_CHOICES, creator_days=EXPIRY_DAYS,
       scopes=SCOPES, agents=AGENT_CHOICES, days=EXPIRY_DAYS)
def test_a_created_key_never_has_more_power_than_its_creator(
        creator_scopes: frozenset[Scope], creator_agents: frozenset[int] | None, creator_days: int | None,
        scopes: frozenset[Scope], agents: frozenset[int] | None, days: int | None) -> None:
    world = make_world()
    creator = caller_with(world, three_agents(world), creator_scopes, creator_agents, creator_days)
    assert creator.key is not None
    expires_at = None if days is None else (world.clock.current + timedelta(days=days, hours=1)).isoformat()
    request = NewKey(name="new", scopes=sorted(s.value for s in scopes),
                     agents=None if agents is None else sorted(agents), expires_at=expires_at)
    within = (scopes <= creator_scopes
              and (creator_agents is None or (agents is not None and agents <= creator_agents))
              and (creator_days is None or days is None or days < creator_days))
    try:
        created = world.portal.keys.create_key(creator, request).key
    except (InsufficientScope, KeyLimitedToAgents, ValidationFailed):
        assert not within
        return
    assert within
    assert created.scopes == scopes and created.agents == agents
    assert creator.key.covers(created)


@given(scopes=SCOPES, agents=AGENT_CHOICES)
def test_every_key_covers_itself_and_the_full_key_covers_every_key(scopes: frozenset[Scope],
                                                                   agents: frozenset[int] | None) -> None:
    key = ApiKey(user_id=1, prefix="p", digest="d", created_at=_T0, scopes=scopes, agents=agents, full=False)
    full = ApiKey(user_id=1, prefix="f", digest="d", created_at=_T0)
    assert key.covers(key) and full.covers(key)
    assert key.covers(full) == (scopes == ALL_SCOPES and agents is None)


@given(st.lists(st.text(max_size=12), max_size=8))
def test_scope_names_parse_to_exactly_the_scopes_named_or_say_which_is_unknown(names: list[str]) -> None:
    scopes, errors = parse_scopes(names)
    known = {s.value for s in Scope}
    if names and all(name in known for name in names):
        assert errors == [] and {s.value for s in scopes} == set(names)
    else:
        assert [e.field for e in errors] == ["scopes"] and scopes == frozenset()


def test_a_key_limited_to_agents_finds_only_those(world: World) -> None:
    alice = three_agents(world)
    limited = caller_with(world, alice, ALL_SCOPES, frozenset({2}), None)
    assert [a.id for a in world.portal.agents.list_agents(limited)] == [2]
    assert world.portal.agents.get_agent(limited, 2).id == 2
    for agent_id in (1, 3):
        with pytest.raises(AgentNotFound):
            world.portal.agents.get_agent(limited, agent_id)
        with pytest.raises(AgentNotFound):
            world.portal.agents.delete_agent(limited, agent_id)
    assert [a.id for a, _ in world.portal.remote.targets(limited, set())] == [2]
    assert [a.id for a in world.portal.agents.list_agents(alice)] == [1, 2, 3]  # the full powers see all


def test_the_operator_acting_as_a_user_has_the_full_keys_powers(world: World) -> None:
    alice = make_caller(world, "alice")
    assert alice.key is None and alice.scopes == ALL_SCOPES
    current = world.portal.keys.current_key(alice)
    assert current.full and current.scopes == ALL_SCOPES


_T0 = make_world().clock.current


@given(st.text(max_size=40) | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()))
def test_an_expiry_parses_to_a_future_utc_instant_or_says_why(text: str) -> None:
    now = _T0
    when, problem = parse_expiry(text, now)
    assert (when is None) != (problem is None)
    if when is not None:
        assert when.tzinfo is not None and when > now and when.utcoffset() == timedelta(0)
