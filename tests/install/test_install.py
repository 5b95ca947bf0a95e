"""The production installer, for real: ``scripts/install.sh`` on this machine with nginx, the service
started exactly as the installed systemd unit says (``ExecStart``, ``User``, ``EnvironmentFile``,
``WorkingDirectory``, ``UMask``), a user and agent driven through nginx on port 80, a backup taken
while serving and restored, a second run (an upgrade from ``APP_REPO``) that keeps the data, the env
file and the secret key, and ``--uninstall`` / ``--uninstall --purge``.

It uses the real default paths (/opt, /var/lib, /etc): it is meant for disposable CI machines, runs
only as root on a Debian-like system (otherwise it skips, or fails under ``CI=true``), and refuses to
touch an installation it did not make. nginx listens on 127.0.0.1:80 only; the service gets a free
port."""

from __future__ import annotations

import contextlib
import grp
import http.client
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.support import REPO, free_port

pytestmark = pytest.mark.install

INSTALLER = REPO / "scripts" / "install.sh"
APP_DIR = Path("/opt/manage.playrservers")
DATA_DIR = Path("/var/lib/manage-playrservers")
DB = DATA_DIR / "management.sqlite3"
SECRET_KEY = DATA_DIR / "secret.key"
ENV_FILE = Path("/etc/manage-playrservers.env")
UNIT = Path("/etc/systemd/system/manage-playrservers.service")
SITE = Path("/etc/nginx/sites-available/manage-playrservers")
SITE_LINK = Path("/etc/nginx/sites-enabled/manage-playrservers")
USER = "manage-playrservers"
DOMAIN = "manage.playrservers.test"
CLIENT = "127.0.0.2"  # we talk to nginx from here, so nginx's X-Forwarded-For differs from its own address
# Written before this test's first install: leftovers of an interrupted run may then be purged.
OWNER_MARK = Path("/var/tmp/manage-playrservers-install-test.owner")
CLI = APP_DIR / ".venv" / "bin" / "manage-playrservers"
HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
    "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes", "UMask": "0077", "Restart": "on-failure",
}


# ------------------------------------------------------------------------------------ helpers

def _log(message: str) -> None:
    print(f"[install-test] {message}", file=sys.stderr, flush=True)


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the installer test needs Linux"
    if os.geteuid() != 0:
        return "the installer test needs root (it installs packages, a system user, files in /opt and /etc)"
    if shutil.which("apt-get") is None or shutil.which("dpkg-query") is None:
        return "the installer test needs a Debian-like system with apt-get"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires the installer test, but {reason}")
    pytest.skip(reason)


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (unit files may repeat a key)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def parse_env_file(path: Path) -> dict[str, str]:
    """The variables of an ``EnvironmentFile=`` in the simple form systemd reads."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name.strip()] = value
    return env


def owner_mode(path: Path) -> tuple[str, str, int]:
    st = path.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def nginx_master() -> int | None:
    try:
        pid = int(Path("/run/nginx.pid").read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "nginx":
            return pid
    except (OSError, ValueError):
        pass
    return None


def _alive(pid: int) -> bool:
    """Running (a zombie left to an init that does not reap counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def port_80_problem() -> str | None:
    """Why nginx could not listen on 127.0.0.1:80 here, or None (a running nginx is fine)."""
    if nginx_master() is not None:
        return None
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx does: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", 80))
        except OSError as error:
            holders = subprocess.run(["ss", "-Hltnp", "sport = :80"], capture_output=True, text=True,
                                     check=False).stdout if shutil.which("ss") else "(ss not installed)"
            return f"port 80 is taken ({error}) by something that is not nginx:\n{holders}"
    return None


def request(method: str, path: str, key: str | None = None, body: Any = None, *,
            raw: bytes | None = None, host: str = DOMAIN) -> tuple[int, Any, dict[str, str]]:
    """One request to nginx on 127.0.0.1:80 with ``Host: host``, sent from 127.0.0.2: status, body
    (parsed when JSON), headers (lower-case names)."""
    headers = {"Host": host}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is not None:
        headers["Content-Type"] = "application/json"
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    connection = http.client.HTTPConnection("127.0.0.1", 80, timeout=30, source_address=(CLIENT, 0))
    try:
        # nginx may answer (413) and stop reading before a large body is sent: read its answer anyway
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        text = response.read()
        parsed: Any = text.decode(errors="replace")
        if response.getheader("Content-Type", "").split(";")[0].endswith("json") and text:
            parsed = json.loads(text)
        return response.status, parsed, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


SYSTEMD = Path("/run/systemd/system").is_dir()  # systemd is PID 1: the installer starts the unit itself


class Service:
    """The portal started the way the installed unit starts it: its ``ExecStart`` as its ``User``
    (with that user's groups), in its ``WorkingDirectory``, with its ``UMask``, and with the
    environment systemd would give it (the ``EnvironmentFile`` plus PATH, HOME, USER, LOGNAME,
    SHELL). Where systemd runs, systemd itself starts and stops the unit instead."""

    def __init__(self, unit: Path, log: Path) -> None:
        fields = parse_unit(unit)
        self.argv = shlex.split(fields["Service.ExecStart"][-1].lstrip("-@+!:"))
        self.user = fields["Service.User"][-1]
        self.env_file = Path(fields["Service.EnvironmentFile"][-1].lstrip("-"))
        self.workdir = Path(fields["Service.WorkingDirectory"][-1].lstrip("-"))
        self.umask = int(fields.get("Service.UMask", ["0022"])[-1], 8)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        account = pwd.getpwnam(self.user)
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": account.pw_dir, "USER": self.user, "LOGNAME": self.user, "SHELL": account.pw_shell,
                **parse_env_file(self.env_file)}

    def run_as(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Another command as the service user, with the same environment (e.g. the CLI)."""
        account = pwd.getpwnam(self.user)
        return subprocess.run(argv, cwd=self.workdir, env=self.environment(), user=account.pw_uid,
                              group=account.pw_gid, extra_groups=os.getgrouplist(self.user, account.pw_gid),
                              umask=self.umask, capture_output=True, text=True, timeout=120, check=False,
                              **kwargs)

    def start(self) -> Service:
        if SYSTEMD:
            subprocess.run(["systemctl", "start", UNIT.name], check=True, timeout=120)
        else:
            account = pwd.getpwnam(self.user)
            with self.log.open("ab") as handle:
                self.process = subprocess.Popen(
                    self.argv, cwd=self.workdir, env=self.environment(), user=account.pw_uid,
                    group=account.pw_gid, extra_groups=os.getgrouplist(self.user, account.pw_gid),
                    umask=self.umask, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                    start_new_session=True)
        started = time.monotonic()
        status = None
        while time.monotonic() - started < 60:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the service exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status, body, _ = request("GET", "/health")
                if status == 200 and body == {"status": "ok"}:
                    _log(f"service up through nginx in {time.monotonic() - started:.1f} s")
                    return self
            except OSError:
                pass
            time.sleep(0.2)  # polling for readiness
        raise AssertionError(f"no healthy answer through nginx within 60 s (last status {status}):\n"
                             f"{self.log_tail()}")

    def stop(self) -> None:
        if SYSTEMD:
            subprocess.run(["systemctl", "stop", UNIT.name], check=False, timeout=120)
            return
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # what systemctl stop sends (KillSignal default)
        try:
            self.process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            raise AssertionError(f"the service ignored SIGTERM for 45 s:\n{self.log_tail()}") from None

    def log_tail(self) -> str:
        if SYSTEMD:
            return subprocess.run(["journalctl", "-u", UNIT.name, "-n", "60", "--no-pager"], capture_output=True,
                                  text=True, check=False).stdout
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else "(no log)"


class Installer:
    def __init__(self, port: int) -> None:
        self.port = port

    def run(self, *args: str, **env: str) -> str:
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("MANAGEMENT_", "APP_")) and k not in {"INSTALL_NGINX", "NGINX_LISTEN"}}
        clean.update({"APP_PORT": str(self.port), "APP_DOMAIN": DOMAIN, "INSTALL_NGINX": "1",
                      "NGINX_LISTEN": "127.0.0.1:80", **env})
        started = time.monotonic()
        result = subprocess.run(["bash", str(INSTALLER), *args], env=clean, capture_output=True, text=True,
                                timeout=900, check=False)
        output = result.stdout + result.stderr
        _log(f"install.sh {' '.join(args)} -> {result.returncode} in {time.monotonic() - started:.1f} s")
        assert result.returncode == 0, f"install.sh {' '.join(args)} failed:\n{output[-6000:]}"
        return output


def leftovers() -> list[str]:
    found = [str(p) for p in (APP_DIR, DATA_DIR, ENV_FILE, UNIT, SITE, SITE_LINK) if p.exists() or p.is_symlink()]
    try:
        pwd.getpwnam(USER)
        found.append(f"user {USER}")
    except KeyError:
        pass
    return found


@pytest.fixture(scope="module")
def machine() -> Iterator[Installer]:
    """A clean machine for the installer; afterwards nginx is stopped again if the test started it."""
    missing = _missing()
    if missing is not None:
        _skip_or_fail(missing)
    existing = leftovers()
    if existing and not OWNER_MARK.exists():
        _skip_or_fail(f"an installation this test did not make exists ({', '.join(existing)}); "
                      "refusing to touch it")
    problem = port_80_problem()
    if problem is not None:
        pytest.fail(f"nginx must listen on 127.0.0.1:80 for this test, but {problem}")
    nginx_was_running = nginx_master() is not None
    installer = Installer(free_port())
    if existing:
        _log(f"purging leftovers of an earlier run of this test: {', '.join(existing)}")
        installer.run("--uninstall", "--purge")
    OWNER_MARK.write_text("tests/install/test_install.py\n")
    try:
        yield installer
    finally:
        if leftovers():
            subprocess.run(["bash", str(INSTALLER), "--uninstall", "--purge"], capture_output=True, timeout=300,
                           check=False)
        if not leftovers():
            OWNER_MARK.unlink(missing_ok=True)
        pid = nginx_master()
        if not nginx_was_running and pid is not None:
            subprocess.run(["systemctl", "stop", "nginx"] if SYSTEMD else ["nginx", "-s", "quit"], capture_output=True,
                           timeout=60, check=False)
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            _log("stopped the nginx this test started")


def make_repo(tmp: Path) -> Path:
    """This checkout as a git repository with a branch ``release`` and a marker file, for APP_REPO."""
    if shutil.which("git") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "git"], check=True, capture_output=True, timeout=600)
    repo = tmp / "portal.git"
    repo.mkdir()
    excludes = [".venv", ".git", "data", ".lab", ".tox", "build", "dist", ".pytest_cache", ".mypy_cache",
                ".ruff_cache", ".hypothesis", "__pycache__", "*.egg-info"]
    tar = subprocess.Popen(["tar", "-C", str(REPO), "-cf", "-", *[f"--exclude={e}" for e in excludes], "."],
                           stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(repo), "-xf", "-"], stdin=tar.stdout, check=True)
    assert tar.wait() == 0
    (repo / "INSTALL_TEST_MARKER").write_text("from APP_REPO\n")
    git = ["git", "-C", str(repo), "-c", "user.name=install test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "release"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "release"], check=True)
    return repo


def assert_unit(port: int) -> None:
    unit = parse_unit(UNIT)
    assert unit["Service.User"] == [USER]
    assert unit["Service.EnvironmentFile"] == [str(ENV_FILE)]
    assert unit["Service.WorkingDirectory"] == [str(DATA_DIR)]
    assert unit["Service.ExecStart"] == [f"{APP_DIR}/.venv/bin/python {APP_DIR}/main.py"]
    assert unit["Service.RestartPreventExitStatus"] == ["2"]  # a configuration error does not loop
    # issue 22: descriptors for a pooled SSH connection per agent, and the fleet view's parallelism whole
    assert int(unit["Service.LimitNOFILE"][0]) >= max(65536, 256 + 2 * 256)
    for key, value in HARDENING.items():
        assert unit[f"Service.{key}"] == [value], key
    assert str(DATA_DIR) in " ".join(unit["Service.ReadWritePaths"]).split()
    if shutil.which("systemd-analyze"):  # systemd's own parser, when installed (it needs no running systemd)
        verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True,
                                check=False)
        assert verify.returncode == 0 and str(UNIT) not in verify.stderr, verify.stderr
    assert (APP_DIR / "main.py").is_file()
    env = parse_env_file(ENV_FILE)
    assert env == {"MANAGEMENT_HOST": "127.0.0.1", "MANAGEMENT_PORT": str(port), "MANAGEMENT_WORKERS": "2",
                   "MANAGEMENT_DB_PATH": str(DB), "MANAGEMENT_LOG_FORMAT": "json", "MANAGEMENT_SIGNUP": "closed",
                   # set by this test (as an operator may): it has no TLS in front of nginx
                   "MANAGEMENT_ALLOW_PLAIN_HTTP": "true"}
    site = SITE.read_text()
    assert SITE_LINK.resolve() == SITE
    for line in (f"server_name {DOMAIN};", f"proxy_pass http://127.0.0.1:{port};", "proxy_set_header Host $host;",
                 "proxy_set_header X-Real-IP $remote_addr;",
                 "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                 "proxy_set_header X-Forwarded-Proto $scheme;", "client_max_body_size 1m;",
                 "client_header_timeout 10s;", "large_client_header_buffers 4 16k;",
                 "listen 127.0.0.1:80;"):
        assert line in site, line
    read_timeout = next(line for line in site.splitlines() if "proxy_read_timeout" in line)
    assert int(read_timeout.split()[1].rstrip("s;")) >= 75
    # consoles (issue 17): /console/ upgrades to a WebSocket, and nginx never cuts a console the
    # portal keeps (MANAGEMENT_CONSOLE_MAX_SECONDS, 8 h by default)
    console = site.split("location /console/ {", 1)[1].split("}", 1)[0]
    for line in (f"proxy_pass http://127.0.0.1:{port};", "proxy_http_version 1.1;",
                 "proxy_set_header Upgrade $http_upgrade;", 'proxy_set_header Connection "upgrade";',
                 "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_buffering off;"):
        assert line in console, line
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        value = next(line for line in console.splitlines() if directive in line)
        assert int(value.split()[1].rstrip("s;")) >= 8 * 3600, value


def assert_owners_and_modes(service: Service) -> None:
    group = grp.getgrgid(pwd.getpwnam(USER).pw_gid).gr_name
    assert owner_mode(DATA_DIR) == (USER, group, 0o750)
    assert owner_mode(DB) == (USER, group, 0o600)
    assert owner_mode(SECRET_KEY) == (USER, group, 0o600)
    for extra in (DB.with_name(DB.name + "-wal"), DB.with_name(DB.name + "-shm")):
        if extra.exists():
            assert owner_mode(extra)[0] == USER and owner_mode(extra)[2] & 0o077 == 0, extra
    assert owner_mode(ENV_FILE) == ("root", group, 0o640)
    assert owner_mode(UNIT)[0] == "root"
    # the code and its virtual environment: root's, writable by nobody else
    bad = []
    for root, dirs, files in os.walk(APP_DIR):
        for name in [*dirs, *files]:
            path = Path(root, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_uid != 0 or st.st_mode & 0o022:
                bad.append(f"{path} {owner_mode(path)}")
    assert owner_mode(APP_DIR) == ("root", "root", 0o755)
    assert not bad, bad[:20]
    probe = service.run_as(["touch", str(APP_DIR / ".venv" / "write-probe")])
    assert probe.returncode != 0, "the service user can write into the virtual environment"


# -------------------------------------------------------------------------------------- tests

def test_help_and_bad_arguments() -> None:
    result = subprocess.run(["bash", str(INSTALLER), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for word in ("APP_REPO", "APP_BRANCH", "APP_DIR", "APP_DOMAIN", "APP_PORT", "INSTALL_NGINX", "--uninstall",
                 "--purge"):
        assert word in result.stdout, word
    assert "/opt/manage.playrservers" in result.stdout and "manage.playrservers.com" in result.stdout
    for args in (["--bogus"], ["--purge"]):
        result = subprocess.run(["bash", str(INSTALLER), *args], capture_output=True, text=True, check=False)
        assert result.returncode != 0 and "error:" in result.stderr, args


def test_installer_is_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        missing = _missing()
        if missing is not None:
            _skip_or_fail(f"shellcheck is not installed and cannot be: {missing}")
        subprocess.run(["apt-get", "install", "-y", "-q", "shellcheck"], check=True, capture_output=True,
                       timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    result = subprocess.run(["shellcheck", str(INSTALLER)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_serve_backup_restore_upgrade_uninstall(machine: Installer, tmp_path: Path) -> None:
    started = time.monotonic()
    key_pair = asyncssh.generate_private_key("ssh-ed25519")
    private_key = key_pair.export_private_key("openssh").decode()
    service: Service | None = None
    try:
        # ---- first install
        # the operator names the first user and, without TLS here, allows keys over plain HTTP
        output = machine.run(APP_ADMIN_NAME="alice", APP_ADMIN_EMAIL="alice@example.com",
                             MANAGEMENT_ALLOW_PLAIN_HTTP="true")
        printed = re.findall(r"^\s*API_KEY=(\S+)$", output, re.MULTILINE)
        assert len(printed) == 1, output[-3000:]  # install.sh made the first user and printed its key once
        if not SYSTEMD:
            assert "systemd is not running" in output
            assert f"{APP_DIR}/.venv/bin/python {APP_DIR}/main.py" in output  # how to start it by hand
        assert f"certbot --nginx -d {DOMAIN}" in output
        assert_unit(machine.port)
        assert SECRET_KEY.is_file(), "the installer prepares the secret key"

        # ---- the service as the unit says, driven through nginx
        service = Service(UNIT, tmp_path / "service.log").start()
        assert_owners_and_modes(service)
        key = printed[0]
        status, user, headers = request("GET", "/users/me", key)
        assert status == 200 and user["email"] == "alice@example.com" and "api_key" not in user
        assert headers.get("x-request-id")
        status, agent, _ = request("POST", "/agents", key, {
            "name": "dalek-hypervisor", "hostname": "192.0.2.15", "port": 22, "username": "qemu-admin",
            "private_key": private_key, "allow_unknown_hosts": False})
        assert status == 201, agent
        status, agents, _ = request("GET", "/agents", key)
        assert status == 200 and [a["id"] for a in agents] == [agent["id"]]
        status, credentials, headers = request("GET", f"/agents/{agent['id']}/credentials", key)
        assert status == 200 and credentials["private_key"] == private_key
        assert headers["cache-control"] == "no-store"
        assert request("POST", "/users", body={"name": "mallory"})[0] == 403  # MANAGEMENT_SIGNUP=closed

        big = b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        status, body, _ = request("POST", "/users", raw=big)
        assert status == 413, body

        status, audit, _ = request("GET", "/users/me/audit", key)
        assert status == 200
        events = {e["action"]: e for e in audit["events"]}
        assert {"user.create", "agent.create", "agent.read_credentials"} <= set(events)
        # the first user was made on the host; for the rest nginx connects from 127.0.0.1 and forwards
        # the client's address, and the app records the client
        assert events["user.create"]["client_address"] == f"local:{USER}"
        assert {e["client_address"] for e in audit["events"] if e["action"] != "user.create"} == {CLIENT}

        # ---- a backup taken while serving, then a change the restore must undo
        backup = DATA_DIR / "backup-during-service.sqlite3"
        result = service.run_as([str(CLI), "db", "backup", str(backup)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert owner_mode(backup)[0] == USER and owner_mode(backup)[2] == 0o600
        status, later, _ = request("POST", "/agents", key, {
            "name": "after-backup", "hostname": "192.0.2.16", "username": "qemu-admin", "private_key": private_key})
        assert status == 201, later
        assert len(request("GET", "/agents", key)[1]) == 2
        service.stop()

        # restore (docs/operations.md): stopped service, drop the WAL files, copy as the service user, 0600
        for suffix in ("-wal", "-shm"):
            DB.with_name(DB.name + suffix).unlink(missing_ok=True)
        subprocess.run(["install", "-m", "0600", "-o", USER, "-g", USER, str(backup), str(DB)], check=True)
        backup.unlink()
        service.start()
        status, agents, _ = request("GET", "/agents", key)
        assert status == 200 and [a["name"] for a in agents] == ["dalek-hypervisor"], agents
        assert request("GET", f"/agents/{agent['id']}/credentials", key)[1]["private_key"] == private_key
        service.stop()
        _log(f"first install, API flow, backup and restore: {time.monotonic() - started:.1f} s")

        # ---- second run: an upgrade, from APP_REPO this time; data, env file and key stay
        users_before = service.run_as([str(CLI), "users", "list", "--json"])
        assert users_before.returncode == 0 and json.loads(users_before.stdout)[0]["email"] == "alice@example.com"
        with ENV_FILE.open("a") as handle:
            handle.write("# operator's note: kept across upgrades\n")
        env_before, key_before = ENV_FILE.read_bytes(), SECRET_KEY.read_bytes()
        with SITE.open("a") as handle:  # as `certbot --nginx` marks the lines it adds
            handle.write("# listen 443 ssl; # managed by Certbot\n")
        site_before = SITE.read_bytes()
        repo = make_repo(tmp_path)
        output = machine.run(APP_REPO=f"file://{repo}", APP_BRANCH="release")
        assert f"keeping {ENV_FILE}" in output
        assert (APP_DIR / "INSTALL_TEST_MARKER").is_file(), "the code did not come from APP_REPO"
        assert not (APP_DIR / ".git").exists()
        assert ENV_FILE.read_bytes() == env_before
        assert SECRET_KEY.read_bytes() == key_before
        assert SITE.read_bytes() == site_before, "the installer rewrote a site certbot manages"
        users_after = service.run_as([str(CLI), "users", "list", "--json"])
        assert users_after.returncode == 0 and users_after.stdout == users_before.stdout
        assert_unit(machine.port)

        service = Service(UNIT, tmp_path / "service.log").start()
        assert_owners_and_modes(service)
        status, me, _ = request("GET", "/users/me", key)
        assert status == 200 and me["id"] == user["id"]
        status, credentials, _ = request("GET", f"/agents/{agent['id']}/credentials", key)
        assert status == 200 and credentials["private_key"] == private_key
        service.stop()

        # ---- uninstall keeps the data; --purge removes it
        output = machine.run("--uninstall")
        assert not UNIT.exists() and not SITE.exists() and not SITE_LINK.is_symlink() and not APP_DIR.exists()
        assert DATA_DIR.is_dir() and ENV_FILE.is_file() and SECRET_KEY.read_bytes() == key_before
        assert "kept" in output and str(DATA_DIR) in output and str(ENV_FILE) in output
        try:
            status, body, _ = request("GET", "/health")
            assert (status, body) != (200, {"status": "ok"}), "nginx still serves the portal"
        except OSError:
            pass  # nothing listens on port 80 any more: not served either
        machine.run("--uninstall", "--purge")
        assert leftovers() == []
        with pytest.raises(KeyError):
            pwd.getpwnam(USER)
        _log(f"whole installer flow: {time.monotonic() - started:.1f} s")
    finally:
        if service is not None:
            service.stop()
