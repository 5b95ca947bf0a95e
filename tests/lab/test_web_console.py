"""The web console in a real headless Chromium (Playwright driving Debian's ``chromium``) against the
live portal (gunicorn) and the lab: sign-up and sign-in, the fleet, a VM's lifecycle and snapshots,
sign-out, CSRF, XSS, session expiry. Every page is photographed into ``.screenshots/web/`` (git-
ignored); docs/web/ keeps the main ones.

The guest this module starts, stops and snapshots is its own (``web-guest``, defined from lab-disk's
XML with its own empty qcow2 disk, removed at the end): other modules use lab-guest1/2 concurrently.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from entrypoints.web.pages import CONSOLE, feature
from tests.lab.conftest import LAB_AGENT_NETWORKS, Lab, register
from tests.support import REPO, Server

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

playwright_api = pytest.importorskip("playwright.sync_api")

SHOTS = REPO / ".screenshots" / "web"
XSS = "<img src=x onerror=alert(1)>"
GUEST = "web-guest"
GUEST_DISK = Path("/var/tmp/playr-lab/web-guest.qcow2")
CONSOLE_GUEST = "web-console"
STATE_TIMEOUT_MS = 60_000


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        message = "Debian's chromium is not installed (scripts/test.sh installs it: apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def portal(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A portal of this module's own: sign-up 'first', so the first account is made on the page."""
    server = Server(tmp_path_factory.mktemp("web"), MANAGEMENT_WORKERS="1", MANAGEMENT_SSH_CONNECT_TIMEOUT="3",
                    MANAGEMENT_SSH_COMMAND_TIMEOUT="30", MANAGEMENT_SIGNUP="first",
                    MANAGEMENT_AGENT_NETWORKS=LAB_AGENT_NETWORKS).start()
    yield server
    server.stop()


def base(portal: Server) -> str:
    return f"http://127.0.0.1:{portal.port}"


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def api_key(portal: Server, browser: Any) -> str:
    """The first user, signed up on the sign-up page, which shows the key once."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(base(portal) + "/")
    assert page.url.endswith("/ui/sign-in")
    shot(page, "sign-in")
    page.get_by_role("link", name="Create the first account").click()
    page.get_by_label("Name").fill("web operator")
    page.get_by_role("button", name="Create account").click()
    key = page.locator("#new-api-key").inner_text().strip()
    assert key.startswith("mgmt_")
    shot(page, "new-key")
    context.close()
    return key


@pytest.fixture(scope="module")
def agent(portal: Server, api_key: str, lab: Lab) -> dict[str, Any]:
    return register(portal, api_key, lab, name="lab")


@pytest.fixture(scope="module")
def guest(lab: Lab) -> Iterator[str]:
    """This module's own guest: lab-disk's definition with another name and its own empty disk."""
    xml = lab.virsh("dumpxml", "lab-disk").stdout
    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml).replace("<name>lab-disk</name>", f"<name>{GUEST}</name>")
    xml = re.sub(r"<mac address=[^/]*/>", "", xml).replace("lab-disk.qcow2", GUEST_DISK.name)
    xml = xml.replace("console-lab-disk.log", f"console-{GUEST}.log")
    lab.virsh("destroy", GUEST)
    lab.virsh("undefine", GUEST, "--snapshots-metadata")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(GUEST_DISK), "16M"], check=True)
    defined = subprocess.run(["virsh", "-c", "qemu:///system", "define", "/dev/stdin"], input=xml, text=True,
                             capture_output=True, timeout=60)
    assert defined.returncode == 0, defined.stderr
    yield GUEST
    lab.virsh("destroy", GUEST)
    lab.virsh("undefine", GUEST, "--snapshots-metadata")
    GUEST_DISK.unlink(missing_ok=True)


def signed_in(browser: Any, portal: Server, api_key: str, **context_options: Any) -> tuple[Any, Any]:
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.goto(base(portal) + "/ui/sign-in")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base(portal) + "/")
    return context, page


def test_a_signed_in_user_sees_the_lab_guests_and_their_states_in_the_fleet(
        browser: Any, portal: Server, api_key: str, agent: dict[str, Any], lab: Lab) -> None:
    context, page = signed_in(browser, portal, api_key)
    table = page.locator("table.fleet")
    for name in lab.guests:
        row = table.locator("tr", has=page.get_by_role("link", name=name, exact=True))
        playwright_api.expect(row).to_have_count(1)
        playwright_api.expect(row.locator(".state")).to_have_text(re.compile(r"running|shut off|paused|.+"))
    shot(page, "fleet")
    # the same page on a phone: nothing wider than the screen
    phone = context.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    phone.goto(base(portal) + "/")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    shot(phone, "fleet-phone")
    context.close()


def test_a_guest_is_started_and_forced_off_from_its_page_and_its_state_shown_in_words(
        browser: Any, portal: Server, api_key: str, agent: dict[str, Any], guest: str) -> None:
    lab_virsh = ["virsh", "-c", "qemu:///system"]
    subprocess.run([*lab_virsh, "destroy", guest], capture_output=True)
    context, page = signed_in(browser, portal, api_key)
    page.goto(f"{base(portal)}/ui/agents/{agent['id']}/vms/{guest}")
    playwright_api.expect(page.locator(".vm-state")).to_contain_text("shut off")
    # only what the state allows: a shut-off VM can be started, not forced off
    playwright_api.expect(page.get_by_role("link", name="Force off…")).to_have_count(0)
    page.get_by_role("button", name="Start", exact=True).click()
    playwright_api.expect(page.locator("#result")).to_contain_text("Start: done, the VM is now running",
                                                                    timeout=STATE_TIMEOUT_MS)
    playwright_api.expect(page.locator(".vm-state")).to_contain_text("running")
    # the live chart: two samples of /stats through the session make the first point
    playwright_api.expect(page.locator(".stats-text")).to_contain_text("CPU", timeout=20_000)
    shot(page, "vm")
    page.get_by_role("link", name="Force off…").click()
    shot(page, "confirm")
    page.get_by_role("button", name="Yes, force off").click()
    playwright_api.expect(page.locator("#result")).to_contain_text("Force off: done, the VM is now shut off",
                                                                    timeout=STATE_TIMEOUT_MS)
    playwright_api.expect(page.locator(".vm-state")).to_contain_text("shut off")
    # the host agrees
    state = subprocess.run([*lab_virsh, "domstate", guest], capture_output=True, text=True).stdout.strip()
    assert state == "shut off"
    context.close()


@pytest.fixture
def watching_portal(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A portal whose watchers are on (the module's portal has them off): what virsh does on the host
    becomes events on the stream. Only for the time of one test: a watcher is an SSH session on the
    shared lab's host."""
    server = Server(tmp_path_factory.mktemp("web-live"), MANAGEMENT_WORKERS="1", MANAGEMENT_SIGNUP="open",
                    MANAGEMENT_SSH_CONNECT_TIMEOUT="3", MANAGEMENT_SSH_COMMAND_TIMEOUT="30",
                    MANAGEMENT_AGENT_NETWORKS=LAB_AGENT_NETWORKS, MANAGEMENT_WATCHERS="true").start()
    yield server
    server.stop()


def _watched(server: Server, key: str, agent: dict[str, Any], vm: str) -> bool:
    """The agent's watcher is up: its VM list comes from the live mirror."""
    status, vms, _ = server.request("GET", f"/agents/{agent['id']}/vms", key)
    return status == 200 and any(v["name"] == vm and v["source"] == "live" for v in vms)


def test_the_fleet_and_vm_pages_follow_the_event_stream_without_a_reload(
        browser: Any, watching_portal: Server, guest: str, lab: Lab) -> None:
    lab.virsh("destroy", guest)
    status, user, _ = watching_portal.request("POST", "/users", body={"name": "web live"})
    assert status == 201, user
    key = user["api_key"]
    agent = register(watching_portal, key, lab, name="web-live")
    context, page = signed_in(browser, watching_portal, key)
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/ui/events/stream" in r.url else None)
    try:
        page.reload()  # the agent is in use now: its watcher starts
        problems = console_sockets(page)  # e.g. the policy refusing the stream
        for _attempt in range(200):  # until the watcher is up (bounded), so what follows is its events
            if _watched(watching_portal, key, agent, guest):
                break
            page.wait_for_timeout(100)
        assert _watched(watching_portal, key, agent, guest)
        row = page.locator("table.fleet tr", has=page.get_by_role("link", name=guest, exact=True))
        playwright_api.expect(row.locator(".state")).to_have_text("shut off")
        playwright_api.expect(page.locator("#fleet-status")).to_have_text("Live: changes appear as they happen.")
        vm_page = context.new_page()
        console_sockets(vm_page, problems)
        vm_page.goto(f"{base(watching_portal)}/ui/agents/{agent['id']}/vms/{guest}")
        playwright_api.expect(vm_page.locator("#vm-live-status")).to_have_text(
            "Live: state changes appear as they happen.")
        loaded = page.evaluate("performance.timeOrigin")
        assert lab.virsh("start", guest).returncode == 0  # behind the portal's back
        # the event (not a poll: only an event names itself in the status) changes the row
        playwright_api.expect(row.locator(".state")).to_have_text("running", timeout=STATE_TIMEOUT_MS)
        playwright_api.expect(page.locator("#fleet-status")).to_contain_text(f"{guest}: vm.started")
        playwright_api.expect(vm_page.locator(".vm-state")).to_contain_text("running", timeout=STATE_TIMEOUT_MS)
        playwright_api.expect(vm_page.get_by_role("link", name="Force off…")).to_have_count(1)
        shot(page, "fleet-live")
        # an action on the VM page (its address is now the form's, …/do/force-stop) is an event too
        vm_page.get_by_role("link", name="Force off…").click()
        vm_page.get_by_role("button", name="Yes, force off").click()
        playwright_api.expect(vm_page.locator("#result")).to_contain_text("Force off: done", timeout=STATE_TIMEOUT_MS)
        playwright_api.expect(row.locator(".state")).to_have_text("shut off", timeout=STATE_TIMEOUT_MS)
        # and that page still follows what happens on the host
        assert lab.virsh("start", guest).returncode == 0
        playwright_api.expect(vm_page.locator(".vm-state")).to_contain_text("running", timeout=STATE_TIMEOUT_MS)
        playwright_api.expect(vm_page.locator("#vm-live-status")).to_contain_text(f"{guest}: vm.")
        playwright_api.expect(row.locator(".state")).to_have_text("running", timeout=STATE_TIMEOUT_MS)
        assert lab.virsh("destroy", guest).returncode == 0
        playwright_api.expect(row.locator(".state")).to_have_text("shut off", timeout=STATE_TIMEOUT_MS)
        playwright_api.expect(page.locator("#fleet-status")).to_contain_text(f"{guest}: vm.stopped")
        playwright_api.expect(vm_page.locator(".vm-state")).to_contain_text("shut off", timeout=STATE_TIMEOUT_MS)
        playwright_api.expect(vm_page.locator("#vm-live-status")).to_contain_text(f"{guest}: vm.stopped")
        assert page.evaluate("performance.timeOrigin") == loaded  # the same page, not a reload
        assert any("/ui/events/stream?after=" in url for url in streams)
        assert problems == []
    finally:
        lab.virsh("destroy", guest)
        context.close()


def test_the_fleet_page_falls_back_to_polling_when_the_stream_is_refused(
        browser: Any, portal: Server, api_key: str, agent: dict[str, Any], guest: str, lab: Lab) -> None:
    lab.virsh("destroy", guest)
    context = browser.new_context()
    # the stream refused (a proxy that does not pass it, say): the page says so and polls the rows
    context.route("**/ui/events/stream*", lambda route: route.fulfill(status=502, body="no"))
    page = context.new_page()
    page.goto(base(portal) + "/ui/sign-in")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base(portal) + "/")
    row = page.locator("table.fleet tr", has=page.get_by_role("link", name=guest, exact=True))
    playwright_api.expect(row.locator(".state")).to_have_text("shut off")
    playwright_api.expect(page.locator("#fleet-status")).to_contain_text("refreshing every 10 s")
    loaded = page.evaluate("performance.timeOrigin")
    try:
        assert lab.virsh("start", guest).returncode == 0  # behind the portal's back (its watchers are off)
        playwright_api.expect(row.locator(".state")).to_have_text("running", timeout=STATE_TIMEOUT_MS)
        assert page.evaluate("performance.timeOrigin") == loaded  # the same page, not a reload
        playwright_api.expect(page.locator("#fleet-status")).to_contain_text("Updated at")
    finally:
        lab.virsh("destroy", guest)
        context.close()


def test_a_snapshot_is_taken_reverted_and_deleted_from_the_vm_page(
        browser: Any, portal: Server, api_key: str, agent: dict[str, Any], guest: str) -> None:
    name = f"web-{uuid.uuid4().hex[:8]}"
    context, page = signed_in(browser, portal, api_key)
    page.on("dialog", lambda dialog: dialog.accept())  # the confirmations of revert and delete
    page.goto(f"{base(portal)}/ui/agents/{agent['id']}/vms/{guest}")
    page.get_by_label("New snapshot").fill(name)
    page.get_by_role("button", name="Take snapshot").click()
    playwright_api.expect(page.locator("#result")).to_have_text(f"Snapshot {name} taken.", timeout=STATE_TIMEOUT_MS)
    row = page.locator("table.snapshots tr", has=page.get_by_role("rowheader", name=re.compile(name)))
    playwright_api.expect(row).to_have_count(1)
    shot(page, "snapshots")
    row.get_by_role("button", name="Revert").click()
    playwright_api.expect(page.locator("#result")).to_have_text(f"Snapshot {name} reverted to.",
                                                                timeout=STATE_TIMEOUT_MS)
    row = page.locator("table.snapshots tr", has=page.get_by_role("rowheader", name=re.compile(name)))
    row.get_by_role("button", name="Delete").click()
    playwright_api.expect(page.locator("#result")).to_have_text(f"Snapshot {name} deleted.", timeout=STATE_TIMEOUT_MS)
    playwright_api.expect(page.get_by_role("rowheader", name=re.compile(name))).to_have_count(0)
    context.close()


def test_the_other_pages_render_for_the_signed_in_user(
        browser: Any, portal: Server, api_key: str, agent: dict[str, Any]) -> None:
    context, page = signed_in(browser, portal, api_key)
    page.goto(f"{base(portal)}/ui/agents/{agent['id']}")
    page.get_by_role("button", name="Check connection").click()
    playwright_api.expect(page.locator(".check")).to_contain_text("ok: reached the host")
    playwright_api.expect(page.locator(".check")).to_contain_text("SHA256:")
    shot(page, "agent")
    page.goto(base(portal) + "/ui/agents/new")
    playwright_api.expect(page.locator("#enroll-command")).to_contain_text(
        f"bash agent-install.sh --portal {base(portal)}")
    shot(page, "add-host")
    page.goto(base(portal) + "/ui/audit")
    playwright_api.expect(page.locator("table.audit")).to_contain_text("user.sign_in")
    shot(page, "audit")
    page.goto(base(portal) + "/ui/account")
    shot(page, "account")
    context.close()


def test_a_signed_out_session_is_refused_even_with_its_old_cookie(
        browser: Any, portal: Server, api_key: str) -> None:
    context, page = signed_in(browser, portal, api_key)
    cookie = next(c for c in context.cookies() if c["name"] == "playr_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.get_by_role("button", name="Sign out").click()
    playwright_api.expect(page.get_by_role("status")).to_have_text("You are signed out.")
    context.add_cookies([{k: cookie[k] for k in ("name", "value", "domain", "path")}])
    page.goto(base(portal) + "/ui/audit")
    assert page.url.endswith("/ui/sign-in")
    context.close()


def test_the_session_cookie_does_not_authenticate_the_json_api(
        browser: Any, portal: Server, api_key: str) -> None:
    context, page = signed_in(browser, portal, api_key)
    answer = page.request.get(base(portal) + "/agents")
    assert answer.status == 401
    assert answer.json()["code"] == "missing_api_key"
    context.close()


class _OtherSite(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        body = (f'<form id="f" method="post" action="{self.target}"><input name="csrf" value="guess"></form>'
                '<button id="go" form="f">go</button>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_cross_origin_form_post_with_the_session_cookie_is_refused(
        browser: Any, portal: Server, api_key: str, lab: Lab) -> None:
    victim = register(portal, api_key, lab, name=f"csrf-{uuid.uuid4().hex[:6]}")
    # Another port on the same address: another origin, but the same *site*, so the browser sends the
    # SameSite=Strict cookie along; the portal's Origin / Fetch-Metadata check must stop it.
    _OtherSite.target = f"{base(portal)}/ui/agents/{victim['id']}/delete"
    other = http.server.HTTPServer(("127.0.0.1", 0), _OtherSite)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        context, page = signed_in(browser, portal, api_key)
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/")
        with page.expect_response(_OtherSite.target) as answer:
            page.click("#go")
        assert answer.value.status == 403
        assert "csrf_refused" in page.content()
        assert portal.request("GET", f"/agents/{victim['id']}", api_key)[0] == 200
        context.close()
    finally:
        other.shutdown()


def test_a_form_without_the_session_form_token_is_refused(browser: Any, portal: Server, api_key: str,
                                                           lab: Lab) -> None:
    victim = register(portal, api_key, lab, name=f"token-{uuid.uuid4().hex[:6]}")
    context, page = signed_in(browser, portal, api_key)
    answer = page.request.post(f"{base(portal)}/ui/agents/{victim['id']}/delete", form={"csrf": "0" * 64},
                               headers={"Origin": base(portal)})
    assert answer.status == 403
    assert portal.request("GET", f"/agents/{victim['id']}", api_key)[0] == 200
    context.close()


def test_hostile_agent_and_vm_names_render_as_text(browser: Any, portal: Server, api_key: str, lab: Lab,
                                                   agent: dict[str, Any]) -> None:
    hostile = register(portal, api_key, lab, name=XSS, hostname="192.0.2.10", port=22)
    xml = (f"<domain type='qemu'><name>{XSS.replace('<', '&lt;').replace('>', '&gt;')}</name>"
           "<memory unit='KiB'>65536</memory><os><type arch='x86_64'>hvm</type></os></domain>")
    defined = subprocess.run(["virsh", "-c", "qemu:///system", "define", "/dev/stdin"], input=xml, text=True,
                             capture_output=True, timeout=60)
    assert defined.returncode == 0, defined.stderr
    try:
        context, page = signed_in(browser, portal, api_key)
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(base(portal) + "/")
        playwright_api.expect(page.locator(f'a[href="/ui/agents/{hostile["id"]}"]').first).to_have_text(XSS)
        vm_link = page.locator(f'a[href="/ui/agents/{agent["id"]}/vms/{quote(XSS, safe="")}"]')
        playwright_api.expect(vm_link).to_have_text(XSS)
        assert page.locator("img").count() == 0
        # the unreachable hostile host is shown inline with its error
        row = page.locator("tr.unreachable", has=page.get_by_role("link", name=XSS, exact=True))
        playwright_api.expect(row).to_contain_text("unreachable")
        page.goto(f"{base(portal)}/ui/agents/{hostile['id']}")
        playwright_api.expect(page.get_by_role("heading", level=1)).to_have_text(XSS)
        assert page.locator("img").count() == 0
        shot(page, "xss")
        assert dialogs == []
        context.close()
    finally:
        lab.virsh("undefine", XSS)


def test_a_session_ends_after_its_lifetime_on_the_server_side(
        browser: Any, lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = Server(tmp_path_factory.mktemp("web-expiry"), MANAGEMENT_WORKERS="1", MANAGEMENT_SIGNUP="open",
                    MANAGEMENT_SESSION_LIFETIME="3").start()
    try:
        status, user, _ = server.request("POST", "/users", body={"name": "short"})
        assert status == 201
        context, page = signed_in(browser, server, user["api_key"])
        cookie = next(c for c in context.cookies() if c["name"] == "playr_session")
        # until the session has ended (bounded): the server refuses the cookie itself, even re-sent
        for _attempt in range(40):
            context.add_cookies([{k: cookie[k] for k in ("name", "value", "domain", "path")}])
            page.goto(base(server) + "/ui/account")
            if page.url.endswith("/ui/sign-in"):
                break
            page.wait_for_timeout(250)
        assert page.url.endswith("/ui/sign-in")
        context.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def console_guest(lab: Lab) -> Iterator[str]:
    """This module's own console guest, running: the lab's console-guest (a shell on its serial port,
    VNC on loopback; kernel and initrd, no disk) under another name, since other modules use it."""
    if "console-guest" not in lab.virsh("list", "--all", "--name").stdout.split():
        pytest.skip("the lab has no console guest (scripts/lab.sh defines it)")
    xml = lab.virsh("dumpxml", "console-guest").stdout
    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml).replace("<name>console-guest</name>", f"<name>{CONSOLE_GUEST}</name>")
    lab.virsh("destroy", CONSOLE_GUEST)
    lab.virsh("undefine", CONSOLE_GUEST)
    defined = subprocess.run(["virsh", "-c", "qemu:///system", "define", "/dev/stdin"], input=xml, text=True,
                             capture_output=True, timeout=60)
    assert defined.returncode == 0, defined.stderr
    started = lab.virsh("start", CONSOLE_GUEST)
    assert started.returncode == 0, started.stderr
    yield CONSOLE_GUEST
    lab.virsh("destroy", CONSOLE_GUEST)
    lab.virsh("undefine", CONSOLE_GUEST)


def console_sockets(page: Any, problems: list[str] | None = None) -> list[str]:
    """Every error the page logs (a policy violation, a refused stream) and every WebSocket problem it
    meets (a refused handshake is only a console message), into ``problems``."""
    problems = [] if problems is None else problems
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("websocket", lambda ws: ws.on("socketerror", lambda error: problems.append(str(error))))
    return problems


@pytest.mark.skipif(not feature(CONSOLE), reason="the console page needs the consoles feature (issue 17) merged")
def test_the_serial_console_shows_the_guests_output(browser: Any, portal: Server, api_key: str,
                                                     agent: dict[str, Any], console_guest: str) -> None:
    marker = f"web-{uuid.uuid4().hex[:10]}"
    context, page = signed_in(browser, portal, api_key)
    problems = console_sockets(page)
    page.goto(f"{base(portal)}/ui/agents/{agent['id']}/vms/{console_guest}/console")
    playwright_api.expect(page.locator("#console-status")).to_have_text("Connected to the serial console.")
    # virsh's own banner comes through the relay before the guest says anything
    playwright_api.expect(page.locator(".xterm-rows")).to_contain_text(f"Connected to domain '{console_guest}'")
    page.locator(".xterm").click()
    # the guest may still be booting: press Enter until its shell answers (bounded), as the consoles
    # lab test does
    prompt = page.locator(".xterm-rows > div", has_text=re.compile(r"#\s*$"))
    for attempt in range(STATE_TIMEOUT_MS // 2_000):
        page.keyboard.press("Enter")
        try:
            playwright_api.expect(prompt.first).to_be_visible(timeout=2_000)
            break
        except AssertionError:
            if attempt == STATE_TIMEOUT_MS // 2_000 - 1:
                raise
    page.keyboard.type(f"echo {marker}\n")
    # the guest's shell ran it: the output is a row of its own (the typed command is another row)
    output = page.locator(".xterm-rows > div", has_text=re.compile(rf"^\s*{marker}\s*$"))
    playwright_api.expect(output).to_have_count(1, timeout=STATE_TIMEOUT_MS)
    playwright_api.expect(page.locator(".xterm-rows > div", has_text=f"echo {marker}")).to_have_count(1)
    shot(page, "console")
    assert problems == []
    context.close()


@pytest.mark.skipif(not feature(CONSOLE), reason="the console page needs the consoles feature (issue 17) merged")
def test_the_vnc_tab_shows_the_guests_screen(browser: Any, portal: Server, api_key: str, agent: dict[str, Any],
                                             console_guest: str) -> None:
    context, page = signed_in(browser, portal, api_key)
    problems = console_sockets(page)
    page.goto(f"{base(portal)}/ui/agents/{agent['id']}/vms/{console_guest}/console?kind=vnc")
    # noVNC says "connect" once the RFB handshake and the server's init are through
    playwright_api.expect(page.locator("#console-status")).to_have_text("Connected to the VM's screen.",
                                                                        timeout=STATE_TIMEOUT_MS)
    size = page.evaluate("[document.querySelector('#console canvas').width,"
                         " document.querySelector('#console canvas').height]")
    assert size[0] > 0 and size[1] > 0, size  # the guest's framebuffer size, from its ServerInit
    # the guest's pixels arrived: its text screen is not all black (polled: the cursor blinks)
    lit = "(() => { const c = document.querySelector('#console canvas');" \
          " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;" \
          " for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2]) return true; return false; })()"
    page.wait_for_function(lit, timeout=STATE_TIMEOUT_MS)
    shot(page, "console-vnc")
    assert problems == []
    context.close()
