"""A webhook receiver for the tests: a real HTTP server on loopback (a thread) that records every
request and answers what it is told (fail the first N, redirect, a large body, a slow answer)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable

import attrs

from tests.support import free_port


@attrs.frozen
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """``with Receiver(fail_first=3) as r:`` … ``r.requests`` (what came), ``r.url`` (where to send)."""

    def __init__(self, *, fail_first: int = 0, status: int = 200, body: bytes = b"thanks", delay: float = 0.0,
                 headers: dict[str, str] | None = None, port: int | None = None) -> None:
        self.fail_first = fail_first
        self.status = status
        self.answer = body
        self.delay = delay
        self.extra_headers = dict(headers or {})
        self.port = port or free_port()
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
                    failing = len(receiver.requests) <= receiver.fail_first
                if receiver.delay:
                    time.sleep(receiver.delay)  # the slow receiver under test, not a wait for a race
                self.send_response(500 if failing else receiver.status)
                for name, value in receiver.extra_headers.items():
                    self.send_header(name, value)
                answer = b"not now" if failing else receiver.answer
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, condition: Callable[[list[Received]], bool], within: float = 30.0) -> list[Received]:
        """Poll (bounded) until ``condition`` holds for the requests received so far."""
        deadline = time.monotonic() + within
        while True:
            with self._lock:
                seen = list(self.requests)
            if condition(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver got {len(seen)} requests, not what was expected: {seen}")
            time.sleep(0.05)
