#!/usr/bin/env bash
# Set up and run the portal: creates .venv, installs the package, then serves with gunicorn on
# MANAGEMENT_HOST:MANAGEMENT_PORT (default 0.0.0.0:8000). All MANAGEMENT_* variables apply.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh
# the web console's browser libraries (xterm.js, noVNC), pinned and verified; the pages work without them
python3 scripts/web_assets.py || echo "warning: the console page's libraries could not be fetched (scripts/web_assets.py)" >&2
exec .venv/bin/python main.py
