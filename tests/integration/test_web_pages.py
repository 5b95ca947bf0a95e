"""The web console's pages in-process (the app built by the composition root, falcon.testing): the
session cookie and where it is accepted, CSRF, the security headers, escaping, and the pages of the
features built in parallel (issues 16, 17, 20), driven through stand-in operations at their
contract's routes. The browser tests (tests/lab/test_web_console.py) prove the same in Chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from core.errors import FieldError, ValidationFailed
from core.model import Scope
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from entrypoints.operations import BY_NAME, Call, Operation
from entrypoints.web import pages
from entrypoints.web.guard import COOKIE
from tests.support import Api, make_settings, portal_client

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Api]:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_SIGNUP="open"))
    yield Api(portal_client(create_app(runtime)))
    runtime.close()


def sign_in(web: Api, key: str, headers: dict[str, str] | None = None, **kwargs: Any) -> testing.Result:
    return web.client.simulate_post("/ui/sign-in", body=f"api_key={key}", headers={**FORM, **(headers or {})},
                                    **kwargs)


def session(web: Api, name: str = "alice") -> tuple[str, str, str]:
    """A signed-in browser: (API key, session cookie, the page's form token)."""
    key = web.sign_up(name)["api_key"]
    cookie = sign_in(web, key).cookies[COOKIE].value
    page = web.client.simulate_get("/ui/account", cookies={COOKIE: cookie})
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert match is not None
    return key, cookie, match.group(1)


def test_signing_in_sets_an_http_only_same_site_strict_cookie(web: Api) -> None:
    key = web.sign_up()["api_key"]
    result = sign_in(web, key)
    assert result.status_code == 303 and result.headers["location"] == "/"
    cookie = result.cookies[COOKIE]
    assert cookie.http_only and cookie.same_site == "Strict" and not cookie.secure
    assert cookie.value != key and key not in result.headers.get("set-cookie", "")


def test_the_session_cookie_is_secure_when_the_request_came_over_tls(web: Api) -> None:
    key = web.sign_up()["api_key"]
    assert sign_in(web, key, protocol="https").cookies[COOKIE].secure


def test_a_wrong_key_is_refused_on_the_sign_in_page_without_a_cookie(web: Api) -> None:
    result = sign_in(web, "mgmt_000000000000_wrong")
    assert result.status_code == 401
    assert COOKIE not in result.cookies
    assert "invalid_api_key" in result.text


def test_failed_sign_ins_count_against_the_addresss_limit_of_failed_authentications(tmp_path: Path) -> None:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_SIGNUP="open",
                                                    MANAGEMENT_AUTH_FAILURE_LIMIT="2"))
    try:
        web = Api(portal_client(create_app(runtime)))
        key = web.sign_up()["api_key"]
        assert [sign_in(web, "mgmt_000000000000_wrong").status_code for _ in range(2)] == [401, 401]
        assert sign_in(web, "mgmt_000000000000_wrong").status_code == 429
        assert web.call("GET", "/agents", "mgmt_000000000000_wrong").status_code == 429  # one limit for both doors
        assert sign_in(web, key).status_code == 303  # as the API: a valid key still gets through
    finally:
        runtime.close()


def test_the_json_api_does_not_accept_the_session_cookie(web: Api) -> None:
    _key, cookie, _csrf = session(web)
    result = web.client.simulate_get("/agents", cookies={COOKIE: cookie})
    assert result.status_code == 401
    assert result.json["code"] == "missing_api_key"


def test_pages_send_a_browser_without_a_session_to_sign_in(web: Api) -> None:
    result = web.client.simulate_get("/ui/audit", cookies={COOKIE: "forged"})
    assert result.status_code == 303 and result.headers["location"] == "/ui/sign-in"


def test_the_pages_event_stream_needs_a_session_and_refuses_another_site(web: Api) -> None:
    assert web.client.simulate_get("/ui/events/stream").status_code == 401  # EventSource gives up: polling
    result = web.client.simulate_get("/ui/events/stream", cookies={COOKIE: "forged"})
    assert result.status_code == 401 and result.json["error"]["code"] == "session_ended"
    _key, cookie, _csrf = session(web)
    refused = web.client.simulate_get("/ui/events/stream", cookies={COOKIE: cookie},
                                      headers={"Sec-Fetch-Site": "same-site"})
    assert refused.status_code == 403  # a read, but another site may not even start one
    # the API's filters and their 422s hold on the page's stream too (the same resource)
    bad = web.client.simulate_get("/ui/events/stream?agent=x", cookies={COOKIE: cookie})
    assert bad.status_code == 422


def test_the_fleet_and_vm_pages_follow_the_stream_from_the_last_event_before_they_were_read(web: Api) -> None:
    key, cookie, _csrf = session(web)
    fleet = web.client.simulate_get("/", cookies={COOKIE: cookie})
    assert 'data-events="/ui/events/stream?after=0"' in fleet.text
    # a host that refuses at once (port 1 on loopback): the VM page shows its error, and its stream
    agent = web.call("POST", "/agents", key, json={"name": "hv", "hostname": "127.0.0.1", "port": 1, "username": "u",
                                                     "generate_key": True, "allow_unknown_hosts": True}).json
    vm = web.client.simulate_get(f"/ui/agents/{agent['id']}/vms/a%20b", cookies={COOKIE: cookie})
    assert f'data-live-vm="/ui/events/stream?agent={agent["id"]}&amp;vm=a%20b&amp;after=0"' in vm.text


def test_every_answer_carries_a_strict_policy_and_refuses_framing(web: Api) -> None:
    for path in ("/ui/sign-in", "/health"):
        headers = web.client.simulate_get(path).headers
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"]


def test_no_page_holds_inline_script_or_style(web: Api) -> None:
    _key, cookie, _csrf = session(web)
    for path in ("/", "/ui/audit", "/ui/account", "/ui/agents/new", "/ui/sign-in", "/ui/sign-up"):
        html = web.client.simulate_get(path, cookies={COOKIE: cookie}).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
        assert "<style" not in html and " style=" not in html and "onclick" not in html, path


def test_a_form_from_another_origin_is_refused_even_with_the_token(web: Api) -> None:
    _key, cookie, csrf = session(web)
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        result = web.client.simulate_post("/ui/account/rotate-key", body=f"csrf={csrf}", cookies={COOKIE: cookie},
                                          headers={**FORM, **headers})
        assert result.status_code == 403 and "csrf_refused" in result.text, headers


def test_a_form_without_the_sessions_token_is_refused(web: Api) -> None:
    key, cookie, _csrf = session(web)
    result = web.client.simulate_post("/ui/account/rotate-key", body="csrf=" + "0" * 64, cookies={COOKIE: cookie},
                                      headers=FORM)
    assert result.status_code == 403
    assert web.call("GET", "/users/me", key).status_code == 200  # the key was not rotated


def test_signing_in_over_plain_http_through_the_proxy_is_refused(web: Api) -> None:
    key = web.sign_up()["api_key"]
    result = sign_in(web, key, headers={"X-Forwarded-Proto": "http"})
    assert result.status_code == 403 and "https_required" in result.text
    assert COOKIE not in result.cookies


def test_signing_out_ends_the_session_on_the_server(web: Api) -> None:
    _key, cookie, csrf = session(web)
    out = web.client.simulate_post("/ui/sign-out", body=f"csrf={csrf}", cookies={COOKIE: cookie}, headers=FORM)
    assert out.status_code == 303 and out.headers["location"] == "/ui/sign-in?signed_out=1"
    assert web.client.simulate_get("/", cookies={COOKIE: cookie}).status_code == 303


def test_a_hostile_agent_name_is_escaped_on_every_page(web: Api) -> None:
    key, cookie, _csrf = session(web)
    created = web.call("POST", "/agents", key, json={"name": XSS, "hostname": "192.0.2.9", "username": "u",
                                                     "generate_key": True, "allow_unknown_hosts": True})
    assert created.status_code == 201, created.text
    for path in ("/", f"/ui/agents/{created.json['id']}"):
        html = web.client.simulate_get(path, cookies={COOKIE: cookie}).text
        assert XSS not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_the_enrollment_command_to_copy_quotes_the_agents_name_for_the_shell(web: Api) -> None:
    key, cookie, _csrf = session(web)
    created = web.call("POST", "/agents", key, json={"name": "hv; touch /tmp/owned", "hostname": "192.0.2.9",
                                                     "username": "u", "generate_key": True,
                                                     "allow_unknown_hosts": True}).json
    html = web.client.simulate_get(f"/ui/agents/{created['id']}", cookies={COOKIE: cookie}).text
    assert "--name &#39;hv; touch /tmp/owned&#39;</code>" in html


def test_the_first_user_signs_up_on_the_page_and_sees_the_key_once(web: Api) -> None:
    result = web.client.simulate_post("/ui/sign-up", body="name=first", headers=FORM)
    assert result.status_code == 201
    assert result.headers["cache-control"] == "no-store"
    assert re.search(r'id="new-api-key" class="secret">mgmt_', result.text)
    assert COOKIE in result.cookies


# ---------------------------------------------------------------------- pages of parallel features


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """Operations at the contract routes of issues 16, 17 and 20 that record their calls."""
    calls: list[Call] = []

    async def create_vm(_portal: Any, call: Call) -> Any:
        calls.append(call)
        raise ValidationFailed([FieldError("disk.size_gib", "must be at least 1"),
                                FieldError("name", "must not start with '-'")])

    async def console(_portal: Any, call: Call) -> Any:
        calls.append(call)
        return {"ticket": "t1", "url": "/console/t1", "expires_at": "2026-01-01T00:00:30Z", "kind": call.body["kind"]}

    async def keys(_portal: Any, call: Call) -> Any:
        calls.append(call)
        return [{"id": 3, "name": XSS, "prefix": "mgmt_abc", "scopes": ["read"], "agents": None,
                 "expires_at": None, "created_at": "2026-01-01", "last_used_at": None}]

    async def revoke(_portal: Any, call: Call) -> Any:
        calls.append(call)

    # the stand-ins come first: the pages find an operation by its route, and the real ones exist now
    extra = [Operation("create_vm", "POST", "/agents/{agent_id}/vms", "vms", "stand-in", create_vm,
                       lambda r, c: r, scope=Scope.PROVISION),
             Operation("open_console", "POST", "/agents/{agent_id}/vms/{vm}/console", "vms", "stand-in", console,
                       lambda r, c: r, request=None, scope=Scope.OPERATE),
             Operation("list_api_keys", "GET", "/users/me/keys", "users", "stand-in", keys, lambda r, c: r,
                       scope=Scope.KEYS),
             Operation("revoke_api_key", "DELETE", "/users/me/keys/{key_id}", "users", "stand-in", revoke, ok=204,
                       scope=Scope.KEYS)]
    monkeypatch.setattr(pages, "OPERATIONS", (*extra, *pages.OPERATIONS))
    monkeypatch.setitem(BY_NAME, "create_vm", extra[0])
    monkeypatch.setitem(BY_NAME, "open_console", extra[1])
    monkeypatch.setitem(BY_NAME, "list_api_keys", extra[2])
    monkeypatch.setitem(BY_NAME, "revoke_api_key", extra[3])
    # (the stand-ins take no command class: the body reaches them as the page built it)
    yield calls


def test_the_pages_of_missing_features_answer_404(web: Api) -> None:
    _key, cookie, _csrf = session(web)
    for path, feature in (("/ui/keys", pages.API_KEYS), ("/ui/agents/1/vms/new", pages.CREATE_VM),
                          ("/ui/agents/1/vms/web1/console", pages.CONSOLE)):
        if not pages.feature(feature):
            assert web.client.simulate_get(path, cookies={COOKIE: cookie}).status_code == 404, path


def test_the_create_vm_form_shows_the_apis_422_details_next_to_the_fields(web: Api, stand_in: list[Call]) -> None:
    key, cookie, csrf = session(web)
    agent = web.call("POST", "/agents", key, json={"name": "hv", "hostname": "192.0.2.9", "username": "u",
                                                   "generate_key": True, "allow_unknown_hosts": True}).json
    result = web.client.simulate_post(f"/ui/agents/{agent['id']}/vms/new", cookies={COOKIE: cookie}, headers=FORM,
                                      body=f"csrf={csrf}&name=-x&vcpus=2&memory_mib=512&disk.pool=default"
                                           "&disk.size_gib=0&cloud_init.ssh_authorized_keys=ssh-ed25519+AAAA+a%0A")
    assert result.status_code == 422
    assert re.search(r'id="disk.size_gib".*?<span class="field-error" id="err-disk.size_gib">must be at least 1',
                     result.text, re.S)
    assert '<span class="field-error" id="err-name">must not start with' in result.text
    body = stand_in[-1].body
    assert body["disk"] == {"pool": "default", "size_gib": 0} and body["vcpus"] == 2
    assert body["cloud_init"] == {"ssh_authorized_keys": ["ssh-ed25519 AAAA a"]}


def test_the_console_page_asks_for_a_ticket_with_the_form_token(web: Api, stand_in: list[Call]) -> None:
    key, cookie, csrf = session(web)
    agent = web.call("POST", "/agents", key, json={"name": "hv", "hostname": "192.0.2.9", "username": "u",
                                                   "generate_key": True, "allow_unknown_hosts": True}).json
    page = web.client.simulate_get(f"/ui/agents/{agent['id']}/vms/web1/console", cookies={COOKIE: cookie})
    assert page.status_code == 200 and 'src="/static/console.js"' in page.text
    nonce = re.search(r'name="style-nonce" content="([^"]+)"', page.text)
    assert nonce is not None and f"'nonce-{nonce.group(1)}'" in page.headers["content-security-policy"]
    refused = web.client.simulate_post(f"/ui/agents/{agent['id']}/vms/web1/console/ticket", cookies={COOKIE: cookie},
                                       headers=FORM, body="kind=vnc")
    assert refused.status_code == 403 and not stand_in
    ticket = web.client.simulate_post(f"/ui/agents/{agent['id']}/vms/web1/console/ticket", cookies={COOKIE: cookie},
                                      headers=FORM, body=f"csrf={csrf}&kind=vnc")
    assert ticket.status_code == 200 and ticket.json["url"] == "/console/t1" and ticket.json["kind"] == "vnc"
    assert stand_in[-1].path == {"agent_id": agent["id"], "vm": "web1"}


def test_the_api_keys_page_lists_keys_escaped(web: Api, stand_in: list[Call]) -> None:
    _key, cookie, _csrf = session(web)
    page = web.client.simulate_get("/ui/keys", cookies={COOKIE: cookie})
    assert page.status_code == 200
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text and XSS not in page.text
    assert 'href="/ui/keys"' in page.text  # the navigation shows the page once the feature exists


def test_revoking_a_key_on_the_page_calls_the_operation_with_its_own_path_parameter(
        web: Api, stand_in: list[Call]) -> None:
    _key, cookie, csrf = session(web)
    result = web.client.simulate_post("/ui/keys/3/revoke", body=f"csrf={csrf}", cookies={COOKIE: cookie},
                                      headers=FORM)
    assert result.status_code == 200 and "The key was revoked" in result.text
    assert [c.path for c in stand_in if c.path] == [{"key_id": 3}]
