"""The console page's client in a real headless Chromium, before the consoles feature (issue 17) is
merged: the app under uvicorn with a stand-in operation at the contract's route (``POST
/agents/{id}/vms/{vm}/console`` → ``{ticket, url, expires_at, kind}``) and a stand-in WebSocket at
``url`` that echoes bytes and answers subprotocols as the real relay does. It proves what the page itself does:
xterm.js loads from the pinned vendor files under the page's policy (its run-time ``<style>``
elements admitted by the nonce, no policy violation), asks for a ticket with the form token, and
relays keystrokes and bytes both ways. The lab test (tests/lab/test_web_console.py) reads a real
guest's console once issue 17 is in."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.asgi
import pytest
import uvicorn

from core.model import Scope
from entrypoints import bootstrap
from entrypoints.http.app import create_app
from entrypoints.http.console import chosen_subprotocol
from entrypoints.operations import BY_NAME, Call, Operation
from entrypoints.web import pages
from tests.support import REPO, free_port, make_settings

playwright_api = pytest.importorskip("playwright.sync_api")


class EchoConsole:
    public_methods = frozenset({"GET"})  # a stand-in: the real relay checks its one-use ticket
    async def on_websocket(self, req: falcon.asgi.Request, ws: falcon.asgi.WebSocket, ticket: str) -> None:
        # the real relay's rule: a browser fails a handshake whose answer names no subprotocol it asked for
        await ws.accept(subprotocol=chosen_subprotocol(ws.subprotocols))
        await ws.send_data(b"console of web1\r\n# ")
        while True:
            try:
                data = await ws.receive_data()
            except falcon.WebSocketDisconnected:
                return
            await ws.send_data(data)


@pytest.fixture
def console_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium is not installed (scripts/test.sh installs it)")
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)")
    assets = subprocess.run([sys.executable, str(REPO / "scripts" / "web_assets.py")], capture_output=True, text=True)
    assert assets.returncode == 0, assets.stderr

    async def console(_portal: Any, call: Call) -> Any:
        return {"ticket": "t1", "url": "/console/t1", "expires_at": "2026-01-01T00:00:30Z", "kind": call.body["kind"]}

    stand_in = Operation("open_console", "POST", "/agents/{agent_id}/vms/{vm}/console", "vms", "stand-in", console,
                         lambda r, c: r, scope=Scope.OPERATE)
    monkeypatch.setattr(pages, "OPERATIONS", (stand_in, *pages.OPERATIONS))
    monkeypatch.setitem(BY_NAME, "open_console", stand_in)
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_SIGNUP="open"))
    app = create_app(runtime)
    app.add_route("/console/{ticket}", EchoConsole())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                            ws="wsproto"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):  # until it listens (bounded)
            if server.started:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        runtime.close()


def test_the_serial_console_page_relays_keystrokes_and_output_under_the_strict_policy(console_app: str) -> None:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(console_app + "/ui/sign-up")
            page.get_by_label("Name").fill("console user")
            page.get_by_role("button", name="Create account").click()
            agent_page = page.request.post(console_app + "/agents", headers={
                "Authorization": f"Bearer {page.locator('#new-api-key').inner_text().strip()}"},
                data={"name": "hv", "hostname": "192.0.2.9", "username": "u", "generate_key": True,
                      "allow_unknown_hosts": True})
            agent_id = agent_page.json()["id"]
            page.goto(f"{console_app}/ui/agents/{agent_id}/vms/web1/console")
            playwright_api.expect(page.locator("#console-status")).to_have_text("Connected to the serial console.")
            playwright_api.expect(page.locator(".xterm-rows")).to_contain_text("console of web1")
            page.locator("#console").click()
            page.keyboard.type("echo hello")
            playwright_api.expect(page.locator(".xterm-rows")).to_contain_text("# echo hello")
            assert problems == []
        finally:
            browser.close()
