"""The layer rules of docs/architecture.md are held by tools, and the tools really catch a break.

``lint-imports`` checks the contracts in setup.cfg ([importlinter]) and ``mypy --strict`` covers
core, adapters and entrypoints (scripts/test.sh runs both). These tests prove the contracts hold
on this tree and that a deliberately wrong import makes ``lint-imports`` fail.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)})


def copy_of_the_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for package in ("core", "adapters", "entrypoints"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tree / "setup.cfg")
    return tree


@pytest.fixture(scope="module")
def linter() -> Path:
    if not LINT_IMPORTS.exists():
        pytest.fail("lint-imports is missing: install the dev extra (scripts/venv.sh test,dev)")
    return LINT_IMPORTS


def test_the_import_contracts_hold(linter: Path, tmp_path: Path) -> None:
    result = lint_imports(copy_of_the_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("core/model.py", "import sqlalchemy", "core imports no framework"),
    ("core/agents.py", "from adapters import clock", "core imports no framework"),
    ("adapters/hashing.py", "import entrypoints.settings", "adapters never import entrypoints"),
    ("entrypoints/cli.py", "import adapters.ssh", "only the composition root"),
    ("adapters/ssh/shell.py", "from adapters import sealing", "adapters do not import one another"),
])
def test_a_wrong_import_breaks_its_contract(linter: Path, tmp_path: Path, module: str, line: str,
                                            contract: str) -> None:
    tree = copy_of_the_tree(tmp_path)
    planted = tree / module
    planted.write_text(planted.read_text() + f"\n{line}  # planted by the test\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    report = " ".join(result.stdout.split())  # contract names wrap across lines
    verdict = report[report.index(contract):]
    assert verdict.index("BROKEN") < (verdict.index("KEPT") if "KEPT" in verdict else len(verdict)), result.stdout


def test_core_imports_only_the_standard_library_and_attrs() -> None:
    allowed = set(sys.stdlib_module_names) | {"attrs", "core", "__future__"}
    for path in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.relative_to(ROOT)} imports {name}"
