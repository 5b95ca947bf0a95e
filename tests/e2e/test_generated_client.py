"""A Python client generated with ``openapi-python-client`` from the live server's document works:
it imports, and drives a short flow (sign up, register an agent, list agents, list its VMs) with
typed answers and typed problem details."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import Server, free_port

pytestmark = pytest.mark.e2e
GENERATOR = Path(sys.executable).with_name("openapi-python-client")

FLOW = textwrap.dedent('''
    import json, sys
    from portal_client import AuthenticatedClient, Client
    from portal_client.api.agents import list_agents, register_agent
    from portal_client.api.users import sign_up
    from portal_client.api.vms import list_vms
    from portal_client.models import AgentView, NewAgent, NewUser, Problem, UserWithKeyView

    base_url, closed_port = sys.argv[1], int(sys.argv[2])
    created = sign_up.sync_detailed(client=Client(base_url=base_url), body=NewUser(name="alice")).parsed
    assert isinstance(created, UserWithKeyView), created
    me = AuthenticatedClient(base_url=base_url, token=created.api_key)
    agent = register_agent.sync_detailed(client=me, body=NewAgent(
        name="hv1", hostname="127.0.0.1", port=closed_port, username="playr-agent", generate_key=True)).parsed
    assert isinstance(agent, AgentView), agent
    listed = list_agents.sync_detailed(client=me).parsed
    vms = list_vms.sync_detailed(agent.id, client=me)
    assert isinstance(vms.parsed, Problem), vms
    print(json.dumps({"agents": [a.name for a in listed], "public_key": agent.public_key,
                      "vms_status": int(vms.status_code), "vms_code": vms.parsed.code}))
''')


def test_a_client_generated_from_the_served_document_drives_a_flow(tmp_path: Path) -> None:
    assert GENERATOR.exists(), "openapi-python-client is missing: install the test extra"
    server = Server(tmp_path, MANAGEMENT_AGENT_NETWORKS="127.0.0.0/8,::1/128").start()
    try:
        status, document, _ = server.request("GET", "/openapi.json")
        assert status == 200
        (tmp_path / "openapi.json").write_text(json.dumps(document))
        env = {**os.environ, "PATH": f"{GENERATOR.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        generated = subprocess.run(
            [str(GENERATOR), "generate", "--path", str(tmp_path / "openapi.json"), "--meta", "none",
             "--output-path", str(tmp_path / "portal_client")],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert generated.returncode == 0, generated.stdout + generated.stderr
        flow = subprocess.run([sys.executable, "-c", FLOW, f"http://127.0.0.1:{server.port}", str(free_port())],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**env, "PYTHONPATH": str(tmp_path)})
        assert flow.returncode == 0, flow.stdout + flow.stderr
        outcome = json.loads(flow.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    assert outcome["agents"] == ["hv1"]
    assert outcome["public_key"].startswith("ssh-ed25519 ")
    # Nothing listens on the agent's port: a typed problem, 502 agent_unreachable.
    assert (outcome["vms_status"], outcome["vms_code"]) == (502, "agent_unreachable")
