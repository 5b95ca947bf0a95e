"""Resolving agent addresses and checking them against ``MANAGEMENT_AGENT_NETWORKS``.

The SSH adapter resolves a name once per connection (``resolve``), checks every address
(``checked``) and connects to a checked address only. ``ResolvingAgentAddresses`` implements the
``core.ports.AgentAddresses`` port for registration: the same check, so a refused address is a 422
before anything is stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import socket

from core.errors import AgentAddressRefused
from core.networks import AgentNetworks, IPAddress, ip_literal

# Agent names are looked up in this small pool of their own (``getaddrinfo`` blocks a thread), and
# waited for at most a time-out: a user whose names point at a DNS server that never answers ties
# up these threads (and then waits in their queue), never the default executor the use cases and
# database calls run in.
_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="agent-resolver")


def addresses_of(infos: list[tuple[object, ...]]) -> list[IPAddress]:
    """The distinct addresses of a ``getaddrinfo`` answer, in its order (an IPv6 zone dropped).
    Also used for webhook targets (``adapters/webhook_http.py``)."""
    found: list[IPAddress] = []
    for info in infos:
        sockaddr = info[4]
        assert isinstance(sockaddr, tuple)
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


async def resolve(hostname: str, port: int) -> list[IPAddress]:
    """Every address ``hostname`` resolves to (itself if it is an IP literal), in the resolver's
    order; ``socket.gaierror`` if it does not resolve."""
    literal = ip_literal(hostname)
    if literal is not None:
        return [literal]
    infos = await asyncio.get_running_loop().run_in_executor(
        _RESOLVERS, functools.partial(socket.getaddrinfo, hostname, port, type=socket.SOCK_STREAM))
    return addresses_of(list(infos))


def refusal(hostname: str, addresses: list[IPAddress], networks: AgentNetworks) -> AgentAddressRefused | None:
    """The error to raise if any of ``addresses`` (what ``hostname`` resolved to) is refused."""
    refused = networks.refused(addresses)
    if not refused:
        return None
    shown = ", ".join(str(a) for a in refused[:4])
    where = f"is {shown}" if ip_literal(hostname) is not None else f"resolves to {shown}"
    return AgentAddressRefused(f"{hostname} {where}, which agents may not point at ({networks.describe()}); "
                               "the portal's operator decides which networks agents may be in")


class ResolvingAgentAddresses:
    """Implements ``core.ports.AgentAddresses`` with the system resolver."""

    def __init__(self, networks: AgentNetworks, *, timeout: float = 5.0) -> None:
        self.networks = networks
        self.timeout = timeout

    def check(self, hostname: str, port: int) -> None:
        if self.networks.allows_everything:
            return  # nothing to refuse: no need to ask DNS
        literal = ip_literal(hostname)
        if literal is not None:
            addresses = [literal]
        else:
            lookup = _RESOLVERS.submit(socket.getaddrinfo, hostname, port, type=socket.SOCK_STREAM)
            try:
                addresses = addresses_of(list(lookup.result(timeout=self.timeout)))
            except (OSError, UnicodeError, concurrent.futures.TimeoutError):
                return  # does not resolve (yet): every connection checks again
        error = refusal(hostname, addresses, self.networks)
        if error is not None:
            raise error
