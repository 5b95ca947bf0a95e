#!/usr/bin/env bash
# Set up and run the whole test suite: lint (ruff), types (mypy --strict on core, adapters and
# entrypoints), the layer contracts (lint-imports, setup.cfg [importlinter]), then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k audit
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh test,dev
# web console (issue 19): its browser libraries (pinned, verified), and Debian's chromium for the
# browser tests (Playwright drives it; no browser download)
python3 scripts/web_assets.py
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
.venv/bin/ruff check core adapters entrypoints tests main.py scripts/agent_shell.py
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
exec .venv/bin/pytest "$@"
