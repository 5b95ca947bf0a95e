"""A stateful model of several users acting at once on the HTTP app (hypothesis
``RuleBasedStateMachine``): random sign-ups, key rotations, agent registrations, updates, deletes,
credentials reads and VM actions, checked after every step against a simple model.

Invariants: a user never sees or changes another user's agents, credentials or audit events (404,
exactly like a missing agent); a rotated key is dead everywhere; a deleted agent is 404 and its
pooled connections are gone; every attempted mutation leaves exactly one audit event for the
user who attempted it.

Scoped keys (issue 20): users create keys with random scopes, agent limits and expiry, revoke
them, and time moves on (a manual clock). No key ever does what its scopes forbid (403
insufficient_scope naming the scope, nothing audited, nothing run), a key limited to agents sees
the others as 404, an expired key is 401 api_key_expired and a revoked one 401 at its next request.

The app is the one the composition root builds, on a real SQLite file, with real key parsing and
sealing; only the remote shell is the scripted fake (VM actions succeed)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncssh
import attrs
from falcon import testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from adapters.memory import ManualClock, ScriptedShell
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from entrypoints.settings import Settings
from tests.support import portal_client

PRIVATE_KEY = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh").decode()
ACTIONS = ["start", "shutdown", "force-stop", "reboot"]


@attrs.frozen
class ScopedKey:
    user: int
    id: int
    scopes: frozenset[str]
    agents: frozenset[int] | None
    expires_at: Any


SCOPES = frozenset({"read", "operate", "provision", "agents", "credentials", "keys"})
# (method, path with {a} for an agent id or None, scope needed, audited when authorized)
SCOPED_CALLS = [
    ("GET", "/agents", "read", False), ("GET", "/vms", "read", False), ("GET", "/users/me/audit", "read", False),
    ("GET", "/agents/{a}", "read", False), ("PATCH", "/agents/{a}", "agents", True),
    ("GET", "/agents/{a}/credentials", "credentials", True), ("POST", "/agents/{a}/vms/guest1/start", "operate", True),
    ("GET", "/agents/{a}/public-key", "agents", False),
]


class PortalModel(RuleBasedStateMachine):
    users = Bundle("users")

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="isolation-"))
        config = Settings.from_env({"MANAGEMENT_DB_PATH": str(self.directory / "m.sqlite3"),
                                    "MANAGEMENT_SIGNUP": "open", "MANAGEMENT_AUTH_FAILURE_LIMIT": "1000000"})
        self.shell = ScriptedShell()
        self.clock = ManualClock(step=timedelta(0))
        self.runtime = bootstrap.build_runtime(config, shell=self.shell, clock=self.clock)
        self.client = portal_client(create_app(self.runtime))
        self.keys: dict[int, str] = {}  # user index -> current key
        self.user_ids: dict[int, int] = {}  # user index -> user id
        self.dead_keys: list[str] = []
        self.agents: dict[int, tuple[int, str, int]] = {}  # agent id -> (owner index, name, port)
        self.deleted: set[int] = set()
        self.public_keys: dict[int, str] = {}  # agent id -> its public key, once rotated
        self.mutations: dict[int, int] = {}  # user index -> attempted mutations (audit events expected)
        self.request_ids: dict[int, set[str]] = {}
        self.counter = itertools.count()
        self.scoped: dict[str, ScopedKey] = {}  # plaintext -> a live (maybe expired) scoped key

    def teardown(self) -> None:
        self.runtime.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def call(self, user: int | None, method: str, path: str, body: Any = None, *,
             key: str | None = None, mutation: bool = False) -> testing.Result:
        request_id = f"req-{next(self.counter)}"
        headers = {"X-Request-Id": request_id}
        if user is not None or key is not None:
            headers["Authorization"] = f"Bearer {key or self.keys[user]}"  # type: ignore[index]
        if user is not None:
            self.request_ids.setdefault(user, set()).add(request_id)
            if mutation:
                self.mutations[user] = self.mutations.get(user, 0) + 1
        return self.client.simulate_request(method, path, json=body, headers=headers)

    def expect_agent(self, user: int, agent_id: int) -> bool:
        return agent_id in self.agents and self.agents[agent_id][0] == user

    # ------------------------------------------------------------------ rules

    @rule(target=users)
    def sign_up(self) -> int:
        index = len(self.keys)
        result = self.client.simulate_post("/users", json={"name": f"user{index}"},
                                           headers={"X-Request-Id": f"signup-{index}"})
        assert result.status_code == 201, result.text
        self.keys[index] = result.json["api_key"]
        self.user_ids[index] = result.json["id"]
        self.mutations[index] = 1  # user.create
        self.request_ids[index] = {f"signup-{index}"}
        return index

    @rule(user=users)
    def rotate_key(self, user: int) -> None:
        old = self.keys[user]
        result = self.call(user, "POST", "/users/me/api-key/rotate", mutation=True)
        assert result.status_code == 200, result.text
        self.keys[user] = result.json["api_key"]
        self.dead_keys.append(old)

    @rule(user=users, name=st.sampled_from(["hv1", "hv2", "hv3"]), port=st.integers(1, 65535))
    def register_agent(self, user: int, name: str, port: int) -> None:
        body = {"name": name, "hostname": "192.0.2.10", "port": port, "username": "qemu",
                "private_key": PRIVATE_KEY, "host_key": None}
        result = self.call(user, "POST", "/agents", body, mutation=True)
        taken = any(owner == user and n == name for owner, n, _ in self.agents.values())
        if taken:
            assert (result.status_code, result.json["code"]) == (409, "agent_name_taken"), result.text
        else:
            assert result.status_code == 201, result.text
            self.agents[result.json["id"]] = (user, name, port)

    def _some_agent(self, data: st.DataObject) -> int:
        known = sorted(self.agents) + sorted(self.deleted)
        return data.draw(st.sampled_from(known)) if known else 424242

    @rule(user=users, data=st.data(), port=st.integers(1, 65535))
    def update_agent(self, user: int, data: st.DataObject, port: int) -> None:
        agent_id = self._some_agent(data)
        result = self.call(user, "PATCH", f"/agents/{agent_id}", {"port": port}, mutation=True)
        if self.expect_agent(user, agent_id):
            assert result.status_code == 200, result.text
            owner, name, _ = self.agents[agent_id]
            self.agents[agent_id] = (owner, name, port)
        else:
            assert (result.status_code, result.json["code"]) == (404, "agent_not_found"), result.text

    @rule(user=users, data=st.data())
    def delete_agent(self, user: int, data: st.DataObject) -> None:
        agent_id = self._some_agent(data)
        result = self.call(user, "DELETE", f"/agents/{agent_id}", mutation=True)
        if self.expect_agent(user, agent_id):
            assert result.status_code == 204, result.text
            del self.agents[agent_id]
            self.deleted.add(agent_id)
            assert agent_id in self.shell.discarded  # its pooled connections are dropped
        else:
            assert (result.status_code, result.json["code"]) == (404, "agent_not_found"), result.text

    @rule(user=users, data=st.data())
    def read_credentials(self, user: int, data: st.DataObject) -> None:
        agent_id = self._some_agent(data)
        result = self.call(user, "GET", f"/agents/{agent_id}/credentials", mutation=True)
        if self.expect_agent(user, agent_id) and agent_id in self.public_keys:
            # rotated: a generated key, never exported (issue 14 item 7); the refusal is audited
            assert (result.status_code, result.json["code"]) == (409, "key_not_exportable"), result.text
            assert "private_key" not in result.json
        elif self.expect_agent(user, agent_id):
            assert result.status_code == 200, result.text
            assert result.json["private_key"] == PRIVATE_KEY
        else:
            assert (result.status_code, result.json["code"]) == (404, "agent_not_found"), result.text
            assert "private_key" not in result.json

    @rule(user=users, data=st.data())
    def rotate_agent_key(self, user: int, data: st.DataObject) -> None:
        agent_id = self._some_agent(data)
        discarded = len(self.shell.discarded)
        result = self.call(user, "POST", f"/agents/{agent_id}/rotate-key", mutation=True)
        if self.expect_agent(user, agent_id):
            assert result.status_code == 200, result.text
            assert result.json["public_key"] != self.public_keys.get(agent_id)
            self.public_keys[agent_id] = result.json["public_key"]
            assert self.shell.discarded[discarded:] == [agent_id]  # connections with the old key dropped
        else:
            assert (result.status_code, result.json["code"]) == (404, "agent_not_found"), result.text

    @rule(user=users, data=st.data())
    def read_public_key(self, user: int, data: st.DataObject) -> None:
        agent_id = self._some_agent(data)
        result = self.call(user, "GET", f"/agents/{agent_id}/public-key")
        if self.expect_agent(user, agent_id):
            assert result.status_code == 200, result.text
            if agent_id in self.public_keys:
                assert result.json["public_key"] == self.public_keys[agent_id]
        else:
            assert (result.status_code, result.json["code"]) == (404, "agent_not_found"), result.text

    @rule(user=users, data=st.data(), action=st.sampled_from(ACTIONS))
    def vm_action(self, user: int, data: st.DataObject, action: str) -> None:
        agent_id = self._some_agent(data)
        calls = len(self.shell.calls)
        result = self.call(user, "POST", f"/agents/{agent_id}/vms/guest1/{action}", mutation=True)
        if self.expect_agent(user, agent_id):
            assert result.status_code == 200, result.text
            assert self.shell.calls[-1][0] == agent_id
        else:
            assert (result.status_code, result.json["code"]) == (404, "agent_not_found"), result.text
            assert len(self.shell.calls) == calls  # nothing ran anywhere

    @precondition(lambda self: bool(self.dead_keys))
    @rule(data=st.data(), path=st.sampled_from(["/users/me", "/agents", "/users/me/audit"]))
    def dead_key_is_refused(self, data: st.DataObject, path: str) -> None:
        key = data.draw(st.sampled_from(self.dead_keys))
        result = self.call(None, "GET", path, key=key)
        assert (result.status_code, result.json["code"]) == (401, "invalid_api_key"), result.text

    # ------------------------------------------------------------------ scoped keys (issue 20)

    @rule(user=users, scopes=st.frozensets(st.sampled_from(sorted(SCOPES)), min_size=1),
          limited=st.booleans(), minutes=st.none() | st.integers(1, 120), data=st.data())
    def create_scoped_key(self, user: int, scopes: frozenset[str], limited: bool, minutes: int | None,
                          data: st.DataObject) -> None:
        own = sorted(a for a, (owner, _, _) in self.agents.items() if owner == user)
        if limited:  # limited to one of at least two agents: the other must be hidden from the key
            taken = {name for owner, name, _ in self.agents.values() if owner == user}
            for name in sorted({"hv1", "hv2", "hv3"} - taken)[:max(0, 2 - len(own))]:
                self.register_agent(user, name, 22)
            own = sorted(a for a, (owner, _, _) in self.agents.items() if owner == user)
        agents = frozenset({data.draw(st.sampled_from(own))}) if limited else None
        expires_at = None if minutes is None else self.clock.current + timedelta(minutes=minutes)
        body = {"name": f"k{next(self.counter)}", "scopes": sorted(scopes),
                "agents": None if agents is None else sorted(agents),
                "expires_at": None if expires_at is None else expires_at.isoformat()}
        result = self.call(user, "POST", "/users/me/keys", body, mutation=True)
        assert result.status_code == 201, result.text
        self.scoped[result.json["api_key"]] = ScopedKey(user, result.json["id"], scopes, agents, expires_at)

    def _scoped_in_creation_order(self) -> list[str]:
        """The live scoped keys to draw from, by key id: never by plaintext, which is random (real key
        generation), so that an order by it would make the same choices pick another key, of another
        user, on hypothesis's replay, and the draws that follow differ (FlakyStrategyDefinition)."""
        return sorted(self.scoped, key=lambda plaintext: self.scoped[plaintext].id)

    @precondition(lambda self: bool(self.scoped))
    @rule(data=st.data())
    def revoke_scoped_key(self, data: st.DataObject) -> None:
        plaintext = data.draw(st.sampled_from(self._scoped_in_creation_order()))
        key = self.scoped.pop(plaintext)
        result = self.call(key.user, "DELETE", f"/users/me/keys/{key.id}", mutation=True)
        assert result.status_code == 204, result.text
        self.dead_keys.append(plaintext)

    @rule(minutes=st.integers(1, 90))
    def time_passes(self, minutes: int) -> None:
        self.clock.current += timedelta(minutes=minutes)

    @rule(user=users, data=st.data(), call=st.sampled_from(SCOPED_CALLS), port=st.integers(1, 65535))
    def scoped_key_call(self, user: int, data: st.DataObject, call: tuple[str, str, str, bool], port: int) -> None:
        if not self.scoped or data.draw(st.booleans()):  # a new key of this user, or one of the live ones
            self.create_scoped_key(user, data.draw(st.frozensets(st.sampled_from(sorted(SCOPES)), min_size=1)),
                                   data.draw(st.booleans()), data.draw(st.none() | st.integers(1, 120)), data)
        plaintext = data.draw(st.sampled_from(self._scoped_in_creation_order()))
        key = self.scoped[plaintext]
        method, template, scope, audited = call
        own = sorted(a for a, (owner, _, _) in self.agents.items() if owner == key.user)
        agent_id = None
        if "{a}" in template:  # mostly the key user's own agents: the limit is what is tested here
            agent_id = data.draw(st.sampled_from(own)) if own and data.draw(st.booleans()) else self._some_agent(data)
        path = template.replace("{a}", str(agent_id))
        expired = key.expires_at is not None and self.clock.current >= key.expires_at
        allowed = scope in key.scopes
        calls = len(self.shell.calls)
        result = self.call(key.user, method, path, {"port": port} if method == "PATCH" else None, key=plaintext,
                           mutation=audited and allowed and not expired)
        if expired:
            assert (result.status_code, result.json["code"]) == (401, "api_key_expired"), result.text
            return
        if not allowed:
            assert (result.status_code, result.json["code"], result.json["scope"]) == (
                403, "insufficient_scope", scope), result.text
            assert len(self.shell.calls) == calls  # nothing ran
            return
        visible = {a for a, (owner, _, _) in self.agents.items()
                   if owner == key.user and (key.agents is None or a in key.agents)}
        if agent_id is None:
            assert result.status_code == 200, result.text
            if path == "/agents":
                assert {a["id"] for a in result.json} == visible
            elif path == "/vms":
                assert {e["agent_id"] for e in result.json} == visible
            elif key.agents is not None:
                assert {e["agent_id"] for e in result.json["events"]} <= key.agents
        elif agent_id not in visible:
            assert (result.status_code, result.json["code"]) == (404, "agent_not_found"), result.text
            assert len(self.shell.calls) == calls
        elif template.endswith("credentials") and agent_id in self.public_keys:
            assert (result.status_code, result.json["code"]) == (409, "key_not_exportable"), result.text
        else:
            assert result.status_code == 200, result.text
            if method == "PATCH":
                owner, name, _ = self.agents[agent_id]
                self.agents[agent_id] = (owner, name, port)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def each_user_sees_exactly_their_agents(self) -> None:
        for user in self.keys:
            listed = self.client.simulate_get("/agents", headers={"Authorization": f"Bearer {self.keys[user]}"})
            assert listed.status_code == 200
            seen = {a["id"]: (a["name"], a["port"]) for a in listed.json}
            expected = {agent_id: (name, port) for agent_id, (owner, name, port) in self.agents.items()
                        if owner == user}
            assert seen == expected

    @invariant()
    def each_scoped_key_sees_exactly_what_its_scopes_agents_and_expiry_allow(self) -> None:
        for plaintext, key in self.scoped.items():
            headers = {"Authorization": f"Bearer {plaintext}"}
            listed = self.client.simulate_get("/agents", headers=headers)
            if key.expires_at is not None and self.clock.current >= key.expires_at:
                assert (listed.status_code, listed.json["code"]) == (401, "api_key_expired"), listed.text
                continue
            if "read" not in key.scopes:
                assert (listed.status_code, listed.json["code"]) == (403, "insufficient_scope"), listed.text
                continue
            own = {a for a, (owner, _, _) in self.agents.items() if owner == key.user}
            visible = own if key.agents is None else own & key.agents
            assert {a["id"] for a in listed.json} == visible
            for agent_id in own:
                one = self.client.simulate_get(f"/agents/{agent_id}", headers=headers)
                assert one.status_code == (200 if agent_id in visible else 404), one.text

    @invariant()
    def each_mutation_leaves_exactly_one_audit_event_for_its_author(self) -> None:
        for user in self.keys:
            page = self.client.simulate_get("/users/me/audit?limit=500",
                                            headers={"Authorization": f"Bearer {self.keys[user]}"}).json
            events = page["events"]
            assert len(events) == self.mutations[user]
            assert {e["request_id"] for e in events} <= self.request_ids[user]


PortalModel.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestIsolationModel = PortalModel.TestCase
