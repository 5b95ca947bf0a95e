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
from core.credentials import Keyring
from core.fleet import FLEET_PARALLELISM, FleetService
from core.model import SignupPolicy
from core.ports import AgentAddresses, Clock, KeyHasher, RemoteShell, SecretBox, SshKeys, Storage
from core.remote import RemoteCommands
from core.snapshots import SnapshotService
from core.users import UserService
from core.vms import POLL_GRACE, POLL_INTERVAL, VmService
from core.web_sessions import SESSION_IDLE, SESSION_LIFETIME, WebSessionService


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
    sessions: WebSessionService  # the web console's browser sessions (issue 19)


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
    session_lifetime: timedelta = SESSION_LIFETIME,
    session_idle: timedelta = SESSION_IDLE,
) -> Portal:
    """The services over these ports; each gets only the ports it uses."""
    audit = AuditLog(storage=storage, clock=clock)
    keyring = Keyring(secrets)
    remote = RemoteCommands(storage=storage, keyring=keyring, clock=clock, audit=audit, shell=shell)
    users = UserService(storage=storage, hasher=hasher, clock=clock, audit=audit, signup=signup)
    return Portal(
        users=users,
        agents=AgentService(storage=storage, keyring=keyring, ssh_keys=ssh_keys, clock=clock, audit=audit,
                            shell=shell, max_agents=max_agents, addresses=addresses),
        vms=VmService(remote=remote, poll_interval=poll_interval, poll_grace=poll_grace, monotonic=monotonic,
                      sleep=sleep),
        snapshots=SnapshotService(remote=remote),
        fleet=FleetService(remote=remote, fleet_parallelism=fleet_parallelism, monotonic=monotonic),
        audit=audit,
        remote=remote,
        sessions=WebSessionService(storage=storage, clock=clock, audit=audit, users=users,
                                   lifetime=session_lifetime, idle=session_idle),
    )
