"""``entrypoints.logs.drop_secrets``: no key, passphrase or API key ever reaches a log line."""

from __future__ import annotations

from typing import Any

import pytest

from entrypoints.logs import REDACTED, drop_secrets

API_KEY = "mgmt_0123456789ab_" + "Zx9-_Qw" * 6 + "a"
OPENSSH_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----"
)
PEM_BODY = "MIIEowIBAAKCAQEAsecretbodysecretbody"


def redact(**event: Any) -> dict[str, Any]:
    return dict(drop_secrets(None, "info", dict(event)))


@pytest.mark.parametrize("key", ["api_key", "private_key", "passphrase", "authorization", "Authorization",
                                 "private_key_passphrase", "API_KEY"])
def test_values_of_secret_named_keys_are_redacted(key: str) -> None:
    assert redact(**{key: "hunter2-value"})[key] == REDACTED


def test_api_key_prefix_is_left_alone() -> None:
    assert redact(api_key_prefix="mgmt_0123456789ab")["api_key_prefix"] == "mgmt_0123456789ab"


def test_other_values_are_left_alone() -> None:
    event = {"event": "agent_created", "agent_id": 7, "hostname": "192.0.2.15", "ok": True, "extra": None}
    assert redact(**event) == event


@pytest.mark.parametrize("kind", ["OPENSSH ", "RSA ", "EC ", "ENCRYPTED ", ""])
def test_a_private_key_block_inside_a_string_is_redacted(kind: str) -> None:
    block = f"-----BEGIN {kind}PRIVATE KEY-----\n{PEM_BODY}\n-----END {kind}PRIVATE KEY-----"
    out = redact(detail=f"could not load {block} for hv1")["detail"]
    assert PEM_BODY not in out
    assert "PRIVATE KEY" not in out
    assert out.startswith("could not load ")
    assert out.endswith(" for hv1")


def test_an_openssh_key_in_the_event_message_is_redacted() -> None:
    out = redact(event=f"key was {OPENSSH_KEY}")["event"]
    assert "b3BlbnNzaC1rZXktdjE" not in out
    assert REDACTED in out


def test_an_unterminated_private_key_block_is_redacted_to_the_end() -> None:
    out = redact(detail=f"truncated: -----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}")["detail"]
    assert PEM_BODY not in out
    assert out.startswith("truncated: ")


def test_an_api_key_inside_a_string_is_redacted() -> None:
    out = redact(path=f"/users?key={API_KEY}&x=1")["path"]
    assert API_KEY not in out
    assert API_KEY.split("_", 2)[2] not in out
    assert out == f"/users?key={REDACTED}&x=1"


@pytest.mark.parametrize("header", ["Bearer xyz", "bearer   abc.def-ghi", "Bearer " + API_KEY])
def test_a_bearer_token_inside_a_string_is_redacted(header: str) -> None:
    token = header.split()[-1]
    out = redact(header_dump=f"Authorization: {header} (from 198.51.100.1)")["header_dump"]
    assert token not in out
    assert REDACTED in out
    assert out.endswith(" (from 198.51.100.1)")


def test_every_string_value_is_scanned() -> None:
    out = redact(first=f"a {API_KEY}", second=f"b {OPENSSH_KEY}", third="c Bearer tok123")
    assert all(REDACTED in value for value in out.values())
    assert not any(secret in " ".join(out.values()) for secret in (API_KEY, "b3BlbnNzaC1rZXktdjE", "tok123"))


def test_the_processor_returns_the_event_it_was_given() -> None:
    event: dict[str, Any] = {"event": "x", "api_key": API_KEY}
    assert drop_secrets(None, "info", event) is event
    assert event["api_key"] == REDACTED
