"""Serve the portal: ``python main.py`` runs gunicorn with ASGI workers, configured by the
``MANAGEMENT_*`` environment variables (see README.md)."""

from __future__ import annotations

import sys

from entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve"]))
