#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install the package into it.
# Usage: scripts/venv.sh [EXTRAS]   e.g. scripts/venv.sh test,dev
# Needs only Python 3.11+; on Debian/Ubuntu it installs python3-venv with apt when venv is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $python is $("$python" -V 2>&1); the portal needs Python 3.11 or newer" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$python" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${version}-venv" \
                || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            "$python" -m venv .venv
        else
            echo "error: '$python -m venv' failed; install your distribution's python3-venv package" >&2
            exit 1
        fi
    fi
fi

target="."
[ -n "$extras" ] && target=".[$extras]"
log=.venv/pip-install.log
if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade "pip>=23" \
        && .venv/bin/python -m pip install --disable-pip-version-check -e "$target"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "error: installing the package failed; full log in $log" >&2
    exit 1
fi
echo "installed $(.venv/bin/python -m pip show manage-playrservers | sed -n 's/^Version: /manage-playrservers /p') into .venv" >&2
