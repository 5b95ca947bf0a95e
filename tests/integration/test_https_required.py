"""Issue 14 item 9: credential-bearing requests that reached the proxy over plain HTTP are refused.

Run against the real server (gunicorn + uvicorn): uvicorn decides from ``MANAGEMENT_TRUSTED_PROXIES``
whether ``X-Forwarded-Proto`` sets the request's scheme, and the portal's check relies on exactly
that. Every connection is to 127.0.0.1 (a trusted proxy by default)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Server

PLAIN = {"X-Forwarded-Proto": "http", "X-Forwarded-For": "198.51.100.7"}
TLS = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.7"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("https"), MANAGEMENT_SIGNUP="open").start()
    yield running
    running.stop()


def test_item9_credentials_over_plain_http_from_a_proxy_are_https_required(server: Server) -> None:
    # sign-up answers with a key: refused when the proxy received it over plain HTTP
    for path in ("/users", "/users/", "//users"):  # every spelling that routes to sign-up
        status, problem, _ = server.request("POST", path, body={"name": "eve"}, headers=PLAIN)
        assert (status, problem["code"]) == (403, "https_required"), (path, problem)
    assert "MANAGEMENT_ALLOW_PLAIN_HTTP" in problem["detail"]
    status, user, _ = server.request("POST", "/users", body={"name": "alice"}, headers=TLS)
    assert status == 201, user
    key = user["api_key"]
    # every request carrying the key: refused over plain HTTP, served over HTTPS
    for method, path in (("GET", "/users/me"), ("GET", "/agents"), ("POST", "/users/me/api-key/rotate"),
                         ("GET", "/agents/1/credentials")):
        status, problem, _ = server.request(method, path, key, headers=PLAIN)
        assert (status, problem["code"]) == (403, "https_required"), (path, problem)
    status, problem, _ = server.request("GET", "/users/me", "not-a-key", headers=PLAIN)
    assert (status, problem["code"]) == (403, "https_required"), problem  # refused before any lookup
    assert server.request("GET", "/users/me", key, headers=TLS)[0] == 200
    # public routes stay reachable over plain HTTP, and a direct request (no proxy header) is not proxied
    assert server.request("GET", "/health", headers=PLAIN)[0] == 200
    assert server.request("GET", "/openapi.json", headers=PLAIN)[0] == 200
    assert server.request("GET", "/users/me", key)[0] == 200
    # the refusals were never counted as failed authentications
    assert server.request("GET", "/users/me", key, headers=TLS)[0] == 200


def test_item9_a_proxy_that_is_not_trusted_cannot_claim_https(tmp_path: Path) -> None:
    server = Server(tmp_path, MANAGEMENT_SIGNUP="open", MANAGEMENT_TRUSTED_PROXIES="").start()
    try:
        status, problem, _ = server.request("POST", "/users", body={"name": "eve"}, headers=TLS)
        assert (status, problem["code"]) == (403, "https_required"), problem
        assert server.request("POST", "/users", body={"name": "alice"})[0] == 201  # direct: not proxied
    finally:
        server.stop()


def test_item9_the_operator_may_allow_plain_http(tmp_path: Path) -> None:
    server = Server(tmp_path, MANAGEMENT_SIGNUP="open", MANAGEMENT_ALLOW_PLAIN_HTTP="true").start()
    try:
        status, user, _ = server.request("POST", "/users", body={"name": "alice"}, headers=PLAIN)
        assert status == 201, user
        assert server.request("GET", "/users/me", user["api_key"], headers=PLAIN)[0] == 200
    finally:
        server.stop()
