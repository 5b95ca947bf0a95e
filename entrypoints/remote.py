"""Where the command line finds a remote portal, and the exit codes it answers with.

A user command runs through the HTTP client (``entrypoints/client.py``) when a portal URL is
configured, and in-process (``entrypoints/library.py``, on the portal host) otherwise. Each value
is taken from the first of: the command-line option, the environment, the configuration file::

    url       --url URL          MANAGEMENT_URL        url = "https://manage.example.com"
    api key   --api-key KEY      MANAGEMENT_API_KEY    api_key = "mgmt_…"
    CA file   --ca-file PATH     MANAGEMENT_CA_FILE    ca_file = "/etc/ssl/my-ca.pem"
    time-out  --timeout SECONDS  (none)                timeout = 30

The configuration file is ``$XDG_CONFIG_HOME/manage-playrservers/config.toml`` (by default
``~/.config/…``). It holds an API key, so it is refused unless it belongs to the user running the
command and nobody else may read or write it (mode 0600 or stricter).
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from entrypoints.settings import ConfigError

# Exit codes of the command line (docs/client.md), the same locally and remotely.
EXIT_OK = 0
EXIT_FAILED = 1  # the portal or the host failed (5xx: 502 remote error, 504 time-out, 503…); a check that failed
EXIT_USAGE = 2  # bad arguments or configuration; input the portal refused (400, 413, 415, 422)
EXIT_NOT_FOUND = 3  # 404: no such agent, VM, snapshot… (for you)
EXIT_DENIED = 4  # 401/403: the API key is missing, wrong or not allowed to do this
EXIT_CONFLICT = 5  # 409: the state forbids it (VM already running, name taken…)
EXIT_SLOW_DOWN = 6  # 429: too many requests or operations at once; try again later
EXIT_UNREACHABLE = 7  # the portal could not be reached or did not answer as the portal (DNS, refused, TLS, time-out)

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "the portal or the host failed (HTTP 5xx: 502, 503, 504), or a check found the host failing"),
    (EXIT_USAGE, "usage or configuration error, or input the portal refused (HTTP 400, 413, 415, 422)"),
    (EXIT_NOT_FOUND, "not found (HTTP 404)"),
    (EXIT_DENIED, "authentication or permission (HTTP 401, 403)"),
    (EXIT_CONFLICT, "conflict with the current state (HTTP 409)"),
    (EXIT_SLOW_DOWN, "too many requests (HTTP 429)"),
    (EXIT_UNREACHABLE, "the portal could not be reached (DNS, connection refused, TLS, time-out) or is not at "
                       "that URL"),
)


def exit_code(status: int) -> int:
    """The command line's exit code for an error answered with HTTP ``status``."""
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (401, 403):
        return EXIT_DENIED
    if status == 409:
        return EXIT_CONFLICT
    if status == 429:
        return EXIT_SLOW_DOWN
    if status >= 500:
        return EXIT_FAILED
    if status >= 400:
        return EXIT_USAGE
    return EXIT_FAILED  # not an error status at all: nothing a script can act on


CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {"url": str, "api_key": str, "ca_file": str,
                                                   "timeout": (int, float)}


def config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME", "").strip()
    root = Path(base) if base else Path(env.get("HOME") or Path.home()) / ".config"
    return root / "manage-playrservers" / "config.toml"


def read_config(path: Path) -> dict[str, Any]:
    """The configuration file's values ({} when there is none); ConfigError when it is unsafe or wrong."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise ConfigError(str(path), f"cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(str(path), "is not a regular file")
    if info.st_uid != os.geteuid():
        raise ConfigError(str(path), "belongs to another user; it holds an API key, so only your own file is read")
    if info.st_mode & 0o077:
        raise ConfigError(str(path), f"may be read or written by others (mode {stat.S_IMODE(info.st_mode):04o}); it "
                                     f"holds your API key: run chmod 600 {path}")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), f"is not valid TOML ({error})") from None
    for key, value in values.items():
        kind = CONFIG_KEYS.get(key)
        if kind is None:
            raise ConfigError(str(path), f"unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(str(path), f"{key} must be a {'number' if key == 'timeout' else 'string'}")
    return values


@attrs.frozen
class Target:
    """A remote portal: where it is, the key to use, how to trust its certificate."""

    url: str
    api_key: str | None
    ca_file: str | None = None
    timeout: float = 30.0

    @property
    def verify(self) -> bool | str:
        return self.ca_file or True


@attrs.frozen
class Choice:
    """What a user command runs against: ``target`` (remote) or the portal in this process (None)."""

    target: Target | None
    api_key: str | None


def choose(options: Any, env: Mapping[str, str]) -> Choice:
    """Remote or local, from the options (``--url`` …), the environment and the configuration file."""
    file = read_config(config_path(env))

    def pick(option: str, variable: str | None, key: str) -> Any:
        given = getattr(options, option, None)
        if given not in (None, ""):
            return given
        if variable is not None and env.get(variable, "").strip():
            return env[variable].strip()
        return file.get(key)

    url = pick("url", "MANAGEMENT_URL", "url")
    api_key = pick("api_key", "MANAGEMENT_API_KEY", "api_key")
    if not url:
        return Choice(None, api_key)
    where = "--url" if getattr(options, "url", None) else "MANAGEMENT_URL" if env.get("MANAGEMENT_URL", "").strip() \
        else str(config_path(env))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(where, f"must be the portal's URL, such as https://manage.example.com (got {url!r})")
    timeout = pick("timeout", None, "timeout")
    if timeout is not None and not 0 < float(timeout) <= 3600:
        raise ConfigError("--timeout", "must be between 0 and 3600 seconds")
    ca_file = pick("ca_file", "MANAGEMENT_CA_FILE", "ca_file")
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError("MANAGEMENT_CA_FILE" if env.get("MANAGEMENT_CA_FILE") else "--ca-file",
                          f"no such file: {ca_file}")
    return Choice(Target(url, api_key, ca_file, float(timeout) if timeout is not None else 30.0), api_key)


def explicit_url(options: Any, env: Mapping[str, str]) -> str | None:
    """Where a portal URL was asked for explicitly (``--url`` or ``MANAGEMENT_URL``), if it was."""
    if getattr(options, "url", None):
        return "--url"
    if env.get("MANAGEMENT_URL", "").strip():
        return "MANAGEMENT_URL"
    return None
