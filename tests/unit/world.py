"""The in-memory world the use-case tests run in: the portal assembled over the fakes of
``adapters/memory.py`` (storage, hasher, secret box, SSH keys, clock), a scripted remote shell and a
fake monotonic clock, so nothing leaves the process and nothing sleeps for real.

The fixtures over it (``world``, ``alice``, ``bob``, ``agent``, ``shell``) are in ``conftest.py``;
a test file that needs another world overrides ``world`` with a call to :func:`make_world`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import attrs

from adapters.memory import (
    CountingKeyHasher,
    FakeSshKeys,
    InMemoryStorage,
    ManualClock,
    ReversibleSecretBox,
    ScriptedShell,
)
from core.commands import NewAgent, NewUser
from core.errors import PortalError
from core.model import Agent, AgentCredentials, AuditEvent, Caller, HostKey, Origin, SignupPolicy
from core.portal import Portal, assemble
from core.ports import CommandResult, PinHostKey

ENCRYPTED_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nENCRYPTED:hunter2 b3BlbnNzaC1rZXktdjECCCC\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
PASSPHRASE = "hunter2"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyNumberOne host1"
OPERATOR = Origin(request_id="cli-1", client_address="local:root")
"""Where operator commands (``create_user``) come from: the CLI, as root."""


class FakeTime:
    """A monotonic clock that only the portal's ``sleep`` moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


class FakeShell(ScriptedShell):
    """The scripted shell (``results``, ``calls``, ``discarded``), plus:

    - ``targets``: the credentials every command was run with;
    - ``failure``: raised by every command, after it was recorded (a transport that fails);
    - ``failures``: per agent id, raised before the command runs (a dead host);
    - ``sequences``: answers that change from one call to the next (a VM's state while it shuts
      down; the last one stays);
    - ``hang_after``: answer this command so many times, then never (a host that stops answering);
    - ``running`` / ``most_running``: how many commands run at once, now and at most."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[AgentCredentials] = []
        self.failure: Exception | None = None
        self.failures: dict[int, PortalError] = {}
        self.sequences: dict[tuple[str, ...], list[CommandResult]] = {}
        self.hang_after: dict[tuple[str, ...], int] = {}
        self.running = 0
        self.most_running = 0

    async def run(self, target: AgentCredentials, argv: Sequence[str], *,
                  pin: PinHostKey | None = None, counted: bool = True, fresh: bool = False) -> CommandResult:
        command = tuple(argv)
        self.targets.append(target)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            for _ in range(3):
                await asyncio.sleep(0)  # let other requests start meanwhile
            if target.agent.id in self.failures:
                self.calls.append((target.agent.id, command))
                raise self.failures[target.agent.id]
            if command in self.hang_after:
                if self.hang_after[command] == 0:
                    await asyncio.Event().wait()  # a host that stopped answering
                self.hang_after[command] -= 1
            queue = self.sequences.get(command)
            if queue:
                self.calls.append((target.agent.id, command))
                return queue.pop(0) if len(queue) > 1 else queue[0]
            result = await super().run(target, argv, pin=pin)
            if self.failure is not None:
                raise self.failure
            return result
        finally:
            self.running -= 1


@attrs.define
class World:
    storage: InMemoryStorage
    portal: Portal
    clock: ManualClock
    shell: FakeShell
    time: FakeTime


def make_world(*, signup: SignupPolicy = SignupPolicy.OPEN, **assemble_options: Any) -> World:
    """A fresh world; ``assemble_options`` (``poll_interval``, ``fleet_parallelism``, …) go to
    :func:`core.portal.assemble`. Sign-up is open unless told otherwise, and waiting runs on the
    world's :class:`FakeTime`."""
    storage, clock, shell, fake_time = InMemoryStorage(), ManualClock(), FakeShell(), FakeTime()
    options: dict[str, Any] = {"monotonic": fake_time.monotonic, "sleep": fake_time.sleep, **assemble_options}
    portal = assemble(storage=storage, hasher=CountingKeyHasher(), secrets=ReversibleSecretBox(),
                      ssh_keys=FakeSshKeys(), clock=clock, signup=signup, shell=shell, **options)
    return World(storage, portal, clock, shell, fake_time)


def make_caller(world: World, name: str, address: str = "198.51.100.10") -> Caller:
    """A user the operator created, calling from ``address``."""
    created = world.portal.users.create_user(NewUser(name=name, email=f"{name}@example.com"), OPERATOR)
    return Caller(user=created.user, request_id=f"req-{name}", client_address=address)


def register(world: World, caller: Caller, **fields: Any) -> Agent:
    """An agent of ``caller`` with an encrypted key and a pinned host key; ``fields`` change it."""
    base: dict[str, Any] = {"name": "hv1", "hostname": "192.0.2.15", "username": "qemu-admin",
                            "private_key": ENCRYPTED_KEY, "private_key_passphrase": PASSPHRASE,
                            "host_key": HOST_KEY}
    return world.portal.agents.register_agent(caller, NewAgent(**{**base, **fields}))


def events(world: World) -> list[AuditEvent]:
    """Every stored audit event, oldest first, read straight from the fake storage."""
    return [event for _, event in sorted(world.storage.state.events.items())]


def new_events(world: World, since: int) -> list[AuditEvent]:
    """The audit events stored after the first ``since``."""
    return events(world)[since:]


def ok(command: tuple[str, ...], stdout: str = "") -> CommandResult:
    return CommandResult(command=command, exit_status=0, stdout=stdout, stderr="")


def fail(command: tuple[str, ...], stderr: str) -> CommandResult:
    return CommandResult(command=command, exit_status=1, stdout="\n", stderr=stderr)


def script(world: World, command: tuple[str, ...], *, exit_status: int = 0, stdout: str = "", stderr: str = "",
           host_key: HostKey | None = None) -> CommandResult:
    """Scripts the shell's answer to ``command`` and returns it."""
    result = CommandResult(command=command, exit_status=exit_status, stdout=stdout, stderr=stderr, host_key=host_key)
    world.shell.results[command] = result
    return result
