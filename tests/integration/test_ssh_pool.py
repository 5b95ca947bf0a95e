"""The asyncssh remote shell and its pool against an in-process asyncssh server on loopback.

The server counts connections and concurrent sessions, refuses more than 10 sessions per
connection (as OpenSSH's MaxSessions does), and runs a few fake commands: ``echo``, ``sleep N``
``cat`` and ``virsh … list --all``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shlex
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncssh
import attrs
import pytest

from adapters.memory import CountingKeyHasher, FakeSshKeys, InMemoryStorage, ManualClock, ReversibleSecretBox
from adapters.ssh import AsyncsshShell
from core import virsh
from core.commands import NewAgent, NewUser
from core.errors import (
    DETAIL_LIMIT,
    AgentAddressRefused,
    AgentAuthFailed,
    AgentConnectTimeout,
    NotSsh,
    OutputTooLarge,
    RemoteError,
    RemoteTimeout,
    TooManyOperations,
)
from core.model import Agent, AgentCredentials, Caller, ClientKey, HostKey, Origin, SignupPolicy
from core.networks import AgentNetworks, IPAddress
from core.portal import assemble
from core.ports import CommandResult
from tests.support import LOOPBACK_NETWORKS

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
        self.flood_sent = 0  # bytes the flood command wrote before it ended or was cut off
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
                self.writable = asyncio.Event()  # SSH flow control: the client's window is open
                self.writable.set()
                self.closed = False
                self.catting = False  # `cat`: echo stdin back until its end

            def pause_writing(self) -> None:
                self.writable.clear()

            def resume_writing(self) -> None:
                self.writable.set()

            def connection_made(self, chan: Any) -> None:
                self.chan = chan

            def data_received(self, data: str, datatype: Any) -> None:
                if self.catting:
                    self.chan.write(data)

            def eof_received(self) -> bool:
                if self.catting:
                    self.chan.exit(0)
                return False

            def exec_requested(self, command: str) -> bool:
                hypervisor.commands.append(command)
                hypervisor.environments.append(dict(self.chan.get_environment()))
                self.task = asyncio.ensure_future(self.run(shlex.split(command)))
                return True

            async def run(self, argv: list[str]) -> None:
                if argv[0] == "sleep":
                    await asyncio.sleep(float(argv[1]))
                    self.chan.exit(0)
                elif argv[0] == "cat":
                    self.catting = True
                elif argv[0] == "echo":
                    self.chan.write(" ".join(argv[1:]) + "\n")
                    self.chan.exit(0)
                elif argv[0] == "flood":  # flood BYTES [stdout|stderr|both]: as fast as the client reads
                    await self.flood(int(argv[1]), argv[2] if len(argv) > 2 else "stdout")
                elif argv[0] == "die":  # some output, then the whole connection drops (sshd killed)
                    self.chan.write("partial output\n")
                    await asyncio.sleep(0.05)
                    self.chan.get_extra_info("connection").abort()
                else:
                    self.chan.write_stderr(f"{argv[0]}: command not found\n")
                    self.chan.exit(127)

            async def flood(self, total: int, streams: str) -> None:
                chunk = "x" * 65536
                sent = 0
                while sent < total:
                    await self.writable.wait()
                    if self.closed:
                        return  # the client closed the channel: stop, as a real command gets SIGPIPE
                    piece = chunk[:min(len(chunk), total - sent)]
                    if streams in ("stdout", "both"):
                        self.chan.write(piece)
                    if streams in ("stderr", "both"):
                        self.chan.write_stderr(piece)
                    sent += len(piece)
                    hypervisor.flood_sent += len(piece) * (2 if streams == "both" else 1)
                self.chan.exit(0)

            def connection_lost(self, exc: Exception | None) -> None:
                hypervisor.sessions_now[self.number] -= 1
                self.closed = True
                self.writable.set()

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
    shell = AsyncsshShell(**{"connect_timeout": 2, "command_timeout": 2, "networks": LOOPBACK_NETWORKS,
                             **shell_options})
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
        async with lab(connect_timeout=5, command_timeout=10, max_operations_per_user=25) as (hypervisor, shell):
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
        shell = AsyncsshShell(connect_timeout=2, networks=LOOPBACK_NETWORKS)
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


# ---------------------------------------------------------------------- issue 14 (hardening)

MIB = 1024 * 1024


def test_item2_output_past_the_cap_is_output_too_large_and_the_channel_closed() -> None:
    """A host answering with 64 MiB: the shell holds at most the cap, closes the channel, and the
    host manages to send only what the SSH window let through (the portal stopped reading)."""
    async def scenario() -> None:
        async with lab(command_timeout=30, max_output_bytes=256 * 1024) as (hypervisor, shell):
            with pytest.raises(OutputTooLarge) as too_large:
                await shell.run(hypervisor.target(), ["flood", str(64 * MIB)])
            assert too_large.value.code == "output_too_large"
            assert "MANAGEMENT_MAX_OUTPUT_BYTES" in too_large.value.detail
            assert hypervisor.flood_sent < 8 * MIB  # cap + SSH window + send buffer, not 64 MiB
            for _ in range(100):  # the server sees the channel close
                if sum(hypervisor.sessions_now.values()) == 0:
                    break
                await asyncio.sleep(0.02)
            assert sum(hypervisor.sessions_now.values()) == 0
            # the connection is still good for the next command
            assert (await shell.run(hypervisor.target(), ["echo", "ok"])).stdout == "ok\n"
            assert hypervisor.connections == 1

    run(scenario())


def test_item2_stdout_and_stderr_count_together_and_output_up_to_the_cap_is_whole() -> None:
    async def scenario() -> None:
        cap = 256 * 1024
        async with lab(command_timeout=30, max_output_bytes=cap) as (hypervisor, shell):
            whole = await shell.run(hypervisor.target(), ["flood", str(cap // 2), "both"])
            assert (len(whole.stdout), len(whole.stderr), whole.exit_status) == (cap // 2, cap // 2, 0)
            with pytest.raises(OutputTooLarge):
                await shell.run(hypervisor.target(), ["flood", str(cap // 2 + 1), "both"])
            with pytest.raises(OutputTooLarge):
                await shell.run(hypervisor.target(), ["flood", str(cap + 1), "stderr"])

    run(scenario())


def test_item2_error_details_stay_a_few_kib_whatever_the_host_writes() -> None:
    """virsh's stderr is quoted in error details: a hostile host's megabyte of it is cut to 4 KiB."""
    stderr = "error: " + "A" * MIB
    result = CommandResult(command=("virsh", "list"), exit_status=1, stdout="", stderr=stderr)
    with pytest.raises(RemoteError) as failed:
        virsh.raise_for_failure(result)
    assert len(failed.value.detail) <= DETAIL_LIMIT + 100
    assert failed.value.detail.startswith("virsh failed with exit status 1: error: AAAA")
    assert str(failed.value) == failed.value.detail


class PlainTcpService:
    """Something that is not sshd on a loopback port: answers like a web server (``http``), or
    accepts and says nothing (``silent``)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.held: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            if self.behaviour == "silent":
                self.held.append(writer)
                return
            await reader.readline()  # the client's "SSH-2.0-…" line, read as a request line
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        for writer in self.held:
            writer.close()
        assert self.server is not None
        self.server.close()


@pytest.mark.parametrize("pinned", [True, False])
def test_a_port_that_accepts_and_stays_silent_is_a_connect_timeout(pinned: bool) -> None:
    """Silence is not proof of "not SSH" (an overloaded sshd, a tarpit): it is a time-out."""
    async def scenario() -> None:
        service = PlainTcpService("silent")
        await service.start()
        shell = AsyncsshShell(connect_timeout=0.5, networks=LOOPBACK_NETWORKS)
        try:
            target = FakeHypervisor().target(port=service.port, **({} if pinned else {"host_key": None}))
            with pytest.raises(AgentConnectTimeout) as timed_out:
                await shell.run(target, ["echo", "x"])
            assert not timed_out.value.reached_host
            assert service.connections >= 1
        finally:
            await shell.close()
            service.stop()

    run(scenario())


@pytest.mark.parametrize("pinned", [True, False])
def test_item13_a_service_that_is_not_sshd_is_not_ssh_reached_but_not_logged_in(pinned: bool) -> None:
    async def scenario() -> None:
        service = PlainTcpService("http")
        await service.start()
        hypervisor = FakeHypervisor()  # only for a target with real keys
        shell = AsyncsshShell(connect_timeout=0.5, networks=LOOPBACK_NETWORKS)
        try:
            target = hypervisor.target(port=service.port, **({} if pinned else {"host_key": None}))
            with pytest.raises(NotSsh) as not_ssh:
                await shell.run(target, ["echo", "x"])
            assert not_ssh.value.code == "not_ssh"
            assert not_ssh.value.reached_host and not not_ssh.value.logged_in
            assert "SSH port" in not_ssh.value.detail
            assert service.connections >= 1
        finally:
            await shell.close()
            service.stop()

    run(scenario())


def test_item13_a_check_of_a_non_ssh_service_says_reachable_not_authenticated_not_ssh() -> None:
    async def scenario() -> None:
        service = PlainTcpService("http")
        await service.start()
        hypervisor = FakeHypervisor()
        shell = AsyncsshShell(connect_timeout=1, networks=LOOPBACK_NETWORKS)
        portal = assemble(storage=InMemoryStorage(), hasher=CountingKeyHasher(), secrets=ReversibleSecretBox(),
                          ssh_keys=FakeSshKeys(), clock=ManualClock(), signup=SignupPolicy.OPEN, shell=shell)
        try:
            created = await asyncio.to_thread(portal.users.create_user, NewUser(name="alice"),
                                              Origin("req", "127.0.0.1"))
            user = created.user
            caller = Caller(user=user, request_id="req", client_address="127.0.0.1")
            target = hypervisor.target()
            assert target.agent.host_key is not None
            agent = portal.agents.register_agent(caller, NewAgent(
                name="web", hostname="127.0.0.1", port=service.port, username="qemu",
                private_key=target.private_key, host_key=target.agent.host_key.openssh))
            check = await portal.fleet.check_agent(caller, agent.id)
            assert (check.reachable, check.authenticated, check.libvirt_reachable) == (True, False, False)
            assert check.error is not None and check.error.code == "not_ssh"
        finally:
            await shell.close()
            service.stop()

    run(scenario())


def test_item4_a_loopback_agent_is_refused_before_any_connection_by_default() -> None:
    async def scenario() -> None:
        async with lab(networks=AgentNetworks()) as (hypervisor, shell):
            for target in (hypervisor.target(), hypervisor.target(host_key=None)):
                with pytest.raises(AgentAddressRefused) as refused:
                    await shell.run(target, ["echo", "x"])
                assert refused.value.code == "agent_address_refused"
                assert "MANAGEMENT_AGENT_NETWORKS" in refused.value.detail
                assert [e.field for e in refused.value.errors] == ["hostname"]
            assert hypervisor.connections == 0

    run(scenario())


def test_item4_a_name_is_resolved_once_per_connection_and_the_checked_address_is_used() -> None:
    """A rebinding name: the first answer is the allowed address, later ones another address. The
    shell asks once, checks that answer and connects to it; a name resolving to any refused address
    is refused whole."""
    async def scenario() -> None:
        asked: list[str] = []
        answers = {"hv.test": [["127.0.0.1"], ["127.0.0.2"]], "mixed.test": [["127.0.0.1", "127.0.0.9"]]}

        async def resolver(hostname: str, port: int) -> list[IPAddress]:
            asked.append(hostname)
            return [ipaddress.ip_address(a) for a in answers[hostname].pop(0)]

        only = AgentNetworks.parse("127.0.0.1/32")
        async with lab(networks=only, resolver=resolver) as (hypervisor, shell):
            result = await shell.run(hypervisor.target(hostname="hv.test"), ["echo", "x"])
            assert result.stdout == "x\n"
            assert asked == ["hv.test"] and hypervisor.connections == 1
            assert (await shell.run(hypervisor.target(hostname="hv.test"), ["echo", "y"])).stdout == "y\n"
            assert asked == ["hv.test"]  # the pooled connection: no new lookup
            with pytest.raises(AgentAddressRefused) as refused:
                await shell.run(hypervisor.target(id=2, hostname="mixed.test"), ["echo", "x"])
            assert "127.0.0.9" in refused.value.detail
            assert hypervisor.connections == 1

    run(scenario())


def test_item5_a_failing_connection_does_not_import_the_client_key_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parsed key is cached per agent revision: three refused logins, one import (one KDF)."""
    imports: list[str] = []
    real_import = asyncssh.import_private_key

    def counting_import(data: Any, passphrase: Any = None, **kwargs: Any) -> asyncssh.SSHKey:
        imports.append("import")
        return real_import(data, passphrase, **kwargs)

    monkeypatch.setattr(asyncssh, "import_private_key", counting_import)

    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            stranger = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh").decode()
            refused = AgentCredentials(hypervisor.target().agent, stranger, None)
            for _ in range(3):
                with pytest.raises(AgentAuthFailed):
                    await shell.run(refused, ["echo", "x"])
            assert len(imports) == 1
            # concurrent first connections share one import too
            fresh = hypervisor.target(revision=2)
            await asyncio.gather(*(shell.run(fresh, ["sleep", "0.1"]) for _ in range(12)))
            assert hypervisor.connections == 2 + 3  # two connections for 12 sessions, after 3 refused
            assert len(imports) == 2  # a new revision is a new key
            shell.discard(1)
            await asyncio.sleep(0)
            await shell.run(fresh, ["echo", "x"])
            assert len(imports) == 3  # a discarded agent's key is forgotten

    run(scenario())


def test_item5_client_keys_are_decrypted_in_their_own_pool_never_in_the_shared_executor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A key's KDF runs in the ``client-key`` threads: costly keys of one tenant cannot take the
    default executor's threads, where every database use case of every user runs."""
    threads: list[str] = []
    real_import = asyncssh.import_private_key

    def recording_import(data: Any, passphrase: Any = None, **kwargs: Any) -> asyncssh.SSHKey:
        threads.append(threading.current_thread().name)
        return real_import(data, passphrase, **kwargs)

    monkeypatch.setattr(asyncssh, "import_private_key", recording_import)

    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            await shell.run(hypervisor.target(), ["echo", "x"])

    run(scenario())
    assert threads and all(name.startswith("client-key") for name in threads), threads


def test_item5_concurrent_operations_per_user_are_limited_with_retry_after() -> None:
    async def scenario() -> None:
        async with lab(command_timeout=30, max_operations_per_user=2) as (hypervisor, shell):
            running = [asyncio.ensure_future(shell.run(hypervisor.target(), ["sleep", "30"])) for _ in range(2)]
            await asyncio.sleep(0)  # both have started (they count before their first await)
            assert shell.operations_running(1) == 2
            with pytest.raises(TooManyOperations) as limited:
                await shell.run(hypervisor.target(), ["echo", "x"])
            assert limited.value.code == "too_many_operations" and limited.value.retry_after >= 1
            assert "MANAGEMENT_MAX_OPERATIONS_PER_USER" in limited.value.detail
            # another user is not affected
            other = hypervisor.target(id=2, owner_id=2)
            assert (await shell.run(other, ["echo", "bob"])).stdout == "bob\n"
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            assert shell.operations_running(1) == 0
            assert (await shell.run(hypervisor.target(), ["echo", "again"])).stdout == "again\n"

    run(scenario())


def test_a_connection_dying_in_the_middle_of_the_output_is_connection_lost() -> None:
    """Reading output incrementally keeps the old outcome when sshd dies mid-command."""
    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            with pytest.raises(RemoteError) as lost:
                await shell.run(hypervisor.target(), ["die"])
            assert lost.value.code == "agent_connection_lost"
            assert (await shell.run(hypervisor.target(), ["echo", "back"])).stdout == "back\n"

    run(scenario())


def test_stdin_reaches_the_command_whole_then_end_of_file() -> None:
    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            data = "".join(chr(0x41 + n % 26) for n in range(300_000))
            result = await shell.run(hypervisor.target(), ["cat"], stdin=data.encode())
            assert (result.exit_status, result.stdout) == (0, data)

    run(scenario())


def test_a_stream_relays_both_ways_and_leaving_it_closes_the_channel() -> None:
    async def scenario() -> None:
        async with lab() as (hypervisor, shell):
            async with shell.stream(hypervisor.target(), ["cat"]) as stream:
                for word in (b"one\n", b"two\n"):
                    await stream.write(word)
                    assert await stream.read() == word
                assert hypervisor.sessions_now[1] == 1
            for _ in range(200):  # the server learns of the close one round trip later
                if hypervisor.sessions_now[1] == 0:
                    break
                await asyncio.sleep(0.01)
            assert hypervisor.sessions_now[1] == 0
            # the connection stays pooled for the next command
            assert (await shell.run(hypervisor.target(), ["echo", "after"])).stdout == "after\n"
            assert hypervisor.connections == 1

    run(scenario())


def test_a_stream_whose_command_ends_reads_end_of_file_and_its_status() -> None:
    async def scenario() -> None:
        async with lab() as (hypervisor, shell), shell.stream(hypervisor.target(), ["echo", "bye"]) as stream:
            assert await stream.read() == b"bye\n"
            assert await stream.read() == b""
            assert await stream.wait_closed() == 0

    run(scenario())
