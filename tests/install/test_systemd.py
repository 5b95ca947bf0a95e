"""The installer's systemd path for real (issue 14 items 9, 12 and the nginx part of 5).

A Debian root made by ``debootstrap`` (cached under /var/cache/playr-install, so only the first run
pays for it) boots systemd as PID 1 of a PID + mount namespace on an overlay of that root, so every
run starts from the same clean machine. ``scripts/install.sh`` runs inside it, ``systemctl`` starts
the hardened unit, and the portal is driven through the installed nginx from this side (the network
is the host's: nginx and the service listen on free loopback ports). Proven here: the unit scores
<= 2.0 in ``systemd-analyze security`` and still serves; the first user comes from install.sh (its
key printed once) and sign-up is closed; an API key over plain HTTP through nginx is refused while
HTTPS serves it; nginx limits a burst; a crash shows in ``systemctl status`` and systemd restarts
the service.

Root and a Debian-like host with debootstrap, unshare and overlayfs are needed: otherwise it skips,
or fails under ``CI=true``."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.support import REPO, free_port

pytestmark = pytest.mark.install

CACHE = Path(os.environ.get("PLAYR_INSTALL_CACHE", "/var/cache/playr-install"))
BASE = CACHE / "bookworm-systemd"
# nginx, python3 and python3-venv are in the cached root so that a run does not fetch them (the host
# installer test covers install.sh installing packages); install.sh still checks them.
DEBOOTSTRAP = ["debootstrap", "--variant=minbase",
               "--include=systemd,systemd-sysv,dbus,python3,python3-venv,nginx,ca-certificates", "bookworm"]
MIRROR = "http://deb.debian.org/debian"
RUNS = Path("/var/tmp/playr-install-runs")
UNIT = "manage-playrservers.service"
DOMAIN = "manage.playrservers.test"
MAX_EXPOSURE = 2.0


def _log(message: str) -> None:
    print(f"[systemd-test] {message}", file=sys.stderr, flush=True)


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (debootstrap, mounts, namespaces)"
    if shutil.which("apt-get") is None:
        return "needs a Debian-like host (apt-get) for debootstrap"
    for tool in ("unshare", "nsenter", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "needs overlayfs"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires the systemd install test, but it {reason}")
    pytest.skip(reason)


def base_root() -> Path:
    """The cached Debian root, made once (about 75 s here)."""
    marker = BASE.with_name(BASE.name + ".complete")
    if marker.is_file() and (BASE / "lib/systemd/systemd").exists():
        return BASE
    if shutil.which("debootstrap") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "debootstrap"], check=True, capture_output=True,
                       timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    CACHE.mkdir(parents=True, exist_ok=True)
    build = CACHE / f"build.{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    started = time.monotonic()
    result = subprocess.run([*DEBOOTSTRAP, str(build), MIRROR], capture_output=True, text=True, timeout=1200,
                            check=False)
    assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    shutil.rmtree(BASE, ignore_errors=True)
    build.rename(BASE)
    marker.write_text(" ".join(DEBOOTSTRAP) + "\n")
    _log(f"debootstrap made {BASE} in {time.monotonic() - started:.0f} s")
    return BASE


class Container:
    """systemd as PID 1 of a PID + mount namespace, on an overlay of the cached root."""

    def __init__(self, base: Path) -> None:
        self.dir = RUNS / uuid.uuid4().hex[:12]
        self.root = self.dir / "root"
        self.mounts: list[Path] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        try:
            self._boot(base)
        except BaseException:
            self.stop()
            raise

    def _boot(self, base: Path) -> None:
        for sub in ("upper", "work", "root"):
            (self.dir / sub).mkdir(parents=True)
        self._mount(["-t", "overlay", "overlay", "-o",
                     f"lowerdir={base},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"], self.root)
        # the checkout, read-only, where install.sh finds it beside itself
        (self.root / "src").mkdir()
        self._mount(["--bind", str(REPO)], self.root / "src")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(self.root / "src")], check=True)
        # pip's downloads survive the run (install.sh runs pip as root: /root/.cache/pip)
        pip_cache = CACHE / "pip"
        pip_cache.mkdir(parents=True, exist_ok=True)
        (self.root / "root/.cache/pip").mkdir(parents=True, exist_ok=True)
        self._mount(["--bind", str(pip_cache)], self.root / "root/.cache/pip")
        # the host's view of the network: its resolver, and the certificates (and pip settings) it
        # trusts to reach the package index
        for name in ("etc/resolv.conf", "etc/ssl/certs/ca-certificates.crt", "etc/pip.conf"):
            source = Path("/") / name
            if source.is_file():
                target = self.root / name
                target.unlink(missing_ok=True)
                shutil.copyfile(source, target)
        # nginx is enabled in the root: without its default site it starts listening nowhere
        (self.root / "etc/nginx/sites-enabled/default").unlink(missing_ok=True)
        (self.root / "etc/hostname").write_text("playr-systemd-test\n")
        # no udev and no terminals here: a getty would wait 90 s for its tty device, and boot with it
        for unit in ("getty.target", "serial-getty@ttyS0.service", "console-getty.service"):
            masked = self.root / "etc/systemd/system" / unit
            masked.unlink(missing_ok=True)
            masked.symlink_to("/dev/null")
        self.process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", f"--mount-proc={self.root / 'proc'}",
             "chroot", str(self.root), "/lib/systemd/systemd", "--system", "--unit=multi-user.target"],
            stdin=subprocess.DEVNULL, stdout=(self.dir / "console.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid = self._systemd_pid()

    def _mount(self, args: list[str], target: Path) -> None:
        subprocess.run(["mount", *args, str(target)], check=True)
        self.mounts.append(target)

    def _systemd_pid(self) -> int:
        assert self.process is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.dir / "console.log").read_text(errors="replace")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "systemd":
                return int(children[0])
            time.sleep(0.05)
        raise AssertionError("systemd did not start")

    def run(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the container (its namespaces, root and working directory)."""
        clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                 "HOME": "/root", **(env or {})}
        result = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-r", "-w",
                                 "env", "-i", *[f"{k}={v}" for k, v in clean.items()], *argv],
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, f"{argv} -> {result.returncode}:\n{result.stdout[-4000:]}" \
                                           f"{result.stderr[-4000:]}"
        return result

    def booted(self) -> str:
        deadline = time.monotonic() + 120
        while True:  # until the system bus answers (systemctl before it: "Failed to connect to bus")
            result = self.run("systemctl", "is-system-running", "--wait", timeout=120, check=False)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return state
            assert time.monotonic() < deadline, (state, result.stderr, self.run(
                "systemctl", "list-jobs", "--no-pager", check=False).stdout)
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # PID 1 of the namespace: every process in it dies with it
                os.kill(self.pid or self.process.pid, signal.SIGKILL)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    missing = _missing()
    if missing is not None:
        _skip_or_fail(missing)
    started = time.monotonic()
    base = base_root()
    box = Container(base)
    try:
        state = box.booted()
        _log(f"systemd booted ({state}) in {time.monotonic() - started:.1f} s")
        yield box
    finally:
        box.stop()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for DOMAIN, as certbot would leave one (made here: no network)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class Nginx:
    def __init__(self, http_port: int, https_port: int) -> None:
        self.http_port = http_port
        self.https_port = https_port

    def request(self, method: str, path: str, key: str | None = None, body: Any = None, *,
                tls: bool = True) -> tuple[int, Any]:
        headers = {"Host": DOMAIN}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        connection: http.client.HTTPConnection
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # our own self-signed certificate
            connection = http.client.HTTPSConnection("127.0.0.1", self.https_port, timeout=30, context=context)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            parsed: Any = raw.decode(errors="replace")
            if response.getheader("Content-Type", "").split(";")[0].endswith("json") and raw:
                parsed = json.loads(raw)
            return response.status, parsed
        finally:
            connection.close()


def exposure(box: Container) -> float:
    result = box.run("systemd-analyze", "security", "--no-pager", UNIT, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout[-3000:] + result.stderr[-2000:]
    return float(found.group(1))


def diagnose(box: Container) -> str:
    return "\n".join(box.run(*argv, check=False).stdout[-3000:] for argv in (
        ("systemctl", "status", "--no-pager", "--lines=0", UNIT, "nginx.service"),
        ("journalctl", "--no-pager", "-n", "40", "-u", UNIT), ("journalctl", "--no-pager", "-n", "10", "-u", "nginx")))


def healthy(site: Nginx, box: Container, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = site.request("GET", "/health", tls=False)
            if last == (200, {"status": "ok"}):
                return
        except (OSError, http.client.HTTPException) as error:
            last = error
        assert time.monotonic() < deadline, f"no healthy answer through nginx (last: {last!r}):\n{diagnose(box)}"
        time.sleep(0.2)  # polling for readiness


@attrs.frozen
class Installation:
    box: Container
    output: str  # what install.sh printed
    nginx: Nginx
    started: float


@pytest.fixture(scope="module")
def installation(container: Container) -> Installation:
    """scripts/install.sh run inside the container, then TLS added to its site as certbot would."""
    started = time.monotonic()
    app_port, http_port, https_port = free_port(), free_port(), free_port()
    installed = container.run("bash", "/src/scripts/install.sh", timeout=900, env={
        "APP_PORT": str(app_port), "APP_DOMAIN": DOMAIN, "NGINX_LISTEN": f"127.0.0.1:{http_port}",
        "APP_ADMIN_EMAIL": "admin@example.com"})
    _log(f"install.sh under systemd: {time.monotonic() - started:.1f} s")
    cert, private = self_signed(container.root / "etc/nginx/playr-test-tls")
    site = container.root / "etc/nginx/sites-available/manage-playrservers"
    text = site.read_text()
    assert f"proxy_read_timeout {10 + 60 + 300 + 2 + 30}s;" in text  # item 12 under the real nginx
    site.write_text(text.replace(f"    listen 127.0.0.1:{http_port};\n", (
        f"    listen 127.0.0.1:{http_port};\n"
        f"    listen 127.0.0.1:{https_port} ssl; # managed by Certbot\n"
        f"    ssl_certificate /etc/nginx/playr-test-tls/{cert.name}; # managed by Certbot\n"
        f"    ssl_certificate_key /etc/nginx/playr-test-tls/{private.name}; # managed by Certbot\n"), 1))
    container.run("nginx", "-t", "-q")
    container.run("systemctl", "reload", "nginx")
    nginx = Nginx(http_port, https_port)
    healthy(nginx, container)
    return Installation(container, installed.stdout + installed.stderr, nginx, started)


def test_item9_install_sh_under_systemd_hardened_unit_first_user_https_only(installation: Installation) -> None:
    container, output, nginx = installation.box, installation.output, installation.nginx
    assert "systemd is not running" not in output
    keys = re.findall(r"^\s*API_KEY=(\S+)$", output, re.MULTILINE)
    assert len(keys) == 1, output[-3000:]  # printed once
    key = keys[0]
    env = container.root / "etc/manage-playrservers.env"
    assert "\nMANAGEMENT_SIGNUP=closed\n" in env.read_text()

    # ---- the hardened unit, started by systemd itself
    assert container.run("systemctl", "is-active", UNIT).stdout.strip() == "active"
    assert container.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    score = exposure(container)
    _log(f"systemd-analyze security {UNIT}: {score}")
    assert score <= MAX_EXPOSURE
    shown = container.run("systemctl", "show", UNIT, "-p", "SystemCallFilter", "-p", "IPAddressDeny",
                          "-p", "MemoryMax", "-p", "ProcSubset", "-p", "RemoveIPC", "-p", "PrivateMounts").stdout
    properties = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert set(properties["IPAddressDeny"].split()) == {"0.0.0.0/0", "::/0"}, shown  # any (in systemd's order)
    assert {k: properties[k] for k in ("MemoryMax", "ProcSubset", "RemoveIPC", "PrivateMounts")} == {
        "MemoryMax": "1073741824", "ProcSubset": "pid", "RemoveIPC": "yes", "PrivateMounts": "yes"}, shown
    allowed_calls = properties["SystemCallFilter"].split()  # the allow-list systemd resolved
    assert "read" in allowed_calls and not {"mount", "chown", "setuid", "reboot", "setrlimit"} & set(allowed_calls)

    # ---- the first user's key through nginx: over HTTPS only; sign-up closed
    status, me = nginx.request("GET", "/users/me", key)
    assert status == 200 and me["name"] == "admin" and me["email"] == "admin@example.com", me
    status, problem = nginx.request("GET", "/users/me", key, tls=False)
    assert (status, problem["code"]) == (403, "https_required"), problem
    status, problem = nginx.request("POST", "/users", body={"name": "mallory"})
    assert (status, problem["code"]) == (403, "signup_closed"), problem
    status, audit = nginx.request("GET", "/users/me/audit", key)
    assert status == 200, audit
    created = [e for e in audit["events"] if e["action"] == "user.create"]
    assert [e["client_address"] for e in created] == ["local:manage-playrservers"], audit  # made on the host

    # ---- a crash shows in systemctl status, and systemd restarts the service
    before = container.run("systemctl", "show", UNIT, "-p", "MainPID", "-p", "NRestarts").stdout
    container.run("systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", UNIT)
    deadline = time.monotonic() + 30
    while True:
        status_text = container.run("systemctl", "status", "--no-pager", "--lines=20", UNIT, check=False).stdout
        if "status=9/KILL" in status_text:
            break
        assert time.monotonic() < deadline, status_text
        time.sleep(0.2)
    deadline = time.monotonic() + 60  # RestartSec=5
    while container.run("systemctl", "show", UNIT, "-p", "MainPID", "-p", "NRestarts").stdout == before or \
            container.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active":
        assert time.monotonic() < deadline, container.run("systemctl", "status", "--no-pager", UNIT,
                                                          check=False).stdout
        time.sleep(0.2)
    healthy(nginx, container)
    assert "NRestarts=1" in container.run("systemctl", "show", UNIT, "-p", "NRestarts").stdout
    assert nginx.request("GET", "/users/me", key)[0] == 200
    _log(f"whole systemd install test: {time.monotonic() - installation.started:.1f} s")


def test_item5_nginx_limits_a_burst_from_one_address(installation: Installation) -> None:
    statuses = [installation.nginx.request("GET", "/health", tls=False)[0] for _ in range(200)]
    assert set(statuses) <= {200, 429}
    # 10 r/s with a burst of 50: 200 requests in a row cannot all pass unless they took 15 s
    assert statuses.count(429) > 0, statuses.count(200)
    healthy(installation.nginx, installation.box)  # and the limit lets the address in again


def test_item9_the_units_ip_filter_lets_ssh_reach_any_unicast_address() -> None:
    """The unit's IPAddressDeny=any + IPAddressAllow lists deny exactly link-local and multicast/
    reserved: every address a hypervisor may have (and loopback, where nginx reaches the service)
    stays reachable. Read from what install.sh writes; no root needed."""
    unit = subprocess.run(["bash", str(REPO / "scripts/install.sh"), "--print-unit"], capture_output=True,
                          text=True, check=True).stdout
    deny = [line.split("=", 1)[1].split() for line in unit.splitlines() if line.startswith("IPAddressDeny=")]
    assert deny == [["any"]]
    allowed = [ipaddress.ip_network(item) for line in unit.splitlines() if line.startswith("IPAddressAllow=")
               for item in line.split("=", 1)[1].split()]
    refused = [ipaddress.ip_network(n) for n in ("169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "fe80::/10",
                                                  "ff00::/8")]

    def covered(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in allowed)

    for address in ("127.0.0.1", "::1", "10.1.2.3", "172.16.0.9", "192.168.1.10", "100.64.0.1", "203.0.113.7",
                    "8.8.8.8", "169.253.255.255", "169.255.0.1", "223.255.255.255", "2001:db8::15", "fd00::1",
                    "2a00:1450::1"):
        assert covered(address), address
    for address in ("169.254.169.254", "169.254.0.1", "224.0.0.251", "239.255.255.250", "255.255.255.255",
                    "fe80::1", "ff02::1"):
        assert not covered(address), address
    # and nothing else is refused: the allowed networks plus the refused ones are the whole space
    for version, whole in ((4, 2 ** 32), (6, 2 ** 128)):
        total = sum(n.num_addresses for n in ipaddress.collapse_addresses(
            [n for n in allowed + refused if n.version == version]))  # type: ignore[misc]
        assert total == whole, version


def test_item12_nginx_waits_longer_than_the_longest_wait(tmp_path: Path) -> None:
    """A VM action with ?wait=300 may take connect + command + 300 s + the last poll's grace: the
    installed nginx must wait longer than that, also when the operator raised the time-outs."""
    from core.virsh import WAIT_MAX

    def read_timeout(env_file: Path | None) -> int:
        env = {**os.environ, "APP_ENV_FILE": str(env_file or tmp_path / "absent.env")}
        site = subprocess.run(["bash", str(REPO / "scripts/install.sh"), "--print-nginx-site"], capture_output=True,
                              text=True, check=True, env=env).stdout
        found = re.search(r"proxy_read_timeout (\d+)s;", site)
        assert found, site
        return int(found.group(1))

    grace = 2  # core's POLL_GRACE: one state poll may outlive the wait's deadline by this much
    assert read_timeout(None) > 10 + 60 + WAIT_MAX + grace
    raised = tmp_path / "raised.env"
    raised.write_text("MANAGEMENT_SSH_CONNECT_TIMEOUT=20\nMANAGEMENT_SSH_COMMAND_TIMEOUT=120.5\n")
    assert read_timeout(raised) > 20 + 120.5 + WAIT_MAX + grace


def test_item5_the_installed_nginx_site_limits_requests_and_connections_per_address() -> None:
    site = subprocess.run(["bash", str(REPO / "scripts/install.sh"), "--print-nginx-site"], capture_output=True,
                          text=True, check=True).stdout
    for line in ("limit_req_zone $binary_remote_addr zone=manage_playrservers_req:10m rate=10r/s;",
                 "limit_conn_zone $binary_remote_addr zone=manage_playrservers_conn:10m;",
                 "limit_req zone=manage_playrservers_req burst=50 nodelay;",
                 "limit_conn manage_playrservers_conn 20;", "limit_req_status 429;", "limit_conn_status 429;"):
        assert line in site, line
