"""The HTTP API through falcon.testing, on the app built by the composition root with real adapters
(SQLite file, AES-GCM sealing, asyncssh key parsing)."""

from __future__ import annotations

import asyncio
import json

import asyncssh
import pytest
from falcon import testing

from entrypoints import bootstrap
from entrypoints.http.app import create_app
from tests.support import Api, KeyMaterial, assert_problem, make_settings, portal_client

# ---------------------------------------------------------------------- health and sign-up


def test_health_needs_no_key(api: Api) -> None:
    result = api.call("GET", "/health")
    assert result.status_code == 200
    assert result.json == {"status": "ok"}


def test_first_sign_up_returns_the_key_once_with_no_store(api: Api) -> None:
    result = api.call("POST", "/users", json={"name": "alice", "email": "alice@example.com"})
    assert result.status_code == 201
    body = result.json
    assert set(body) == {"id", "name", "email", "api_key_prefix", "created_at", "api_key"}
    assert body["api_key"].startswith(body["api_key_prefix"] + "_")
    assert result.headers["cache-control"] == "no-store"
    me = api.call("GET", "/users/me", body["api_key"]).json
    assert "api_key" not in me
    assert me["api_key_prefix"] == body["api_key_prefix"]


def test_second_sign_up_is_refused_by_default_and_says_how(api: Api) -> None:
    api.sign_up("alice")
    body = assert_problem(api.call("POST", "/users", json={"name": "bob"}), 403, "signup_closed")
    assert "users create" in body["detail"] and "MANAGEMENT_SIGNUP" in body["detail"]


def test_closed_sign_up_refuses_even_the_first_user(tmp_path) -> None:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_SIGNUP="closed"))
    api = Api(portal_client(create_app(runtime)))
    assert_problem(api.call("POST", "/users", json={"name": "alice"}), 403, "signup_closed")
    runtime.close()


def test_duplicate_email_is_a_conflict_whatever_the_case(open_api: Api) -> None:
    open_api.sign_up("alice", "Alice@Example.com")
    assert_problem(open_api.call("POST", "/users", json={"name": "a2", "email": "alice@example.COM"}),
                   409, "email_taken")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "ok", "email": "not-an-email"}, "email"),
        ({"name": "ok", "email": "a@" + "b" * 250 + ".com"}, "email"),
        ({"name": 5}, "name"),
        ({}, "name"),
        ({"name": "ok", "admin": True}, "admin"),
    ],
)
def test_invalid_user_fields_are_422_naming_the_field(api: Api, body: dict, field: str) -> None:
    problem = assert_problem(api.call("POST", "/users", json=body), 422, "validation_failed")
    assert field in [e["field"] for e in problem["errors"]]


# ---------------------------------------------------------------------- authentication


def test_missing_key_is_401_with_bearer_challenge(api: Api) -> None:
    result = api.call("GET", "/users/me")
    assert_problem(result, 401, "missing_api_key")
    assert result.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("key", ["nonsense", "mgmt_000000000000_" + "A" * 43])
def test_invalid_key_is_401_with_bearer_challenge(api: Api, key: str) -> None:
    api.sign_up()
    result = api.call("GET", "/agents", key)
    assert_problem(result, 401, "invalid_api_key")
    assert result.headers["www-authenticate"].startswith("Bearer")


def test_a_forged_key_with_a_real_prefix_is_refused(api: Api) -> None:
    user = api.sign_up()
    forged = user["api_key_prefix"] + "_" + "B" * 43
    assert_problem(api.call("GET", "/users/me", forged), 401, "invalid_api_key")


def test_rotation_kills_the_old_key_at_once(api: Api) -> None:
    old = api.sign_up()["api_key"]
    rotated = api.call("POST", "/users/me/api-key/rotate", old)
    assert rotated.status_code == 200
    assert rotated.headers["cache-control"] == "no-store"
    new = rotated.json["api_key"]
    assert new != old
    assert_problem(api.call("GET", "/users/me", old), 401, "invalid_api_key")
    assert api.call("GET", "/users/me", new).status_code == 200


def test_failed_authentications_are_rate_limited_per_client_address(tmp_path) -> None:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_AUTH_FAILURE_LIMIT="3"))
    api = Api(portal_client(create_app(runtime)))
    key = api.sign_up()["api_key"]
    attacker = {"remote_addr": "203.0.113.9"}
    for _ in range(3):
        assert api.call("GET", "/users/me", "mgmt_000000000000_" + "C" * 43, **attacker).status_code == 401
    limited = api.call("GET", "/users/me", "mgmt_000000000000_" + "C" * 43, **attacker)
    assert_problem(limited, 429, "too_many_auth_failures")
    assert int(limited.headers["retry-after"]) >= 1
    # a valid key from the limited address still works (issue 14 item 14)
    assert api.call("GET", "/users/me", key, **attacker).status_code == 200
    # the operator's own address is not affected
    assert api.call("GET", "/users/me", key, remote_addr="198.51.100.7").status_code == 200
    runtime.close()


# ---------------------------------------------------------------------- agents


def test_agent_lifecycle(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    created = api.call("POST", "/agents", key, json=api.agent_body(keys, host_key=keys.host_key))
    assert created.status_code == 201, created.text
    agent = created.json
    assert created.headers["location"] == f"/agents/{agent['id']}"
    assert set(agent) == {"id", "name", "hostname", "port", "username", "allow_unknown_hosts", "host_key",
                          "host_key_fingerprint", "key_fingerprint", "public_key", "libvirt_uri", "created_at",
                          "updated_at", "key_exportable"}
    assert agent["port"] == 22 and agent["libvirt_uri"] == "qemu:///system"
    assert agent["key_exportable"] is True  # an uploaded key
    assert agent["allow_unknown_hosts"] is False
    assert agent["host_key_fingerprint"].startswith("SHA256:")
    assert agent["key_fingerprint"].startswith("SHA256:")

    assert api.call("GET", "/agents", key).json == [agent]
    assert api.call("GET", f"/agents/{agent['id']}", key).json == agent

    patched = api.call("PATCH", f"/agents/{agent['id']}", key, json={"port": 2222, "name": "hv-one"})
    assert patched.status_code == 200, patched.text
    assert patched.json["port"] == 2222 and patched.json["name"] == "hv-one"
    assert patched.json["hostname"] == agent["hostname"]

    assert api.call("DELETE", f"/agents/{agent['id']}", key).status_code == 204
    assert_problem(api.call("GET", f"/agents/{agent['id']}", key), 404, "agent_not_found")
    assert_problem(api.call("DELETE", f"/agents/{agent['id']}", key), 404, "agent_not_found")


@pytest.mark.parametrize("form", ["openssh", "pem_rsa"])
def test_unencrypted_keys_in_openssh_and_pem_are_accepted(api: Api, keys: KeyMaterial, form: str) -> None:
    key = api.sign_up()["api_key"]
    result = api.call("POST", "/agents", key, json=api.agent_body(keys, private_key=getattr(keys, form)))
    assert result.status_code == 201, result.text


@pytest.mark.parametrize("form", ["openssh_encrypted", "pem_encrypted"])
def test_encrypted_keys_need_the_right_passphrase(api: Api, keys: KeyMaterial, form: str) -> None:
    key = api.sign_up()["api_key"]
    text = getattr(keys, form)
    missing = api.call("POST", "/agents", key, json=api.agent_body(keys, private_key=text))
    assert [e["field"] for e in assert_problem(missing, 422, "validation_failed")["errors"]] == [
        "private_key_passphrase"]
    wrong = api.call("POST", "/agents", key,
                     json=api.agent_body(keys, private_key=text, private_key_passphrase="wrong"))
    assert [e["field"] for e in assert_problem(wrong, 422, "validation_failed")["errors"]] == [
        "private_key_passphrase"]
    right = api.call("POST", "/agents", key,
                     json=api.agent_body(keys, private_key=text, private_key_passphrase=keys.passphrase))
    assert right.status_code == 201, right.text


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"hostname": "-oProxyCommand=evil"}, "hostname"),
        ({"hostname": "host name"}, "hostname"),
        ({"hostname": "h" * 256}, "hostname"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": "22"}, "port"),
        ({"port": True}, "port"),
        ({"username": "-l"}, "username"),
        ({"username": "u" * 65}, "username"),
        ({"name": ""}, "name"),
        ({"private_key": "not a key"}, "private_key"),
        ({"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n-----END OPENSSH PRIVATE KEY-----\n"},
         "private_key"),
        ({"host_key": "not a host key"}, "host_key"),
        ({"libvirt_uri": "--help"}, "libvirt_uri"),
        ({"allow_unknown_hosts": "yes"}, "allow_unknown_hosts"),
        ({"key_path": "/etc/shadow"}, "key_path"),
    ],
)
def test_invalid_agent_fields_are_422_naming_the_field(api: Api, keys: KeyMaterial, fields: dict,
                                                      field: str) -> None:
    key = api.sign_up()["api_key"]
    problem = assert_problem(api.call("POST", "/agents", key, json=api.agent_body(keys, **fields)), 422,
                             "validation_failed")
    assert field in [e["field"] for e in problem["errors"]]
    assert api.call("GET", "/agents", key).json == []


def test_several_invalid_fields_are_reported_together(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    body = api.agent_body(keys, hostname="-x", port=0, username="-u")
    problem = assert_problem(api.call("POST", "/agents", key, json=body), 422, "validation_failed")
    assert {e["field"] for e in problem["errors"]} == {"hostname", "port", "username"}


def test_missing_required_agent_fields_are_named(api: Api) -> None:
    key = api.sign_up()["api_key"]
    problem = assert_problem(api.call("POST", "/agents", key, json={"name": "hv"}), 422, "validation_failed")
    assert {e["field"] for e in problem["errors"]} == {"hostname", "username"}


def test_an_agent_needs_a_key_uploaded_or_generated_not_both(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    body = api.agent_body(keys)
    del body["private_key"]
    problem = assert_problem(api.call("POST", "/agents", key, json=body), 422, "validation_failed")
    assert [(e["field"], "generate_key" in e["message"]) for e in problem["errors"]] == [("private_key", True)]
    both = {**api.agent_body(keys), "generate_key": True}
    problem = assert_problem(api.call("POST", "/agents", key, json=both), 422, "validation_failed")
    assert [e["field"] for e in problem["errors"]] == ["generate_key"]
    assert api.call("GET", "/agents", key).json == []


def test_duplicate_agent_name_is_a_conflict(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    assert api.call("POST", "/agents", key, json=api.agent_body(keys)).status_code == 201
    assert_problem(api.call("POST", "/agents", key, json=api.agent_body(keys)), 409, "agent_name_taken")


@pytest.mark.parametrize("field", ["name", "hostname", "username", "port", "private_key", "allow_unknown_hosts"])
def test_patch_cannot_blank_a_required_field(api: Api, keys: KeyMaterial, field: str) -> None:
    key = api.sign_up()["api_key"]
    agent = api.call("POST", "/agents", key, json=api.agent_body(keys)).json
    problem = assert_problem(api.call("PATCH", f"/agents/{agent['id']}", key, json={field: None}), 422,
                             "validation_failed")
    assert [e["field"] for e in problem["errors"]] == [field]
    assert api.call("GET", f"/agents/{agent['id']}", key).json == agent


def test_patch_validates_like_registration(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    agent = api.call("POST", "/agents", key, json=api.agent_body(keys)).json
    for body, field in [({"hostname": "-x"}, "hostname"), ({"port": 99999}, "port"), ({"bogus": 1}, "bogus"),
                        ({"host_key": "junk"}, "host_key"), ({"name": ""}, "name")]:
        problem = assert_problem(api.call("PATCH", f"/agents/{agent['id']}", key, json=body), 422,
                                 "validation_failed")
        assert [e["field"] for e in problem["errors"]] == [field]


def test_patch_pins_and_clears_the_host_key(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    agent = api.call("POST", "/agents", key, json=api.agent_body(keys)).json
    assert agent["host_key"] is None
    pinned = api.call("PATCH", f"/agents/{agent['id']}", key, json={"host_key": keys.host_key}).json
    assert pinned["host_key"] == " ".join(keys.host_key.split()[:2])
    assert pinned["host_key_fingerprint"].startswith("SHA256:")
    cleared = api.call("PATCH", f"/agents/{agent['id']}", key, json={"host_key": None}).json
    assert cleared["host_key"] is None and cleared["host_key_fingerprint"] is None


def test_patch_replaces_the_key_and_passphrase(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    agent = api.call("POST", "/agents", key, json=api.agent_body(keys)).json
    changed = api.call("PATCH", f"/agents/{agent['id']}", key,
                       json={"private_key": keys.pem_encrypted, "private_key_passphrase": keys.passphrase})
    assert changed.status_code == 200, changed.text
    assert changed.json["key_fingerprint"] != agent["key_fingerprint"]
    credentials = api.call("GET", f"/agents/{agent['id']}/credentials", key).json
    assert credentials["private_key"] == keys.pem_encrypted
    assert credentials["private_key_passphrase"] == keys.passphrase
    wrong = api.call("PATCH", f"/agents/{agent['id']}", key, json={"private_key_passphrase": "nope"})
    assert_problem(wrong, 422, "validation_failed")


def test_credentials_return_the_key_material_with_no_store(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    body = api.agent_body(keys, private_key=keys.openssh_encrypted, private_key_passphrase=keys.passphrase)
    agent = api.call("POST", "/agents", key, json=body).json
    result = api.call("GET", f"/agents/{agent['id']}/credentials", key)
    assert result.status_code == 200
    assert result.headers["cache-control"] == "no-store"
    assert result.json["private_key"] == keys.openssh_encrypted
    assert result.json["private_key_passphrase"] == keys.passphrase
    assert result.json["id"] == agent["id"]


def test_agent_id_that_is_not_a_number_or_out_of_range_is_404(api: Api) -> None:
    key = api.sign_up()["api_key"]
    for path in ["/agents/abc", "/agents/0", "/agents/-1", "/agents/99999999999999999999999"]:
        assert_problem(api.call("GET", path, key), 404, "not_found")


# ---------------------------------------------------------------------- isolation


def test_users_never_see_each_others_agents_credentials_or_audit(open_api: Api, keys: KeyMaterial) -> None:
    alice = open_api.sign_up("alice")["api_key"]
    bob = open_api.sign_up("bob")["api_key"]
    agent = open_api.call("POST", "/agents", alice, json=open_api.agent_body(keys)).json
    path = f"/agents/{agent['id']}"
    assert open_api.call("GET", "/agents", bob).json == []
    for method, suffix, body in [("GET", "", None), ("PATCH", "", {"port": 1}), ("DELETE", "", None),
                                 ("GET", "/credentials", None)]:
        assert_problem(open_api.call(method, path + suffix, bob, json=body), 404, "agent_not_found")
    # the 404 for someone else's agent is byte-for-byte the 404 for an agent that does not exist
    theirs = open_api.call("GET", path, bob).json
    missing = open_api.call("GET", "/agents/424242", bob).json
    assert {k: v for k, v in theirs.items() if k != "request_id"} == {
        k: v for k, v in missing.items() if k != "request_id"}
    bob_events = open_api.call("GET", "/users/me/audit", bob).json["events"]
    assert all(e["request_id"] not in {x["request_id"] for x in
                                       open_api.call("GET", "/users/me/audit", alice).json["events"]}
               for e in bob_events)
    assert open_api.call("GET", path, alice).json == agent  # untouched by bob's attempts
    # bob may reuse alice's agent name: names are unique per owner only
    assert open_api.call("POST", "/agents", bob, json=open_api.agent_body(keys)).status_code == 201


# ---------------------------------------------------------------------- audit


def test_every_mutation_and_credentials_read_is_audited_newest_first(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    agent = api.call("POST", "/agents", key, json=api.agent_body(keys), headers={"X-Request-Id": "req-create"}).json
    api.call("PATCH", f"/agents/{agent['id']}", key, json={"port": 2200})
    api.call("GET", f"/agents/{agent['id']}/credentials", key)
    api.call("GET", f"/agents/{agent['id']}", key)  # reads are not audited
    api.call("DELETE", f"/agents/{agent['id']}", key)
    api.call("DELETE", f"/agents/{agent['id']}", key)  # refused: recorded with its code
    events = api.call("GET", "/users/me/audit", key).json["events"]
    assert [(e["action"], e["outcome"]) for e in events] == [
        ("agent.delete", "agent_not_found"),
        ("agent.delete", "ok"),
        ("agent.read_credentials", "ok"),
        ("agent.update", "ok"),
        ("agent.create", "ok"),
        ("user.create", "ok"),
    ]
    assert all(e["agent_id"] == agent["id"] for e in events[:5])
    assert events[4]["request_id"] == "req-create"
    assert all(e["client_address"] for e in events)


def test_audit_pages_with_limit_and_before(api: Api, keys: KeyMaterial) -> None:
    key = api.sign_up()["api_key"]
    for n in range(5):
        api.call("POST", "/agents", key, json=api.agent_body(keys, name=f"hv{n}"))
    first = api.call("GET", "/users/me/audit?limit=4", key).json
    assert len(first["events"]) == 4
    second = api.call("GET", f"/users/me/audit?limit=4&before={first['next_before']}", key).json
    assert len(second["events"]) == 2 and second["next_before"] is None
    ids = [e["id"] for e in first["events"] + second["events"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 6


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=abc", "before=0", "before=-3"])
def test_bad_audit_paging_is_422_naming_the_parameter(api: Api, query: str) -> None:
    key = api.sign_up()["api_key"]
    problem = assert_problem(api.call("GET", f"/users/me/audit?{query}", key), 422, "validation_failed")
    assert problem["errors"][0]["field"] == query.split("=")[0]


# ---------------------------------------------------------------------- request hygiene


def test_unparseable_json_is_400(api: Api) -> None:
    assert_problem(api.call("POST", "/users", body="{nope", headers={"Content-Type": "application/json"}), 400,
                   "malformed_json")


def test_a_json_body_that_is_not_an_object_is_422(api: Api) -> None:
    problem = assert_problem(api.call("POST", "/users", json=["alice"]), 422, "validation_failed")
    assert problem["errors"][0]["field"] == "body"


def test_wrong_content_type_is_415(api: Api) -> None:
    result = api.call("POST", "/users", body="name=alice",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_problem(result, 415, "unsupported_media_type")


def test_declared_body_over_the_limit_is_413_before_reading(api: Api) -> None:
    body = json.dumps({"name": "x" * (1024 * 1024 + 10)})
    result = api.call("POST", "/users", body=body, headers={"Content-Type": "application/json"})
    assert_problem(result, 413, "body_too_large")


def test_undeclared_body_over_the_limit_is_413(api: Api) -> None:
    payload = b'{"name": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    assert_problem(_chunked_post(api, payload), 413, "body_too_large")


def _chunked_post(api: Api, payload: bytes) -> testing.Result:
    """POST ``payload`` straight to the ASGI app in 64 KiB pieces with no Content-Length, as a
    client using chunked transfer encoding would; return status, headers and body."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/users", "raw_path": b"/users", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                    (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }
    pieces = [payload[i:i + 65536] for i in range(0, len(payload), 65536)]
    sent: list[dict] = []

    async def receive() -> dict:
        if pieces:
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(api.client.app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = [(k.decode(), v.decode()) for k, v in start["headers"]]
    return testing.Result([body], f"{start['status']} X", headers)


def test_unknown_route_and_method_are_problem_details(api: Api) -> None:
    assert_problem(api.call("GET", "/nowhere"), 404, "not_found")
    key = api.sign_up()["api_key"]
    result = api.call("PUT", "/agents", key)
    assert_problem(result, 405, "method_not_allowed")
    assert "POST" in result.headers["allow"]


def test_request_id_is_echoed_or_generated(api: Api) -> None:
    assert api.call("GET", "/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = api.call("GET", "/health", headers={"X-Request-Id": "bad id\x01"}).headers["x-request-id"]
    assert generated != "bad id\x01" and len(generated) == 32


def test_an_unexpected_error_is_a_500_without_details(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    key = api.sign_up()["api_key"]
    from core.agents import AgentService

    def explode(*_args: object) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(AgentService, "list_agents", explode)
    result = api.call("GET", "/agents", key)
    body = assert_problem(result, 500, "internal_error")
    assert "secret internals" not in result.text and "Traceback" not in result.text
    assert body["request_id"] == result.headers["x-request-id"]


# ---------------------------------------------------------------------- portal-generated agent keys


def sealed_private_key(runtime: bootstrap.Runtime, owner_id: int, agent_id: int) -> str:
    """The private key as the portal holds it (generated keys are never exported: issue 14 item 7)."""
    with runtime.storage.transaction() as tx:
        stored = tx.get_agent(owner_id, agent_id)
    assert stored is not None
    return runtime.portal.agents.keyring.secrets.unseal(stored.sealed_private_key,
                                         context=f"agent-credential/private_key/user:{owner_id}")


def test_generated_key_agent_exposes_its_public_key_and_keeps_the_private_key_sealed(
        api: Api, runtime: bootstrap.Runtime) -> None:
    user = api.sign_up()
    key = user["api_key"]
    created = api.call("POST", "/agents", key, json={"name": "hv", "hostname": "192.0.2.7", "username": "playr",
                                                     "generate_key": True})
    assert created.status_code == 201, created.text
    agent = created.json
    assert agent["public_key"].startswith("ssh-ed25519 ") and len(agent["public_key"].split()) == 2
    published = api.call("GET", f"/agents/{agent['id']}/public-key", key)
    assert published.status_code == 200
    assert published.json["public_key"] == agent["public_key"]
    assert published.json["key_fingerprint"] == agent["key_fingerprint"]
    assert published.json["authorized_keys_line"] == (
        f'restrict,pty,command="/usr/local/libexec/playr-agent-shell" {agent["public_key"]} '
        f"playr-portal-agent-{agent['id']}")
    # The private key is never exported, and the sealed one is the one the public key belongs to.
    assert_problem(api.call("GET", f"/agents/{agent['id']}/credentials", key), 409, "key_not_exportable")
    private = sealed_private_key(runtime, user["id"], agent["id"])
    imported = asyncssh.import_private_key(private)
    assert imported.export_public_key("openssh").decode().split()[:2] == agent["public_key"].split()
    assert imported.get_fingerprint("sha256") == agent["key_fingerprint"]


def test_rotating_an_agent_key_issues_a_new_pair_and_is_audited(api: Api, keys: KeyMaterial,
                                                                runtime: bootstrap.Runtime) -> None:
    user = api.sign_up()
    key = user["api_key"]
    agent = api.call("POST", "/agents", key, json=api.agent_body(keys)).json
    rotated = api.call("POST", f"/agents/{agent['id']}/rotate-key", key)
    assert rotated.status_code == 200, rotated.text
    assert rotated.json["public_key"] != agent["public_key"]
    assert rotated.json["key_fingerprint"] != agent["key_fingerprint"]
    again = api.call("POST", f"/agents/{agent['id']}/rotate-key", key).json
    assert again["public_key"] not in (agent["public_key"], rotated.json["public_key"])
    assert api.call("GET", f"/agents/{agent['id']}/public-key", key).json["public_key"] == again["public_key"]
    assert_problem(api.call("GET", f"/agents/{agent['id']}/credentials", key), 409, "key_not_exportable")
    assert asyncssh.import_private_key(sealed_private_key(runtime, user["id"], agent["id"])).get_fingerprint(
        "sha256") == again["key_fingerprint"]
    events = api.call("GET", "/users/me/audit", key).json["events"]
    assert [e["action"] for e in events if e["action"] == "agent.rotate_key"] == ["agent.rotate_key"] * 2


def test_another_users_agent_key_can_be_neither_read_nor_rotated(open_api: Api, keys: KeyMaterial) -> None:
    alice = open_api.sign_up()["api_key"]
    bob = open_api.sign_up()["api_key"]
    agent = open_api.call("POST", "/agents", alice, json=open_api.agent_body(keys)).json
    assert_problem(open_api.call("GET", f"/agents/{agent['id']}/public-key", bob), 404, "agent_not_found")
    assert_problem(open_api.call("POST", f"/agents/{agent['id']}/rotate-key", bob), 404, "agent_not_found")
    assert open_api.call("GET", f"/agents/{agent['id']}", alice).json["key_fingerprint"] == agent["key_fingerprint"]
