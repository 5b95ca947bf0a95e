"""The agent registry: remote hypervisors, their addresses and SSH credentials (sealed at rest).
Synchronous: storage, key parsing and sealing; the HTTP layer runs these in a worker thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

import attrs

from core import validation
from core.audit import AuditLog
from core.commands import AgentChanges, NewAgent, is_set
from core.credentials import Keyring, owned_agent
from core.errors import (
    AgentChanged,
    AgentLimitReached,
    AgentNameTaken,
    AgentNotFound,
    FieldError,
    KeyLimitedToAgents,
    KeyNotExportable,
    ValidationFailed,
)
from core.model import DEFAULT_LIBVIRT_URI, Agent, AgentCredentials, Caller, ClientKey, HostKey
from core.ports import AgentAddresses, Clock, RemoteShell, SshKeys, Storage, Transaction

T = TypeVar("T")

# Fields whose change makes pooled connections to the agent stale (its revision moves).
MAX_AGENTS_PER_USER = 1000
AGENT_PAGE_MAX = 1000

_CONNECTION_FIELDS = frozenset({"hostname", "port", "username", "host_key", "client_key", "libvirt_uri",
                                "allow_unknown_hosts"})


class AgentService:
    """Register, read, change and remove agents; read or rotate their keys."""

    runs_on_event_loop: ClassVar[bool] = False

    def __init__(self, *, storage: Storage, keyring: Keyring, ssh_keys: SshKeys, clock: Clock, audit: AuditLog,
                 shell: RemoteShell | None = None, max_agents: int = MAX_AGENTS_PER_USER,
                 addresses: AgentAddresses | None = None) -> None:
        self.storage = storage
        self.addresses = addresses  # where agents may point (MANAGEMENT_AGENT_NETWORKS); None: anywhere
        # One user's agents are bounded, so one tenant cannot grow every fleet-wide query (the
        # fleet view, the agent list) without limit.
        self.max_agents = max_agents
        self.keyring = keyring
        self.ssh_keys = ssh_keys
        self.clock = clock
        self.audit = audit
        # Only to drop pooled connections made with settings that just changed.
        self.shell = shell

    def register_agent(self, caller: Caller, request: NewAgent) -> Agent:
        """Register a remote hypervisor: validate every field, parse the key, seal the secrets."""
        with self.audit.audited(caller, "agent.create") as change:
            if caller.agent_ids is not None:
                raise KeyLimitedToAgents("this API key is limited to some agents, so it cannot register new ones; "
                                         "use a key that is not limited to agents")
            errors = validation.collect(
                ("name", validation.check_name(request.name)),
                ("hostname", validation.check_hostname(request.hostname)),
                ("port", validation.check_port(request.port)),
                ("username", validation.check_username(request.username)),
                ("libvirt_uri", _maybe(validation.check_libvirt_uri, request.libvirt_uri)),
            )
            self._check_address(errors, request.hostname, request.port)  # before any KDF runs
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
            owner = caller.user.id
            sealed_key = self.keyring.seal(owner, "private_key", private_key)
            sealed_passphrase = self.keyring.seal_optional(owner, "passphrase", request.private_key_passphrase)
            with change.write() as tx:
                if tx.count_agents(owner) >= self.max_agents:
                    raise AgentLimitReached(f"you already have {self.max_agents} agents, the most a user may have "
                                            "on this portal (MANAGEMENT_MAX_AGENTS_PER_USER); remove one first")
                if tx.agent_name_taken(owner, request.name):
                    raise AgentNameTaken()
                now = self.clock.now()
                agent = tx.add_agent(Agent(
                    id=0, owner_id=owner, name=request.name, hostname=request.hostname, port=request.port,
                    username=request.username, allow_unknown_hosts=request.allow_unknown_hosts,
                    host_key=host_key, libvirt_uri=request.libvirt_uri or DEFAULT_LIBVIRT_URI,
                    client_key=client_key, sealed_private_key=sealed_key, sealed_passphrase=sealed_passphrase,
                    created_at=now, updated_at=now, key_generated=request.generate_key,
                ))
                change.agent_id = agent.id
        return agent

    def _check_address(self, errors: list[FieldError], hostname: str, port: int) -> None:
        """Refuse (``AgentAddressRefused``, 422) an address agents may not point at (SSRF), once the
        hostname and port are otherwise valid. Every connection checks again (names move)."""
        if self.addresses is not None and not any(e.field in ("hostname", "port") for e in errors):
            self.addresses.check(hostname, port)

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
        with self.audit.audited(caller, "agent.rotate_key", agent_id=agent_id) as change:
            agent = self.get_agent(caller, agent_id)
            private_key = self.ssh_keys.generate_private_key()
            client_key = self.ssh_keys.inspect_private_key(private_key, None)
            rotated = attrs.evolve(agent, client_key=client_key, revision=agent.revision + 1,
                                   sealed_private_key=self.keyring.seal(caller.user.id, "private_key", private_key),
                                   sealed_passphrase=None, key_generated=True, updated_at=self.clock.now())
            with change.write() as tx:
                _require_unchanged(tx, caller, agent)
                tx.update_agent(rotated)
        self._forget_connections(agent_id)
        return rotated

    def check_secret_key(self) -> None:
        """Start-up check: the server's secret key opens the stored credentials (``SecretUnreadable``
        if they were sealed with another key: a replaced key file, or instances configured with
        different keys). Reads the newest agent only; nothing if there is none."""
        with self.storage.transaction() as tx:
            agent = tx.newest_agent()
        if agent is not None:
            self.keyring.open(agent)

    def list_agents(self, caller: Caller, *, after: int | None = None, limit: int | None = None) -> list[Agent]:
        """The caller's agents, oldest first; a page of at most ``limit`` with ids above ``after``."""
        errors = validation.collect(
            ("after", None if after is None or 0 <= after <= 2**31 - 1 else "must be an agent id (0 or more)"),
            ("limit", None if limit is None or 1 <= limit <= AGENT_PAGE_MAX
             else f"must be between 1 and {AGENT_PAGE_MAX}"),
        )
        if errors:
            raise ValidationFailed(errors)
        with self.storage.transaction() as tx:
            agents = tx.list_agents(caller.user.id)
        page = [agent for agent in agents if (after is None or agent.id > after) and caller.sees_agent(agent.id)]
        return page if limit is None else page[:limit]

    def get_agent(self, caller: Caller, agent_id: int) -> Agent:
        """One of the caller's agents; ``AgentNotFound`` if it is not theirs (or does not exist)."""
        with self.storage.transaction() as tx:
            return owned_agent(tx, caller, agent_id)

    def update_agent(self, caller: Caller, agent_id: int, changes: AgentChanges) -> Agent:
        """Change some of an agent's fields, validated exactly as on registration."""
        with self.audit.audited(caller, "agent.update", agent_id=agent_id) as change:
            agent = self.get_agent(caller, agent_id)
            errors = validation.collect(
                ("name", _if_set(validation.check_name, changes.name)),
                ("hostname", _if_set(validation.check_hostname, changes.hostname)),
                ("port", _if_set(validation.check_port, changes.port)),
                ("username", _if_set(validation.check_username, changes.username)),
                ("libvirt_uri", _if_set(validation.check_libvirt_uri, changes.libvirt_uri)),
            )
            if is_set(changes.hostname) or is_set(changes.port):
                self._check_address(errors, changes.hostname if is_set(changes.hostname) else agent.hostname,
                                    changes.port if is_set(changes.port) else agent.port)
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
                key = changes.private_key if is_set(changes.private_key) else self.keyring.open(agent).private_key
                passphrase = changes.private_key_passphrase if is_set(changes.private_key_passphrase) else None
                parsed, key_errors = self._inspect_key(key, passphrase)
                errors += key_errors
                if parsed is not None:
                    updates["client_key"] = parsed
                    if is_set(changes.private_key):
                        updates["key_generated"] = False  # uploaded: its owner has it, so it is exportable
                    updates["sealed_private_key"] = self.keyring.seal(caller.user.id, "private_key", key)
                    updates["sealed_passphrase"] = self.keyring.seal_optional(caller.user.id, "passphrase",
                                                                              passphrase)
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
            with change.write() as tx:
                _require_unchanged(tx, caller, agent)
                if is_set(changes.name) and tx.agent_name_taken(caller.user.id, changes.name, except_id=agent.id):
                    raise AgentNameTaken()
                tx.update_agent(updated)
        if updated.revision != agent.revision:
            self._forget_connections(agent.id)  # connections made with the old settings must not be reused
        return updated

    def delete_agent(self, caller: Caller, agent_id: int) -> None:
        """Forget an agent and its sealed credentials; its audit history stays with its owner."""
        with self.audit.audited(caller, "agent.delete", agent_id=agent_id) as change, change.write() as tx:
            if not caller.sees_agent(agent_id) or not tx.delete_agent(caller.user.id, agent_id):
                raise AgentNotFound()
        self._forget_connections(agent_id)

    def read_credentials(self, caller: Caller, agent_id: int) -> AgentCredentials:
        """An agent's key material in clear, for its owner; every read is audited. A key the portal
        generated is never exported (``KeyNotExportable``, audited as refused): its owner never
        needs it, and a stolen API key must not yield it."""
        with self.audit.audited(caller, "agent.read_credentials", agent_id=agent_id) as change, \
                change.write() as tx:
            agent = owned_agent(tx, caller, agent_id)
            if agent.key_generated:
                raise KeyNotExportable()
            return self.keyring.open(agent)

    def _forget_connections(self, agent_id: int) -> None:
        if self.shell is not None:
            self.shell.discard(agent_id)

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


def _require_unchanged(tx: Transaction, caller: Caller, agent: Agent) -> None:
    """Inside the write transaction: the agent is still as it was read before it (changes are
    prepared outside the transaction, so a concurrent change must not be overwritten)."""
    current = owned_agent(tx, caller, agent.id)
    if (current.revision, current.updated_at) != (agent.revision, agent.updated_at):
        raise AgentChanged()


def _maybe(check: Callable[[str], T], value: str | None) -> T | None:
    return None if value is None else check(value)


def _if_set(check: Callable[[T], str | None], value: T | None) -> str | None:
    return check(value) if is_set(value) and value is not None else None
