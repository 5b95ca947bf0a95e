"""Configuration from ``MANAGEMENT_*`` environment variables, validated once at start-up.

A bad value raises ``ConfigError`` naming the variable; the server and the command line print it
and exit non-zero instead of starting half-configured.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import attrs
import sqlalchemy

from core.model import SignupPolicy
from core.networks import AgentNetworks

T = TypeVar("T")

DEFAULT_DB_PATH = "data/management.sqlite3"
SECRET_KEY_FILENAME = "secret.key"  # noqa: S105 - a file name, not a secret


class ConfigError(ValueError):
    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


def database_url(raw: str) -> str:
    """``MANAGEMENT_DATABASE_URL`` checked and normalised: SQLite, or PostgreSQL through psycopg 3
    (``postgres://`` and ``postgresql://`` mean ``postgresql+psycopg://``, the driver installed)."""
    variable = "MANAGEMENT_DATABASE_URL"
    example = "postgresql+psycopg://user:password@host:5432/database"
    if "://" not in raw:
        raise ConfigError(variable, f"must be a URL such as {example} or sqlite:///path/to/file.sqlite3")
    scheme, _, rest = raw.partition("://")
    if scheme.lower() in ("postgres", "postgresql"):
        scheme = "postgresql+psycopg"
    try:
        url = sqlalchemy.engine.make_url(f"{scheme}://{rest}")
    except (ValueError, sqlalchemy.exc.ArgumentError):
        raise ConfigError(variable, f"is not a valid URL (expected e.g. {example})") from None
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "sqlite" and driver in ("pysqlite", "sqlite"):
        return f"{scheme}://{rest}"
    if backend == "postgresql" and driver == "psycopg":
        if not url.database:
            raise ConfigError(variable, f"names no database (expected e.g. {example})")
        return f"{scheme}://{rest}"
    raise ConfigError(variable, f"{scheme}:// is not supported; use {example} (PostgreSQL through psycopg 3) "
                                "or sqlite:///path/to/file.sqlite3")


def shown_url(url: str | sqlalchemy.engine.URL) -> str:
    """A database URL fit for messages and logs: the password hidden, also one given as a libpq
    ``?password=`` query parameter."""
    parsed = sqlalchemy.engine.make_url(url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def secrets_of_url(url: str | sqlalchemy.engine.URL) -> list[str]:
    """Every password in a database URL (to scrub from a driver's error text)."""
    parsed = sqlalchemy.engine.make_url(url)
    found = [str(parsed.password)] if parsed.password else []
    query_password = parsed.query.get("password")
    found += [query_password] if isinstance(query_password, str) else list(query_password or ())
    return [secret for secret in found if secret]


def _hide_password(url: str) -> str:
    return repr(shown_url(url))


@attrs.frozen
class Settings:
    database_url: str = attrs.field(repr=_hide_password)
    db_path: Path | None  # the SQLite file, when the database is SQLite
    host: str = "0.0.0.0"  # noqa: S104 - the seed's default; production binds 127.0.0.1 behind nginx
    port: int = 8000
    workers: int = 1
    reload: bool = False
    secret_key: str | None = attrs.field(default=None, repr=False)
    secret_key_file: Path = Path("data") / SECRET_KEY_FILENAME
    signup: SignupPolicy = SignupPolicy.FIRST
    log_format: str = "auto"  # json | console | auto (console on a terminal, JSON otherwise)
    log_level: str = "info"
    max_body_bytes: int = 1024 * 1024
    auth_failure_limit: int = 20  # failed authentications per client address per window
    auth_failure_window: float = 60.0
    db_busy_timeout: float = 10.0
    db_pool_size: int = 5  # database connections each worker process keeps (PostgreSQL: see docs/scaling.md)
    db_connect_wait: float = 30.0  # seconds start-up waits for a database server that cannot be reached yet
    ssh_connect_timeout: float = 10.0
    ssh_command_timeout: float = 60.0
    ssh_idle_timeout: float = 300.0
    trusted_proxies: str = "127.0.0.1,::1"  # peers whose X-Forwarded-For names the real client
    max_agents_per_user: int = 1000
    # Hostile hosts and tenants (issue 14): output read per command, addresses agents may point at,
    # SSH operations one user may run at once (per worker).
    max_output_bytes: int = 4 * 1024 * 1024
    agent_networks: AgentNetworks = attrs.field(factory=AgentNetworks)
    max_operations_per_user: int = 16
    # credential-bearing requests that a proxy received over plain HTTP are refused unless this is true
    allow_plain_http: bool = False
    # Metrics (issue 21): the token that opens GET /metrics to non-loopback clients, how often
    # GET /metrics/vms may ask each host, and where the server's workers keep their values.
    metrics_token: str | None = attrs.field(default=None, repr=False)
    metrics_min_interval: float = 10.0
    metrics_dir: Path | None = None
    # --- scale (issue 22): agents the fleet view asks at once (also bounded by RLIMIT_NOFILE, see
    # bootstrap.fleet_parallelism), and seconds a host that could not be connected to is answered
    # with its error without trying again (0: never remembered)
    fleet_parallelism: int = 256
    ssh_failure_ttl: float = 15.0
    # Provisioning (issue 16): the libvirt domain type of the VMs the portal creates: kvm on real
    # hypervisors, qemu (TCG, no hardware virtualization) where KVM is missing or unusable (the lab).
    vm_domain_type: str = "kvm"
    # consoles (issue 17): open at once per user (counted in the database), idle time-out, longest session
    max_consoles_per_user: int = 4
    console_idle_timeout: float = 900.0
    console_max_seconds: float = 8 * 3600.0
    console_ticket_seconds: int = 30  # the contract's 30 s; the lab tests shorten it to see tickets expire
    # Live state and events (issue 18): events kept per user, whether this instance runs watchers,
    # how old a mirror may be and still answer lists, how long a watcher's lease lasts unrenewed.
    event_retention: int = 10_000
    watchers: bool = True
    mirror_max_age: float = 5.0
    watch_lease_seconds: float = 6.0
    watch_idle: float = 600.0  # seconds an agent stays watched after its last use
    # --- web console (issue 19): a browser session's absolute lifetime and idle time-out, in seconds
    session_lifetime: float = 12 * 3600.0
    session_idle: float = 30 * 60.0
    # --- webhooks (issue 18): where deliveries may go (the agents' policy, its own list), the time-out
    # of one POST, how many attempts before a delivery fails and the first retry's delay (doubling),
    # and whether this instance's workers deliver at all
    webhook_networks: AgentNetworks = attrs.field(factory=lambda: AgentNetworks(variable="MANAGEMENT_WEBHOOK_ALLOW"))
    webhook_timeout: float = 10.0
    webhook_max_attempts: int = 12
    webhook_retry_base: float = 10.0
    webhook_deliveries: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        url = env.get("MANAGEMENT_DATABASE_URL", "").strip()
        db_path: Path | None = None
        if url:
            url = database_url(url)
            data_dir = Path(env.get("MANAGEMENT_DATA_DIR", "data"))
            if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
                db_path = Path(url.removeprefix("sqlite:///"))
                data_dir = db_path.parent
        else:
            raw_path = env.get("MANAGEMENT_DB_PATH", DEFAULT_DB_PATH).strip()
            if not raw_path:
                raise ConfigError("MANAGEMENT_DB_PATH", "must not be empty")
            db_path = Path(raw_path)
            url = f"sqlite:///{db_path}"
            data_dir = db_path.parent
        key_file = Path(env.get("MANAGEMENT_SECRET_KEY_FILE", "") or data_dir / SECRET_KEY_FILENAME)
        return cls(
            database_url=url,
            db_path=db_path,
            host=reader.text("MANAGEMENT_HOST", "0.0.0.0"),  # noqa: S104
            port=reader.number("MANAGEMENT_PORT", 8000, int, 1, 65535),
            workers=reader.number("MANAGEMENT_WORKERS", 1, int, 1, 64),
            reload=reader.flag("MANAGEMENT_RELOAD", False),
            secret_key=env.get("MANAGEMENT_SECRET_KEY") or None,
            secret_key_file=key_file,
            signup=reader.choice("MANAGEMENT_SIGNUP", SignupPolicy.FIRST, SignupPolicy),
            log_format=reader.choice_text("MANAGEMENT_LOG_FORMAT", "auto", ("auto", "json", "console")),
            log_level=reader.choice_text("MANAGEMENT_LOG_LEVEL", "info",
                                         ("debug", "info", "warning", "error")),
            max_body_bytes=reader.number("MANAGEMENT_MAX_BODY_BYTES", 1024 * 1024, int, 1024, 64 * 1024 * 1024),
            max_agents_per_user=reader.number("MANAGEMENT_MAX_AGENTS_PER_USER", 1000, int, 1, 100_000),
            auth_failure_limit=reader.number("MANAGEMENT_AUTH_FAILURE_LIMIT", 20, int, 1, 1_000_000),
            auth_failure_window=reader.number("MANAGEMENT_AUTH_FAILURE_WINDOW", 60.0, float, 1, 86400),
            db_busy_timeout=reader.number("MANAGEMENT_DB_BUSY_TIMEOUT", 10.0, float, 0.1, 600),
            db_pool_size=reader.number("MANAGEMENT_DB_POOL_SIZE", 5, int, 1, 100),
            db_connect_wait=reader.number("MANAGEMENT_DB_CONNECT_WAIT", 30.0, float, 0, 3600),
            ssh_connect_timeout=reader.number("MANAGEMENT_SSH_CONNECT_TIMEOUT", 10.0, float, 0.1, 600),
            ssh_command_timeout=reader.number("MANAGEMENT_SSH_COMMAND_TIMEOUT", 60.0, float, 0.1, 3600),
            ssh_idle_timeout=reader.number("MANAGEMENT_SSH_IDLE_TIMEOUT", 300.0, float, 1, 86400),
            trusted_proxies=reader.proxies("MANAGEMENT_TRUSTED_PROXIES", "127.0.0.1,::1"),
            max_output_bytes=reader.number("MANAGEMENT_MAX_OUTPUT_BYTES", 4 * 1024 * 1024, int, 64 * 1024,
                                           1024 * 1024 * 1024),
            agent_networks=reader.networks("MANAGEMENT_AGENT_NETWORKS"),
            max_operations_per_user=reader.number("MANAGEMENT_MAX_OPERATIONS_PER_USER", 16, int, 1, 10_000),
            allow_plain_http=reader.flag("MANAGEMENT_ALLOW_PLAIN_HTTP", False),
            metrics_token=reader.token("MANAGEMENT_METRICS_TOKEN"),
            metrics_min_interval=reader.number("MANAGEMENT_METRICS_MIN_INTERVAL", 10.0, float, 0, 3600),
            metrics_dir=Path(env["MANAGEMENT_METRICS_DIR"]) if env.get("MANAGEMENT_METRICS_DIR", "").strip() else None,
            fleet_parallelism=reader.number("MANAGEMENT_FLEET_PARALLELISM", 256, int, 1, 10_000),
            ssh_failure_ttl=reader.number("MANAGEMENT_SSH_FAILURE_TTL", 15.0, float, 0, 3600),
            vm_domain_type=reader.choice_text("MANAGEMENT_VM_DOMAIN_TYPE", "kvm", ("kvm", "qemu")),
            max_consoles_per_user=reader.number("MANAGEMENT_MAX_CONSOLES_PER_USER", 4, int, 1, 10_000),
            console_idle_timeout=reader.number("MANAGEMENT_CONSOLE_IDLE_TIMEOUT", 900.0, float, 1, 86400),
            console_ticket_seconds=reader.number("MANAGEMENT_CONSOLE_TICKET_SECONDS", 30, int, 1, 30),
            console_max_seconds=reader.number("MANAGEMENT_CONSOLE_MAX_SECONDS", 8 * 3600.0, float, 1, 7 * 86400),
            # issue 18
            event_retention=reader.number("MANAGEMENT_EVENT_RETENTION", 10_000, int, 100, 10_000_000),
            watchers=reader.flag("MANAGEMENT_WATCHERS", True),
            mirror_max_age=reader.number("MANAGEMENT_MIRROR_MAX_AGE", 5.0, float, 0, 3600),
            watch_lease_seconds=reader.number("MANAGEMENT_WATCH_LEASE_SECONDS", 6.0, float, 1, 600),
            watch_idle=reader.number("MANAGEMENT_WATCH_IDLE", 600.0, float, 1, 30 * 86400),
            # --- web console (issue 19)
            session_lifetime=reader.number("MANAGEMENT_SESSION_LIFETIME", 12 * 3600.0, float, 1, 30 * 86400),
            session_idle=reader.number("MANAGEMENT_SESSION_IDLE", 30 * 60.0, float, 1, 30 * 86400),
            # --- webhooks (issue 18)
            webhook_networks=reader.networks("MANAGEMENT_WEBHOOK_ALLOW"),
            webhook_timeout=reader.number("MANAGEMENT_WEBHOOK_TIMEOUT", 10.0, float, 0.5, 60),
            webhook_max_attempts=reader.number("MANAGEMENT_WEBHOOK_MAX_ATTEMPTS", 12, int, 1, 50),
            webhook_retry_base=reader.number("MANAGEMENT_WEBHOOK_RETRY_BASE", 10.0, float, 0.01, 3600),
            webhook_deliveries=reader.flag("MANAGEMENT_WEBHOOK_DELIVERIES", True),
        )


@attrs.frozen
class _Reader:
    env: Mapping[str, str]

    def text(self, name: str, default: str) -> str:
        value = self.env.get(name, default).strip()
        if not value:
            raise ConfigError(name, "must not be empty")
        return value

    def number(self, name: str, default: T, kind: Callable[[str], T], low: float, high: float) -> T:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ConfigError(name, f"must be a number, got {raw!r}") from None
        if not low <= value <= high:  # type: ignore[operator]
            raise ConfigError(name, f"must be between {low:g} and {high:g}, got {raw!r}")
        return value

    def token(self, name: str) -> str | None:
        """A bearer token: unset or blank for none; otherwise at least 32 printable ASCII characters
        without spaces (guessing it must be hopeless: ``openssl rand -hex 32``)."""
        raw = self.env.get(name, "").strip()
        if not raw:
            return None
        if len(raw) < 32 or len(raw) > 512 or not all("!" <= char <= "~" for char in raw):
            raise ConfigError(name, "must be 32 to 512 printable ASCII characters without spaces "
                                    "(e.g. the output of 'openssl rand -hex 32')")
        return raw

    def proxies(self, name: str, default: str) -> str:
        """Comma-separated IP addresses or networks (or empty: trust no proxy header)."""
        raw = self.env.get(name)
        if raw is None:
            return default
        items = [item.strip() for item in raw.split(",") if item.strip()]
        for item in items:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(name, f"{item!r} is not an IP address or network") from None
        return ",".join(items)

    def networks(self, name: str) -> AgentNetworks:
        """Comma-separated networks agents may point at; unset or blank: the default policy."""
        try:
            return AgentNetworks.parse(self.env.get(name), name)
        except ValueError as error:
            raise ConfigError(name, str(error)) from None

    def flag(self, name: str, default: bool) -> bool:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        value = raw.strip().lower()
        if value in {"1", "true", "yes", "on"}:
            return True
        if value in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(name, f"must be true/false (or 1/0), got {raw!r}")

    def choice(self, name: str, default: SignupPolicy, kind: type[SignupPolicy]) -> SignupPolicy:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return kind(raw.strip().lower())
        except ValueError:
            allowed = "|".join(p.value for p in kind)
            raise ConfigError(name, f"must be one of {allowed}, got {raw!r}") from None

    def choice_text(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.env.get(name, default).strip().lower() or default
        if value not in allowed:
            raise ConfigError(name, f"must be one of {'|'.join(allowed)}, got {value!r}")
        return value
