"""The HTTP client (entrypoints/client.py) and the command line in remote mode, against a live
portal under gunicorn: every operation of the served document is a client method, answers are the
typed views, problems raise the core.errors class of their code, and a wrong URL, a bad key or a
TLS failure is one clear line with its documented exit code."""

from __future__ import annotations

import asyncio
import datetime
import http.server
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core import errors
from entrypoints import remote
from entrypoints.client import ApiError, AsyncClient, Client, PortalUnreachable, TlsError
from entrypoints.shapes import (
    AgentCheckView,
    AgentView,
    AuditPage,
    CredentialsView,
    FleetEntryView,
    PublicKeyView,
    UserView,
    UserWithKeyView,
)
from tests.support import REPO, KeyMaterial, Server, free_port, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # sign-up policy "first": the first user signs up, everyone after is refused (403)
    portal = Server(tmp_path_factory.mktemp("client"), MANAGEMENT_WORKERS="1",
                    MANAGEMENT_SSH_CONNECT_TIMEOUT="2").start()
    yield portal
    portal.stop()


@pytest.fixture(scope="module")
def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def user(url: str) -> UserWithKeyView:
    with Client(url) as anonymous:
        created = anonymous.sign_up(name="alice", email="alice@example.com")
    assert isinstance(created, UserWithKeyView)
    return created


@pytest.fixture(scope="module")
def dead_agent(url: str, user: UserWithKeyView) -> AgentView:
    """An agent whose SSH port refuses: every host operation is a 502 agent_unreachable."""
    with Client(url, user.api_key) as portal:
        agent = portal.register_agent(name="dead", hostname="127.0.0.1", port=free_port(), username="playr-agent",
                                      generate_key=True)
    assert isinstance(agent, AgentView)
    return agent


def test_every_operation_of_the_served_document_is_a_client_method(url: str) -> None:
    with Client(url) as portal:
        document = portal.get_openapi()
    ids = [operation["operationId"] for path in document["paths"].values() for operation in path.values()]
    assert len(ids) >= 25 and "start_vm" in ids
    sync, asynchronous = Client(url), AsyncClient(url)
    for name in ids:
        assert callable(getattr(sync, name)), name
        assert callable(getattr(asynchronous, name)), name
        assert name in dir(sync)
    sync.close()
    asyncio.run(asynchronous.aclose())


def test_a_rotated_key_replaces_the_old_one_in_the_client(url: str, server: Server, user: UserWithKeyView,
                                                          tmp_path: Path) -> None:
    made = cli("users", "create", "--name", "bob", home=tmp_path, **local_env(server, ""))  # the operator, locally
    assert made.returncode == 0, made.stderr
    old_key = json.loads(made.stdout)["api_key"]
    with Client(url, old_key) as portal:
        rotated = portal.rotate_api_key()
        assert isinstance(rotated, UserWithKeyView) and rotated.api_key != old_key
        assert portal.api_key == rotated.api_key and portal.get_current_user().name == "bob"
    with Client(url, old_key) as stale, pytest.raises(errors.Unauthenticated):
        stale.get_current_user()


def test_sign_up_after_the_first_user_is_403_signup_refused(url: str, user: UserWithKeyView) -> None:
    with Client(url) as anonymous, pytest.raises(errors.SignupRefused) as refused:
        anonymous.sign_up(name="mallory")
    assert isinstance(refused.value, ApiError)
    assert (refused.value.status, refused.value.code) == (403, "signup_closed") and refused.value.detail


def test_a_bad_or_missing_key_is_401_of_its_class(url: str, user: UserWithKeyView) -> None:
    with Client(url, "mgmt_" + "x" * 40) as wrong, pytest.raises(errors.Unauthenticated) as bad:
        wrong.list_agents()
    assert bad.value.status == 401 and bad.value.code == "invalid_api_key"  # type: ignore[attr-defined]
    with Client(url) as nobody, pytest.raises(errors.MissingApiKey) as missing:
        nobody.get_current_user()
    assert missing.value.status == 401  # type: ignore[attr-defined]


def test_agents_family_and_its_errors(url: str, user: UserWithKeyView, keys: KeyMaterial) -> None:
    with Client(url, user.api_key) as portal:
        me = portal.get_current_user()
        assert isinstance(me, UserView) and me.id == user.id
        agent = portal.register_agent("hv-uploaded", "192.0.2.15", "qemu-admin", private_key=keys.openssh)
        assert isinstance(agent, AgentView) and agent.key_exportable
        assert agent.created_at.tzinfo is not None
        assert portal.agent(agent.id) == agent  # the library's alias works too
        assert agent in portal.agents()
        assert agent in portal.list_agents(after=agent.id - 1, limit=1)
        changed = portal.update_agent(agent.id, name="hv-renamed")
        assert changed.name == "hv-renamed"
        credentials = portal.read_credentials(agent.id)
        assert isinstance(credentials, CredentialsView) and "PRIVATE KEY" in credentials.private_key
        key = portal.get_public_key(agent.id)
        assert isinstance(key, PublicKeyView) and key.authorized_keys_line.endswith(f"agent-{agent.id}")
        generated = portal.register_agent(name="hv-generated", hostname="192.0.2.16", username="playr-agent",
                                          generate_key=True)
        with pytest.raises(errors.KeyNotExportable) as not_exportable:  # 409
            portal.read_credentials(generated.id)
        assert not_exportable.value.status == 409  # type: ignore[attr-defined]
        with pytest.raises(errors.AgentNameTaken) as taken:  # 409
            portal.register_agent(name="hv-renamed", hostname="192.0.2.17", username="u", generate_key=True)
        assert taken.value.code == "agent_name_taken"
        with pytest.raises(errors.ValidationFailed) as invalid:  # 422, naming each field
            portal.register_agent(name="", hostname="192.0.2.18", username="u", generate_key=True, port=0)
        assert invalid.value.status == 422  # type: ignore[attr-defined]
        assert {e.field for e in invalid.value.errors} >= {"name", "port"}
        rotated = portal.rotate_agent_key(generated.id)
        assert rotated.public_key != generated.public_key
        portal.delete_agent(generated.id)
        with pytest.raises(errors.AgentNotFound) as gone:  # 404
            portal.get_agent(generated.id)
        assert gone.value.status == 404 and gone.value.request_id  # type: ignore[attr-defined]
        assert isinstance(gone.value, errors.NotFound)
        page = portal.list_audit_events(limit=5)
        assert isinstance(page, AuditPage) and page.events and page.events[0].action


def test_host_operations_of_an_unreachable_agent_are_502_remote_errors(url: str, user: UserWithKeyView,
                                                                        dead_agent: AgentView) -> None:
    with Client(url, user.api_key) as portal:
        for call in (lambda: portal.list_vms(dead_agent.id), lambda: portal.start_vm(dead_agent.id, "web1", wait=5),
                     lambda: portal.list_snapshots(dead_agent.id, "web1"), lambda: portal.get_host(dead_agent.id)):
            with pytest.raises(errors.AgentUnreachable) as failed:
                call()
            assert isinstance(failed.value, errors.RemoteError) and failed.value.status == 502  # type: ignore[attr-defined]
        check = portal.check_agent(dead_agent.id)
        assert isinstance(check, AgentCheckView) and not check.reachable and check.error is not None
        fleet = portal.list_fleet(agent=[dead_agent.id])
        assert fleet == [FleetEntryView(dead_agent.id, "dead", None, fleet[0].error)]
        assert fleet[0].error is not None and fleet[0].error.code == "agent_unreachable"


def test_arguments_are_checked_like_the_librarys_before_anything_is_sent(url: str, user: UserWithKeyView) -> None:
    with Client(url, user.api_key) as portal:
        with pytest.raises(errors.ValidationFailed):
            portal.start_vm(1, "web1", wait="soon")
        with pytest.raises(TypeError):
            portal.list_vms()
        with pytest.raises(AttributeError):
            portal.no_such_operation  # noqa: B018


def test_the_async_client_drives_the_same_operations(url: str, user: UserWithKeyView, dead_agent: AgentView) -> None:
    async def flow() -> tuple[list[AgentView], Exception]:
        async with AsyncClient(url, user.api_key) as portal:
            agents, failure = await asyncio.gather(portal.agents(), portal.get_vm(dead_agent.id, "web 1"),
                                                   return_exceptions=True)
            return agents, failure  # type: ignore[return-value]

    agents, failure = asyncio.run(flow())
    assert dead_agent in agents
    assert isinstance(failure, errors.AgentUnreachable)


def test_a_closed_port_is_portal_unreachable(user: UserWithKeyView) -> None:
    with Client(f"http://127.0.0.1:{free_port()}", user.api_key, retries=1, backoff=0.01) as portal, \
            pytest.raises(PortalUnreachable) as unreachable:
        portal.list_agents()
    assert "cannot reach the portal" in str(unreachable.value)


# ---------------------------------------------------------------------- the command line, remote


def cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MANAGEMENT_URL", "MANAGEMENT_API_KEY", "MANAGEMENT_CA_FILE")}
    environment.update({"PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(home), **env})
    return subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], capture_output=True, text=True,
                          env=environment, timeout=60)


def local_env(server: Server, api_key: str) -> dict[str, str]:
    """The portal's own database and settings, as on the portal host."""
    return {"MANAGEMENT_DB_PATH": str(server.workdir / "data" / "management.sqlite3"),
            "MANAGEMENT_AGENT_NETWORKS": server.env["MANAGEMENT_AGENT_NETWORKS"],
            "MANAGEMENT_SSH_CONNECT_TIMEOUT": "2", "MANAGEMENT_API_KEY": api_key}


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_the_same_commands_print_the_same_locally_and_remotely(url: str, server: Server, user: UserWithKeyView,
                                                              dead_agent: AgentView, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    agent = str(dead_agent.id)
    here_env = {**local_env(server, user.api_key), "XDG_CONFIG_HOME": str(tmp_path)}
    there_env = {"MANAGEMENT_URL": url, "MANAGEMENT_API_KEY": user.api_key, "XDG_CONFIG_HOME": str(tmp_path)}
    for command in (["agents", "list"], ["agents", "list", "--json"], ["agents", "public-key", agent],
                    ["agents", "check", agent], ["agents", "check", agent, "--json"],
                    ["vms", "fleet", "--agent", agent], ["vms", "fleet", "--agent", agent, "--json"],
                    ["vms", "list", agent], ["vms", "snapshots", "list", agent, "web1"], ["agents", "host", "999"]):
        here = run_cli(monkeypatch, capsys, command, here_env)
        there = run_cli(monkeypatch, capsys, command, there_env)
        assert there == here, command
        assert here[1] or here[2], command
    status, _out, err = run_cli(monkeypatch, capsys, ["vms", "list", agent], there_env)
    assert status == remote.EXIT_FAILED and err.startswith("error: agent_unreachable:")  # 502
    assert run_cli(monkeypatch, capsys, ["agents", "host", "999"], there_env)[0] == remote.EXIT_NOT_FOUND


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Any:
    """The command line run in this process (``run_cli``), answering like ``cli``: cheaper where the
    point is the exit code and the message, not the process (a traceback would fail the test too)."""
    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        status, out, err = run_cli(monkeypatch, capsys, list(args), {"XDG_CONFIG_HOME": str(tmp_path), **env})
        return subprocess.CompletedProcess(list(args), status, out, err)
    return run


def test_remote_errors_exit_with_the_code_of_their_kind(in_process: Any, url: str, user: UserWithKeyView) -> None:
    env = {"MANAGEMENT_URL": url, "MANAGEMENT_API_KEY": user.api_key}
    with Client(url, user.api_key) as portal:
        taken = portal.register_agent(name="second", hostname="192.0.2.21", username="u", generate_key=True)
    renamed = in_process("agents", "rotate-key", str(taken.id), "--json", **env)
    assert renamed.returncode == 0 and json.loads(renamed.stdout)["agent_id"] == taken.id
    missing = in_process("vms", "snapshots", "delete", "999", "web1", "s1", **env)
    assert missing.returncode == remote.EXIT_NOT_FOUND
    assert one_line(missing).startswith("error: agent_not_found:")
    invalid = in_process("vms", "start", "1", "web1", "--wait", "9999", **env)
    assert invalid.returncode == remote.EXIT_USAGE and "validation_failed" in one_line(invalid)


def test_a_wrong_url_a_bad_key_and_tls_failures_are_one_line_each(url: str, server: Server, user: UserWithKeyView,
                                                                  tmp_path: Path) -> None:
    refused = cli("agents", "list", home=tmp_path, MANAGEMENT_URL=f"http://127.0.0.1:{free_port()}",
                  MANAGEMENT_API_KEY=user.api_key)
    assert refused.returncode == remote.EXIT_UNREACHABLE
    assert one_line(refused).startswith("error: cannot reach the portal at http://127.0.0.1:")
    bad_key = cli("agents", "list", home=tmp_path, MANAGEMENT_URL=url, MANAGEMENT_API_KEY="mgmt_not-a-key")
    assert bad_key.returncode == remote.EXIT_DENIED
    assert one_line(bad_key).startswith("error: invalid_api_key:")
    plain = cli("agents", "list", "--url", f"https://127.0.0.1:{server.port}", home=tmp_path,
                MANAGEMENT_API_KEY=user.api_key)
    assert plain.returncode == remote.EXIT_UNREACHABLE
    assert "TLS handshake" in one_line(plain) and "plain HTTP" in plain.stderr
    no_url = cli("agents", "list", home=tmp_path, MANAGEMENT_URL="manage.example.com",
                 MANAGEMENT_API_KEY=user.api_key)
    assert no_url.returncode == remote.EXIT_USAGE and "MANAGEMENT_URL" in one_line(no_url)
    no_key = cli("agents", "list", home=tmp_path, MANAGEMENT_URL=url)
    assert no_key.returncode == remote.EXIT_USAGE and "MANAGEMENT_API_KEY" in one_line(no_key)


def test_operator_commands_refuse_to_run_remotely(in_process: Any, url: str, tmp_path: Path) -> None:
    for command in (["users", "create", "--name", "x"], ["db", "upgrade"]):
        refused = in_process("--url", url, *command)
        assert refused.returncode == remote.EXIT_USAGE
        assert "runs only on the portal host" in one_line(refused) and "--url" in refused.stderr
    env_refused = in_process("db", "version", MANAGEMENT_URL=url)
    assert env_refused.returncode == remote.EXIT_USAGE and "unset MANAGEMENT_URL" in one_line(env_refused)


def test_the_configuration_file_is_used_only_when_private(in_process: Any, url: str, user: UserWithKeyView,
                                                          tmp_path: Path) -> None:
    config = tmp_path / "manage-playrservers" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'url = "{url}"\napi_key = "{user.api_key}"\n')
    config.chmod(0o600)
    listed = in_process("agents", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "dead" in {agent["name"] for agent in json.loads(listed.stdout)}
    config.chmod(0o644)
    refused = in_process("agents", "list")
    assert refused.returncode == remote.EXIT_USAGE
    assert "chmod 600" in one_line(refused) and "0644" in refused.stderr


# ---------------------------------------------------------------------- TLS: a self-signed server on loopback


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _EmptyPortal(http.server.BaseHTTPRequestHandler):
    """Answers every GET with an empty JSON list (an agent list with nothing in it)."""

    def do_GET(self) -> None:
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def self_signed(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EmptyPortal)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", cert
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_a_self_signed_certificate_is_refused_unless_its_ca_is_given(self_signed: tuple[str, Path],
                                                                     tmp_path: Path) -> None:
    tls_url, cert = self_signed
    untrusted = cli("agents", "list", home=tmp_path, MANAGEMENT_URL=tls_url, MANAGEMENT_API_KEY="mgmt_k")
    assert untrusted.returncode == remote.EXIT_UNREACHABLE
    assert "not trusted" in one_line(untrusted) and "--ca-file" in untrusted.stderr
    with Client(tls_url, "mgmt_k") as portal, pytest.raises(TlsError):
        portal.list_agents()
    trusted = cli("agents", "list", "--ca-file", str(cert), home=tmp_path, MANAGEMENT_URL=tls_url,
                  MANAGEMENT_API_KEY="mgmt_k")
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.split() == ["ID", "NAME", "ADDRESS", "USER", "HOST", "KEY"]
    with Client(tls_url, "mgmt_k", verify=str(cert)) as portal:
        assert portal.list_agents() == []
