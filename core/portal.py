"""The portal's use cases, one service per aggregate, assembled from the ports.

``assemble`` wires services to each other (the remote-command runner, the audit log and the
keyring are shared); which adapters fill the ports is decided by the composition root
(``entrypoints/bootstrap.py``) or by a test. Services whose ``runs_on_event_loop`` is true are
``async``; the others are plain functions that talk to storage (run them in a thread from async
code).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import attrs

from core.agents import MAX_AGENTS_PER_USER, AgentService
from core.audit import AuditLog
from core.consoles import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONSOLES_PER_USER,
    DEFAULT_MAX_SECONDS,
    TICKET_SECONDS,
    ConsoleService,
)
from core.credentials import Keyring
from core.events import EVENT_RETENTION, EventLog
from core.fleet import FLEET_PARALLELISM, FleetService
from core.keys import KeyService
from core.metrics import MIN_INTERVAL, FleetMetrics
from core.model import SignupPolicy
from core.ports import (
    AgentAddresses,
    Clock,
    KeyHasher,
    Observer,
    RemoteShell,
    SecretBox,
    SeedImages,
    SshKeys,
    Storage,
    TicketDigests,
    WebhookSender,
)
from core.provisioning import ProvisioningService
from core.remote import RemoteCommands
from core.snapshots import SnapshotService
from core.users import UserService
from core.vms import POLL_GRACE, POLL_INTERVAL, VmService
from core.watch import LEASE_SECONDS, MAX_AGE, RENEW_EVERY, WATCH_IDLE, WatchService
from core.web_sessions import SESSION_IDLE, SESSION_LIFETIME, WebSessionService
from core.webhook_rules import MAX_ATTEMPTS, RETRY_BASE
from core.webhooks import WebhookService


@attrs.frozen
class Portal:
    """Every service of the portal: what the HTTP API, the command line and the library call."""

    users: UserService
    agents: AgentService
    vms: VmService
    snapshots: SnapshotService
    fleet: FleetService
    audit: AuditLog
    remote: RemoteCommands
    keys: KeyService  # API keys and scopes (issue 20)
    metrics: FleetMetrics  # the fleet for Prometheus (issue 21)
    provisioning: ProvisioningService  # issue 16
    consoles: ConsoleService  # issue 17
    events: EventLog  # live state and events (issue 18)
    watch: WatchService
    sessions: WebSessionService  # the web console's browser sessions (issue 19)
    webhooks: WebhookService = attrs.field(kw_only=True)  # signed webhooks (issue 18)


def assemble(
    *,
    storage: Storage,
    hasher: KeyHasher,
    secrets: SecretBox,
    ssh_keys: SshKeys,
    clock: Clock,
    signup: SignupPolicy = SignupPolicy.FIRST,
    shell: RemoteShell | None = None,
    poll_interval: float = POLL_INTERVAL,
    poll_grace: float = POLL_GRACE,
    fleet_parallelism: int = FLEET_PARALLELISM,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    max_agents: int = MAX_AGENTS_PER_USER,
    addresses: AgentAddresses | None = None,
    metrics_min_interval: float = MIN_INTERVAL,
    observer: Observer | None = None,
    seeds: SeedImages | None = None,
    domain_type: str = "kvm",
    tickets: TicketDigests | None = None,
    max_consoles: int = DEFAULT_MAX_CONSOLES_PER_USER,
    console_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    console_max_seconds: float = DEFAULT_MAX_SECONDS,
    console_ticket_seconds: int = TICKET_SECONDS,
    event_retention: int = EVENT_RETENTION,
    mirror_max_age: float = MAX_AGE,
    lease_seconds: float = LEASE_SECONDS,
    renew_every: float = RENEW_EVERY,
    watch_idle: float = WATCH_IDLE,
    session_lifetime: timedelta = SESSION_LIFETIME,
    session_idle: timedelta = SESSION_IDLE,
    webhook_sender: WebhookSender | None = None,
    webhook_max_attempts: int = MAX_ATTEMPTS,
    webhook_retry_base: float = RETRY_BASE,
) -> Portal:
    """The services over these ports; each gets only the ports it uses."""
    events = EventLog(storage=storage, clock=clock, retention=event_retention)
    audit = AuditLog(storage=storage, clock=clock, events=events)
    keyring = Keyring(secrets)
    remote = RemoteCommands(storage=storage, keyring=keyring, clock=clock, audit=audit, shell=shell)
    watch = WatchService(storage=storage, keyring=keyring, shell=shell, clock=clock, events=events,
                         lease_seconds=lease_seconds, renew_every=renew_every, max_age=mirror_max_age,
                         idle=watch_idle)
    vms = VmService(remote=remote, poll_interval=poll_interval, poll_grace=poll_grace, monotonic=monotonic,
                    sleep=sleep, live=watch)
    users = UserService(storage=storage, hasher=hasher, clock=clock, audit=audit, signup=signup)
    return Portal(
        users=users,
        agents=AgentService(storage=storage, keyring=keyring, ssh_keys=ssh_keys, clock=clock, audit=audit,
                            shell=shell, max_agents=max_agents, addresses=addresses),
        vms=vms,
        snapshots=SnapshotService(remote=remote),
        fleet=FleetService(remote=remote, fleet_parallelism=fleet_parallelism, monotonic=monotonic, live=watch),
        audit=audit,
        remote=remote,
        keys=KeyService(storage=storage, hasher=hasher, clock=clock, audit=audit),
        metrics=FleetMetrics(remote=remote, min_interval=metrics_min_interval, monotonic=monotonic,
                             observer=observer),
        provisioning=ProvisioningService(remote=remote, vms=vms, seeds=seeds, ssh_keys=ssh_keys,
                                         domain_type=domain_type),
        consoles=ConsoleService(storage=storage, clock=clock, tickets=tickets, remote=remote,
                                max_per_user=max_consoles, idle_timeout=console_idle_timeout,
                                max_seconds=console_max_seconds, ticket_seconds=console_ticket_seconds,
                                monotonic=monotonic, sleep=sleep),
        events=events,
        watch=watch,
        sessions=WebSessionService(storage=storage, clock=clock, audit=audit, users=users,
                                   lifetime=session_lifetime, idle=session_idle),
        webhooks=WebhookService(storage=storage, secrets=secrets, clock=clock, audit=audit, sender=webhook_sender,
                                max_attempts=webhook_max_attempts, retry_base=webhook_retry_base),
    )
