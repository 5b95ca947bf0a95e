"""Every parser of core/virsh.py does work linear in its input (issue 14, item 3).

A hostile hypervisor chooses every byte virsh "prints"; a 400 KB snapshot list used to take
minutes (each header cell's width recounted from the start of the header, each row walked once
per column). Work is counted, not timed: the Python lines core/virsh.py executes (``sys.settrace``)
on a ladder of inputs, each twice the size of the one before, must grow by at most about twice.
Regular expressions run inside ``re`` and are invisible to the count; the two that were quadratic
are gone (``_ROW``'s lazy tail, ``_SNAPSHOT_EXISTS``), the replacements are compared with them here
on any text, and ``bench/parsers.py`` times size ladders of every parser, regexes included."""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core import virsh
from core.ports import CommandResult
from tests.virsh_tables import render_table

VIRSH_FILE = virsh.__file__
LADDER = (1, 2, 4, 8)
GROWTH = 2.5  # per doubling of the input; linear work doubles, quadratic work quadruples


def work(parse: Callable[[str], object], text: str) -> int:
    """Lines of core/virsh.py executed while parsing ``text``."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def global_(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == VIRSH_FILE:
            return local
        return None

    previous = sys.gettrace()
    sys.settrace(global_)
    try:
        parse(text)
    finally:
        sys.settrace(previous)
    return count


def assert_linear(parse: Callable[[str], object], make: Callable[[int], str], unit: int) -> None:
    counts = [work(parse, make(unit * step)) for step in LADDER]
    for small, large in itertools.pairwise(counts):
        assert large <= GROWTH * small + 50, counts


def failure(stderr: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            virsh.raise_for_snapshot_failure(CommandResult(("virsh",), 1, "", text), "vm", "s")
        except Exception as error:  # any mapped error is fine; only the work counts
            return error
        return None
    return parse


FILLER = st.text(alphabet="ab -中\t", min_size=1, max_size=4)


@settings(max_examples=8)
@given(FILLER)
def test_item3_a_snapshot_list_with_a_huge_header_parses_in_linear_work(cell: str) -> None:
    """The 400 KB answer of the issue: thousands of header cells, long rows under them."""
    def make(n: int) -> str:
        header = " Name   Creation Time   State   Parent" + "   X" * n
        row = " s1   2026-01-02 03:04:05 +0000   running   " + (cell.strip() or "p") * (4 * n)
        return header + "\n" + "-" * (4 * n) + "\n" + (row + "\n") * 4
    assert_linear(virsh.parse_snapshot_list, make, 100)


@settings(max_examples=8)
@given(FILLER)
def test_item3_a_snapshot_list_with_many_rows_or_long_rows_parses_in_linear_work(cell: str) -> None:
    head = " Name   Creation Time   State   Parent\n" + "-" * 40 + "\n"
    assert_linear(virsh.parse_snapshot_list,
                  lambda n: head + f" s{cell}   2026-01-02 03:04:05 +0000   running   p\n" * n, 50)
    assert_linear(virsh.parse_snapshot_list, lambda n: head + " s " + cell * n + "  x\n", 200)


@settings(max_examples=8)
@given(FILLER)
def test_item3_a_vm_list_parses_in_linear_work(cell: str) -> None:
    head = " Id   Name   State\n" + "-" * 20 + "\n"
    assert_linear(virsh.parse_list, lambda n: head + f" 1    vm{cell}   running\n" * n, 50)
    assert_linear(virsh.parse_list, lambda n: head + " 1 a" + " " * n + cell + "b  running\n", 200)
    assert_linear(virsh.parse_list, lambda n: " Id" + "  X" * n + "\n---\n 1   " + cell * n + "\n", 100)


@settings(max_examples=8)
@given(FILLER)
def test_item3_key_value_parsers_and_failures_parse_in_linear_work(cell: str) -> None:
    for parse in (virsh.parse_dominfo, virsh.parse_domstats, virsh.parse_nodeinfo, virsh.parse_version,
                  virsh.parse_hostname, lambda text: virsh.parse_stats(text, "vm")):
        assert_linear(parse, lambda n: f"Domain: 'x'\n  block.count=3\n  Id: {'9' * n}\n  k{cell}=v\n" * n, 20)
        assert_linear(parse, lambda n: "  CPU(s): " + "7" * n + cell * n + "\n", 200)
    assert_linear(failure("x"), lambda n: "domain snapshot " * n + cell, 100)
    assert_linear(failure("x"), lambda n: ("domain snapshot " + cell + "\n") * n, 100)


# ---------------------------------------------------------------------------------------- same answers

OLD_SNAPSHOT_EXISTS = re.compile(r"domain (?:moment|snapshot) .+ already exists\s*$", re.MULTILINE)
OLD_ROW = re.compile(r"^\s*(?P<id>[0-9]{1,10}|-)\s+(?P<rest>.*?)\s*$")
EXISTS_ISH = st.lists(st.sampled_from(["domain snapshot ", "domain moment ", " already exists", "domain",
                                       "x", " ", "\n", "\t", "\r", "\x1c", "\u2028", "''", "é"]), max_size=12)


@given(EXISTS_ISH.map("".join) | st.text())
@example("domain snapshot x already exists  \nmore")
@example("domain snapshot  already exists")
@example("domain snapshot already exists")
def test_item3_the_snapshot_exists_test_answers_as_the_old_regex(text: str) -> None:
    assert virsh._says_snapshot_exists(text) == bool(OLD_SNAPSHOT_EXISTS.search(text))


@given(st.lists(st.sampled_from(["1", "-", " ", "  ", "\t", "12345678901", "a", "running", "\u3000", "x y"]),
                max_size=10).map("".join) | st.text())
def test_item3_the_row_prefix_and_rest_are_the_old_regex_s(line: str) -> None:
    old = OLD_ROW.match(line)
    new = virsh._ROW.match(line)
    assert (old is None) == (new is None)
    if old is not None and new is not None:
        assert (new.group("id"), line[new.end():].rstrip()) == (old.group("id"), old.group("rest"))


def _old_cells(line: str, start: int, end: int | None) -> str:
    out, cell = [], 0
    for char in line:
        if cell >= start and (end is None or cell < end):
            out.append(char)
        cell += virsh._width(char)
    return "".join(out)


@given(st.text(alphabet="ab 中\t-", max_size=30), st.lists(st.integers(0, 40), max_size=6), st.integers(1, 6))
def test_item3_cutting_a_row_in_one_pass_gives_the_cells_of_the_old_per_column_walk(
        line: str, raw: list[int], count: int) -> None:
    starts = sorted(set(raw))
    expected = [_old_cells(line, start, starts[i + 1] if i + 1 < len(starts) else None)
                for i, start in enumerate(starts)][:count]
    assert virsh._cut(line, starts, count)[: len(expected)] == expected


@given(st.lists(st.tuples(st.text(alphabet="ab 中", min_size=1, max_size=6).map(str.strip).filter(bool),
                          st.sampled_from(["running", "shutoff"]),
                          st.text(alphabet="ab 中", max_size=6).map(str.strip)), max_size=5),
       st.lists(st.sampled_from(["Name", "Creation Time", "State", "Parent", "Extra", "名前"]),
                min_size=3, max_size=6))
def test_item3_wide_headers_cut_rows_exactly_as_before(rows: list[tuple[str, str, str]], header: list[str]) -> None:
    table = render_table(header, [[name, "2026-01-02 03:04:05 +0000", state, parent, *([""] * (len(header) - 4))][
        : len(header)] for name, state, parent in rows])
    parsed = virsh.parse_snapshot_list(table)
    assert [s.name for s in parsed] == [name for name, _, _ in rows]
    assert [s.state for s in parsed] == [state for _, state, _ in rows]


@pytest.mark.parametrize("digits", [21, 5000, 100_000])
def test_item3_numbers_longer_than_20_digits_are_none_not_a_crash(digits: int) -> None:
    """int() of a long run of digits is quadratic (and past 4300 digits a ValueError)."""
    assert virsh.parse_dominfo(f"Id: {'1' * digits}\n")["id"] is None
    assert virsh.parse_nodeinfo(f"CPU(s): {'1' * digits}\n").cpus is None
    assert virsh.parse_stats(f"Domain: 'x'\n  cpu.time={'1' * digits}\n", "x").cpu.time_ns is None
