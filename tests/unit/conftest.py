"""The fixtures of the use-case tests, over the in-memory world of ``tests/unit/world.py``: a fresh
world, two users (alice at 198.51.100.10, bob at 198.51.100.20), an agent of alice's and the
world's scripted shell. A file that needs another world overrides ``world`` with ``make_world``."""

from __future__ import annotations

import pytest

from core.model import Agent, Caller
from tests.unit.world import FakeShell, World, make_caller, make_world, register


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.fixture
def alice(world: World) -> Caller:
    return make_caller(world, "alice", "198.51.100.10")


@pytest.fixture
def bob(world: World) -> Caller:
    return make_caller(world, "bob", "198.51.100.20")


@pytest.fixture
def agent(world: World, alice: Caller) -> Agent:
    """Alice's agent, with an encrypted key and a pinned host key."""
    return register(world, alice)


@pytest.fixture
def shell(world: World) -> FakeShell:
    return world.shell
