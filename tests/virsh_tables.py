"""virsh's tables, rendered the way libvirt's vshTable prints them, for the parsers' property tests."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def display_width(text: str) -> int:
    """Columns a terminal gives ``text``, as virsh measures it (wide East Asian characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1
               for c in text)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Every cell after one space, every column but the last padded to its widest cell (by display
    width) plus two spaces, a dashed line of sum(width + 3) under the header, a blank line at the end."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(display_width(cells[i]) for cells in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = ""
        for i, cell in enumerate(cells):
            out += " " + cell
            if i < len(cells) - 1:
                out += " " * (widths[i] - display_width(cell) + 2)
        return out + "\n"

    return line(table[0]) + "-" * sum(w + 3 for w in widths) + "\n" + "".join(line(c) for c in table[1:]) + "\n"
