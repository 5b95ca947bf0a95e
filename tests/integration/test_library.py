"""The library facade, as an automation script would use it: synchronous, same rules as HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import KeyNotExportable, NotFound, Unauthenticated, ValidationFailed
from entrypoints.library import connect
from tests.support import TEST_AGENT_NETWORKS, KeyMaterial


def env(tmp_path: Path) -> dict[str, str]:
    return {"MANAGEMENT_DB_PATH": str(tmp_path / "data" / "management.sqlite3"),
            "MANAGEMENT_AGENT_NETWORKS": TEST_AGENT_NETWORKS}


def test_a_script_registers_lists_updates_and_deletes_agents(tmp_path: Path, keys: KeyMaterial) -> None:
    with connect(env(tmp_path)) as portal:
        api_key = portal.create_user("alice", "alice@example.com").api_key
        me = portal.login(api_key)
        agent = me.register_agent(name="hv1", hostname="hv1.example.com", username="qemu",
                                  private_key=keys.openssh)
        assert [a.name for a in me.agents()] == ["hv1"]
        assert me.update_agent(agent.id, port=2222).port == 2222
        assert me.credentials(agent.id).private_key == keys.openssh
        me.delete_agent(agent.id)
        with pytest.raises(NotFound) as missing:
            me.agent(agent.id)
        assert missing.value.code == "agent_not_found"
        assert [e.action for e in me.audit_events()][:2] == ["agent.delete", "agent.read_credentials"]


def test_library_validation_matches_the_api(tmp_path: Path, keys: KeyMaterial) -> None:
    with connect(env(tmp_path)) as portal:
        me = portal.login(portal.create_user("alice").api_key)
        with pytest.raises(ValidationFailed) as invalid:
            me.register_agent(name="hv1", hostname="-x", username="qemu", private_key=keys.openssh, port="22")
        assert {e.field for e in invalid.value.errors} == {"port"}  # types first, like the API
        with pytest.raises(ValidationFailed) as unknown:
            me.update_agent(1, colour="blue")
        assert unknown.value.errors[0].field == "colour"


def test_data_persists_across_connections_and_rotation_kills_the_old_key(tmp_path: Path) -> None:
    with connect(env(tmp_path)) as portal:
        old = portal.create_user("alice").api_key
    with connect(env(tmp_path)) as portal:
        me = portal.login(old)
        new = me.rotate_api_key()
        with pytest.raises(Unauthenticated):
            portal.login(old)
        assert portal.login(new).user.name == "alice"


def test_a_script_registers_a_generated_key_agent_and_rotates_its_key(tmp_path: Path) -> None:
    with connect(env(tmp_path)) as portal:
        me = portal.login(portal.create_user("alice").api_key)
        agent = me.register_agent(name="hv1", hostname="hv1.example.com", username="playr-agent", generate_key=True)
        assert agent.client_key.public_key.startswith("ssh-ed25519 ")
        with pytest.raises(KeyNotExportable):  # generated: never exported (issue 14 item 7)
            me.credentials(agent.id)
        rotated = me.rotate_agent_key(agent.id)
        assert rotated.client_key.public_key != agent.client_key.public_key
        assert me.agent(agent.id).client_key == rotated.client_key
        assert [e.action for e in me.audit_events()][:2] == ["agent.rotate_key", "agent.read_credentials"]


def test_library_keywords_are_held_to_the_api_s_types(tmp_path: Path) -> None:
    """A query parameter given by keyword is checked like the HTTP query: a clear ValidationFailed
    naming it, not a TypeError from deep inside a use case."""
    with connect(env(tmp_path)) as portal:
        me = portal.login(portal.create_user("alice").api_key)
        for bad in ("5", 5.0, True):
            with pytest.raises(ValidationFailed) as refused:
                me.list_agents(limit=bad)
            assert [e.field for e in refused.value.errors] == ["limit"]
        assert me.list_agents(limit=5) == []
