"""The httpx webhook sender against a real receiver on loopback (issue 18): it connects to the
address it checked (a name is resolved once; the Host header keeps the name), refuses addresses
outside MANAGEMENT_WEBHOOK_ALLOW without sending anything, never follows a redirect, gives up after
its time-out and reads a bounded part of the answer."""

from __future__ import annotations

import asyncio

import pytest

from adapters.webhook_http import HttpWebhookSender
from core.errors import WebhookTargetRefused
from core.networks import AgentNetworks
from tests.webhook_receiver import Receiver

LOOPBACK = AgentNetworks.parse("127.0.0.0/8", "MANAGEMENT_WEBHOOK_ALLOW")
DEFAULT = AgentNetworks.parse("", "MANAGEMENT_WEBHOOK_ALLOW")


def post(sender: HttpWebhookSender, url: str, body: bytes = b'{"id":1}') -> object:
    return asyncio.run(sender.post(url, {"Content-Type": "application/json", "X-Playr-Delivery": "9"}, body))


def test_a_name_is_posted_to_the_address_it_was_checked_as_with_its_host_header() -> None:
    with Receiver() as receiver:
        answer = post(HttpWebhookSender(LOOPBACK), f"http://localhost:{receiver.port}/hook?x=1")
        [request] = receiver.requests
    assert answer.status_code == 200 and answer.error is None and answer.response == "thanks"  # type: ignore[attr-defined]
    assert request.path == "/hook?x=1" and request.body == b'{"id":1}'
    assert request.headers["Host"] == f"localhost:{receiver.port}" and request.headers["X-Playr-Delivery"] == "9"


def test_a_refused_address_is_a_failed_attempt_and_nothing_is_sent() -> None:
    with Receiver() as receiver:
        for url in (receiver.url, f"http://localhost:{receiver.port}/hook"):
            answer = post(HttpWebhookSender(DEFAULT), url)
            assert answer.status_code is None and answer.error.startswith("webhook_target_refused")  # type: ignore[attr-defined]
            assert "MANAGEMENT_WEBHOOK_ALLOW" in answer.error  # type: ignore[attr-defined]
        assert receiver.requests == []
    with pytest.raises(WebhookTargetRefused):
        HttpWebhookSender(DEFAULT).check("http://localhost:8080/")
    HttpWebhookSender(LOOPBACK).check("http://localhost:8080/")  # allowed when listed


def test_a_redirect_is_not_followed() -> None:
    with Receiver(status=302, headers={"Location": "http://169.254.169.254/"}) as receiver:
        answer = post(HttpWebhookSender(LOOPBACK), receiver.url)
        assert len(receiver.requests) == 1
    assert answer.status_code == 302  # type: ignore[attr-defined]


def test_a_large_answer_is_read_only_in_part() -> None:
    with Receiver(status=200, body=b"x" * 5_000_000) as receiver:
        answer = post(HttpWebhookSender(LOOPBACK, max_response_bytes=4096), receiver.url)
    assert answer.status_code == 200 and len(answer.response) <= 4096  # type: ignore[attr-defined]


def test_a_receiver_that_does_not_answer_in_time_is_a_failed_attempt() -> None:
    with Receiver(delay=3.0) as receiver:
        answer = post(HttpWebhookSender(LOOPBACK, timeout=0.5), receiver.url)
    assert answer.status_code is None and "0.5 s" in answer.error and answer.seconds < 2.5  # type: ignore[attr-defined]


def test_a_closed_port_is_a_failed_attempt_with_the_reason() -> None:
    from tests.support import free_port

    answer = post(HttpWebhookSender(LOOPBACK), f"http://127.0.0.1:{free_port()}/")
    assert answer.status_code is None and "Connect" in answer.error  # type: ignore[attr-defined]
