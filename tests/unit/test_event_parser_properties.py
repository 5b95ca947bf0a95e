"""Properties of the ``virsh event --all --loop --timestamp`` parser (``core.virsh``), checked on
output recorded from the lab's libvirt (tests/data/virsh-event-lab.txt) and on generated lines."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from core import virsh
from core.virsh import EventLines, HostEvent, parse_event_line

RECORDED = (Path(__file__).parent.parent / "data" / "virsh-event-lab.txt").read_bytes()

LIFECYCLE = st.sampled_from(["Defined Added", "Undefined Removed", "Started Booted", "Suspended Paused",
                             "Resumed Unpaused", "Stopped Destroyed", "Shutdown Finished after host request",
                             "Crashed Panicked", "PMSuspended Memory"])
NAMES = st.text(alphabet="abcXYZ019 ._-+:@,=%", min_size=1, max_size=40).filter(lambda n: n.strip() == n and n)
TIMES = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000, tzinfo=UTC))


def line(at: datetime, kind: str, vm: str, detail: str | None) -> str:
    stamp = at.strftime("%Y-%m-%d %H:%M:%S.") + f"{at.microsecond // 1000:03d}+0000"
    return f"{stamp}: event '{kind}' for domain '{vm}'" + (f": {detail}" if detail is not None else "")


def test_the_recorded_lab_output_reads_as_the_lifecycle_it_was() -> None:
    events = EventLines().feed(RECORDED)
    assert [(e.vm, e.type) for e in events] == [
        ("ev-probe", "vm.defined"), ("ev-probe", "vm.resumed"), ("ev-probe", "vm.started"),
        ("ev-probe", "vm.suspended"), ("ev-probe", "vm.resumed"), ("ev-probe", "vm.shutdown"),
        ("ev-probe", "vm.stopped"), ("ev-probe", "vm.undefined")]
    assert events[2].state == "running" and events[3].state == "paused" and events[6].state == "shut off"
    assert events[0].at == datetime(2026, 12, 1, 6, 16, 34, 100000, tzinfo=UTC)


@given(TIMES, LIFECYCLE, NAMES)
def test_a_lifecycle_line_reads_back_as_its_event_vm_and_time(at: datetime, words: str, vm: str) -> None:
    event = parse_event_line(line(at, "lifecycle", vm, words))
    first, _, rest = words.partition(" ")
    assert event == HostEvent(at=at, vm=vm, type=f"vm.{first.lower()}", detail=rest)
    assert event.state == virsh.LIFECYCLE_STATES[first.lower()]


@given(TIMES, st.sampled_from(["reboot", "rtc-change", "watchdog", "io-error", "device-removed"]), NAMES,
       st.one_of(st.none(), st.text(alphabet="abc 0123:'", max_size=30)))
def test_other_events_keep_their_kind_as_type(at: datetime, kind: str, vm: str, detail: str | None) -> None:
    event = parse_event_line(line(at, kind, vm, detail))
    assert event is not None and event.type == f"vm.{kind}" and event.vm == vm and event.state is None


@given(st.text(max_size=300))
def test_any_text_parses_or_is_skipped_never_raises(text: str) -> None:
    result = parse_event_line(text)
    assert result is None or result.type.startswith("vm.")


@given(st.lists(st.integers(min_value=1, max_value=len(RECORDED)), max_size=10))
def test_chunk_boundaries_do_not_change_the_events(cuts: list[int]) -> None:
    whole = EventLines().feed(RECORDED)
    lines = EventLines()
    pieces, start = [], 0
    for cut in sorted(set(cuts)):
        pieces.append(RECORDED[start:cut])
        start = cut
    pieces.append(RECORDED[start:])
    assert [e for piece in pieces for e in lines.feed(piece)] == whole


@given(st.binary(max_size=2000))
def test_the_line_buffer_stays_bounded_whatever_the_host_sends(noise: bytes) -> None:
    lines = EventLines(max_line=64)
    for _ in range(5):
        lines.feed(noise)
        assert len(lines._buffer) <= 64 + len(noise)
    lines.feed(b"x" * 1000)
    assert len(lines._buffer) <= 64
