"""The composition root: the one place that builds adapters and wires them into the core.

The HTTP app, the command line and the library facade all get their ``Portal`` from here.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from collections.abc import Callable
from datetime import timedelta

import attrs
import sqlalchemy
import structlog

from adapters.clock import SystemClock
from adapters.hashing import HmacKeyHasher, HmacTicketDigests, api_key_pepper, console_ticket_pepper
from adapters.prometheus import PrometheusObserver, mark_process_dead
from adapters.sealing import AesGcmSecretBox, SecretKeyError, decode_key, generate_key, load_or_create_key_file
from adapters.seed_iso import PycdlibSeedImages
from adapters.sql import migrations
from adapters.sql.storage import SqlStorage
from adapters.ssh import AsyncsshShell, ResolvingAgentAddresses
from adapters.sshkeys import AsyncsshKeys
from adapters.webhook_http import HttpWebhookSender
from core.errors import DatabaseBusy, DatabaseUnavailable, PortalError, SecretUnreadable
from core.portal import Portal, assemble
from core.ports import (
    AgentAddresses,
    Clock,
    KeyHasher,
    NullObserver,
    Observer,
    RemoteShell,
    SecretBox,
    SshKeys,
    Storage,
    TicketDigests,
    WebhookSender,
)
from entrypoints.settings import ConfigError, Settings, secrets_of_url, shown_url


@attrs.define
class Runtime:
    """A wired portal and the resources to release when done with it."""

    settings: Settings
    portal: Portal
    storage: Storage
    shell: RemoteShell
    # The portal's own metrics (issue 21): what the HTTP layer tells, and the text of GET /metrics.
    observer: Observer = attrs.field(factory=NullObserver)
    exposition: Callable[[], bytes] | None = None

    async def close_connections(self) -> None:
        """Close pooled SSH connections (a worker shutting down, a script finishing)."""
        await self.shell.close()

    def close(self) -> None:
        """Release the database (call ``close_connections`` first from async code)."""
        dispose = getattr(self.storage, "dispose", None)
        if dispose is not None:
            dispose()


log = structlog.get_logger("manage_playrservers.startup")

LATEST_SCHEMA_VERSION = migrations.LATEST


def metrics_worker_exited(pid: int) -> None:
    """A server worker exited: its live gauges leave the portal's metrics (its counters stay)."""
    mark_process_dead(pid)


def new_secret_key() -> str:
    """A new random value for ``MANAGEMENT_SECRET_KEY``."""
    return generate_key()


def open_storage(settings: Settings, *, migrate: bool = True, observer: Observer | None = None) -> SqlStorage:
    """The SQL storage, migrated to the latest schema (safe from several processes at once).

    A new SQLite file is created 0600 in a 0700 directory: it holds sealed keys and audit history
    (SQLite gives its -wal and -shm files the database file's mode). A database *server* that
    cannot be reached yet (booting alongside the portal, restarting) is waited for up to
    ``MANAGEMENT_DB_CONNECT_WAIT`` seconds, then ``Unavailable`` (exit 1: a service manager
    restarts the portal); anything else wrong with the database is a ``ConfigError`` (exit 2)."""
    deadline = time.monotonic() + settings.db_connect_wait
    while True:
        try:
            return _open_storage(settings, migrate=migrate, observer=observer)
        except _ServerNotReachable as error:
            if time.monotonic() >= deadline:
                raise DatabaseUnavailable(f"{error} (waited {settings.db_connect_wait:g} s, "
                                  "MANAGEMENT_DB_CONNECT_WAIT)") from error.__cause__
            log.warning("database_not_reachable_yet", reason=str(error),
                        retrying_for_seconds=round(max(0.0, deadline - time.monotonic()), 1))
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


class _ServerNotReachable(Exception):
    """The database server cannot be reached yet (worth waiting for); the message says why."""


# What a database server that is down, starting, restarting or unreachable makes the driver say.
_NOT_REACHABLE = ("connection refused", "could not connect", "timeout expired", "timed out", "starting up",
                  "shutting down", "no route to host", "network is unreachable", "server closed the connection",
                  "temporary failure in name resolution", "connection reset")


def _open_storage(settings: Settings, *, migrate: bool, observer: Observer | None = None) -> SqlStorage:
    variable = "MANAGEMENT_DB_PATH" if settings.db_path is not None and settings.database_url.startswith(
        "sqlite:///") and "MANAGEMENT_DATABASE_URL" not in os.environ else "MANAGEMENT_DATABASE_URL"
    storage: SqlStorage | None = None
    try:
        if settings.db_path is not None and not settings.db_path.exists():
            settings.db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(settings.db_path, os.O_CREAT | os.O_WRONLY, 0o600))
        storage = SqlStorage(settings.database_url, busy_timeout=settings.db_busy_timeout,
                             pool_size=settings.db_pool_size, observer=observer)
        if migrate:
            # Migration 4 re-keys old API-key digests with the server key's pepper: the key is read
            # only if there is one to re-key (once), so opening a new database never needs it.
            hasher = functools.cache(lambda: key_hasher(settings))
            storage.upgrade(rekey_api_key_digest=lambda digest: hasher().rekey(digest))
        else:
            storage.schema_version()
    except ConfigError:  # the secret key, needed by migration 4, is unusable: the error names it
        if storage is not None:
            storage.dispose()
        raise
    except (OSError, ImportError, RuntimeError, sqlalchemy.exc.SQLAlchemyError, PortalError) as error:
        if storage is not None:
            storage.dispose()
        url = sqlalchemy.engine.make_url(settings.database_url)
        cause = error.__cause__ if isinstance(error, PortalError) and error.__cause__ is not None else error
        reason = (str(getattr(cause, "orig", None) or cause).strip().splitlines() or [type(cause).__name__])[0]
        for secret in secrets_of_url(url):  # never print one, whatever the driver put in its message
            reason = reason.replace(secret, "***")
        message = f"cannot open the database {shown_url(url)}: {reason}"
        busy = isinstance(error, DatabaseBusy)  # another instance migrating
        if not url.drivername.startswith("sqlite") and (busy or any(w in reason.lower() for w in _NOT_REACHABLE)):
            raise _ServerNotReachable(message) from error
        raise ConfigError(variable, message) from error
    return storage


def secret_box(settings: Settings) -> AesGcmSecretBox:
    return AesGcmSecretBox(server_key(settings))


def key_hasher(settings: Settings) -> HmacKeyHasher:
    """API-key digests keyed with a pepper derived from the server key (``adapters.hashing``)."""
    return HmacKeyHasher(api_key_pepper(server_key(settings)))


def server_key(settings: Settings) -> bytes:
    """The server's secret key: ``MANAGEMENT_SECRET_KEY``, or the key file (created on first use)."""
    try:
        if settings.secret_key is not None:
            key = decode_key(settings.secret_key, source="MANAGEMENT_SECRET_KEY")
        else:
            key = load_or_create_key_file(settings.secret_key_file)
    except SecretKeyError as error:
        variable = "MANAGEMENT_SECRET_KEY" if settings.secret_key else "MANAGEMENT_SECRET_KEY_FILE"
        raise ConfigError(variable, str(error)) from error
    except OSError as error:
        raise ConfigError("MANAGEMENT_SECRET_KEY_FILE", f"cannot use {settings.secret_key_file}: {error}") from error
    return key


# --- scale (issue 22)
FDS_RESERVED = 256  # descriptors kept for everything but the fleet view's new SSH connections


def fleet_parallelism(settings: Settings, open_files_limit: int | None = None) -> int:
    """Agents the fleet view asks at once: ``MANAGEMENT_FLEET_PARALLELISM``, but never more than
    half the descriptors the process may open past a reserve (each agent asked on a cold pool opens
    a connection, a descriptor; the other half is for pooled connections, the database and clients).
    scripts/install.sh gives the unit a LimitNOFILE that leaves the setting whole."""
    limit = open_files_limit if open_files_limit is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return settings.fleet_parallelism
    return max(1, min(settings.fleet_parallelism, (limit - FDS_RESERVED) // 2))


def build_runtime(
    settings: Settings,
    *,
    storage: Storage | None = None,
    hasher: KeyHasher | None = None,
    secrets: SecretBox | None = None,
    ssh_keys: SshKeys | None = None,
    clock: Clock | None = None,
    shell: RemoteShell | None = None,
    metrics: PrometheusObserver | None = None,
) -> Runtime:
    """Wire the portal. Tests may pass fakes for any port; everything else gets the real adapter."""
    # Each adapter is assigned to its port's type: an adapter that stops implementing its port is
    # a type error here (mypy --strict runs over every package).
    prometheus = metrics if metrics is not None else PrometheusObserver()
    observer: Observer = prometheus
    storage = storage if storage is not None else open_storage(settings, observer=observer)
    remote_shell: RemoteShell = shell if shell is not None else AsyncsshShell(
        connect_timeout=settings.ssh_connect_timeout,
        command_timeout=settings.ssh_command_timeout,
        idle_timeout=settings.ssh_idle_timeout,
        max_output_bytes=settings.max_output_bytes,
        max_operations_per_user=settings.max_operations_per_user,
        networks=settings.agent_networks,
        observer=observer,
        failure_ttl=settings.ssh_failure_ttl,
    )
    api_keys: KeyHasher = hasher or key_hasher(settings)
    secret_store: SecretBox = secrets or secret_box(settings)
    key_parser: SshKeys = ssh_keys or AsyncsshKeys()
    system_clock: Clock = clock or SystemClock()
    agent_addresses: AgentAddresses = ResolvingAgentAddresses(settings.agent_networks,
                                                              timeout=settings.ssh_connect_timeout)
    # consoles (issue 17): ticket digests keyed with the server key, like API keys'
    console_tickets: TicketDigests = HmacTicketDigests(console_ticket_pepper(server_key(settings)))
    # webhooks (issue 18): POSTs only to MANAGEMENT_WEBHOOK_ALLOW, checked at each delivery
    webhook_sender: WebhookSender = HttpWebhookSender(settings.webhook_networks, timeout=settings.webhook_timeout)
    portal = assemble(storage=storage, hasher=api_keys, secrets=secret_store, ssh_keys=key_parser,
                      clock=system_clock, signup=settings.signup, shell=remote_shell,
                      max_agents=settings.max_agents_per_user, addresses=agent_addresses,
                      metrics_min_interval=settings.metrics_min_interval, observer=observer,
                      fleet_parallelism=fleet_parallelism(settings),
                      seeds=PycdlibSeedImages(), domain_type=settings.vm_domain_type,
                      tickets=console_tickets, max_consoles=settings.max_consoles_per_user,
                      console_idle_timeout=settings.console_idle_timeout,
                      console_max_seconds=settings.console_max_seconds,
                      console_ticket_seconds=settings.console_ticket_seconds,
                      # issue 18
                      event_retention=settings.event_retention, mirror_max_age=settings.mirror_max_age,
                      lease_seconds=settings.watch_lease_seconds, watch_idle=settings.watch_idle,
                      renew_every=min(settings.watch_lease_seconds / 4, max(0.2, settings.mirror_max_age / 3)),
                      # web console sessions (issue 19)
                      session_lifetime=timedelta(seconds=settings.session_lifetime),
                      session_idle=timedelta(seconds=settings.session_idle),
                      # webhooks (issue 18)
                      webhook_sender=webhook_sender, webhook_max_attempts=settings.webhook_max_attempts,
                      webhook_retry_base=settings.webhook_retry_base)
    try:
        portal.agents.check_secret_key()
    except SecretUnreadable as error:
        variable = "MANAGEMENT_SECRET_KEY" if settings.secret_key else "MANAGEMENT_SECRET_KEY_FILE"
        raise ConfigError(variable, "this key does not open the credentials stored in the database (they were "
                                    "sealed with another key: every instance must use the same key, and a lost "
                                    "key file cannot be replaced by a new one)") from error
    return Runtime(settings=settings, portal=portal, storage=storage, shell=remote_shell, observer=observer,
                   exposition=prometheus.exposition)
