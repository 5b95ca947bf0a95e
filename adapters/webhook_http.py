"""Posting webhook deliveries with httpx, only to addresses ``MANAGEMENT_WEBHOOK_ALLOW`` allows.

A webhook URL is chosen by a user, and the portal then connects there: unchecked, that makes the
portal a probe of its own host and network (the metadata service on 169.254.169.254, services on
loopback). So each POST resolves the host once, refuses it if **any** address it resolves to is
outside the allowed networks, and connects to the first checked address itself: the request goes
to ``http(s)://<that address>:<port>/…`` with the original ``Host`` header and, for https, the
original name as TLS SNI and certificate name (httpcore's ``sni_hostname``). DNS is never asked a
second time between the check and the connection.

Also: no redirects followed (a 3xx is a failed attempt: it could point anywhere), no proxy from
the environment (it would bypass the check), no connection kept alive (a pooled TLS connection to
one IP verified for one name must not carry another name's request), a time-out on the whole
attempt, and at most ``max_response_bytes`` of the answer read, undecoded (no decompression bomb).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import httpx

from adapters.ssh.addresses import addresses_of
from core.errors import WebhookTargetRefused
from core.networks import AgentNetworks, IPAddress, ip_literal
from core.ports import WebhookResponse

# Webhook hosts are looked up in a small pool of their own, with a time-out (getaddrinfo blocks a thread).
_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-resolver")


def _refusal(host: str, addresses: list[IPAddress], networks: AgentNetworks) -> WebhookTargetRefused | None:
    refused = networks.refused(addresses)
    if not refused:
        return None
    shown = ", ".join(str(a) for a in refused[:4])
    where = "" if ip_literal(host) is not None else f" (it resolves to {shown})"
    return WebhookTargetRefused(f"{host}{where} is an address webhooks may not post to ({networks.describe()}); "
                                "the portal's operator decides which networks webhooks may reach")


class HttpWebhookSender:
    """Implements ``core.ports.WebhookSender``."""

    def __init__(self, networks: AgentNetworks, *, timeout: float = 10.0, resolve_timeout: float = 5.0,
                 max_response_bytes: int = 4096) -> None:
        self.networks = networks
        self.timeout = timeout
        self.resolve_timeout = resolve_timeout
        self.max_response_bytes = max_response_bytes

    def _resolve(self, host: str, port: int) -> list[IPAddress]:
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        lookup = _RESOLVERS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        return addresses_of(list(lookup.result(timeout=self.resolve_timeout)))

    def check(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if self.networks.allows_everything:
            return
        try:
            addresses = self._resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
        except (OSError, UnicodeError, concurrent.futures.TimeoutError):
            return  # does not resolve (yet): every delivery checks again
        error = _refusal(host, addresses, self.networks)
        if error is not None:
            raise error

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> WebhookResponse:
        started = time.monotonic()

        def failed(reason: str) -> WebhookResponse:
            return WebhookResponse(status_code=None, response=None, error=reason, seconds=time.monotonic() - started)

        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            literal = ip_literal(host)
            addresses = [literal] if literal is not None else addresses_of(list(await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(
                    _RESOLVERS, functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)),
                self.resolve_timeout)))
        except TimeoutError:
            return failed(f"cannot resolve {host}: no answer within {self.resolve_timeout:g} s")
        except (OSError, UnicodeError) as error:
            return failed(f"cannot resolve {host}: {error or type(error).__name__}")
        refusal = _refusal(host, addresses, self.networks)
        if refusal is not None:
            return failed(f"{refusal.code}: {refusal.errors[0].message}")
        address = addresses[0]
        shown = f"[{address}]" if address.version == 6 else str(address)
        target = urlunsplit((parts.scheme, f"{shown}:{port}", parts.path or "/", parts.query, ""))
        default_port = port == (443 if parts.scheme == "https" else 80)
        host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            async with asyncio.timeout(self.timeout):
                async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.timeout,
                                             limits=httpx.Limits(max_keepalive_connections=0)) as client:
                    request = client.build_request("POST", target, content=body,
                                                   headers={**headers, "Host": host_header}, extensions=extensions)
                    response = await client.send(request, stream=True)
                    try:
                        answer = bytearray()
                        async for chunk in response.aiter_raw():
                            answer += chunk
                            if len(answer) >= self.max_response_bytes:
                                break
                    finally:
                        await response.aclose()
        except TimeoutError:
            return failed(f"no answer within {self.timeout:g} s")
        except (httpx.HTTPError, httpx.InvalidURL) as error:  # (InvalidURL: e.g. an IPv6 zone, not an HTTPError)
            return failed(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        except OSError as error:
            return failed(f"{type(error).__name__}: {error}")
        return WebhookResponse(status_code=response.status_code,
                               response=bytes(answer[:self.max_response_bytes]).decode("utf-8", "replace"),
                               error=None, seconds=time.monotonic() - started)
