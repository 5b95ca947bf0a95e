"""Webhooks over HTTP on SQLite (issue 18), on the app the composition root builds (real sealing,
real storage, the real sender's target policy): create/list/show/update/delete, the secret shown on
create and rotate only and sealed at rest, 422s with stable codes, isolation between users and
between agent-limited keys, the scopes, and the outbox rows an event makes in SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.memory import ScriptedShell
from core.model import Scope
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from tests.support import Api, KeyMaterial, assert_problem, make_settings, portal_client

# Webhook targets in these tests are documentation addresses (never connected to: no worker runs
# under falcon.testing), written as IP literals so the policy needs no DNS.
ALLOW = "192.0.2.0/24,2001:db8::/32"
URL = "https://192.0.2.10/hooks/playr"


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[bootstrap.Runtime]:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_SIGNUP="open",
                                                    MANAGEMENT_WEBHOOK_ALLOW=ALLOW),
                                      shell=ScriptedShell())
    yield runtime
    runtime.close()


@pytest.fixture
def api(runtime: bootstrap.Runtime) -> Api:
    return Api(portal_client(create_app(runtime)))


def create(api: Api, key: str, **fields: Any) -> dict[str, Any]:
    result = api.call("POST", "/webhooks", key, json={"url": URL, **fields})
    assert result.status_code == 201, result.text
    return dict(result.json)


def new_key(api: Api, key: str, scopes: list[str], agents: list[int] | None = None) -> str:
    result = api.call("POST", "/users/me/keys", key, json={"name": f"k{len(scopes)}{agents}", "scopes": scopes,
                                                           "agents": agents})
    assert result.status_code == 201, result.text
    return str(result.json["api_key"])


def test_a_webhook_is_created_with_its_secret_shown_once_and_sealed_at_rest(api: Api, tmp_path: Path) -> None:
    key = api.sign_up()["api_key"]
    result = api.call("POST", "/webhooks", key, json={"url": URL, "events": ["vm.started", "agent.*"]})
    assert result.status_code == 201 and result.headers["cache-control"] == "no-store"
    created = result.json
    assert result.headers["location"] == f"/webhooks/{created['id']}"
    assert created["secret"].startswith("whsec_") and created["events"] == ["vm.started", "agent.*"]
    assert created["agents"] is None and created["active"] is True
    shown = api.call("GET", f"/webhooks/{created['id']}", key).json
    assert "secret" not in shown and shown["url"] == URL
    assert all("secret" not in hook for hook in api.call("GET", "/webhooks", key).json)
    with sqlite3.connect(tmp_path / "data" / "management.sqlite3") as db:
        [(sealed,)] = db.execute("SELECT sealed_secret FROM webhooks").fetchall()
    assert created["secret"] not in sealed
    rotated = api.call("POST", f"/webhooks/{created['id']}/rotate-secret", key)
    assert rotated.status_code == 200 and rotated.headers["cache-control"] == "no-store"
    assert rotated.json["secret"] not in (created["secret"], None)


def test_a_webhook_changes_only_what_a_patch_gives_and_is_deleted(api: Api) -> None:
    key = api.sign_up()["api_key"]
    hook = create(api, key, events=["vm.stopped"])
    changed = api.call("PATCH", f"/webhooks/{hook['id']}", key, json={"active": False})
    assert changed.status_code == 200 and changed.json["active"] is False
    assert changed.json["events"] == ["vm.stopped"] and changed.json["url"] == URL
    moved = api.call("PATCH", f"/webhooks/{hook['id']}", key, json={"url": "http://[2001:db8::5]:8080/x",
                                                                    "events": []}).json
    assert moved["url"] == "http://[2001:db8::5]:8080/x" and moved["events"] == []
    assert api.call("DELETE", f"/webhooks/{hook['id']}", key).status_code == 204
    assert_problem(api.call("GET", f"/webhooks/{hook['id']}", key), 404, "webhook_not_found")
    assert_problem(api.call("DELETE", f"/webhooks/{hook['id']}", key), 404, "webhook_not_found")


@pytest.mark.parametrize(("url", "code"), [
    ("ftp://192.0.2.10/", "validation_failed"),
    ("gopher://192.0.2.10/", "validation_failed"),
    ("https://user:pw@192.0.2.10/", "validation_failed"),
    ("not a url", "validation_failed"),
    ("http://127.0.0.1:8000/", "webhook_target_refused"),
    ("http://169.254.169.254/latest/meta-data/", "webhook_target_refused"),
    ("http://[::1]/", "webhook_target_refused"),
    ("http://[::ffff:127.0.0.1]/", "webhook_target_refused"),
    ("https://198.51.100.7/", "webhook_target_refused"),  # outside the list the operator gave
])
def test_a_url_that_is_not_http_or_is_outside_the_allowed_networks_is_a_422(api: Api, url: str, code: str) -> None:
    key = api.sign_up()["api_key"]
    body = assert_problem(api.call("POST", "/webhooks", key, json={"url": url}), 422, code)
    assert [e["field"] for e in body["errors"]] == ["url"]
    if code == "webhook_target_refused":
        assert "MANAGEMENT_WEBHOOK_ALLOW" in body["detail"]
    hook = create(api, key)
    assert_problem(api.call("PATCH", f"/webhooks/{hook['id']}", key, json={"url": url}), 422, code)


@pytest.mark.parametrize("body", [{"url": URL, "events": ["Started"]}, {"url": URL, "events": "vm.started"},
                                  {"url": URL, "agents": []}, {"url": URL, "agents": [999]},
                                  {"url": URL, "active": "yes"}, {"url": URL, "secret": "mine"}, {}])
def test_bad_webhook_fields_are_422_naming_the_field(api: Api, body: dict[str, Any]) -> None:
    key = api.sign_up()["api_key"]
    assert_problem(api.call("POST", "/webhooks", key, json=body), 422, "validation_failed")


def test_users_never_see_or_touch_each_others_webhooks(api: Api) -> None:
    alice = api.sign_up("alice")["api_key"]
    bob = api.sign_up("bob")["api_key"]
    hook = create(api, alice)
    assert api.call("GET", "/webhooks", bob).json == []
    for method, suffix in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/rotate-secret"),
                           ("GET", "/deliveries")):
        body = {"active": False} if method == "PATCH" else None
        assert_problem(api.call(method, f"/webhooks/{hook['id']}{suffix}", bob, json=body), 404, "webhook_not_found")
    assert api.call("GET", f"/webhooks/{hook['id']}", alice).json["active"] is True


def test_a_key_limited_to_agents_sees_only_webhooks_within_them(api: Api, keys: KeyMaterial) -> None:
    full = api.sign_up()["api_key"]
    hv1 = api.call("POST", "/agents", full, json=api.agent_body(keys, name="hv1")).json["id"]
    hv2 = api.call("POST", "/agents", full, json=api.agent_body(keys, name="hv2")).json["id"]
    wide = create(api, full)
    limited = new_key(api, full, ["read", "keys"], [hv1])
    mine = create(api, limited)
    assert mine["agents"] == [hv1]
    assert [h["id"] for h in api.call("GET", "/webhooks", limited).json] == [mine["id"]]
    assert_problem(api.call("GET", f"/webhooks/{wide['id']}", limited), 404, "webhook_not_found")
    assert_problem(api.call("POST", "/webhooks", limited, json={"url": URL, "agents": [hv2]}), 403,
                   "key_limited_to_agents")
    assert_problem(api.call("PATCH", f"/webhooks/{mine['id']}", limited, json={"agents": [hv1, hv2]}), 403,
                   "key_limited_to_agents")
    assert {h["id"] for h in api.call("GET", "/webhooks", full).json} == {wide["id"], mine["id"]}


def test_reading_webhooks_needs_read_and_changing_them_needs_keys(api: Api) -> None:
    full = api.sign_up()["api_key"]
    hook = create(api, full)
    reader = new_key(api, full, ["read"])
    assert api.call("GET", "/webhooks", reader).status_code == 200
    assert api.call("GET", f"/webhooks/{hook['id']}/deliveries", reader).status_code == 200
    for method, path, body in (("POST", "/webhooks", {"url": URL}),
                               ("PATCH", f"/webhooks/{hook['id']}", {"active": False}),
                               ("DELETE", f"/webhooks/{hook['id']}", None),
                               ("POST", f"/webhooks/{hook['id']}/rotate-secret", None)):
        refused = assert_problem(api.call(method, path, reader, json=body), 403, "insufficient_scope")
        assert refused["scope"] == Scope.KEYS.value
    keys_only = new_key(api, full, ["keys"])
    refused = assert_problem(api.call("POST", "/webhooks", keys_only, json={"url": URL}), 403, "insufficient_scope")
    assert refused["scope"] == "read"  # a webhook hands out events: its creator must be able to read them


def test_an_event_makes_a_pending_delivery_listed_with_its_webhook(api: Api, runtime: bootstrap.Runtime) -> None:
    created = api.sign_up()
    key = created["api_key"]
    every = create(api, key)
    other = create(api, key, events=["vm.stopped"])
    log = runtime.portal.events
    with runtime.storage.transaction(write=True) as tx:
        event = log.add(tx, log.new(created["id"], None, "web", "vm.started", "Booted"))
    [delivery] = api.call("GET", f"/webhooks/{every['id']}/deliveries", key).json
    assert delivery["event_id"] == event.id and delivery["event_type"] == "vm.started"
    assert delivery["status"] == "pending" and delivery["attempts"] == [] and delivery["next_attempt_at"]
    assert api.call("GET", f"/webhooks/{other['id']}/deliveries", key).json == []
    assert_problem(api.call("GET", f"/webhooks/{every['id']}/deliveries?limit=0", key), 422, "validation_failed")


def test_webhook_changes_are_audited_without_the_urls_path_or_query(api: Api) -> None:
    key = api.sign_up()["api_key"]
    hook = create(api, key, url=URL + "/s3cr3t-in-path?token=s3cr3t-in-query")
    api.call("DELETE", f"/webhooks/{hook['id']}", key)
    audited = [e for e in api.call("GET", "/users/me/audit", key).json["events"] if e["action"].startswith("webhook")]
    assert [e["action"] for e in audited] == ["webhook.delete", "webhook.create"]
    assert all("s3cr3t" not in (e["detail"] or "") and "192.0.2.10" in e["detail"] for e in audited)
