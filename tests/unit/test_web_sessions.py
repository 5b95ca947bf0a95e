"""Browser sessions of the web console (core/web_sessions.py) over the in-memory world: signing in
with an API key, the absolute lifetime and the idle time-out, signing out, and key rotation ending
every session. The clock is the world's ManualClock: nothing waits for real."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.memory import CountingKeyHasher
from core.errors import SessionEnded, Unauthenticated
from core.model import Caller
from core.web_sessions import WebSessionService, session_digest
from tests.unit.world import OPERATOR, World, make_world

LIFETIME = timedelta(hours=1)
IDLE = timedelta(minutes=10)


@pytest.fixture
def world() -> World:
    return make_world(session_lifetime=LIFETIME, session_idle=IDLE)


def _key(world: World, alice: Caller) -> str:
    return world.portal.users.rotate_api_key(alice).api_key


def test_signing_in_with_a_valid_key_gives_a_session_of_its_owner(world: World, alice: Caller) -> None:
    signed = world.portal.sessions.sign_in(_key(world, alice), OPERATOR)
    user, _session = world.portal.sessions.resolve(signed.token)
    assert user.id == alice.user.id


def test_signing_in_with_a_wrong_key_is_refused_and_makes_no_session(world: World, alice: Caller) -> None:
    with pytest.raises(Unauthenticated):
        world.portal.sessions.sign_in("mgmt_000000000000_not-a-key", OPERATOR)
    assert world.storage.state.web_sessions == {}


def test_the_session_token_is_stored_only_as_its_digest(world: World, alice: Caller) -> None:
    signed = world.portal.sessions.sign_in(_key(world, alice), OPERATOR)
    stored = list(world.storage.state.web_sessions.values())
    assert [s.digest for s in stored] == [session_digest(signed.token)]
    assert signed.token not in repr(world.storage.state)


def test_a_session_ends_at_its_absolute_lifetime_even_when_used(world: World, alice: Caller) -> None:
    sessions = world.portal.sessions
    signed = sessions.sign_in(_key(world, alice), OPERATOR)
    for _ in range(11):  # used every 5 minutes for 55 minutes: never idle
        world.clock.current += timedelta(minutes=5)
        sessions.resolve(signed.token)
    world.clock.current += timedelta(minutes=5)
    with pytest.raises(SessionEnded):
        sessions.resolve(signed.token)


def test_a_session_ends_after_the_idle_time_out(world: World, alice: Caller) -> None:
    sessions = world.portal.sessions
    signed = sessions.sign_in(_key(world, alice), OPERATOR)
    world.clock.current += IDLE
    with pytest.raises(SessionEnded):
        sessions.resolve(signed.token)
    assert world.storage.state.web_sessions == {}  # and it is gone for good


def test_signing_out_ends_the_session_at_once_and_is_audited(world: World, alice: Caller) -> None:
    sessions = world.portal.sessions
    signed = sessions.sign_in(_key(world, alice), OPERATOR)
    sessions.sign_out(signed.token, OPERATOR)
    with pytest.raises(SessionEnded):
        sessions.resolve(signed.token)
    actions = [e.action for e in world.portal.audit.audit_events(alice)]
    assert actions[:2] == ["user.sign_out", "user.sign_in"]


def test_rotating_the_api_key_ends_every_session_of_the_user(world: World, alice: Caller) -> None:
    sessions = world.portal.sessions
    first = sessions.sign_in(_key(world, alice), OPERATOR)
    second = sessions.sign_in(_key(world, alice), OPERATOR)
    world.portal.users.rotate_api_key(alice)
    for signed in (first, second):
        with pytest.raises(SessionEnded):
            sessions.resolve(signed.token)


def test_another_users_session_is_not_ended_by_a_rotation(world: World, alice: Caller, bob: Caller) -> None:
    sessions = world.portal.sessions
    bobs = sessions.sign_in(_key(world, bob), OPERATOR)
    world.portal.users.rotate_api_key(alice)
    assert sessions.resolve(bobs.token)[0].id == bob.user.id


@given(st.text(max_size=80))
def test_only_the_sessions_own_form_token_matches(given_token: str) -> None:
    world = make_world()
    token = "session-token"
    form_token = WebSessionService.form_token(token)
    assert world.portal.sessions.form_token_matches(token, given_token) == (given_token == form_token)
    assert world.portal.sessions.form_token_matches(token, form_token)


def test_a_session_lives_no_longer_than_the_key_it_was_signed_in_with(world: World, alice: Caller) -> None:
    """Even when nothing deletes the session (a key revoked by another path, e.g. scoped keys)."""
    sessions = world.portal.sessions
    signed = sessions.sign_in(_key(world, alice), OPERATOR)
    with world.storage.transaction(write=True) as tx:  # the key replaced behind the sessions' back
        tx.replace_api_key(alice.user.id, CountingKeyHasher().issue(), world.clock.now())
    assert list(world.storage.state.web_sessions.values())  # still stored...
    with pytest.raises(SessionEnded):  # ...and refused
        sessions.resolve(signed.token)
