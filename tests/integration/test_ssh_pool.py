"""The asyncssh remote shell and its pool against an in-process asyncssh server on loopback.

The server counts connections and concurrent sessions, refuses more than 10 sessions per
connection (as OpenSSH's MaxSessions does), and runs a few fake commands: ``echo``, ``sleep N``
and ``virsh … list --all``."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncssh
import attrs
import pytest

from adapters.ssh import AsyncsshShell
from core.errors import RemoteError, RemoteTimeout
from core.model import Agent, AgentCredentials, ClientKey, HostKey

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakeHypervisor:
    def __init__(self, max_sessions: int = 10, stall_sessions: bool = False) -> None:
        self.max_sessions = max_sessions
        self.stall_sessions = stall_sessions  # accept connections but never open a session
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.connections = 0
        self.sessions_now: dict[int, int] = {}
        self.max_sessions_seen = 0
        self.commands: list[str] = []
        self.environments: list[dict[str, str]] = []
        self.server: asyncssh.SSHAcceptor | None = None
        self.port = 0

    async def start(self) -> None:
        hypervisor = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                hypervisor.connections += 1
                self.number = hypervisor.connections
                hypervisor.sessions_now[self.number] = 0

            def begin_auth(self, username: str) -> bool:
                return True

            def session_requested(self) -> Any:
                if hypervisor.stall_sessions:
                    return asyncio.get_running_loop().create_future()  # never answered
                if hypervisor.sessions_now[self.number] >= hypervisor.max_sessions:
                    return False  # like OpenSSH's MaxSessions
                hypervisor.sessions_now[self.number] += 1
                hypervisor.max_sessions_seen = max(hypervisor.max_sessions_seen, hypervisor.sessions_now[self.number])
                return Session(self.number)

        class Session(asyncssh.SSHServerSession):  # type: ignore[misc]
            def __init__(self, number: int) -> None:
                self.number = number
                self.chan: Any = None

            def connection_made(self, chan: Any) -> None:
                self.chan = chan

            def exec_requested(self, command: str) -> bool:
                hypervisor.commands.append(command)
                hypervisor.environments.append(dict(self.chan.get_environment()))
                self.task = asyncio.ensure_future(self.run(shlex.split(command)))
                return True

            async def run(self, argv: list[str]) -> None:
                if argv[0] == "sleep":
                    await asyncio.sleep(float(argv[1]))
                    self.chan.exit(0)
                elif argv[0] == "echo":
                    self.chan.write(" ".join(argv[1:]) + "\n")
                    self.chan.exit(0)
                else:
                    self.chan.write_stderr(f"{argv[0]}: command not found\n")
                    self.chan.exit(127)

            def connection_lost(self, exc: Exception | None) -> None:
                hypervisor.sessions_now[self.number] -= 1

        self.server = await asyncssh.create_server(
            Server, "127.0.0.1", 0, server_host_keys=[self.host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(
                self.client_key.export_public_key("openssh").decode()),
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    def target(self, **changes: Any) -> AgentCredentials:
        host_key = self.host_key.export_public_key("openssh").decode().strip()
        agent = Agent(
            id=1, owner_id=1, name="hv", hostname="127.0.0.1", port=self.port, username="qemu",
            allow_unknown_hosts=False,
            host_key=HostKey(host_key, self.host_key.get_fingerprint("sha256")),
            libvirt_uri="qemu:///system", client_key=ClientKey("ssh-ed25519 X", "SHA256:x"),
            sealed_private_key="", sealed_passphrase=None, created_at=NOW, updated_at=NOW,
        )
        agent = attrs.evolve(agent, **changes)
        return AgentCredentials(agent, self.client_key.export_private_key("openssh").decode(), None)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def lab(hypervisor_options: dict[str, Any] | None = None,
              **shell_options: Any) -> AsyncIterator[tuple[FakeHypervisor, AsyncsshShell]]:
    """A fake hypervisor listening on loopback and a shell to it; both closed afterwards."""
    hypervisor = FakeHypervisor(**(hypervisor_options or {}))
    await hypervisor.start()
    shell = AsyncsshShell(**{"connect_timeout": 2, "command_timeout": 2, **shell_options})
    try:
        yield hypervisor, shell
    finally:
        await shell.close()
        hypervisor.stop()


def test_sequential_commands_reuse_one_connection() -> None:
    async def scenario() -> None:
        async with lab(connect_timeout=2, command_timeout=2) as (hypervisor, shell):
            for n in range(5):
                result = await shell.run(hypervisor.target(), ["echo", f"hello {n}"])
                assert (result.exit_status, result.stdout) == (0, f"hello {n}\n")
            assert hypervisor.connections == 1
            assert shell.connections_opened == 1

    run(scenario())


def test_arguments_reach_the_host_quoted() -> None:
    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            result = await shell.run(hypervisor.target(), ["echo", "$(id)", "a;b", "it's"])
            assert result.stdout == "$(id) a;b it's\n"
            assert result.command == ("echo", "$(id)", "a;b", "it's")
            assert hypervisor.commands == ["echo '$(id)' 'a;b' 'it'\"'\"'s'"]
            assert hypervisor.environments == [{"LC_ALL": "C"}]  # virsh's English output, where sshd allows it

    run(scenario())


def test_more_than_ten_concurrent_commands_use_more_connections_never_over_ten_sessions() -> None:
    async def scenario() -> None:
        async with lab(connect_timeout=5, command_timeout=10) as (hypervisor, shell):
            results = await asyncio.gather(*(shell.run(hypervisor.target(), ["sleep", "0.3"]) for _ in range(25)))
            assert all(r.exit_status == 0 for r in results)
            assert hypervisor.max_sessions_seen <= 10
            assert hypervisor.connections == 3  # ceil(25 / 10): waiters share a connection being opened

    run(scenario())


def test_a_command_that_outlives_the_timeout_is_504_and_its_channel_closed() -> None:
    async def scenario() -> None:
        async with lab(connect_timeout=2, command_timeout=0.5) as (hypervisor, shell):
            with pytest.raises(RemoteTimeout) as timeout:
                await shell.run(hypervisor.target(), ["sleep", "30"])
            assert timeout.value.code == "command_timeout"
            for _ in range(50):  # the server sees the channel close
                if sum(hypervisor.sessions_now.values()) == 0:
                    break
                await asyncio.sleep(0.02)
            assert sum(hypervisor.sessions_now.values()) == 0
            # the connection is still good for the next command
            assert (await shell.run(hypervisor.target(), ["echo", "ok"])).stdout == "ok\n"

    run(scenario())


def test_a_wrong_pinned_host_key_is_refused_as_a_mismatch() -> None:
    async def scenario() -> None:
        other = asyncssh.generate_private_key("ssh-ed25519")
        wrong = HostKey(other.export_public_key("openssh").decode().strip(), other.get_fingerprint("sha256"))
        async with lab() as (hypervisor, shell):
            with pytest.raises(RemoteError) as refused:
                await shell.run(hypervisor.target(host_key=wrong), ["echo", "x"])
            assert refused.value.code == "host_key_mismatch"
            assert "PATCH host_key" in refused.value.detail

    run(scenario())


def test_no_pinned_key_without_allow_unknown_hosts_is_refused_with_the_offered_fingerprint() -> None:
    async def scenario() -> None:
        async with lab(connect_timeout=2) as (hypervisor, shell):
            with pytest.raises(RemoteError) as refused:
                await shell.run(hypervisor.target(host_key=None), ["echo", "x"])
            assert refused.value.code == "host_key_unknown"
            assert hypervisor.host_key.get_fingerprint("sha256") in refused.value.detail
            assert hypervisor.commands == []

    run(scenario())


def test_unknown_hosts_allowed_reports_the_key_seen_for_pinning() -> None:
    async def scenario() -> None:
        async with lab(connect_timeout=2) as (hypervisor, shell):
            result = await shell.run(hypervisor.target(host_key=None, allow_unknown_hosts=True), ["echo", "x"])
            assert result.host_key is not None
            assert result.host_key.fingerprint == hypervisor.host_key.get_fingerprint("sha256")

    run(scenario())


def test_a_settings_change_drops_the_old_connection() -> None:
    async def scenario() -> None:
        async with lab(connect_timeout=2) as (hypervisor, shell):
            await shell.run(hypervisor.target(), ["echo", "1"])
            await shell.run(hypervisor.target(revision=2), ["echo", "2"])
            assert hypervisor.connections == 2
            assert shell.open_connections(1) == 1
            shell.discard(1)
            assert shell.open_connections(1) == 0

    run(scenario())


def test_wrong_key_is_an_authentication_failure() -> None:
    async def scenario() -> None:
        async with lab(connect_timeout=2) as (hypervisor, shell):
            stranger = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh").decode()
            target = hypervisor.target()
            with pytest.raises(RemoteError) as refused:
                await shell.run(AgentCredentials(target.agent, stranger, None), ["echo", "x"])
            assert refused.value.code == "agent_auth_failed"

    run(scenario())


def test_a_closed_port_is_refused_quickly() -> None:
    async def scenario() -> None:
        hypervisor = FakeHypervisor()
        await hypervisor.start()
        hypervisor.stop()
        shell = AsyncsshShell(connect_timeout=2)
        with pytest.raises(RemoteError) as refused:
            await shell.run(hypervisor.target(), ["echo", "x"])
        assert refused.value.code == "agent_unreachable"
        await shell.close()

    run(scenario())


def test_a_pooled_connection_that_died_is_replaced_transparently() -> None:
    async def scenario() -> None:
        async with lab(connect_timeout=2) as (hypervisor, shell):
            await shell.run(hypervisor.target(), ["echo", "1"])
            # kill the connection from the server side while it sits idle in the pool
            for slot in shell._pools[1]:
                conn = slot.connection()
                assert conn is not None
                conn._transport.abort()  # the TCP connection drops without a goodbye
            await asyncio.sleep(0.05)
            assert (await shell.run(hypervisor.target(), ["echo", "2"])).stdout == "2\n"
            assert hypervisor.connections == 2

    run(scenario())


def test_a_server_that_never_opens_a_session_times_out_instead_of_hanging() -> None:
    async def scenario() -> None:
        async with lab({"stall_sessions": True}, command_timeout=0.5) as (hypervisor, shell):
            with pytest.raises(RemoteTimeout) as timeout:
                await asyncio.wait_for(shell.run(hypervisor.target(), ["echo", "x"]), timeout=10)
            assert timeout.value.code == "command_timeout"
            assert shell.open_connections(1) == 0  # that connection is not reused

    run(scenario())


def test_a_server_allowing_fewer_sessions_still_serves_every_command() -> None:
    async def scenario() -> None:
        async with lab({"max_sessions": 3}, command_timeout=10) as (hypervisor, shell):
            results = await asyncio.gather(*(shell.run(hypervisor.target(), ["sleep", "0.2"]) for _ in range(10)))
            assert [r.exit_status for r in results] == [0] * 10
            assert hypervisor.max_sessions_seen <= 3

    run(scenario())


def test_trust_on_first_use_refuses_a_connection_whose_key_differs_from_the_pinned_one() -> None:
    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            other = asyncssh.generate_private_key("ssh-ed25519")
            pinned_first = HostKey(other.export_public_key("openssh").decode().strip(), other.get_fingerprint("sha256"))

            async def pin(seen: HostKey) -> HostKey:
                return pinned_first  # a concurrent first connection pinned another host's key

            with pytest.raises(RemoteError) as refused:
                await shell.run(hypervisor.target(host_key=None, allow_unknown_hosts=True), ["echo", "x"], pin=pin)
            assert refused.value.code == "host_key_mismatch"
            assert hypervisor.commands == []  # nothing ran on the impostor

    run(scenario())


def test_trust_on_first_use_pins_before_the_first_command() -> None:
    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            pinned: list[HostKey] = []

            async def pin(seen: HostKey) -> HostKey:
                assert hypervisor.commands == []
                pinned.append(seen)
                return seen

            await shell.run(hypervisor.target(host_key=None, allow_unknown_hosts=True), ["echo", "x"], pin=pin)
            assert [k.fingerprint for k in pinned] == [hypervisor.host_key.get_fingerprint("sha256")]

    run(scenario())


def test_a_recycled_agent_id_never_inherits_another_agents_connection() -> None:
    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            await shell.run(hypervisor.target(), ["echo", "alice"])
            # same id and revision, but another owner: a different agent
            await shell.run(hypervisor.target(owner_id=2), ["echo", "bob"])
            assert hypervisor.connections == 2

    run(scenario())
