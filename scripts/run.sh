#!/usr/bin/env bash
# Set up and run the portal: creates .venv, installs the package, then serves with gunicorn on
# MANAGEMENT_HOST:MANAGEMENT_PORT (default 0.0.0.0:8000). All MANAGEMENT_* variables apply.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh
exec .venv/bin/python main.py
