#!/usr/bin/env bash
# The Prometheus server and promtool for the metrics tests (issue 21), from Debian's `prometheus`
# package, unpacked into a cache directory: nothing is installed system-wide and no service starts.
# Usage: scripts/prometheus.sh install    prints PROMETHEUS=... and PROMTOOL=... (idempotent)
set -euo pipefail

CACHE_DIR="${PLAYR_PROMETHEUS_DIR:-/var/cache/playr-prometheus}"

unpack() {
    if [ ! -x "$CACHE_DIR/prometheus" ] || [ ! -x "$CACHE_DIR/promtool" ]; then
        command -v apt-get >/dev/null || { echo "error: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
        local work
        work="$(mktemp -d)"
        (cd "$work" && apt-get download prometheus >/dev/null 2>&1) || {
            apt-get update -qq >/dev/null
            (cd "$work" && apt-get download prometheus >/dev/null)
        }
        dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
        mkdir -p "$CACHE_DIR"
        command install -m 0755 "$work/root/usr/bin/prometheus" "$work/root/usr/bin/promtool" "$CACHE_DIR/"
        rm -rf "$work"
    fi
    echo "PROMETHEUS=$CACHE_DIR/prometheus"
    echo "PROMTOOL=$CACHE_DIR/promtool"
}

case "${1:-}" in
    install) unpack ;;
    *) echo "usage: $0 install" >&2; exit 2 ;;
esac
