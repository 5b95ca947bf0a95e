"""Item 3 of issue 14: long host output is parsed in a worker thread, short output inline."""

from __future__ import annotations

import asyncio
import threading

from core.remote import OFF_LOOP_PARSE_BYTES, parse_output


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
