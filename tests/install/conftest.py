"""The installer tests change the machine they run on (packages, a system user, /opt, /etc, nginx on
port 80): they are for disposable CI machines and run only as root on a Debian-like system."""

from __future__ import annotations
