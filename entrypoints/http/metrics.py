"""``GET /metrics``: the portal's own metrics, guarded (issue 21).

They name no user's data (route templates, error codes, virsh subcommands, counts), but they are
not public either: they are served to a client on loopback that did not come through a proxy (a
Prometheus on the portal's host, scraping it on its own port), or to any client that presents the
operator's ``MANAGEMENT_METRICS_TOKEN`` as a Bearer token (compared in constant time). A request
relayed by a proxy (it carries ``X-Forwarded-For``, ``Forwarded`` or ``X-Real-IP``) never counts
as local, trusted proxy or not: nginx on loopback in front of the portal must not open them to
the world.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Callable

import falcon
import falcon.asgi

from core.errors import MetricsForbidden
from entrypoints.exposition import CONTENT_TYPE

PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` (a peer's IP address as the server reports it) is on loopback."""
    try:
        ip = ipaddress.ip_address((address or "").strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


class PortalMetrics:
    """Answers ``GET /metrics`` with ``exposition()`` to the clients allowed to read it."""

    def __init__(self, exposition: Callable[[], bytes] | None, token: str | None) -> None:
        self.exposition = exposition
        self.token = token

    def allowed(self, req: falcon.asgi.Request) -> bool:
        header = req.get_header("Authorization")
        if header is not None:  # a token given is checked, from loopback too: a wrong one is refused
            scheme, _, presented = header.partition(" ")
            return (self.token is not None and scheme.lower() == "bearer"
                    and hmac.compare_digest(presented.strip().encode("utf-8", "surrogatepass"),
                                            self.token.encode("utf-8")))
        if any(req.get_header(name) is not None for name in PROXY_HEADERS):
            return False
        return is_loopback(req.remote_addr)

    async def answer(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not self.allowed(req):
            raise MetricsForbidden()
        body = b"" if self.exposition is None else await asyncio.to_thread(self.exposition)  # reads files
        resp.status = falcon.HTTP_200
        resp.content_type = CONTENT_TYPE
        resp.set_header("Cache-Control", "no-store")
        resp.data = body
