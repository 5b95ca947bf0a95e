"""The error vocabulary is declared once: every code is one class of core/errors.py, every class
has its HTTP status, and no code is spelled (or compared) as a string anywhere else."""

from __future__ import annotations

import re
from pathlib import Path

from core import errors
from entrypoints.http.errors import status_of_class

ROOT = Path(__file__).resolve().parents[2]


def test_every_code_is_one_class() -> None:
    classes = errors.error_classes()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)
    assert {"agent_not_found", "host_key_mismatch", "vm_not_running", "output_too_large", "agent_address_refused",
            "key_not_exportable", "https_required", "body_too_large"} <= set(codes)


def test_every_error_class_has_an_http_status_below_500() -> None:
    unmapped = [cls.__name__ for cls in errors.error_classes()
                if cls is not errors.PortalError and not 400 <= status_of_class(cls) < 600]
    assert unmapped == []
    assert all(status_of_class(cls) != 500 for cls in errors.error_classes() if cls is not errors.PortalError)


def test_no_code_is_spelled_or_compared_as_a_string_outside_the_vocabulary() -> None:
    codes = {cls.code for cls in errors.error_classes()}
    spelled = re.compile(r"""\bcode\s*(?:=|==|!=)\s*["']|\.code\s+(?:not\s+)?in\b""")
    offenders = []
    for package in ("core", "adapters", "entrypoints"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "core" / "errors.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if spelled.search(line) or any(f'"{code}"' in line for code in codes if "code" in line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
