"""Which addresses an agent may point at (``MANAGEMENT_AGENT_NETWORKS``).

An agent's address is chosen by whoever registers it, and the portal then connects there and
reports what it found (open or closed port, round-trip time, the host key offered). Unchecked,
that makes the portal a scanner of its own network: its loopback services, the cloud metadata
service on a link-local address, anything only the portal host can reach. The policy below says
which addresses are fair game; the SSH adapter resolves a name once, checks every address it
resolves to, and connects to a checked address only (so DNS cannot answer differently between
the check and the connection).

Pure: no DNS here (see ``adapters/ssh/addresses.py``), only addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

VARIABLE = "MANAGEMENT_AGENT_NETWORKS"

# Refused unless the operator lists them: addresses that reach the portal host itself, or its
# own link, or nothing real. Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) stay allowed:
# hypervisors usually live there. IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are checked as the
# IPv4 address they are.
REFUSED_BY_DEFAULT: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local: cloud metadata services (169.254.169.254)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, with the broadcast address 255.255.255.255
    "::/8",  # unspecified, loopback, IPv4-compatible and NAT64 (64:ff9b::/96): IETF-reserved
    "100::/64",  # discard-only
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated, reserved)
    "ff00::/8",  # multicast
))

EVERYTHING: tuple[IPNetwork, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def ip_literal(hostname: str) -> IPAddress | None:
    """``hostname`` as an IP address if it is written as one (``[::1]`` brackets allowed)."""
    text = hostname.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _plain(address: IPAddress) -> IPAddress:
    """The address packets really go to: an IPv4-mapped IPv6 address is its IPv4 address, and an
    IPv6 scope (``%eth0``) does not change which network the address is in."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(address.packed)
    return address


@attrs.frozen
class AgentNetworks:
    """The allowed networks: ``allowed`` when the operator listed them (the list replaces the
    default), else every address outside ``REFUSED_BY_DEFAULT``."""

    allowed: tuple[IPNetwork, ...] | None = None
    # the variable the operator sets this policy with (named in refusals): the same rules serve
    # agents' addresses and webhook targets (``MANAGEMENT_WEBHOOK_ALLOW``, issue 18)
    variable: str = VARIABLE

    @classmethod
    def parse(cls, text: str | None, variable: str = VARIABLE) -> AgentNetworks:
        """Comma-separated networks or addresses (``10.0.0.0/8, 2001:db8::/32, 192.0.2.7``);
        unset or blank means the default. Raises ``ValueError`` naming the item it cannot read."""
        items = [item.strip() for item in (text or "").split(",") if item.strip()]
        if not items:
            return cls(variable=variable)
        networks: list[IPNetwork] = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network (such as 10.0.0.0/8) or address") from None
        return cls(tuple(networks), variable)

    @classmethod
    def of(cls, networks: Iterable[str]) -> AgentNetworks:
        return cls.parse(",".join(networks))

    def allows(self, address: IPAddress) -> bool:
        plain = _plain(address)
        if self.allowed is None:
            return not any(plain in network for network in REFUSED_BY_DEFAULT if network.version == plain.version)
        return any(plain in network for network in self.allowed if network.version == plain.version)

    def refused(self, addresses: Iterable[IPAddress]) -> list[IPAddress]:
        """The addresses of ``addresses`` this policy refuses (empty: all allowed)."""
        return [address for address in addresses if not self.allows(address)]

    @property
    def allows_everything(self) -> bool:
        """Whether no address at all is refused (then a name need not even be resolved to check it)."""
        return self.allowed is not None and all(
            any(network.num_addresses == full.num_addresses and network.version == full.version
                for network in self.allowed) for full in EVERYTHING)

    def describe(self) -> str:
        """The policy in words, for refusals: what the operator set, or what the default is."""
        if self.allowed is None:
            return (f"{self.variable} is not set: loopback, link-local, multicast, unspecified and reserved "
                    "addresses are refused")
        return f"{self.variable}={','.join(str(n) for n in self.allowed)}"
