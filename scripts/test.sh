#!/usr/bin/env bash
# Set up and run the whole test suite: lint (ruff), types (mypy --strict on core, adapters and
# entrypoints), the layer contracts (lint-imports, setup.cfg [importlinter]), then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k audit
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh test,dev
.venv/bin/ruff check core adapters entrypoints tests main.py scripts/agent_shell.py
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
exec .venv/bin/pytest "$@"
