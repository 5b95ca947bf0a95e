"""The pure rules of webhooks (issue 18), property-tested: signatures verify exactly when secret,
body and time agree; the back-off doubles to its cap and ends; URLs are http(s) with a host and no
credentials; the target policy refuses loopback and link-local unless listed; matching follows the
webhook's types, families and agents."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from core import webhook_rules as rules
from core.live import Event, Webhook
from core.networks import AgentNetworks

SECRETS = st.text(min_size=1, max_size=64)
BODIES = st.binary(max_size=2048)
TIMES = st.integers(min_value=0, max_value=2**40)
WEBHOOK_VARIABLE = "MANAGEMENT_WEBHOOK_ALLOW"


# ---------------------------------------------------------------------- signatures


@given(SECRETS, BODIES, TIMES, st.integers(min_value=-300, max_value=300))
def test_a_signature_verifies_with_its_secret_and_body_within_the_tolerance(secret: str, body: bytes, t: int,
                                                                              skew: int) -> None:
    header = rules.signature(secret, t, body)
    assert header.startswith(f"t={t},v1=") and len(header.partition("v1=")[2]) == 64
    assert rules.verify(secret, header, body, now=t + skew)


@given(SECRETS, SECRETS, BODIES, TIMES)
def test_another_secret_does_not_verify(secret: str, other: str, body: bytes, t: int) -> None:
    assume(secret != other)
    assert not rules.verify(other, rules.signature(secret, t, body), body, now=t)


@given(SECRETS, BODIES, BODIES, TIMES)
def test_another_body_does_not_verify(secret: str, body: bytes, other: bytes, t: int) -> None:
    assume(body != other)
    assert not rules.verify(secret, rules.signature(secret, t, body), other, now=t)


@given(SECRETS, BODIES, TIMES, st.integers(min_value=301, max_value=10**9))
def test_a_signature_outside_the_tolerance_does_not_verify(secret: str, body: bytes, t: int, skew: int) -> None:
    header = rules.signature(secret, t, body)
    assert not rules.verify(secret, header, body, now=t + skew)
    assert not rules.verify(secret, header, body, now=t - skew)


@given(SECRETS, BODIES, TIMES, st.integers(min_value=1, max_value=10**6))
def test_a_timestamp_changed_after_signing_does_not_verify(secret: str, body: bytes, t: int, shift: int) -> None:
    digest = rules.signature(secret, t, body).partition(",v1=")[2]
    assert not rules.verify(secret, f"t={t + shift},v1={digest}", body, now=t + shift)


@given(st.text(max_size=200), BODIES)
def test_verify_never_raises_on_arbitrary_headers(header: str, body: bytes) -> None:
    assert rules.verify("secret", header, body, now=0) in (True, False)


def test_each_attempt_carries_the_delivery_id_and_a_signature_of_the_body() -> None:
    from core.live import Delivery

    now = datetime(2026, 12, 1, tzinfo=UTC)
    delivery = Delivery(id=42, webhook_id=1, user_id=1, event_id=7, event_type="vm.started", body='{"id":7}',
                        status="pending", attempts=0, next_at=now, created_at=now)
    headers = rules.headers("s3cret", delivery, 1_700_000_000)
    assert headers[rules.DELIVERY_HEADER] == "42" and headers[rules.EVENT_HEADER] == "vm.started"
    assert rules.verify("s3cret", headers[rules.SIGNATURE_HEADER], b'{"id":7}', now=1_700_000_000)


def test_new_secrets_are_prefixed_and_distinct() -> None:
    made = {rules.new_secret() for _ in range(100)}
    assert len(made) == 100 and all(s.startswith("whsec_") and len(s) >= 6 + 43 for s in made)


# ---------------------------------------------------------------------- back-off


def test_the_back_off_doubles_from_its_base_to_its_cap() -> None:
    assert [rules.retry_delay(n, base=10, cap=100) for n in range(6)] == [0, 10, 20, 40, 80, 100]


@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=0.01, max_value=100),
       st.floats(min_value=1, max_value=10_000))
def test_the_back_off_never_shrinks_and_never_passes_its_cap(attempts: int, base: float, cap: float) -> None:
    assert rules.retry_delay(attempts, base, cap) <= max(cap, base)
    assert rules.retry_delay(attempts + 1, base, cap) >= rules.retry_delay(attempts, base, cap)


@given(st.integers(min_value=0, max_value=60), st.integers(min_value=1, max_value=50))
def test_a_delivery_is_tried_at_most_max_attempts_times(attempts: int, max_attempts: int) -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    after = rules.next_attempt(attempts, now, max_attempts=max_attempts, base=1, cap=60)
    assert (after is None) == (attempts >= max_attempts)
    if after is not None:
        assert after - now == timedelta(seconds=rules.retry_delay(attempts, 1, 60))


def test_only_2xx_answers_deliver() -> None:
    assert [rules.succeeded(c) for c in (None, 199, 200, 204, 299, 301, 400, 500)] == [
        False, False, True, True, True, False, False, False]


# ---------------------------------------------------------------------- URLs and the target policy


@given(st.sampled_from(["http", "https"]), st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z]{2,6}){1,2}\Z"),
       st.one_of(st.none(), st.integers(min_value=1, max_value=65535)), st.from_regex(r"\A(/[a-z0-9._-]{0,10}){0,3}\Z"))
def test_http_and_https_urls_with_a_host_are_accepted(scheme: str, host: str, port: int | None, path: str) -> None:
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}{path}"
    target, problem = rules.parse_url(url)
    assert problem is None and target is not None
    assert target.host == host and target.scheme == scheme
    assert target.port == (port or (443 if scheme == "https" else 80))


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://example.com", "example.com",
                                 "http://", "https://user:pw@example.com/", "https://example.com/#frag",
                                 "http://example.com:99999/", "http://exa mple.com/", "http://example.com:0/",
                                 "https://ex\u00e4mple.com/", "javascript:alert(1)", "http://[::1/"])
def test_urls_that_are_not_plain_http_or_https_are_refused(url: str) -> None:
    target, problem = rules.parse_url(url)
    assert target is None and problem


@given(st.text(max_size=300))
def test_parsing_any_text_as_a_url_answers_a_target_or_a_reason(text: str) -> None:
    target, problem = rules.parse_url(text)
    assert (target is None) != (problem is None)
    if target is not None:
        assert target.scheme in ("http", "https") and target.host and 0 < target.port <= 65535


LOOPBACK_OR_LINK_LOCAL = st.one_of(
    st.ip_addresses(network="127.0.0.0/8"), st.ip_addresses(network="169.254.0.0/16"),
    st.ip_addresses(network="fe80::/10"), st.just(ipaddress.ip_address("::1")),
    st.ip_addresses(network="127.0.0.0/8").map(lambda a: ipaddress.ip_address(f"::ffff:{a}")))


@given(LOOPBACK_OR_LINK_LOCAL)
def test_the_default_webhook_policy_refuses_loopback_and_link_local(address: ipaddress.IPv4Address) -> None:
    policy = AgentNetworks.parse("", WEBHOOK_VARIABLE)
    assert not policy.allows(address)
    assert WEBHOOK_VARIABLE in policy.describe()


@given(st.ip_addresses(v=4, network="127.0.0.0/8"))
def test_listing_loopback_allows_it_and_nothing_else(address: ipaddress.IPv4Address) -> None:
    policy = AgentNetworks.parse("127.0.0.0/8", WEBHOOK_VARIABLE)
    assert policy.allows(address)
    assert not policy.allows(ipaddress.ip_address("192.0.2.1"))
    assert policy.describe() == f"{WEBHOOK_VARIABLE}=127.0.0.0/8"


def test_a_bad_webhook_allow_list_is_a_configuration_error_naming_the_variable() -> None:
    from entrypoints.settings import ConfigError, Settings

    with pytest.raises(ConfigError, match=WEBHOOK_VARIABLE):
        Settings.from_env({"MANAGEMENT_DB_PATH": "/tmp/x.sqlite3", WEBHOOK_VARIABLE: "10.0.0.0/8,nonsense"})
    loaded = Settings.from_env({"MANAGEMENT_DB_PATH": "/tmp/x.sqlite3", WEBHOOK_VARIABLE: "10.0.0.0/8"})
    assert loaded.webhook_networks.allows(ipaddress.ip_address("10.1.2.3"))
    assert not loaded.webhook_networks.allows(ipaddress.ip_address("192.0.2.1"))


# ---------------------------------------------------------------------- matching


def hook(types: tuple[str, ...] = (), agents: frozenset[int] | None = None, active: bool = True) -> Webhook:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    return Webhook(id=1, user_id=1, url="https://example.com/", types=types, agent_ids=agents, active=active,
                   sealed_secret="x", created_at=now, updated_at=now)


def event(kind: str = "vm.started", agent_id: int | None = 1, user_id: int = 1) -> Event:
    return Event(id=5, user_id=user_id, at=datetime(2026, 12, 1, tzinfo=UTC), agent_id=agent_id, vm="web", type=kind,
                 detail="Booted")


def test_a_webhook_gets_its_types_families_and_agents_only() -> None:
    assert rules.matches(hook(), event())
    assert rules.matches(hook(("vm.started",)), event())
    assert not rules.matches(hook(("vm.stopped",)), event())
    assert rules.matches(hook(("vm.*",)), event("vm.crashed"))
    assert not rules.matches(hook(("vm.*",)), event("agent.unreachable"))
    assert rules.matches(hook(agents=frozenset({1})), event())
    assert not rules.matches(hook(agents=frozenset({2})), event())
    assert not rules.matches(hook(agents=frozenset({1})), event(agent_id=None))
    assert not rules.matches(hook(active=False), event())
    assert not rules.matches(hook(), event(user_id=2))


@pytest.mark.parametrize("types", [["Started"], ["vm."], ["vm.**"], ["*"], ["host.started"], ["vm.a b"],
                                   ["vm.x"] * 51])
def test_bad_event_types_are_refused(types: list[str]) -> None:
    assert rules.check_types(types)


def test_the_body_is_the_event_as_the_api_shows_it() -> None:
    import json

    assert json.loads(rules.event_body(event())) == {"id": 5, "at": "2026-12-01T00:00:00Z", "agent_id": 1,
                                                     "vm": "web", "type": "vm.started", "detail": "Booted"}
