"""The library facade: drive the portal from a Python automation script, synchronously, in-process.

It opens the same database with the same configuration as the server (the ``MANAGEMENT_*``
variables) and calls the same use cases, so validation, isolation and audit are exactly those of
the HTTP API. Errors are the core's (``core.errors``), each with its stable ``code``::

    from entrypoints.library import connect

    with connect() as portal:                      # reads MANAGEMENT_* like the server
        me = portal.login("mgmt_…")                # act as the owner of this API key
        agent = me.register_agent(name="hv1", hostname="192.0.2.15", username="qemu-admin",
                                  private_key=open("id_ed25519").read())
        for vm in me.vms(agent.id):
            print(vm.name, vm.state)
        me.start_vm(agent.id, "web1")
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from core.audit import AUDIT_PAGE_DEFAULT
from core.commands import AgentChanges, AutostartChange, NewAgent, NewSnapshot, NewUser
from core.errors import ValidationFailed
from core.model import Agent, AgentCredentials, AuditEvent, Caller, Origin, User
from core.portal import Portal
from core.ports import CommandResult
from core.results import AgentCheck, FleetEntry, HostFacts, NewApiKey, VmInfo, WaitedAction
from core.virsh import Snapshot, VmAction, VmStats, VmSummary
from entrypoints import bootstrap
from entrypoints.settings import Settings
from entrypoints.shapes import structure

T = TypeVar("T")


def connect(env: Mapping[str, str] | None = None, *, settings: Settings | None = None) -> PortalLibrary:
    """Open the portal described by ``settings`` (default: the ``MANAGEMENT_*`` environment)."""
    return PortalLibrary(settings or Settings.from_env(env))


class PortalLibrary:
    """An open portal. Use it as a context manager, or call ``close()`` when done."""

    def __init__(self, settings: Settings, *, runtime: bootstrap.Runtime | None = None) -> None:
        self._runtime = runtime or bootstrap.build_runtime(settings)
        self.portal: Portal = self._runtime.portal
        # VM operations are asynchronous inside; one private event loop carries them (and the SSH
        # connection pool) across calls, so consecutive calls reuse connections.
        self._runner = asyncio.Runner()

    def __enter__(self) -> PortalLibrary:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close SSH connections and the database."""
        try:
            self._runner.run(self._runtime.close_connections())
        finally:
            self._runner.close()
            self._runtime.close()

    def _await(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coroutine)

    def login(self, api_key: str) -> Session:
        """Act as the owner of ``api_key``; raises ``core.errors.Unauthenticated`` if it is not valid."""
        return Session(self, self.portal.users.authenticate(api_key))

    def login_as(self, user: User) -> Session:
        """Act as ``user`` without their key: for the host's operator (e.g. to rotate a lost key)."""
        return Session(self, user)

    def create_user(self, name: str, email: str | None = None) -> NewApiKey:
        """Create a user as the host's operator (the sign-up policy does not apply here)."""
        return self.portal.users.create_user(structure({"name": name, "email": email}, NewUser), _origin())


class Session:
    """What one user can do. Every call is checked, scoped and audited as an HTTP request would be."""

    def __init__(self, library: PortalLibrary, user: User) -> None:
        self._library = library
        self.portal = library.portal
        self.user = user

    def _caller(self) -> Caller:
        origin = _origin()
        return Caller(user=self.user, request_id=origin.request_id, client_address=origin.client_address)

    def rotate_api_key(self) -> str:
        """A new API key for this user (returned once); the old key stops working at once."""
        rotated = self.portal.users.rotate_api_key(self._caller())
        self.user = rotated.user
        return rotated.api_key

    def agents(self) -> list[Agent]:
        return self.portal.agents.list_agents(self._caller())

    def agent(self, agent_id: int) -> Agent:
        return self.portal.agents.get_agent(self._caller(), agent_id)

    def register_agent(self, **fields: Any) -> Agent:
        """Register an agent; keyword arguments are the fields of ``POST /agents``
        (``generate_key=True`` instead of ``private_key`` has the portal generate the key pair)."""
        return self.portal.agents.register_agent(self._caller(), structure(fields, NewAgent))

    def rotate_agent_key(self, agent_id: int) -> Agent:
        """Replace the agent's key with a new generated ed25519 pair; the answer's
        ``client_key.public_key`` must go into the hypervisor's authorized_keys."""
        return self.portal.agents.rotate_agent_key(self._caller(), agent_id)

    def update_agent(self, agent_id: int, **changes: Any) -> Agent:
        """Change fields of an agent; keyword arguments are the fields of ``PATCH /agents/{id}``."""
        return self.portal.agents.update_agent(self._caller(), agent_id, structure(changes, AgentChanges))

    def delete_agent(self, agent_id: int) -> None:
        self.portal.agents.delete_agent(self._caller(), agent_id)

    def credentials(self, agent_id: int) -> AgentCredentials:
        """The agent's private key and passphrase in clear (audited)."""
        return self.portal.agents.read_credentials(self._caller(), agent_id)

    def audit_events(self, *, limit: int = AUDIT_PAGE_DEFAULT, before: int | None = None) -> list[AuditEvent]:
        return self.portal.audit.audit_events(self._caller(), limit=limit, before=before)

    # VMs, over SSH

    def vms(self, agent_id: int) -> list[VmSummary]:
        """The agent's VMs (``virsh list --all``)."""
        return self._library._await(self.portal.vms.list_vms(self._caller(), agent_id))

    def vm_info(self, agent_id: int, vm: str) -> VmInfo:
        """``virsh dominfo`` for one VM, parsed (``.dominfo``) and raw (``.raw``)."""
        return self._library._await(self.portal.vms.vm_info(self._caller(), agent_id, vm))

    def vm_action(self, agent_id: int, vm: str, action: VmAction | str) -> CommandResult:
        """Run ``start``, ``shutdown``, ``force-stop``, ``reboot``, ``suspend`` or ``resume`` on a VM."""
        return self._library._await(self.portal.vms.vm_action(self._caller(), agent_id, vm, _action(action)))

    def start_vm(self, agent_id: int, vm: str) -> CommandResult:
        return self.vm_action(agent_id, vm, VmAction.START)

    def shutdown_vm(self, agent_id: int, vm: str) -> CommandResult:
        return self.vm_action(agent_id, vm, VmAction.SHUTDOWN)

    def force_stop_vm(self, agent_id: int, vm: str) -> CommandResult:
        return self.vm_action(agent_id, vm, VmAction.FORCE_STOP)

    def reboot_vm(self, agent_id: int, vm: str) -> CommandResult:
        return self.vm_action(agent_id, vm, VmAction.REBOOT)

    def suspend_vm(self, agent_id: int, vm: str) -> CommandResult:
        return self.vm_action(agent_id, vm, VmAction.SUSPEND)

    def resume_vm(self, agent_id: int, vm: str) -> CommandResult:
        return self.vm_action(agent_id, vm, VmAction.RESUME)

    # VMs beyond the lifecycle

    def vm_action_and_wait(self, agent_id: int, vm: str, action: VmAction | str, wait: int,
                           progress: Callable[[str | None, float], None] | None = None) -> WaitedAction:
        """Run an action, then wait up to ``wait`` seconds (0-300) for the VM to reach the action's state
        (``.state``); raises ``core.errors.WaitTimedOut`` (``.state``: where it is) when time is up.
        ``progress(state, elapsed_seconds)`` is called after every poll."""
        return self._library._await(
            self.portal.vms.vm_action_and_wait(self._caller(), agent_id, vm, _action(action), wait, progress))

    def set_autostart(self, agent_id: int, vm: str, enabled: bool) -> CommandResult:
        """Have libvirt start the VM with the host (``True``), or not (``False``; nothing else)."""
        change = structure({"enabled": enabled}, AutostartChange)
        return self._library._await(self.portal.vms.set_autostart(self._caller(), agent_id, vm, change.enabled))

    def vm_stats(self, agent_id: int, vm: str) -> VmStats:
        """``virsh domstats``: state, CPU time, vCPUs, balloon memory, disk and network counters."""
        return self._library._await(self.portal.vms.vm_stats(self._caller(), agent_id, vm))

    def snapshots(self, agent_id: int, vm: str) -> list[Snapshot]:
        return self._library._await(self.portal.snapshots.list_snapshots(self._caller(), agent_id, vm))

    def create_snapshot(self, agent_id: int, vm: str, name: str, description: str | None = None) -> Snapshot:
        request = structure({"name": name, "description": description}, NewSnapshot)
        return self._library._await(self.portal.snapshots.create_snapshot(self._caller(), agent_id, vm, request))

    def revert_snapshot(self, agent_id: int, vm: str, snapshot: str) -> CommandResult:
        return self._library._await(self.portal.snapshots.revert_snapshot(self._caller(), agent_id, vm, snapshot))

    def delete_snapshot(self, agent_id: int, vm: str, snapshot: str) -> None:
        self._library._await(self.portal.snapshots.delete_snapshot(self._caller(), agent_id, vm, snapshot))

    def fleet(self, *, agent_ids: Sequence[int] = (), states: Sequence[str] = ()) -> list[FleetEntry]:
        """Every VM on every agent of yours (or of ``agent_ids``), agents asked in parallel; an agent
        that fails has ``.vms`` None and ``.error`` (code, detail)."""
        if isinstance(agent_ids, str | bytes) or not all(isinstance(a, int) and not isinstance(a, bool)
                                                         for a in agent_ids):
            raise ValidationFailed.one("agent", "must be a sequence of agent ids (integers)")
        return self._library._await(self.portal.fleet.fleet(self._caller(), agent_ids=agent_ids, states=states))

    def host(self, agent_id: int) -> HostFacts:
        """The agent's host name, ``virsh nodeinfo`` and versions."""
        return self._library._await(self.portal.fleet.host_facts(self._caller(), agent_id))

    def check_agent(self, agent_id: int) -> AgentCheck:
        """Reachable, authenticated, libvirt reachable, round trip; never raises for a failing host."""
        return self._library._await(self.portal.fleet.check_agent(self._caller(), agent_id))


def _action(action: VmAction | str) -> VmAction:
    """``action`` as a ``VmAction``; a name that is none is a ``ValidationFailed`` like any bad input."""
    try:
        return VmAction(action)
    except ValueError:
        choices = ", ".join(a.value for a in VmAction)
        raise ValidationFailed.one("action", f"must be one of {choices}") from None


def _origin() -> Origin:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    return Origin(request_id=f"lib-{uuid.uuid4().hex}", client_address=f"local:{who}"[:64])
