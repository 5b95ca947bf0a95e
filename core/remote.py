"""Running virsh on a caller's agent: find the agent, open its key, pin its host key on first
use, run the argument vector over the pooled SSH connection, and audit what changes a VM.

The VM, snapshot and fleet use cases are built on this; none of them talks to the shell directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import attrs

from core import virsh
from core.audit import AuditLog
from core.credentials import Keyring, owned_agent
from core.errors import AgentChanged, PortalError
from core.model import DEFAULT_LIBVIRT_URI, Agent, AgentCredentials, Caller, HostKey
from core.ports import Clock, CommandResult, PinHostKey, RemoteShell, RemoteStream, Storage

T = TypeVar("T")

# Output longer than this is parsed in a worker thread: parsers are linear, but a host may answer
# megabytes, and one host's long answer must not hold the event loop every other request shares.
OFF_LOOP_PARSE_BYTES = 64 * 1024


async def parse_output(parse: Callable[..., T], text: str, *args: Any) -> T:
    """``parse(text, *args)``: inline for short output, in a worker thread for long output."""
    if len(text) <= OFF_LOOP_PARSE_BYTES:
        return parse(text, *args)
    return await asyncio.to_thread(parse, text, *args)


class RemoteCommands:
    """The caller's agents, as places to run virsh."""

    def __init__(self, *, storage: Storage, keyring: Keyring, clock: Clock, audit: AuditLog,
                 shell: RemoteShell | None) -> None:
        self.storage = storage
        self.keyring = keyring
        self.clock = clock
        self.audit = audit
        self.shell = shell

    async def target(self, caller: Caller, agent_id: int) -> AgentCredentials:
        """One of the caller's agents with its key opened (storage and unsealing in a thread)."""
        return await asyncio.to_thread(self._target, caller, agent_id)

    def _target(self, caller: Caller, agent_id: int) -> AgentCredentials:
        with self.storage.transaction() as tx:
            agent = owned_agent(tx, caller, agent_id)
        return self.keyring.open(agent)

    def targets(self, caller: Caller, only: set[int]) -> list[tuple[Agent, AgentCredentials | PortalError]]:
        """Every agent of the caller (or those in ``only``) with its key opened, or the error that
        kept it closed: one unreadable key fails its own agent only."""
        return [(agent, self.open_key(agent)) for agent in self.agents(caller, only)]

    def agents(self, caller: Caller, only: set[int]) -> list[Agent]:
        """Every agent of the caller (or those in ``only``) that the caller's key sees."""
        with self.storage.transaction() as tx:
            return [a for a in tx.list_agents(caller.user.id) if (not only or a.id in only) and caller.sees_agent(a.id)]

    def agent_names(self, caller: Caller, only: set[int]) -> list[tuple[int, str]]:
        """(id, name) of every agent of the caller (or those in ``only``) that the caller's key
        sees: the cheap listing of the fleet view, whose mirrored agents need nothing more."""
        with self.storage.transaction() as tx:
            return [(agent_id, name) for agent_id, name in tx.agent_names(caller.user.id)
                    if (not only or agent_id in only) and caller.sees_agent(agent_id)]

    def open_key(self, agent: Agent) -> AgentCredentials | PortalError:
        """The agent with its key opened, or the error that kept it closed."""
        try:
            return self.keyring.open(agent)
        except PortalError as error:
            return error

    async def run(self, caller: Caller, target: AgentCredentials, argv: tuple[str, ...], *,
                  counted: bool = True, fresh: bool = False, stdin: bytes | None = None) -> CommandResult:
        """Run ``argv`` on the agent (with ``stdin`` sent to its standard input, then end of file);
        a first connection to an agent that trusts on first use pins the key it saw before
        anything runs. ``counted`` and ``fresh``: see ``RemoteShell.run``."""
        # Keywords only when they differ from their defaults: doubles of the port need not know them.
        extra: dict[str, Any] = {}
        if not counted:
            extra["counted"] = False
        if fresh:
            extra["fresh"] = True
        if stdin is not None:
            extra["stdin"] = stdin
        return await self._shell().run(target, argv, pin=self._pin(caller, target), **extra)

    def _shell(self) -> RemoteShell:
        if self.shell is None:
            raise RuntimeError("this portal was built without a remote shell")
        return self.shell

    def _pin(self, caller: Caller, target: AgentCredentials) -> PinHostKey | None:
        if target.agent.host_key is None and target.agent.allow_unknown_hosts:
            async def pin(seen: HostKey) -> HostKey:
                return await asyncio.to_thread(self.pin_host_key, caller, target.agent, seen)
            return pin
        return None

    def stream(self, caller: Caller, target: AgentCredentials, argv: tuple[str, ...], *,
               pty: bool = False) -> AbstractAsyncContextManager[RemoteStream]:
        """A long-lived command on the agent (a console), pinning the host key on first use like ``run``."""
        return self._shell().stream(target, argv, pin=self._pin(caller, target), pty=pty)

    def connect(self, caller: Caller, target: AgentCredentials, host: str,
                port: int) -> AbstractAsyncContextManager[RemoteStream]:
        """A TCP connection from the agent to ``host:port`` (a VNC server on its loopback)."""
        return self._shell().connect(target, host, port, pin=self._pin(caller, target))

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
            tx.add_audit_event(attrs.evolve(self.audit.caller_event(caller, "agent.pin_host_key"), agent_id=agent.id,
                                            detail=f"trusted on first use: {host_key.fingerprint}"))
            return host_key

    def pinned_host_key(self, caller: Caller, agent_id: int) -> HostKey | None:
        with self.storage.transaction() as tx:
            agent = tx.get_agent(caller.user.id, agent_id) if caller.sees_agent(agent_id) else None
        return agent.host_key if agent is not None else None

    async def audited(self, caller: Caller, action: str, agent_id: int, vm: str,
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
            target = await self.target(caller, agent_id)
            result = await self.run(caller, target, build(target.agent.libvirt_uri))
            if snapshot is None:
                virsh.raise_for_failure(result, vm)
            else:
                virsh.raise_for_snapshot_failure(result, vm, snapshot)
        except PortalError as error:
            await asyncio.to_thread(self.audit.record, caller, action, agent_id, vm, error.code, error.detail)
            raise
        await asyncio.to_thread(self.audit.record, caller, action, agent_id, vm, "ok", detail)
        return result, target
