"""Webhooks over the in-memory world (issue 18): the secret is shown once and held sealed; an event
makes outbox rows for the webhooks that want it, in the transaction that stores it; the worker signs,
retries with back-off, gives up after its attempts; two workers never attempt one row at once; a key
limited to agents manages only webhooks within its agents."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import attrs
import pytest

from adapters.memory import FakeWebhookSender
from core import webhook_rules as rules
from core.commands import NewWebhook, WebhookChanges
from core.errors import KeyLimitedToAgents, ValidationFailed, WebhookNotFound, WebhookTargetRefused
from core.live import DELIVERY_DELIVERED, DELIVERY_FAILED, DELIVERY_PENDING, Delivery, DeliveryAttempt
from core.model import Agent, ApiKey, Caller, Scope
from core.webhooks import WebhookService
from tests.unit.world import World, make_caller, make_world, register

URL = "https://hooks.example.com/playr"


@pytest.fixture
def sender() -> FakeWebhookSender:
    return FakeWebhookSender()


@pytest.fixture
def world(sender: FakeWebhookSender) -> World:
    return make_world(webhook_sender=sender, webhook_max_attempts=4, webhook_retry_base=10.0)


def emit(world: World, caller: Caller, agent_id: int, kind: str = "vm.started", vm: str = "web") -> int:
    log = world.portal.events
    with world.storage.transaction(write=True) as tx:
        return log.add(tx, log.new(caller.user.id, agent_id, vm, kind, "Booted")).id


def with_key(world: World, caller: Caller, scopes: frozenset[Scope], agents: frozenset[int] | None) -> Caller:
    with world.storage.transaction(write=True) as tx:
        key = tx.add_api_key(ApiKey(user_id=caller.user.id, prefix=f"mgmt_{tx.count_api_keys(caller.user.id):012x}",
                                    digest="x", created_at=world.clock.current, name="limited", scopes=scopes,
                                    agents=agents, full=False))
    return attrs.evolve(caller, key=key)


def pending(world: World) -> list[int]:
    return sorted(i for i, d in world.storage.state.deliveries.items() if d.status == DELIVERY_PENDING)


def test_the_secret_is_shown_on_create_only_and_kept_sealed(world: World, alice: Caller) -> None:
    created = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL, events=["vm.*"]))
    assert created.secret.startswith("whsec_") and created.secret not in repr(created)
    [stored] = world.storage.state.webhooks.values()
    assert created.secret not in stored.sealed_secret and created.secret not in repr(stored)
    assert world.portal.webhooks.get_webhook(alice, created.webhook.id) == stored
    rotated = world.portal.webhooks.rotate_secret(alice, created.webhook.id)
    assert rotated.secret != created.secret


def test_an_event_makes_an_outbox_row_for_each_webhook_that_wants_it(world: World, alice: Caller, bob: Caller,
                                                                     agent: Agent) -> None:
    hooks = world.portal.webhooks
    every = hooks.create_webhook(alice, NewWebhook(url=URL)).webhook
    stops = hooks.create_webhook(alice, NewWebhook(url=URL, events=["vm.stopped"])).webhook
    hooks.create_webhook(bob, NewWebhook(url=URL))
    started = emit(world, alice, agent.id, "vm.started")
    stopped = emit(world, alice, agent.id, "vm.stopped")
    rows = sorted((d.webhook_id, d.event_id) for d in world.storage.state.deliveries.values())
    assert rows == sorted([(every.id, started), (every.id, stopped), (stops.id, stopped)])


def test_an_event_stored_in_a_transaction_that_rolls_back_leaves_no_delivery(world: World, alice: Caller,
                                                                              agent: Agent) -> None:
    world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL))
    log = world.portal.events
    with pytest.raises(RuntimeError), world.storage.transaction(write=True) as tx:
        log.add(tx, log.new(alice.user.id, agent.id, "web", "vm.started", "Booted"))
        raise RuntimeError("the change failed")
    assert world.storage.state.deliveries == {} and world.storage.state.live_events == {}


def test_a_delivery_posts_the_event_signed_with_the_webhook_secret(world: World, alice: Caller, agent: Agent,
                                                                   sender: FakeWebhookSender) -> None:
    created = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL))
    event_id = emit(world, alice, agent.id)
    assert asyncio.run(world.portal.webhooks.deliver_due("worker-a")) == 1
    [(url, headers, body)] = sender.posted
    assert url == URL and rules.verify(created.secret, headers[rules.SIGNATURE_HEADER], body,
                                       now=world.clock.current.timestamp())
    assert f'"id":{event_id}' in body.decode()
    [record] = world.portal.webhooks.list_deliveries(alice, created.webhook.id)
    assert record.delivery.status == DELIVERY_DELIVERED and [a.status_code for a in record.attempts] == [200]
    assert asyncio.run(world.portal.webhooks.deliver_due("worker-a")) == 0  # nothing twice


def test_a_failing_receiver_is_retried_with_back_off_and_the_same_delivery_id(world: World, alice: Caller,
                                                                              agent: Agent,
                                                                              sender: FakeWebhookSender) -> None:
    sender.answers = [500, "ConnectError: connection refused", 503, 200]
    world.clock.step = timedelta(0)  # time moves only when the test moves it
    created = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL))
    emit(world, alice, agent.id)
    service = world.portal.webhooks
    waits = []
    for _ in range(4):
        assert asyncio.run(service.deliver_due("worker-a")) == 1
        assert asyncio.run(service.deliver_due("worker-a")) == 0  # not due again yet
        [delivery] = world.storage.state.deliveries.values()
        if delivery.next_at is not None:
            waits.append(delivery.next_at - world.clock.current)
            world.clock.current = delivery.next_at
    assert len({headers[rules.DELIVERY_HEADER] for _, headers, _ in sender.posted}) == 1
    assert len({body for _, _, body in sender.posted}) == 1
    assert [round(w.total_seconds()) for w in waits] == [10, 20, 40]
    [record] = service.list_deliveries(alice, created.webhook.id)
    assert record.delivery.status == DELIVERY_DELIVERED
    assert [(a.number, a.status_code) for a in record.attempts] == [(1, 500), (2, None), (3, 503), (4, 200)]
    assert record.attempts[1].error == "ConnectError: connection refused"
    assert record.attempts[0].error == "the receiver answered 500"


def every_attempt(world: World, caller: Caller, agent: Agent) -> Delivery:
    """A webhook, one event for it, and the world's four attempts (``webhook_max_attempts``) at it,
    each when due; the delivery afterwards."""
    world.portal.webhooks.create_webhook(caller, NewWebhook(url=URL))
    emit(world, caller, agent.id)
    for _ in range(4):
        world.clock.current += timedelta(hours=2)
        asyncio.run(world.portal.webhooks.deliver_due("worker-a"))
    [delivery] = world.storage.state.deliveries.values()
    return delivery


def test_a_delivery_fails_after_its_last_attempt(world: World, alice: Caller, agent: Agent,
                                                 sender: FakeWebhookSender) -> None:
    sender.answers = [500] * 10
    delivery = every_attempt(world, alice, agent)
    assert delivery.status == DELIVERY_FAILED and delivery.attempts == 4 and delivery.next_at is None
    world.clock.current += timedelta(hours=2)
    assert asyncio.run(world.portal.webhooks.deliver_due("worker-a")) == 0 and len(sender.posted) == 4


def test_a_sender_that_breaks_is_a_failed_attempt_retried_with_back_off(world: World, alice: Caller, agent: Agent,
                                                                        sender: FakeWebhookSender,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault of the sender itself (a bug, an odd URL its library refuses) is recorded like any
    failed attempt: the delivery backs off and gives up after its attempts, never claimed for ever."""
    async def broken(url: str, headers: dict[str, str], body: bytes) -> rules.WebhookResponse:
        raise ValueError("an odd URL")
    monkeypatch.setattr(sender, "post", broken)
    delivery = every_attempt(world, alice, agent)
    assert delivery.status == DELIVERY_FAILED and delivery.attempts == 4
    [record] = world.portal.webhooks.list_deliveries(alice, delivery.webhook_id)
    assert {attempt.error for attempt in record.attempts} == {"the portal could not send it (ValueError)"}


def test_two_workers_never_hold_one_delivery_and_a_dead_workers_rows_return_after_its_lease(
        world: World, alice: Caller, agent: Agent) -> None:
    world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL))
    emit(world, alice, agent.id)
    service: WebhookService = world.portal.webhooks
    now = world.clock.current
    with world.storage.transaction(write=True) as tx:
        first = tx.claim_deliveries("worker-a", now, now + timedelta(seconds=60), 8)
    with world.storage.transaction(write=True) as tx:
        assert tx.claim_deliveries("worker-b", now, now + timedelta(seconds=60), 8) == []
    assert len(first) == 1
    world.clock.current = now + timedelta(seconds=61)  # worker-a died: its lease ran out
    with world.storage.transaction(write=True) as tx:
        [(taken, _)] = tx.claim_deliveries("worker-b", world.clock.current, world.clock.current + timedelta(60), 8)
    assert taken.id == first[0][0].id
    # worker-a comes back: its attempt is not recorded over worker-b's lease
    with world.storage.transaction(write=True) as tx:
        assert not tx.record_attempt("worker-a", DeliveryAttempt(delivery_id=taken.id, number=1, at=now, seconds=0.1,
                                                                  status_code=200, error=None, response=None),
                                     DELIVERY_DELIVERED, None)
    assert pending(world) == [taken.id]
    with world.storage.transaction(write=True) as tx:
        tx.release_deliveries("worker-b")
    assert asyncio.run(service.deliver_due("worker-c")) == 1


def test_a_paused_webhook_gets_no_deliveries_until_resumed(world: World, alice: Caller, agent: Agent,
                                                           sender: FakeWebhookSender) -> None:
    created = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL, active=False))
    emit(world, alice, agent.id)
    assert world.storage.state.deliveries == {}
    world.portal.webhooks.update_webhook(alice, created.webhook.id, WebhookChanges(active=True))
    emit(world, alice, agent.id)
    assert asyncio.run(world.portal.webhooks.deliver_due("w")) == 1 and len(sender.posted) == 1


def test_a_refused_target_is_a_422_naming_the_url(world: World, alice: Caller) -> None:
    for url in ("http://127.0.0.1:8000/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]/"):
        with pytest.raises(WebhookTargetRefused) as refused:
            world.portal.webhooks.create_webhook(alice, NewWebhook(url=url))
        assert refused.value.errors[0].field == "url" and "MANAGEMENT_WEBHOOK_ALLOW" in refused.value.detail
    with pytest.raises(ValidationFailed, match="http"):
        world.portal.webhooks.create_webhook(alice, NewWebhook(url="ftp://example.com/"))
    created = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL))
    with pytest.raises(WebhookTargetRefused):
        world.portal.webhooks.update_webhook(alice, created.webhook.id, WebhookChanges(url="http://127.0.0.2/"))
    assert world.portal.webhooks.get_webhook(alice, created.webhook.id).url == URL


def test_users_never_see_each_others_webhooks(world: World, alice: Caller, bob: Caller) -> None:
    created = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL))
    for attempt in (lambda: world.portal.webhooks.get_webhook(bob, created.webhook.id),
                    lambda: world.portal.webhooks.delete_webhook(bob, created.webhook.id),
                    lambda: world.portal.webhooks.list_deliveries(bob, created.webhook.id),
                    lambda: world.portal.webhooks.rotate_secret(bob, created.webhook.id)):
        with pytest.raises(WebhookNotFound):
            attempt()
    assert world.portal.webhooks.list_webhooks(bob) == []


def test_a_key_limited_to_agents_manages_only_webhooks_within_its_agents() -> None:
    world = make_world(webhook_sender=FakeWebhookSender())
    alice = make_caller(world, "alice")
    hv1, hv2 = register(world, alice, name="hv1"), register(world, alice, name="hv2")
    wide = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL)).webhook
    limited = with_key(world, alice, frozenset({Scope.READ, Scope.KEYS}), frozenset({hv1.id}))
    mine = world.portal.webhooks.create_webhook(limited, NewWebhook(url=URL)).webhook
    assert mine.agent_ids == frozenset({hv1.id})  # limited by default to the key's agents
    with pytest.raises(KeyLimitedToAgents):
        world.portal.webhooks.create_webhook(limited, NewWebhook(url=URL, agents=[hv2.id]))
    assert [h.id for h in world.portal.webhooks.list_webhooks(limited)] == [mine.id]
    with pytest.raises(WebhookNotFound):
        world.portal.webhooks.get_webhook(limited, wide.id)
    emit(world, alice, hv2.id)  # the other agent's event reaches only the wide webhook
    assert {d.webhook_id for d in world.storage.state.deliveries.values()} == {wide.id}


def test_a_key_that_cannot_read_events_cannot_point_a_webhook_at_them(world: World, alice: Caller) -> None:
    from core.errors import InsufficientScope

    keys_only = with_key(world, alice, frozenset({Scope.KEYS}), None)
    with pytest.raises(InsufficientScope, match="read"):
        world.portal.webhooks.create_webhook(keys_only, NewWebhook(url=URL))


def test_deleting_a_webhook_drops_its_pending_deliveries(world: World, alice: Caller, agent: Agent) -> None:
    created = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL))
    emit(world, alice, agent.id)
    world.portal.webhooks.delete_webhook(alice, created.webhook.id)
    assert world.storage.state.deliveries == {}
    assert asyncio.run(world.portal.webhooks.deliver_due("w")) == 0


def test_a_failing_receiver_holds_back_its_own_queue_not_other_webhooks(world: World, alice: Caller, agent: Agent,
                                                                        sender: FakeWebhookSender) -> None:
    world.clock.step = timedelta(0)
    failing = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL, events=["vm.started"])).webhook
    healthy = world.portal.webhooks.create_webhook(alice, NewWebhook(url=URL + "/ok", events=["vm.stopped"])).webhook
    for _ in range(20):
        emit(world, alice, agent.id, "vm.started")
    emit(world, alice, agent.id, "vm.stopped")
    sender.answers = ["ConnectError: connection refused"] * 8
    asyncio.run(world.portal.webhooks.deliver_due("w"))  # one batch: 8 attempts at the failing receiver
    now = world.clock.current
    later = [d for d in world.storage.state.deliveries.values() if d.webhook_id == failing.id and d.attempts == 0]
    assert len(later) == 12 and all(d.next_at is not None and d.next_at > now for d in later)
    assert asyncio.run(world.portal.webhooks.deliver_due("w")) == 1  # only the healthy webhook's is due
    assert sender.posted[-1][0] == URL + "/ok"
    assert [d.status for d in world.storage.state.deliveries.values() if d.webhook_id == healthy.id] == [
        DELIVERY_DELIVERED]


def test_the_worker_keeps_delivering_while_one_receiver_hangs(world: World, alice: Caller, agent: Agent) -> None:
    from core.ports import WebhookResponse

    class HangingSender(FakeWebhookSender):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()
            self.hanging = False

        async def post(self, url: str, headers: dict[str, str], body: bytes) -> WebhookResponse:
            if url.endswith("/slow"):
                self.hanging = True
                await self.release.wait()
            return await super().post(url, headers, body)

    sender = HangingSender()
    service = WebhookService(storage=world.storage, secrets=world.portal.webhooks.secrets, clock=world.clock,
                             audit=world.portal.audit, sender=sender, poll_seconds=0.01)
    service.create_webhook(alice, NewWebhook(url=URL + "/slow", events=["vm.started"]))
    service.create_webhook(alice, NewWebhook(url=URL + "/fast", events=["vm.stopped"]))
    emit(world, alice, agent.id, "vm.started")

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = asyncio.create_task(service.run("w", stop))
        async with asyncio.timeout(10):
            while not sender.hanging:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(emit, world, alice, agent.id, "vm.stopped")
            while not any(url.endswith("/fast") for url, _, _ in sender.posted):
                await asyncio.sleep(0.01)  # delivered while the slow one still hangs
        assert not sender.release.is_set()
        stop.set()
        await worker  # stopping cancels the hanging attempt and releases its lease

    asyncio.run(scenario())
    assert pending(world) == [d.id for d in world.storage.state.deliveries.values() if d.event_type == "vm.started"]
    assert world.storage.state.delivery_leases == {}
