"""Parse time of core/virsh.py's parsers on hostile answers, on size ladders (issue 14, item 3).

    .venv/bin/python bench/parsers.py                      # this tree's parsers
    .venv/bin/python bench/parsers.py --module OLD.py      # another core/virsh.py (e.g. from git show)

For each shape of answer a hostile hypervisor can send, the answer is built at 25, 50, 100, 200
and 400 KB and parsed once (best of ``--repeat``); the ratio column is the time against the step
before (about 2 when linear, 4 when quadratic). A shape stops climbing once a step takes longer
than ``--budget`` seconds; the 400 KB time is then extrapolated from the last two steps and
marked ``~`` (``-`` when a single step already took longer than the budget: use ``--sizes``).
No lab needed; results are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIZES_KB = (25, 50, 100, 200, 400)


def load(path: Path) -> ModuleType:
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("virsh_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fit(text: str, size: int) -> str:
    return text[:size]


def shapes(virsh: Any) -> dict[str, tuple[Callable[[str], object], Callable[[int], str]]]:
    """name -> (parse, answer of about ``size`` bytes)."""
    def failure(text: str) -> object:
        try:
            virsh.raise_for_snapshot_failure(virsh.CommandResult(("virsh",), 1, "", text), "vm", "s")
        except Exception as error:  # the mapping is not measured, its time is
            return error
        return None

    def wide_snapshot_list(size: int) -> str:
        quarter = size // 4  # a header of ~quarter/4 cells, three rows as wide as it
        header = " Name   Creation Time   State   Parent" + "   X" * (quarter // 4)
        row = " s1   2026-01-02 03:04:05 +0000   running   " + "p" * quarter
        return header + "\n" + "-" * 40 + "\n" + (row + "\n") * 3

    def many_snapshots(size: int) -> str:
        head = " Name   Creation Time                 State     Parent\n" + "-" * 60 + "\n"
        row = " snap-{:06d}   2026-01-02 03:04:05 +0000   running   snap-{:06d}\n"
        return head + "".join(row.format(i, i - 1) for i in range(size // len(row.format(0, 0))))

    def space_run_list(size: int) -> str:
        return " Id   Name   State\n" + "-" * 20 + "\n 1 a" + " " * size + "b  running\n"

    def wide_list(size: int) -> str:
        return " Id" + "  X" * (size // 6) + "\n---\n 1   " + "n" * (size // 2) + "\n"

    return {
        "snapshot-list, wide header (cells per column per row)": (virsh.parse_snapshot_list, wide_snapshot_list),
        "snapshot-list, many snapshots (a real 400 KB list)": (virsh.parse_snapshot_list, many_snapshots),
        "list, a run of spaces in a row (_ROW)": (virsh.parse_list, space_run_list),
        "list, wide header": (virsh.parse_list, wide_list),
        "snapshot failure, repeated 'domain snapshot ' (_SNAPSHOT_EXISTS)":
            (failure, lambda size: "domain snapshot " * (size // 16)),
        "dominfo, many lines": (virsh.parse_dominfo, lambda size: "Name: x\n" * (size // 8)),
        "domstats, many fields": (lambda text: virsh.parse_stats(text, "vm"),
                                  lambda size: "Domain: 'x'\n" + "  block.count=3\n" * (size // 16)),
    }


def measure(parse: Callable[[str], object], text: str, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        parse(text)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", type=Path, default=REPO / "core" / "virsh.py")
    parser.add_argument("--budget", type=float, default=20.0, help="stop a shape past this many seconds")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_KB)), help="KB, comma-separated")
    parser.add_argument("--only", default="", help="measure only shapes whose name contains this")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    virsh = load(args.module)
    print(f"parsers of {args.module}")
    print(f"{'shape':66} " + " ".join(f"{size:>9} KB" for size in sizes) + "   ratios")
    for name, (parse, make) in shapes(virsh).items():
        if args.only not in name:
            continue
        times: list[float] = []
        for size in sizes:
            if times and times[-1] > args.budget:
                break
            text = make(size * 1024)
            times.append(measure(parse, text, 1 if times and times[-1] > 1 else args.repeat))
        cells = [f"{t:>10.4f}s" for t in times]
        ratios = [later / earlier for earlier, later in itertools.pairwise(times) if earlier > 0]
        while len(cells) < len(sizes):  # extrapolate with the last ratio (none without two steps)
            if not ratios:
                cells.append(f"{'-':>11}")
                continue
            times.append(times[-1] * ratios[-1])
            cells.append(f"~{times[-1]:>9.1f}s")
        print(f"{name:66} " + " ".join(cells) + "   " + " ".join(f"{r:.1f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
