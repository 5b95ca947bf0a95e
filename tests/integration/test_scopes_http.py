"""Scoped, expiring API keys over HTTP (issue 20), on the app the composition root builds (SQLite
file, real hashing and sealing, a clock the test moves, a scripted remote shell).

The first test walks EVERY operation of the OpenAPI document: a key without the operation's scope
gets 403 ``insufficient_scope`` naming it, a key with only that scope gets past authorization. A new
route cannot forget its scope: ``Operation.scope`` has no default (the table fails to import), and a
non-public operation without one is refused unless it is listed in ``ANY_KEY``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.memory import ManualClock, ScriptedShell
from core import errors
from core.model import Scope
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from entrypoints.library import PortalLibrary
from entrypoints.operations import ANY_KEY, BY_NAME, OPERATIONS, Operation
from tests.support import Api, KeyMaterial, assert_problem, make_settings, portal_client

ALL = sorted(scope.value for scope in Scope)
_names = itertools.count()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(step=timedelta(0))


@pytest.fixture
def runtime(tmp_path: Path, clock: ManualClock) -> Iterator[bootstrap.Runtime]:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_SIGNUP="open",
                                                    MANAGEMENT_AUTH_FAILURE_LIMIT="100000"),
                                      shell=ScriptedShell(), clock=clock)
    yield runtime
    runtime.close()


@pytest.fixture
def api(runtime: bootstrap.Runtime) -> Api:
    return Api(portal_client(create_app(runtime)))


def new_key(api: Api, key: str, scopes: list[str], **fields: Any) -> dict[str, Any]:
    result = api.call("POST", "/users/me/keys", key, json={"name": f"key-{next(_names)}", "scopes": scopes,
                                                           **fields})
    assert result.status_code == 201, result.text
    return dict(result.json)


def register(api: Api, key: str, keys: KeyMaterial, name: str = "hv1") -> int:
    result = api.call("POST", "/agents", key, json=api.agent_body(keys, name=name, host_key=keys.host_key))
    assert result.status_code == 201, result.text
    return int(result.json["id"])


# ---------------------------------------------------------------------- every operation declares its scope


def _operations_of(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method.upper(), op) for path, methods in document["paths"].items()
            for method, op in methods.items()]


def test_every_operation_refuses_a_key_without_its_scope_and_admits_a_key_with_only_it(
        api: Api, keys: KeyMaterial) -> None:
    document = api.call("GET", "/openapi.json").json
    walked = 0
    for path, method, op in _operations_of(document):
        if op["security"] == []:
            assert BY_NAME[op["operationId"]].public, op["operationId"]
            continue
        [requirement] = op["security"]
        needed = requirement["bearer"]
        assert needed == ([] if BY_NAME[op["operationId"]].scope is None
                          else [BY_NAME[op["operationId"]].scope.value])  # type: ignore[union-attr]
        full = api.sign_up(f"u{next(_names)}")["api_key"]
        agent_id = register(api, full, keys)
        target = new_key(api, full, ["read"])
        concrete = (path.replace("{agent_id}", str(agent_id)).replace("{vm}", "web1")
                    .replace("{snapshot}", "s1").replace("{key_id}", str(target["id"]))
                    .replace("{webhook_id}", "1"))
        body = {} if "requestBody" in op else None
        if not needed:  # any key may call it
            assert op["operationId"] in ANY_KEY
            only_read = new_key(api, full, ["read"])["api_key"]
            result = api.call(method, concrete, only_read, json=body)
            assert result.status_code < 400, (op["operationId"], result.text)
            walked += 1
            continue
        [scope] = needed
        without = new_key(api, full, [s for s in ALL if s != scope])["api_key"]
        refused = assert_problem(api.call(method, concrete, without, json=body), 403, "insufficient_scope")
        assert refused["scope"] == scope, op["operationId"]
        assert str(403) in op["responses"] and "insufficient_scope" in op["responses"]["403"]["description"]
        admitted = api.call(method, concrete, new_key(api, full, [scope])["api_key"], json=body)
        code = admitted.json.get("code") if admitted.headers.get("content-type", "").endswith("json") and \
            isinstance(admitted.json, dict) else None
        assert admitted.status_code != 401 and code != "insufficient_scope", (op["operationId"], admitted.text)
        walked += 1
    assert walked == sum(1 for op in OPERATIONS if not op.public)


def test_an_operation_without_a_scope_is_refused_when_the_table_is_built() -> None:
    with pytest.raises(TypeError, match="scope"):
        Operation("list_things", "GET", "/things", "agents", "Things", None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="give the operation a scope"):
        Operation("list_things", "GET", "/things", "agents", "Things", None, scope=None)
    with pytest.raises(ValueError, match="public"):
        Operation("ping", "GET", "/ping", "service", "Ping", None, public=True, scope=Scope.READ)


# ---------------------------------------------------------------------- creating keys


def test_a_created_key_is_shown_once_and_listed_without_its_secret(api: Api) -> None:
    full = api.sign_up()["api_key"]
    created = new_key(api, full, ["read", "operate"], expires_at="2027-01-01T00:00:00Z")
    assert created["api_key"].startswith(created["prefix"])
    assert created["scopes"] == ["operate", "read"] and created["agents"] is None
    assert created["expires_at"] == "2027-01-01T00:00:00Z" and created["full"] is False
    listed = api.call("GET", "/users/me/keys", full)
    assert listed.status_code == 200
    assert [k["name"] for k in listed.json] == ["full", created["name"]]
    assert listed.json[0]["full"] is True and listed.json[0]["scopes"] == ALL
    assert created["api_key"] not in listed.text
    current = api.call("GET", "/users/me/keys/current", created["api_key"])
    assert current.json["id"] == created["id"] and current.json["scopes"] == ["operate", "read"]


def test_the_full_key_keeps_working_and_rotating_it_keeps_it_full(api: Api) -> None:
    signed = api.sign_up()
    assert api.call("GET", "/users/me", signed["api_key"]).status_code == 200
    rotated = api.call("POST", "/users/me/api-key/rotate", signed["api_key"]).json
    current = api.call("GET", "/users/me/keys/current", rotated["api_key"]).json
    assert current["full"] is True and current["scopes"] == ALL
    assert api.call("GET", "/users/me", signed["api_key"]).status_code == 401


def test_rotating_a_named_key_keeps_its_name_and_scopes(api: Api) -> None:
    full = api.sign_up()["api_key"]
    named = new_key(api, full, ["read", "keys"])
    rotated = api.call("POST", "/users/me/api-key/rotate", named["api_key"]).json["api_key"]
    current = api.call("GET", "/users/me/keys/current", rotated).json
    assert (current["id"], current["name"], current["scopes"]) == (named["id"], named["name"], ["keys", "read"])
    assert api.call("GET", "/users/me/keys/current", named["api_key"]).status_code == 401
    assert api.call("GET", "/users/me/keys/current", full).json["full"] is True  # the full key is untouched


def test_a_key_cannot_create_a_key_with_a_scope_it_lacks(api: Api) -> None:
    full = api.sign_up()["api_key"]
    manager = new_key(api, full, ["keys", "read"])["api_key"]
    refused = assert_problem(api.call("POST", "/users/me/keys", manager,
                                      json={"name": "x", "scopes": ["read", "operate"]}), 403, "insufficient_scope")
    assert refused["scope"] == "operate"
    assert new_key(api, manager, ["read"])["scopes"] == ["read"]


def test_a_key_limited_to_agents_creates_only_keys_limited_to_some_of_them(api: Api, keys: KeyMaterial) -> None:
    full = api.sign_up()["api_key"]
    one, two = register(api, full, keys, "hv1"), register(api, full, keys, "hv2")
    manager = new_key(api, full, ["keys", "read"], agents=[one])["api_key"]
    assert_problem(api.call("POST", "/users/me/keys", manager, json={"name": "x", "scopes": ["read"]}),
                   403, "key_limited_to_agents")
    assert_problem(api.call("POST", "/users/me/keys", manager, json={"name": "x", "scopes": ["read"],
                                                                     "agents": [one, two]}),
                   403, "key_limited_to_agents")
    assert new_key(api, manager, ["read"], agents=[one])["agents"] == [one]


def test_a_key_never_outlives_the_key_that_created_it(api: Api, clock: ManualClock) -> None:
    full = api.sign_up()["api_key"]
    limit = (clock.current + timedelta(days=1)).isoformat()
    manager = new_key(api, full, ["keys", "read"], expires_at=limit)["api_key"]
    inherited = new_key(api, manager, ["read"])
    assert inherited["expires_at"] == new_key(api, full, ["read"], expires_at=limit)["expires_at"]
    later = (clock.current + timedelta(days=2)).isoformat()
    body = assert_problem(api.call("POST", "/users/me/keys", manager,
                                   json={"name": "x", "scopes": ["read"], "expires_at": later}),
                          422, "validation_failed")
    assert body["errors"][0]["field"] == "expires_at"


@pytest.mark.parametrize(("fields", "field"), [
    ({"scopes": ["root"]}, "scopes"), ({"scopes": []}, "scopes"),
    ({"scopes": ["read"], "expires_at": "tomorrow"}, "expires_at"),
    ({"scopes": ["read"], "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ({"scopes": ["read"], "expires_at": "2030-01-01T00:00:00"}, "expires_at"),
    ({"scopes": ["read"], "agents": [424242]}, "agents"), ({"scopes": ["read"], "agents": []}, "agents"),
    ({"scopes": ["read"], "name": " "}, "name"),
])
def test_an_invalid_key_request_is_a_422_naming_the_field(api: Api, fields: dict[str, Any], field: str) -> None:
    full = api.sign_up()["api_key"]
    body = assert_problem(api.call("POST", "/users/me/keys", full, json={"name": "k", **fields}),
                          422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == [field]


# ---------------------------------------------------------------------- revocation and expiry


def test_a_revoked_key_is_refused_at_its_next_request_like_an_unknown_key(api: Api) -> None:
    full = api.sign_up()["api_key"]
    created = new_key(api, full, ["read"])
    assert api.call("GET", "/agents", created["api_key"]).status_code == 200  # remembered by the worker now
    assert api.call("DELETE", f"/users/me/keys/{created['id']}", full).status_code == 204
    assert_problem(api.call("GET", "/agents", created["api_key"]), 401, "invalid_api_key")
    assert_problem(api.call("DELETE", f"/users/me/keys/{created['id']}", full), 404, "api_key_not_found")


def test_the_full_key_cannot_be_revoked(api: Api) -> None:
    full = api.sign_up()["api_key"]
    full_id = api.call("GET", "/users/me/keys/current", full).json["id"]
    assert_problem(api.call("DELETE", f"/users/me/keys/{full_id}", full), 409, "full_key_not_revocable")


def test_an_expired_key_is_refused_with_api_key_expired_even_when_remembered(api: Api, clock: ManualClock) -> None:
    full = api.sign_up()["api_key"]
    created = new_key(api, full, ["read"], expires_at=(clock.current + timedelta(hours=1)).isoformat())
    assert api.call("GET", "/agents", created["api_key"]).status_code == 200
    clock.current += timedelta(hours=1)
    body = assert_problem(api.call("GET", "/agents", created["api_key"]), 401, "api_key_expired")
    assert "expired" in body["detail"]
    assert api.call("GET", "/agents", full).status_code == 200


def test_a_narrow_key_neither_sees_nor_revokes_wider_keys(api: Api) -> None:
    full = api.sign_up()["api_key"]
    wide = new_key(api, full, ["read", "operate"])
    narrow = new_key(api, full, ["keys", "read"])
    listed = [k["id"] for k in api.call("GET", "/users/me/keys", narrow["api_key"]).json]
    assert wide["id"] not in listed and narrow["id"] in listed
    assert_problem(api.call("DELETE", f"/users/me/keys/{wide['id']}", narrow["api_key"]), 404, "api_key_not_found")


def test_a_user_cannot_revoke_or_see_another_users_keys(api: Api) -> None:
    alice = api.sign_up("alice")["api_key"]
    bob = api.sign_up("bob")["api_key"]
    alices = new_key(api, alice, ["read"])
    assert alices["id"] not in [k["id"] for k in api.call("GET", "/users/me/keys", bob).json]
    assert_problem(api.call("DELETE", f"/users/me/keys/{alices['id']}", bob), 404, "api_key_not_found")
    assert api.call("GET", "/agents", alices["api_key"]).status_code == 200


# ---------------------------------------------------------------------- agent limits


def test_a_key_limited_to_agents_sees_the_others_as_404_everywhere(api: Api, keys: KeyMaterial) -> None:
    full = api.sign_up()["api_key"]
    one, two = register(api, full, keys, "hv1"), register(api, full, keys, "hv2")
    limited = new_key(api, full, ["read", "agents", "operate", "credentials"], agents=[one])["api_key"]
    assert [a["id"] for a in api.call("GET", "/agents", limited).json] == [one]
    assert [e["agent_id"] for e in api.call("GET", "/vms", limited).json] == [one]
    for method, path in (("GET", f"/agents/{two}"), ("PATCH", f"/agents/{two}"), ("DELETE", f"/agents/{two}"),
                         ("GET", f"/agents/{two}/credentials"), ("GET", f"/agents/{two}/vms"),
                         ("POST", f"/agents/{two}/vms/web1/start"), ("GET", f"/agents/{two}/public-key")):
        assert_problem(api.call(method, path, limited, json={"port": 22} if method == "PATCH" else None),
                       404, "agent_not_found")
    assert api.call("GET", f"/agents/{one}", limited).status_code == 200
    assert_problem(api.call("POST", "/agents", limited, json=api.agent_body(keys, name="hv3")),
                   403, "key_limited_to_agents")
    audit = api.call("GET", "/users/me/audit", limited).json["events"]
    assert audit and {e["agent_id"] for e in audit} == {one}


# ---------------------------------------------------------------------- audit and last use


def test_audit_events_name_the_key_that_acted(api: Api, keys: KeyMaterial) -> None:
    full = api.sign_up()["api_key"]
    agent_id = register(api, full, keys)
    operator = new_key(api, full, ["agents", "read"])
    assert api.call("PATCH", f"/agents/{agent_id}", operator["api_key"], json={"port": 2200}).status_code == 200
    events = api.call("GET", "/users/me/audit", full).json["events"]
    update = next(e for e in events if e["action"] == "agent.update")
    assert (update["key_id"], update["key_name"]) == (operator["id"], operator["name"])
    create = next(e for e in events if e["action"] == "agent.create")
    assert create["key_name"] == "full"
    revoke = api.call("DELETE", f"/users/me/keys/{operator['id']}", full)
    assert revoke.status_code == 204
    still = api.call("GET", "/users/me/audit", full).json["events"]
    assert any(e["key_id"] == operator["id"] and e["action"] == "agent.update" for e in still)


def test_last_used_at_is_written_at_most_once_a_minute(api: Api, runtime: bootstrap.Runtime,
                                                       clock: ManualClock) -> None:
    full = api.sign_up()["api_key"]
    created = new_key(api, full, ["read"])
    assert created["last_used_at"] is None
    first_use = clock.current
    writes = _count_writes(runtime)
    api.call("GET", "/agents", created["api_key"])
    assert len(writes) == 1
    clock.current += timedelta(seconds=30)
    for _ in range(5):
        assert api.call("GET", "/agents", created["api_key"]).status_code == 200
    assert len(writes) == 1  # no write for these uses
    current = api.call("GET", "/users/me/keys/current", created["api_key"]).json
    assert current["last_used_at"] == first_use.isoformat().replace("+00:00", "Z")
    clock.current += timedelta(seconds=31)
    api.call("GET", "/agents", created["api_key"])
    later = api.call("GET", "/users/me/keys/current", created["api_key"]).json
    assert later["last_used_at"] == clock.current.isoformat().replace("+00:00", "Z")


def _count_writes(runtime: bootstrap.Runtime) -> list[bool]:
    """The write transactions the key service opens from now on (the last-use notes)."""
    writes: list[bool] = []
    storage = runtime.portal.keys.storage

    class Counting:
        def transaction(self, *, write: bool = False) -> Any:
            if write:
                writes.append(True)
            return storage.transaction(write=write)

    runtime.portal.keys.storage = Counting()  # type: ignore[assignment]
    return writes


# ---------------------------------------------------------------------- the library obeys the same check


def test_the_library_refuses_what_the_key_may_not_do(runtime: bootstrap.Runtime, api: Api,
                                                     keys: KeyMaterial) -> None:
    full = api.sign_up()["api_key"]
    agent_id = register(api, full, keys)
    reader = new_key(api, full, ["read"])["api_key"]
    library = PortalLibrary(runtime.settings, runtime=runtime)
    me = library.login(reader)
    assert [a.id for a in me.list_agents()] == [agent_id]
    with pytest.raises(errors.InsufficientScope) as refused:
        me.delete_agent(agent_id)
    assert refused.value.scope == "agents"
    with pytest.raises(errors.InsufficientScope):
        me.vm_action(agent_id, "web1", "start")
    with pytest.raises(errors.InsufficientScope):
        me.read_credentials(agent_id)
    assert me.get_current_api_key().scopes == frozenset({Scope.READ})
