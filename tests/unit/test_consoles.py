"""Consoles (issue 17) against the fakes: tickets (one use, 30 s, bound, stored as digests, per-user
limit), the checks made before one is issued, and the relay (both ways, closing, time-outs, audit)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.memory import CountingTicketDigests
from core import virsh
from core.consoles import TICKET_SECONDS, ConsoleRecord
from core.errors import ConsoleUnavailable, TooManyConsoles, ValidationFailed, VmNotFound, VmNotRunning
from core.model import Agent, Caller, ConsoleKind, ConsoleTicket, Origin
from entrypoints.http.console import chosen_subprotocol
from tests.unit.world import World, events, make_world, script

URI = "qemu:///system"
VM = "web1"
ORIGIN = Origin(request_id="ws-1", client_address="198.51.100.10")
RUNNING = "Domain: 'web1'\n  state.state=1\n  state.reason=1\n"


def synchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in its own event loop (the unit tests take no asyncio plugin)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


@pytest.fixture
def world() -> World:
    made = make_world(tickets=CountingTicketDigests(), max_consoles=2, sleep=asyncio.sleep)
    made.clock.step = timedelta(0)
    return made


def running_with_consoles(world: World) -> None:
    script(world, virsh.state_command(URI, VM), stdout=RUNNING)
    script(world, virsh.ttyconsole_command(URI, VM), stdout="/dev/pts/3\n")
    script(world, virsh.vnc_display_command(URI, VM), stdout="vnc://127.0.0.1:2\n")


class FakeClient:
    """A WebSocket client: sends what the test queues (None: it closes), keeps what it receives."""

    def __init__(self) -> None:
        self.outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.received = bytearray()
        self.got_something = asyncio.Event()

    async def receive(self) -> bytes | None:
        return await self.outgoing.get()

    async def send(self, data: bytes) -> None:
        self.received += data
        self.got_something.set()


async def opened(world: World, alice: Caller, agent: Agent, kind: str = "serial") -> ConsoleTicket:
    issued = await world.portal.consoles.open_ticket(alice, agent.id, VM, kind)
    console = world.portal.consoles.redeem(issued.ticket)
    assert console is not None
    return console


async def relay(world: World, console: ConsoleTicket, client: FakeClient) -> ConsoleRecord:
    consoles = world.portal.consoles
    async with consoles.connected(console, ORIGIN) as vm_end:
        record = await consoles.relay(console, client, vm_end)
    consoles.finish(console, ORIGIN, record)
    return record


# ---------------------------------------------------------------------------------------- tickets


@synchronous
async def test_a_ticket_is_random_bound_to_its_console_and_stored_only_as_a_digest(
        world: World, alice: Caller, agent: Agent) -> None:
    running_with_consoles(world)
    issued = await world.portal.consoles.open_ticket(alice, agent.id, VM, "serial")
    [stored] = world.storage.state.consoles.values()
    assert issued.ticket not in repr(world.storage.state)
    assert stored.digest == CountingTicketDigests().digest(issued.ticket)
    bound = (stored.user_id, stored.agent_id, stored.vm, stored.kind)
    assert bound == (alice.user.id, agent.id, VM, ConsoleKind.SERIAL)
    assert issued.expires_at - stored.created_at == timedelta(seconds=TICKET_SECONDS)


@synchronous
async def test_a_ticket_opens_one_console_only(world: World, alice: Caller, agent: Agent) -> None:
    running_with_consoles(world)
    issued = await world.portal.consoles.open_ticket(alice, agent.id, VM, "serial")
    assert world.portal.consoles.redeem(issued.ticket) is not None
    assert world.portal.consoles.redeem(issued.ticket) is None


@synchronous
async def test_a_ticket_is_refused_once_its_30_seconds_are_over(world: World, alice: Caller, agent: Agent) -> None:
    running_with_consoles(world)
    issued = await world.portal.consoles.open_ticket(alice, agent.id, VM, "vnc")
    world.clock.current += timedelta(seconds=TICKET_SECONDS)
    assert world.portal.consoles.redeem(issued.ticket) is None


@pytest.mark.parametrize("ticket", ["", "x", "ticket-000000000001-" + "0" * 16, "a" * 10_000])
@synchronous
async def test_an_unknown_ticket_is_refused(world: World, ticket: str) -> None:
    assert world.portal.consoles.redeem(ticket) is None


@synchronous
async def test_a_vm_that_is_not_running_gets_no_ticket(world: World, alice: Caller, agent: Agent) -> None:
    script(world, virsh.state_command(URI, VM), stdout="Domain: 'web1'\n  state.state=5\n")
    with pytest.raises(VmNotRunning):
        await world.portal.consoles.open_ticket(alice, agent.id, VM, "serial")
    assert not world.storage.state.consoles


@pytest.mark.parametrize("kind", ["serial", "vnc"])
@synchronous
async def test_a_vm_without_that_console_is_console_unavailable(world: World, alice: Caller, agent: Agent,
                                                                kind: str) -> None:
    script(world, virsh.state_command(URI, VM), stdout=RUNNING)
    script(world, virsh.ttyconsole_command(URI, VM), exit_status=1, stdout="\n")
    script(world, virsh.vnc_display_command(URI, VM), exit_status=1,
           stderr="error: No graphical display with type 'vnc' found")
    with pytest.raises(ConsoleUnavailable):
        await world.portal.consoles.open_ticket(alice, agent.id, VM, kind)


@synchronous
async def test_a_vnc_server_off_the_hosts_loopback_is_console_unavailable(world: World, alice: Caller,
                                                                          agent: Agent) -> None:
    running_with_consoles(world)
    script(world, virsh.vnc_display_command(URI, VM), stdout="vnc://192.0.2.7:0\n")
    with pytest.raises(ConsoleUnavailable):
        await world.portal.consoles.open_ticket(alice, agent.id, VM, "vnc")


@synchronous
async def test_a_vm_the_agent_does_not_have_is_not_found(world: World, alice: Caller, agent: Agent) -> None:
    script(world, virsh.state_command(URI, VM), exit_status=1, stderr="error: failed to get domain 'web1'")
    with pytest.raises(VmNotFound):
        await world.portal.consoles.open_ticket(alice, agent.id, VM, "serial")


@pytest.mark.parametrize("kind", ["", "SERIAL", "spice", "rdp"])
@synchronous
async def test_an_unknown_kind_is_refused_naming_the_field(world: World, alice: Caller, agent: Agent,
                                                           kind: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await world.portal.consoles.open_ticket(alice, agent.id, VM, kind)
    assert refused.value.errors[0].field == "kind"


@synchronous
async def test_past_the_per_user_limit_no_ticket_is_issued(world: World, alice: Caller, bob: Caller,
                                                           agent: Agent) -> None:
    running_with_consoles(world)
    await opened(world, alice, agent)
    await opened(world, alice, agent)
    with pytest.raises(TooManyConsoles):
        await world.portal.consoles.open_ticket(alice, agent.id, VM, "serial")


@synchronous
async def test_tickets_issued_together_cannot_pass_the_limit_together(world: World, alice: Caller,
                                                                      agent: Agent) -> None:
    running_with_consoles(world)
    issued = [await world.portal.consoles.open_ticket(alice, agent.id, VM, "serial") for _ in range(3)]
    redeemed = [world.portal.consoles.redeem(ticket.ticket) for ticket in issued]
    assert [console is not None for console in redeemed] == [True, True, False]


@synchronous
async def test_a_closed_console_no_longer_counts_against_the_limit(world: World, alice: Caller,
                                                                   agent: Agent) -> None:
    running_with_consoles(world)
    for _ in range(3):
        console = await opened(world, alice, agent)
        client = FakeClient()
        client.outgoing.put_nowait(None)
        await relay(world, console, client)


# ---------------------------------------------------------------------------------------- the relay


@synchronous
async def test_serial_bytes_go_both_ways_over_a_terminal_and_the_console_is_audited(
        world: World, alice: Caller, agent: Agent) -> None:
    running_with_consoles(world)
    world.shell.streams[virsh.serial_console_command(URI, VM)] = b"login: "
    world.shell.hold_streams_open = True
    console = await opened(world, alice, agent)
    client = FakeClient()
    task = asyncio.create_task(relay(world, console, client))
    await asyncio.wait_for(client.got_something.wait(), 5)
    client.outgoing.put_nowait(b"root\n")
    client.outgoing.put_nowait(None)
    record = await asyncio.wait_for(task, 5)
    [stream] = world.shell.opened
    assert bytes(stream.written) == b"root\n" and bytes(client.received) == b"login: "
    assert world.shell.ptys == [True]
    assert (record.ended, record.bytes_to_vm, record.bytes_from_vm) == ("client_closed", 5, 7)
    event = events(world)[-1]
    assert (event.action, event.outcome, event.vm, event.agent_id) == ("vm.console", "ok", VM, agent.id)
    assert event.detail is not None
    assert "kind=serial" in event.detail and "bytes_to_vm=5" in event.detail and "bytes_from_vm=7" in event.detail


@synchronous
async def test_closing_the_client_closes_the_ssh_channel(world: World, alice: Caller, agent: Agent) -> None:
    running_with_consoles(world)
    world.shell.hold_streams_open = True
    console = await opened(world, alice, agent)
    client = FakeClient()
    client.outgoing.put_nowait(None)
    record = await asyncio.wait_for(relay(world, console, client), 5)
    assert record.ended == "client_closed"
    assert all(stream.closed for stream in world.shell.opened)
    assert world.storage.state.consoles[console.id].closed_at is not None


@synchronous
async def test_the_vm_end_closing_ends_the_console(world: World, alice: Caller, agent: Agent) -> None:
    running_with_consoles(world)
    world.shell.streams[virsh.serial_console_command(URI, VM)] = b"bye"
    console = await opened(world, alice, agent)
    record = await asyncio.wait_for(relay(world, console, FakeClient()), 5)
    assert record.ended == "vm_closed"


@synchronous
async def test_an_idle_console_is_closed_after_the_idle_time_out(alice: Caller) -> None:
    # A clock that runs as fast as the relay sleeps: hours of idleness pass at once.
    from tests.unit.world import make_caller, register

    moved = 0.0

    async def sleep(seconds: float) -> None:
        nonlocal moved
        moved += seconds
        await asyncio.sleep(0)

    world = make_world(tickets=CountingTicketDigests(), monotonic=lambda: moved, sleep=sleep,
                       console_idle_timeout=600.0)
    world.clock.step = timedelta(0)
    caller = make_caller(world, "carol")
    agent = register(world, caller)
    running_with_consoles(world)
    world.shell.hold_streams_open = True
    console = await opened(world, caller, agent)
    record = await asyncio.wait_for(relay(world, console, FakeClient()), 5)
    assert record.ended == "idle_timeout" and 600 <= moved < 602
    assert all(stream.closed for stream in world.shell.opened)


@synchronous
async def test_vnc_tunnels_to_the_port_domdisplay_names(world: World, alice: Caller, agent: Agent) -> None:
    running_with_consoles(world)
    world.shell.tunnels[("127.0.0.1", 5902)] = b"RFB 003.008\n"
    console = await opened(world, alice, agent, "vnc")
    client = FakeClient()
    await asyncio.wait_for(relay(world, console, client), 5)
    assert bytes(client.received) == b"RFB 003.008\n"
    assert (agent.id, ("direct-tcpip", "127.0.0.1", "5902")) in world.shell.calls


@synchronous
async def test_vnc_goes_through_the_restricted_shells_relay_when_the_host_refuses_to_forward(
        world: World, alice: Caller, agent: Agent) -> None:
    running_with_consoles(world)  # no tunnel scripted: the fake refuses, like sshd under ``restrict``
    world.shell.streams[virsh.vnc_relay_command(URI, VM)] = b"RFB 003.008\n"
    console = await opened(world, alice, agent, "vnc")
    client = FakeClient()
    await asyncio.wait_for(relay(world, console, client), 5)
    assert bytes(client.received) == b"RFB 003.008\n"
    assert world.shell.ptys == [False]  # only the serial console gets a terminal


# ---------------------------------------------------------------------------------------- parsing

loopback = st.sampled_from(["127.0.0.1", "localhost", "[::1]"])


@given(host=loopback, display=st.integers(0, 65535 - virsh.VNC_BASE_PORT))
def test_a_vnc_display_on_loopback_reads_as_its_tcp_port(host: str, display: int) -> None:
    address = virsh.parse_vnc_display(f"vnc://{host}:{display}\n")
    assert address is not None and address[1] == virsh.VNC_BASE_PORT + display


@given(st.text(max_size=80))
def test_any_domdisplay_answer_reads_as_a_loopback_port_or_nothing(text: str) -> None:
    address = virsh.parse_vnc_display(text)
    assert address is None or (address[0] in ("127.0.0.1", "::1") and 5900 <= address[1] <= 65535)


@given(st.lists(st.sampled_from(["binary", "base64", "chat", "x-rfb", ""]), max_size=4))
def test_the_console_upgrade_names_binary_exactly_when_the_client_offered_it(offered: list[str]) -> None:
    # a browser that offered subprotocols fails the handshake unless the answer names one of them
    chosen = chosen_subprotocol(offered)
    assert chosen == ("binary" if "binary" in offered else None)
    assert chosen is None or chosen in offered
