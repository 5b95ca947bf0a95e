"""Item 3 of issue 14: long host output is parsed in a worker thread, short output inline."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from core import virsh
from core.errors import WaitTimedOut
from core.remote import OFF_LOOP_PARSE_BYTES, parse_output
from core.virsh import VmAction
from tests.unit.world import make_caller, make_world, register, script


def test_item3_long_output_is_parsed_off_the_event_loop_and_short_output_on_it() -> None:
    seen: list[tuple[int, int]] = []

    def parser(text: str) -> int:
        seen.append((len(text), threading.get_ident()))
        return len(text)

    async def main() -> int:
        loop_thread = threading.get_ident()
        assert await parse_output(parser, "x" * OFF_LOOP_PARSE_BYTES) == OFF_LOOP_PARSE_BYTES
        assert await parse_output(parser, "x" * (OFF_LOOP_PARSE_BYTES + 1)) == OFF_LOOP_PARSE_BYTES + 1
        return loop_thread

    loop_thread = asyncio.run(main())
    (short_length, short_thread), (long_length, long_thread) = seen
    assert (short_length, long_length) == (OFF_LOOP_PARSE_BYTES, OFF_LOOP_PARSE_BYTES + 1)
    assert short_thread == loop_thread
    assert long_thread != loop_thread


@pytest.mark.parametrize("use_case", ["host_facts", "list_vms", "vm_stats", "wait"])
def test_item3_the_use_cases_parse_a_long_answer_off_the_event_loop(use_case: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parser a use case calls on host output goes through ``parse_output``: with an answer
    past the threshold, the parsing happens in another thread than the event loop's."""
    world = make_world()
    alice = make_caller(world, "alice")
    agent = register(world, alice)
    uri = agent.libvirt_uri
    long_text = "x" * (OFF_LOOP_PARSE_BYTES + 1)
    for command in (virsh.hostname_command(uri), virsh.nodeinfo_command(uri), virsh.version_command(uri),
                    virsh.list_command(uri), virsh.stats_command(uri, "vm1"), virsh.state_command(uri, "vm1")):
        script(world, command, stdout=long_text)
    parsing_threads: list[int] = []
    for name in ("parse_hostname", "parse_nodeinfo", "parse_version", "parse_list", "parse_stats", "parse_state"):
        original = getattr(virsh, name)

        def spy(*args: object, _original: object = original) -> object:
            parsing_threads.append(threading.get_ident())
            return _original(*args)  # type: ignore[operator]

        monkeypatch.setattr(virsh, name, spy)

    async def main() -> int:
        calls = {
            "host_facts": lambda: world.portal.fleet.host_facts(alice, agent.id),
            "list_vms": lambda: world.portal.vms.list_vms(alice, agent.id),
            "vm_stats": lambda: world.portal.vms.vm_stats(alice, agent.id, "vm1"),
            "wait": lambda: world.portal.vms.vm_action_and_wait(alice, agent.id, "vm1", VmAction.START, 0),
        }
        with contextlib.suppress(WaitTimedOut):
            await calls[use_case]()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert parsing_threads
    assert loop_thread not in parsing_threads
