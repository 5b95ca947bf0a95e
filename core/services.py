"""Use cases. Each public method is one thing an operator or script can do, callable from the HTTP
API, the command line and the library facade alike.

Every mutation and every credentials read writes an audit event in the same transaction as the
change; a refused attempt is recorded too (outcome = the error's code) in a transaction of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import attrs

from core import validation, virsh
from core.commands import AgentChanges, NewAgent, NewSnapshot, NewUser, is_set
from core.errors import (
    AgentChanged,
    AgentNameTaken,
    AgentNotFound,
    EmailTaken,
    FieldError,
    NotFound,
    PortalError,
    RemoteError,
    SignupRefused,
    SnapshotNotFound,
    Unauthenticated,
    UserNotFound,
    ValidationFailed,
    WaitTimedOut,
)
from core.model import (
    DEFAULT_LIBVIRT_URI,
    Agent,
    AgentCredentials,
    AuditEvent,
    Caller,
    ClientKey,
    HostKey,
    Origin,
    SignupPolicy,
    User,
    api_key_prefix,
)
from core.ports import (
    Clock,
    CommandResult,
    KeyHasher,
    PinHostKey,
    RemoteShell,
    SecretBox,
    SshKeys,
    Storage,
    Transaction,
)
from core.virsh import NodeInfo, Snapshot, Versions, VmAction, VmStats, VmSummary

T = TypeVar("T")

AUDIT_PAGE_MAX = 500
AUDIT_PAGE_DEFAULT = 100


@attrs.frozen
class VmInfo:
    """``virsh dominfo`` parsed, with the command result it came from."""

    dominfo: dict[str, str | int | None]
    raw: CommandResult


@attrs.frozen
class WaitedAction:
    """A VM action and the wait that followed it: the state reached and how long it took."""

    result: CommandResult
    state: str
    waited_seconds: float


@attrs.frozen
class HostFacts:
    """What a hypervisor says about itself: host name, processors and memory, versions."""

    hostname: str | None
    node: NodeInfo
    versions: Versions


@attrs.frozen
class Failure:
    """Why one part of a larger answer failed: the error's stable code and its detail."""

    code: str
    detail: str

    @classmethod
    def of(cls, error: PortalError) -> Failure:
        return cls(error.code, error.detail)


@attrs.frozen
class FleetEntry:
    """One agent of the fleet view: its VMs, or (``vms`` None) why they could not be listed."""

    agent_id: int
    agent_name: str
    vms: list[VmSummary] | None
    error: Failure | None


@attrs.frozen
class AgentCheck:
    """How an agent answered a check. ``host_key_fingerprint`` is the pinned key's; the round trip
    is one virsh command over the pooled connection (connecting first if none was open)."""

    reachable: bool
    authenticated: bool
    host_key_fingerprint: str | None
    libvirt_reachable: bool
    round_trip_ms: float | None
    error: Failure | None


POLL_INTERVAL = 0.25  # seconds between two state polls while waiting
POLL_GRACE = 2.0  # seconds one state poll may run past the wait's deadline before the wait gives up
FLEET_PARALLELISM = 8  # agents asked at once by the fleet view


@attrs.frozen
class NewApiKey:
    """A user together with the plaintext API key just issued to them (shown once)."""

    user: User
    api_key: str = attrs.field(repr=False)


class Portal:
    """The portal's use cases, wired to its ports by the composition root."""

    def __init__(
        self,
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
    ) -> None:
        self.storage = storage
        self.hasher = hasher
        self.secrets = secrets
        self.ssh_keys = ssh_keys
        self.clock = clock
        self.signup = signup
        self.shell = shell
        # Waiting on a VM's state: how often to poll, and the clock and sleep to do it with
        # (injectable, so tests wait on a fake clock instead of the wall clock).
        self.poll_interval = poll_interval
        self.poll_grace = poll_grace
        self.fleet_parallelism = fleet_parallelism
        self._monotonic = monotonic
        self._sleep = sleep

    # ------------------------------------------------------------------ users and API keys

    def sign_up(self, request: NewUser, origin: Origin) -> NewApiKey:
        """Create a user through the unauthenticated door, as the sign-up policy allows."""
        return self._create_user(request, origin, by_operator=False)

    def create_user(self, request: NewUser, origin: Origin) -> NewApiKey:
        """Create a user on behalf of the host's operator (command line); ignores the sign-up policy."""
        return self._create_user(request, origin, by_operator=True)

    def _create_user(self, request: NewUser, origin: Origin, *, by_operator: bool) -> NewApiKey:
        errors = _collect(
            ("name", validation.check_name(request.name)),
            ("email", validation.check_email(request.email) if request.email is not None else None),
        )
        if errors:
            raise ValidationFailed(errors)
        key = self.hasher.issue()
        now = self.clock.now()
        with self.storage.transaction(write=True) as tx:
            if not by_operator:
                self._check_signup_allowed(tx)
            if request.email is not None and tx.find_user_by_email(request.email) is not None:
                raise EmailTaken()
            user = tx.add_user(request.name, request.email, key, now)
            tx.add_audit_event(
                self._event(user.id, "user.create", origin.request_id, origin.client_address)
            )
        return NewApiKey(user, key.plaintext)

    def _check_signup_allowed(self, tx: Transaction) -> None:
        how = (
            "ask the portal's operator to run `manage-playrservers users create --name NAME` "
            "on the portal host, or to set MANAGEMENT_SIGNUP=open"
        )
        if self.signup is SignupPolicy.CLOSED:
            raise SignupRefused(f"sign-up is closed on this portal; {how}")
        if self.signup is SignupPolicy.FIRST and tx.count_users() > 0:
            raise SignupRefused(f"sign-up is closed: this portal already has its first user; {how}")

    def list_users(self) -> list[User]:
        """Every user of the portal (for the host's operator, on the command line)."""
        with self.storage.transaction() as tx:
            return tx.list_users()

    def find_user(self, *, user_id: int | None = None, email: str | None = None) -> User:
        """A user by id or e-mail address (for the host's operator)."""
        with self.storage.transaction() as tx:
            if user_id is not None:
                user = tx.get_user(user_id)
            elif email is not None:
                user = tx.find_user_by_email(email)
            else:
                user = None
        if user is None:
            raise UserNotFound()
        return user

    def authenticate(self, api_key: str) -> User:
        """The user who owns ``api_key``; raises ``Unauthenticated`` for anything else."""
        prefix = api_key_prefix(api_key)
        if prefix is None:
            raise Unauthenticated("the API key is malformed")
        with self.storage.transaction() as tx:
            stored = tx.find_api_key(prefix)
            if stored is None or not self.hasher.matches(api_key, stored.digest):
                raise Unauthenticated("the API key is not valid")
            user = tx.get_user(stored.user_id)
        if user is None:  # pragma: no cover - keys are deleted with their user
            raise Unauthenticated("the API key is not valid")
        return user

    def rotate_api_key(self, caller: Caller) -> NewApiKey:
        """Issue a new API key for the caller; the old one stops working at once."""
        key = self.hasher.issue()
        with self._audited(caller, "user.rotate_api_key") as audit, audit.write() as tx:
            tx.replace_api_key(caller.user.id, key, self.clock.now())
            user = tx.get_user(caller.user.id)
        assert user is not None
        return NewApiKey(user, key.plaintext)

    # ------------------------------------------------------------------ agents

    def register_agent(self, caller: Caller, request: NewAgent) -> Agent:
        """Register a remote hypervisor: validate every field, parse the key, seal the secrets."""
        with self._audited(caller, "agent.create") as audit:
            errors = _collect(
                ("name", validation.check_name(request.name)),
                ("hostname", validation.check_hostname(request.hostname)),
                ("port", validation.check_port(request.port)),
                ("username", validation.check_username(request.username)),
                ("libvirt_uri", _maybe(validation.check_libvirt_uri, request.libvirt_uri)),
            )
            # Parsing an encrypted key runs its KDF and sealing runs AES: both before the write
            # transaction, so no request ever holds the database's write lock while computing.
            private_key, key_errors = self._private_key_of(request)
            client_key, parse_errors = (None, []) if private_key is None else \
                self._inspect_key(private_key, request.private_key_passphrase)
            host_key, host_errors = self._parse_host_key(request.host_key)
            errors += key_errors + parse_errors + host_errors
            if errors:
                raise ValidationFailed(errors)
            assert client_key is not None and private_key is not None
            sealed_key = self._seal(caller.user.id, "private_key", private_key)
            sealed_passphrase = _maybe(lambda p: self._seal(caller.user.id, "passphrase", p),
                                       request.private_key_passphrase)
            with audit.write() as tx:
                if tx.agent_name_taken(caller.user.id, request.name):
                    raise AgentNameTaken()
                now = self.clock.now()
                agent = tx.add_agent(
                    Agent(
                        id=0,
                        owner_id=caller.user.id,
                        name=request.name,
                        hostname=request.hostname,
                        port=request.port,
                        username=request.username,
                        allow_unknown_hosts=request.allow_unknown_hosts,
                        host_key=host_key,
                        libvirt_uri=request.libvirt_uri or DEFAULT_LIBVIRT_URI,
                        client_key=client_key,
                        sealed_private_key=sealed_key,
                        sealed_passphrase=sealed_passphrase,
                        created_at=now,
                        updated_at=now,
                    )
                )
                audit.agent_id = agent.id
        return agent

    def _private_key_of(self, request: NewAgent) -> tuple[str | None, list[FieldError]]:
        """The key a registration brings: uploaded, or generated here when it asks for one."""
        if request.generate_key:
            if request.private_key is not None or request.private_key_passphrase is not None:
                return None, [FieldError("generate_key", "cannot be combined with private_key or "
                                                         "private_key_passphrase: send one or the other")]
            return self.ssh_keys.generate_private_key(), []
        if request.private_key is None:
            return None, [FieldError("private_key", "is required (or send \"generate_key\": true to have the "
                                                    "portal generate a key pair)")]
        return request.private_key, []

    def rotate_agent_key(self, caller: Caller, agent_id: int) -> Agent:
        """Replace an agent's key with a new generated ed25519 pair. The old key stops being used
        at once (pooled connections made with it are dropped); install the new public key on the
        hypervisor (re-run ``scripts/agent-install.sh``) before the next command."""
        with self._audited(caller, "agent.rotate_key", agent_id=agent_id) as audit:
            agent = self.get_agent(caller, agent_id)
            private_key = self.ssh_keys.generate_private_key()
            client_key = self.ssh_keys.inspect_private_key(private_key, None)
            rotated = attrs.evolve(agent, client_key=client_key, revision=agent.revision + 1,
                                   sealed_private_key=self._seal(caller.user.id, "private_key", private_key),
                                   sealed_passphrase=None, updated_at=self.clock.now())
            with audit.write() as tx:
                _require_unchanged(tx, caller, agent)
                tx.update_agent(rotated)
        if self.shell is not None:
            self.shell.discard(agent_id)
        return rotated

    def check_secret_key(self) -> None:
        """Start-up check: the server's secret key opens the stored credentials (``SecretUnreadable``
        if they were sealed with another key: a replaced key file, or instances configured with
        different keys). Reads the newest agent only; nothing if there is none."""
        with self.storage.transaction() as tx:
            agent = tx.newest_agent()
        if agent is not None:
            self._unseal(agent)

    def list_agents(self, caller: Caller) -> list[Agent]:
        """The caller's agents, oldest first."""
        with self.storage.transaction() as tx:
            return tx.list_agents(caller.user.id)

    def get_agent(self, caller: Caller, agent_id: int) -> Agent:
        """One of the caller's agents; ``NotFound`` if it is not theirs (or does not exist)."""
        with self.storage.transaction() as tx:
            return _owned(tx, caller, agent_id)

    def update_agent(self, caller: Caller, agent_id: int, changes: AgentChanges) -> Agent:
        """Change some of an agent's fields, validated exactly as on registration."""
        with self._audited(caller, "agent.update", agent_id=agent_id) as audit:
            agent = self.get_agent(caller, agent_id)
            errors = _collect(
                ("name", _if_set(validation.check_name, changes.name)),
                ("hostname", _if_set(validation.check_hostname, changes.hostname)),
                ("port", _if_set(validation.check_port, changes.port)),
                ("username", _if_set(validation.check_username, changes.username)),
                ("libvirt_uri", _if_set(validation.check_libvirt_uri, changes.libvirt_uri)),
            )
            updates: dict[str, object] = {
                field: getattr(changes, field)
                for field in ("name", "hostname", "port", "username", "allow_unknown_hosts")
                if is_set(getattr(changes, field))
            }
            if is_set(changes.libvirt_uri):
                updates["libvirt_uri"] = DEFAULT_LIBVIRT_URI if changes.libvirt_uri is None else changes.libvirt_uri
            if is_set(changes.private_key) or is_set(changes.private_key_passphrase):
                # The pair (key, passphrase) must still open: a new key takes the passphrase sent
                # with it (none if none was sent); a new passphrase alone must open the stored key.
                key = changes.private_key if is_set(changes.private_key) else self._unseal(agent).private_key
                passphrase = changes.private_key_passphrase if is_set(changes.private_key_passphrase) else None
                parsed, key_errors = self._inspect_key(key, passphrase)
                errors += key_errors
                if parsed is not None:
                    updates["client_key"] = parsed
                    updates["sealed_private_key"] = self._seal(caller.user.id, "private_key", key)
                    updates["sealed_passphrase"] = _maybe(
                        lambda p: self._seal(caller.user.id, "passphrase", p), passphrase)
            if is_set(changes.host_key):
                host_key, host_errors = self._parse_host_key(changes.host_key)
                errors += host_errors
                updates["host_key"] = host_key
            if errors:
                raise ValidationFailed(errors)
            revision = agent.revision
            if any(f in _CONNECTION_FIELDS and getattr(agent, f) != v for f, v in updates.items()) \
                    or "sealed_private_key" in updates:
                revision += 1
            updated = attrs.evolve(agent, **updates, revision=revision, updated_at=self.clock.now())  # type: ignore[arg-type]
            with audit.write() as tx:
                _require_unchanged(tx, caller, agent)
                if is_set(changes.name) and tx.agent_name_taken(caller.user.id, changes.name, except_id=agent.id):
                    raise AgentNameTaken()
                tx.update_agent(updated)
        if updated.revision != agent.revision and self.shell is not None:
            self.shell.discard(agent.id)  # connections made with the old settings must not be reused
        return updated

    def delete_agent(self, caller: Caller, agent_id: int) -> None:
        """Forget an agent and its sealed credentials; its audit history stays with its owner."""
        with self._audited(caller, "agent.delete", agent_id=agent_id) as audit, audit.write() as tx:
            if not tx.delete_agent(caller.user.id, agent_id):
                raise _agent_not_found()
        if self.shell is not None:
            self.shell.discard(agent_id)

    def read_credentials(self, caller: Caller, agent_id: int) -> AgentCredentials:
        """An agent's key material in clear, for its owner; every read is audited."""
        with self._audited(caller, "agent.read_credentials", agent_id=agent_id) as audit, audit.write() as tx:
            agent = _owned(tx, caller, agent_id)
            return self._unseal(agent)

    def pin_host_key(self, caller: Caller, agent: Agent, host_key: HostKey) -> HostKey:
        """Trust on first use: pin ``host_key`` for an agent that has none, and return the key
        pinned for it (a concurrent first connection may have pinned another one already)."""
        with self.storage.transaction(write=True) as tx:
            current = tx.get_agent(agent.owner_id, agent.id)
            if current is None or current.revision != agent.revision or current.created_at != agent.created_at:
                raise AgentChanged("the agent was changed or deleted while connecting to it; retry")
            if current.host_key is not None:
                return current.host_key
            tx.update_agent(attrs.evolve(current, host_key=host_key, updated_at=self.clock.now()))
            tx.add_audit_event(attrs.evolve(self._caller_event(caller, "agent.pin_host_key"), agent_id=agent.id,
                                            detail=f"trusted on first use: {host_key.fingerprint}"))
            return host_key

    # ------------------------------------------------------------------ VMs, over SSH

    async def list_vms(self, caller: Caller, agent_id: int) -> list[VmSummary]:
        """Every VM the agent's libvirt knows (``virsh list --all``)."""
        target = await asyncio.to_thread(self._target, caller, agent_id)
        result = await self._remote(caller, target, virsh.list_command(target.agent.libvirt_uri))
        virsh.raise_for_failure(result)
        return virsh.parse_list(result.stdout)

    async def vm_info(self, caller: Caller, agent_id: int, vm: str) -> VmInfo:
        """``virsh dominfo`` for one VM; ``NotFound`` (vm_not_found) if the agent has no such VM."""
        virsh.require_vm_name(vm)
        target = await asyncio.to_thread(self._target, caller, agent_id)
        result = await self._remote(caller, target, virsh.dominfo_command(target.agent.libvirt_uri, vm))
        virsh.raise_for_failure(result, vm)
        return VmInfo(dominfo=virsh.parse_dominfo(result.stdout), raw=result)

    async def vm_action(self, caller: Caller, agent_id: int, vm: str, action: VmAction) -> CommandResult:
        """Start, shut down, force-stop, reboot, suspend or resume a VM; audited whatever the outcome."""
        result, _ = await self._vm_action(caller, agent_id, vm, action)
        return result

    async def _vm_action(self, caller: Caller, agent_id: int, vm: str, action: VmAction,
                         wait: int | None = None) -> tuple[CommandResult, AgentCredentials]:
        def check_wait() -> None:
            problem = None if wait is None else virsh.check_wait(wait)
            if problem is not None:
                raise ValidationFailed.one("wait", problem)

        return await self._audited_command(caller, f"vm.{action.value.replace('-', '_')}", agent_id, vm,
                                           lambda uri: virsh.action_command(uri, vm, action), None, check=check_wait)

    def _target(self, caller: Caller, agent_id: int) -> AgentCredentials:
        with self.storage.transaction() as tx:
            agent = _owned(tx, caller, agent_id)
        return self._unseal(agent)

    async def _remote(self, caller: Caller, target: AgentCredentials, argv: tuple[str, ...]) -> CommandResult:
        if self.shell is None:
            raise RuntimeError("this portal was built without a remote shell")
        pin: PinHostKey | None = None
        if target.agent.host_key is None and target.agent.allow_unknown_hosts:
            async def pin(seen: HostKey) -> HostKey:
                return await asyncio.to_thread(self.pin_host_key, caller, target.agent, seen)
        return await self.shell.run(target, argv, pin=pin)

    def _record(self, caller: Caller, action: str, agent_id: int, vm: str | None, outcome: str,
                detail: str | None) -> None:
        with self.storage.transaction(write=True) as tx:
            tx.add_audit_event(attrs.evolve(self._caller_event(caller, action), agent_id=agent_id, vm=vm,
                                            outcome=outcome, detail=detail[:500] if detail else None))

    # ------------------------------------------------------------------ VMs beyond the lifecycle

    async def vm_action_and_wait(self, caller: Caller, agent_id: int, vm: str, action: VmAction, wait: int,
                                 progress: Callable[[str | None, float], None] | None = None) -> WaitedAction:
        """Run ``action``, then poll the VM's state over the pooled connection every
        ``poll_interval`` seconds until it reaches ``action.target_state`` or ``wait`` seconds have
        passed (``WaitTimedOut``, carrying the state it is in). ``wait=0`` looks once; no look
        outlives the deadline by more than ``poll_grace``. The action is audited as it ends (a
        ``wait`` out of range is refused and audited like an invalid VM name), before the wait;
        nothing holds a transaction or a thread meanwhile. ``progress(state, elapsed)`` is told of
        every poll (the command line shows it)."""
        result, target = await self._vm_action(caller, agent_id, vm, action, wait)
        state, waited = await self._wait_for_state(caller, target, vm, action.target_state, wait, progress)
        return WaitedAction(result=result, state=state, waited_seconds=waited)

    async def _wait_for_state(self, caller: Caller, target: AgentCredentials, vm: str, wanted: str, wait: float,
                              progress: Callable[[str | None, float], None] | None) -> tuple[str, float]:
        started = self._monotonic()
        deadline = started + wait
        state: str | None = None
        while True:
            # A host that stops answering must not hold the answer for a whole command time-out:
            # one look may outlive the deadline by ``poll_grace`` at most.
            budget = max(0.0, deadline - self._monotonic()) + self.poll_grace
            try:
                state = await asyncio.wait_for(self._state(caller, target, vm), timeout=budget)
            except NotFound as gone:
                if wanted != "shut off" or gone.code != "vm_not_found":
                    raise
                state = wanted  # a transient VM ceases to exist when it stops: that is "shut off"
            except TimeoutError:
                raise WaitTimedOut(f"VM {vm!r} was last seen {state or 'in an unknown state'}, not {wanted}; the "
                                   f"host stopped answering and the {wait:g} s wait ran out", state=state,
                                   target_state=wanted) from None
            now = self._monotonic()
            if progress is not None:
                progress(state, now - started)
            if state == wanted:
                return state, now - started
            if now >= deadline:
                raise WaitTimedOut(f"VM {vm!r} is {state or 'in an unknown state'}, not {wanted}, after waiting "
                                   f"{wait:g} s", state=state, target_state=wanted)
            await self._sleep(min(self.poll_interval, deadline - now))

    async def _state(self, caller: Caller, target: AgentCredentials, vm: str) -> str | None:
        result = await self._remote(caller, target, virsh.state_command(target.agent.libvirt_uri, vm))
        virsh.raise_for_failure(result, vm)
        return virsh.parse_state(result.stdout)

    async def set_autostart(self, caller: Caller, agent_id: int, vm: str, enabled: bool) -> CommandResult:
        """Have libvirt start the VM with the host, or not (``virsh autostart [--disable]``); audited
        as ``vm.autostart`` with ``enable`` or ``disable`` in its detail."""

        result, _ = await self._audited_command(caller, "vm.autostart", agent_id, vm,
                                                lambda uri: virsh.autostart_command(uri, vm, enabled),
                                                "enable" if enabled else "disable")
        return result

    async def vm_stats(self, caller: Caller, agent_id: int, vm: str) -> VmStats:
        """``virsh domstats`` of one VM: state, CPU time, vCPUs, balloon memory, disks, interfaces."""
        virsh.require_vm_name(vm)
        target = await asyncio.to_thread(self._target, caller, agent_id)
        result = await self._remote(caller, target, virsh.stats_command(target.agent.libvirt_uri, vm))
        virsh.raise_for_failure(result, vm)
        return virsh.parse_stats(result.stdout, vm)

    # snapshots (libvirt internal snapshots)

    async def list_snapshots(self, caller: Caller, agent_id: int, vm: str) -> list[Snapshot]:
        """The VM's snapshots (``virsh snapshot-list --parent``), the current one marked."""
        virsh.require_vm_name(vm)
        target = await asyncio.to_thread(self._target, caller, agent_id)
        return await self._snapshots(caller, target, vm)

    async def _snapshots(self, caller: Caller, target: AgentCredentials, vm: str) -> list[Snapshot]:
        uri = target.agent.libvirt_uri
        listed, current = await asyncio.gather(
            self._remote(caller, target, virsh.snapshot_list_command(uri, vm)),
            self._remote(caller, target, virsh.snapshot_current_command(uri, vm)),
        )
        virsh.raise_for_snapshot_failure(listed, vm)
        current_name = virsh.parse_current_snapshot(current)
        return [attrs.evolve(s, current=s.name == current_name) for s in virsh.parse_snapshot_list(listed.stdout)]

    async def create_snapshot(self, caller: Caller, agent_id: int, vm: str, request: NewSnapshot) -> Snapshot:
        """Take an internal snapshot (``virsh snapshot-create-as``); audited as
        ``vm.snapshot_create``. Answers the snapshot as the list shows it afterwards."""

        _, target = await self._audited_command(
            caller, "vm.snapshot_create", agent_id, vm,
            lambda uri: virsh.snapshot_create_command(uri, vm, request.name, request.description),
            f"snapshot {request.name}", snapshot=request.name)
        created = [s for s in await self._snapshots(caller, target, vm) if s.name == request.name]
        if not created:  # deleted again in between by someone else
            raise SnapshotNotFound(f"VM {vm!r} has no snapshot named {request.name!r}")
        return created[0]

    async def revert_snapshot(self, caller: Caller, agent_id: int, vm: str, snapshot: str) -> CommandResult:
        """Revert the VM to a snapshot (``virsh snapshot-revert``); audited as ``vm.snapshot_revert``."""
        result, _ = await self._audited_command(caller, "vm.snapshot_revert", agent_id, vm,
                                                lambda uri: virsh.snapshot_revert_command(uri, vm, snapshot),
                                                f"snapshot {snapshot}", snapshot=snapshot)
        return result

    async def delete_snapshot(self, caller: Caller, agent_id: int, vm: str, snapshot: str) -> CommandResult:
        """Delete a snapshot (``virsh snapshot-delete``; its children are kept, re-parented); audited
        as ``vm.snapshot_delete``."""
        result, _ = await self._audited_command(caller, "vm.snapshot_delete", agent_id, vm,
                                                lambda uri: virsh.snapshot_delete_command(uri, vm, snapshot),
                                                f"snapshot {snapshot}", snapshot=snapshot)
        return result

    async def _audited_command(self, caller: Caller, action: str, agent_id: int, vm: str,
                               build: Callable[[str], tuple[str, ...]], detail: str | None, *,
                               snapshot: str | None = None,
                               check: Callable[[], None] | None = None) -> tuple[CommandResult, AgentCredentials]:
        """Run the virsh command ``build(libvirt_uri)`` on one of the caller's agents and record
        ``action`` once, whatever the outcome: ``ok`` (with ``detail``) or the code of the error
        that refused it, invalid input included. Every argument is checked (``build`` with the
        default URI, then ``check``) before the agent is even looked up; a failure reads as a
        snapshot error when the command is about ``snapshot``. Answers the result and the agent's
        credentials (a wait polls with them)."""
        try:
            build(DEFAULT_LIBVIRT_URI)
            if check is not None:
                check()
            target = await asyncio.to_thread(self._target, caller, agent_id)
            result = await self._remote(caller, target, build(target.agent.libvirt_uri))
            if snapshot is None:
                virsh.raise_for_failure(result, vm)
            else:
                virsh.raise_for_snapshot_failure(result, vm, snapshot)
        except PortalError as error:
            await asyncio.to_thread(self._record, caller, action, agent_id, vm, error.code, error.detail)
            raise
        await asyncio.to_thread(self._record, caller, action, agent_id, vm, "ok", detail)
        return result, target

    # the fleet and the hosts

    async def fleet(self, caller: Caller, *, agent_ids: Sequence[int] = (),
                    states: Sequence[str] = ()) -> list[FleetEntry]:
        """Every VM on every agent of the caller (or on ``agent_ids`` of them), at most
        ``fleet_parallelism`` agents at a time. An agent that fails is an entry with its error, so
        one dead host never fails the answer; ``states`` keeps only VMs in those states."""
        errors = _collect(*[("agent", None if 1 <= a <= 2**31 - 1 else "must be a positive agent id")
                            for a in agent_ids],
                          *[("state", None if s in virsh.VM_STATES
                             else "must be a state virsh prints: " + ", ".join(virsh.VM_STATES))
                            for s in states])
        if errors:
            raise ValidationFailed(errors)
        targets = await asyncio.to_thread(self._targets, caller, set(agent_ids))
        gate = asyncio.Semaphore(max(1, self.fleet_parallelism))

        async def one(agent: Agent, target: AgentCredentials | PortalError) -> FleetEntry:
            if isinstance(target, PortalError):
                return FleetEntry(agent.id, agent.name, None, Failure.of(target))
            try:
                async with gate:
                    result = await self._remote(caller, target, virsh.list_command(agent.libvirt_uri))
                virsh.raise_for_failure(result)
            except PortalError as error:
                return FleetEntry(agent.id, agent.name, None, Failure.of(error))
            vms = [vm for vm in virsh.parse_list(result.stdout) if not states or vm.state in states]
            return FleetEntry(agent.id, agent.name, vms, None)

        return list(await asyncio.gather(*(one(agent, target) for agent, target in targets)))

    def _targets(self, caller: Caller, only: set[int]) -> list[tuple[Agent, AgentCredentials | PortalError]]:
        with self.storage.transaction() as tx:
            agents = [a for a in tx.list_agents(caller.user.id) if not only or a.id in only]
        targets: list[tuple[Agent, AgentCredentials | PortalError]] = []
        for agent in agents:
            try:
                targets.append((agent, self._unseal(agent)))
            except PortalError as error:  # one unreadable key fails its own entry only
                targets.append((agent, error))
        return targets

    async def host_facts(self, caller: Caller, agent_id: int) -> HostFacts:
        """The hypervisor's host name, ``virsh nodeinfo`` and ``virsh version --daemon``: three
        commands at once over the pooled connection."""
        target = await asyncio.to_thread(self._target, caller, agent_id)
        uri = target.agent.libvirt_uri
        node, version, hostname = await asyncio.gather(
            *(self._remote(caller, target, argv)
              for argv in (virsh.nodeinfo_command(uri), virsh.version_command(uri), virsh.hostname_command(uri))))
        for result in (node, version, hostname):
            virsh.raise_for_failure(result)
        return HostFacts(hostname=virsh.parse_hostname(hostname.stdout), node=virsh.parse_nodeinfo(node.stdout),
                         versions=virsh.parse_version(version.stdout))

    async def check_agent(self, caller: Caller, agent_id: int) -> AgentCheck:
        """Can the portal reach the agent, log in, and reach libvirt (``virsh uri``)? A failing host
        answers with the reason instead of raising. Not audited: it changes nothing (except that a
        first connection may pin the host key, which is audited as ``agent.pin_host_key``)."""
        target = await asyncio.to_thread(self._target, caller, agent_id)
        started = self._monotonic()
        error: RemoteError | None = None
        host_key = target.agent.host_key
        try:
            result = await self._remote(caller, target, virsh.check_command(target.agent.libvirt_uri))
            host_key = host_key or result.host_key
            virsh.raise_for_failure(result)
        except RemoteError as failed:
            error = failed
        elapsed_ms = round((self._monotonic() - started) * 1000, 1)
        if host_key is None and target.agent.allow_unknown_hosts:
            # The connection may have pinned the key it saw before the check failed further on.
            host_key = await asyncio.to_thread(self._pinned_host_key, caller, agent_id)
        # How far the connection got is a property of the error's class (core.errors.RemoteError).
        reachable = error is None or error.reached_host
        authenticated = reachable and (error is None or error.logged_in)
        return AgentCheck(
            reachable=reachable,
            authenticated=authenticated,
            host_key_fingerprint=host_key.fingerprint if host_key is not None else None,
            libvirt_reachable=error is None,
            round_trip_ms=elapsed_ms if reachable else None,
            error=Failure.of(error) if error is not None else None,
        )

    def _pinned_host_key(self, caller: Caller, agent_id: int) -> HostKey | None:
        with self.storage.transaction() as tx:
            agent = tx.get_agent(caller.user.id, agent_id)
        return agent.host_key if agent is not None else None

    # ------------------------------------------------------------------ audit

    def audit_events(self, caller: Caller, *, limit: int = AUDIT_PAGE_DEFAULT,
                     before: int | None = None) -> list[AuditEvent]:
        """The caller's audit events, newest first; ``before`` is the id the next page starts below."""
        errors = _collect(
            ("limit", None if 1 <= limit <= AUDIT_PAGE_MAX else f"must be between 1 and {AUDIT_PAGE_MAX}"),
            ("before", None if before is None or before >= 1 else "must be a positive event id"),
        )
        if errors:
            raise ValidationFailed(errors)
        with self.storage.transaction() as tx:
            return tx.list_audit_events(caller.user.id, limit, before)

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _audited(self, caller: Caller, action: str, *, agent_id: int | None = None) -> Iterator[_Audit]:
        """Audit one attempted mutation. Slow preparation (parsing keys, sealing) happens inside
        this block but outside any transaction; ``audit.write()`` then opens the write
        transaction whose last statement records ``action`` as done. If a domain error ends the
        block, the refusal (outcome = the error's code) is recorded in a transaction of its own."""
        audit = _Audit(self, caller, action, agent_id)
        try:
            yield audit
        except PortalError as error:
            with self.storage.transaction(write=True) as tx:
                tx.add_audit_event(
                    attrs.evolve(
                        self._caller_event(caller, action),
                        agent_id=audit.agent_id,
                        outcome=error.code,
                        detail=error.detail[:500],
                    )
                )
            raise

    def _caller_event(self, caller: Caller, action: str) -> AuditEvent:
        return self._event(caller.user.id, action, caller.request_id, caller.client_address)

    def _event(self, user_id: int, action: str, request_id: str, client_address: str) -> AuditEvent:
        return AuditEvent(
            id=0,
            user_id=user_id,
            action=action,
            outcome="ok",
            agent_id=None,
            vm=None,
            detail=None,
            request_id=request_id,
            client_address=client_address,
            created_at=self.clock.now(),
        )

    def _inspect_key(self, key: str, passphrase: str | None) -> tuple[ClientKey | None, list[FieldError]]:
        problem = validation.check_secret_text(key)
        if problem is None and passphrase is not None:
            problem_pass = validation.check_secret_text(passphrase)
            if problem_pass is not None:
                return None, [FieldError("private_key_passphrase", problem_pass)]
        if problem is not None:
            return None, [FieldError("private_key", problem)]
        try:
            return self.ssh_keys.inspect_private_key(key, passphrase), []
        except ValueError as error:
            field = "private_key_passphrase" if "passphrase" in str(error) else "private_key"
            return None, [FieldError(field, str(error))]

    def _parse_host_key(self, text: str | None) -> tuple[HostKey | None, list[FieldError]]:
        if text is None:
            return None, []
        problem = validation.check_secret_text(text)
        if problem is not None:
            return None, [FieldError("host_key", problem)]
        try:
            return self.ssh_keys.parse_host_key(text), []
        except ValueError as error:
            return None, [FieldError("host_key", str(error))]

    def _seal(self, owner_id: int, what: str, plaintext: str) -> str:
        return self.secrets.seal(plaintext, context=_seal_context(owner_id, what))

    def _unseal(self, agent: Agent) -> AgentCredentials:
        return AgentCredentials(
            agent=agent,
            private_key=self.secrets.unseal(
                agent.sealed_private_key, context=_seal_context(agent.owner_id, "private_key")
            ),
            private_key_passphrase=_maybe(
                lambda s: self.secrets.unseal(s, context=_seal_context(agent.owner_id, "passphrase")),
                agent.sealed_passphrase,
            ),
        )


@attrs.define
class _Audit:
    """An audited use case in progress: the agent its event is about (which a registration only
    learns after the insert) and the write transaction that records it."""

    portal: Portal
    caller: Caller
    action: str
    agent_id: int | None

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        with self.portal.storage.transaction(write=True) as tx:
            yield tx
            tx.add_audit_event(attrs.evolve(self.portal._caller_event(self.caller, self.action),
                                            agent_id=self.agent_id))


_CONNECTION_FIELDS = frozenset({"hostname", "port", "username", "host_key", "client_key", "libvirt_uri",
                                "allow_unknown_hosts"})


def _seal_context(owner_id: int, what: str) -> str:
    # Binding the owner into the ciphertext means a sealed key copied into another user's row in
    # the database will not open.
    return f"agent-credential/{what}/user:{owner_id}"


def _owned(tx: Transaction, caller: Caller, agent_id: int) -> Agent:
    agent = tx.get_agent(caller.user.id, agent_id)
    if agent is None:
        raise _agent_not_found()
    return agent


def _require_unchanged(tx: Transaction, caller: Caller, agent: Agent) -> None:
    """Inside the write transaction: the agent is still as it was read before it (changes are
    prepared outside the transaction, so a concurrent change must not be overwritten)."""
    current = _owned(tx, caller, agent.id)
    if (current.revision, current.updated_at) != (agent.revision, agent.updated_at):
        raise AgentChanged()


def _agent_not_found() -> NotFound:
    return AgentNotFound()


def _collect(*checks: tuple[str, str | None]) -> list[FieldError]:
    return [FieldError(field, message) for field, message in checks if message is not None]


def _maybe(check: Callable[[str], T], value: str | None) -> T | None:
    return None if value is None else check(value)


def _if_set(check: Callable[[T], str | None], value: T | None) -> str | None:
    return check(value) if is_set(value) and value is not None else None
