"""Issue 14 item 4 (SSRF): which addresses an agent may point at, the setting that says so, and
the registration-time check (adapter and fake). Nothing here connects anywhere; the one name
resolved is ``localhost`` (from /etc/hosts)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.memory import FakeAgentAddresses
from adapters.ssh.addresses import ResolvingAgentAddresses, resolve
from core.errors import AgentAddressRefused, ValidationFailed
from core.networks import AgentNetworks, ip_literal
from entrypoints.settings import ConfigError, Settings
from tests.support import TEST_AGENT_NETWORKS

DEFAULT = AgentNetworks()

REFUSED = ["127.0.0.1", "127.255.255.254", "0.0.0.0", "0.1.2.3", "169.254.169.254", "224.0.0.1",
           "239.255.255.250", "240.0.0.1", "255.255.255.255", "::", "::1", "::ffff:127.0.0.1",
           "::ffff:169.254.169.254", "fe80::1", "fe80::1%2", "ff02::1", "fec0::1", "64:ff9b::a9fe:a9fe",
           "::127.0.0.1"]
ALLOWED = ["10.0.0.1", "172.16.5.4", "192.168.1.10", "192.0.2.15", "198.51.100.7", "8.8.8.8", "100.64.0.1",
           "2001:db8::1", "fd00::1", "2a01:4f8::1", "::ffff:10.0.0.1"]


@pytest.mark.parametrize("address", REFUSED)
def test_item4_the_default_refuses_loopback_link_local_multicast_unspecified_and_reserved(address: str) -> None:
    parsed = ip_literal(address)
    assert parsed is not None
    assert not DEFAULT.allows(parsed)


@pytest.mark.parametrize("address", ALLOWED)
def test_item4_the_default_allows_private_and_public_unicast(address: str) -> None:
    parsed = ip_literal(address)
    assert parsed is not None
    assert DEFAULT.allows(parsed)


@given(st.ip_addresses(v=4))
def test_item4_default_ipv4_policy_is_exactly_the_documented_ranges(address: ipaddress.IPv4Address) -> None:
    refused = (address.is_loopback or address.is_link_local or address.is_multicast or address.is_reserved
               or address in ipaddress.ip_network("0.0.0.0/8"))
    assert DEFAULT.allows(address) is not refused


@given(st.ip_addresses(v=4), st.sampled_from(["", TEST_AGENT_NETWORKS, "127.0.0.0/8", "10.0.0.0/8,192.0.2.7"]))
def test_item4_an_ipv4_mapped_address_is_judged_as_its_ipv4_address(address: ipaddress.IPv4Address,
                                                                    setting: str) -> None:
    networks = AgentNetworks.parse(setting)
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert networks.allows(mapped) is networks.allows(address)


@given(st.ip_addresses(v=6))
def test_item4_default_ipv6_policy_refuses_the_special_ranges(address: ipaddress.IPv6Address) -> None:
    if address.ipv4_mapped is not None:
        return
    special = (address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified
               or address.is_site_local or address in ipaddress.ip_network("::/8"))
    if special:
        assert not DEFAULT.allows(address)
    elif address in ipaddress.ip_network("2000::/3") or address in ipaddress.ip_network("fc00::/7"):
        assert DEFAULT.allows(address)  # global unicast and unique-local (private) stay allowed


def test_item4_an_explicit_list_replaces_the_default() -> None:
    loopback_only = AgentNetworks.parse("127.0.0.0/8, ::1")
    assert loopback_only.allows(ipaddress.ip_address("127.0.0.1"))
    assert loopback_only.allows(ipaddress.ip_address("::1"))
    assert not loopback_only.allows(ipaddress.ip_address("10.0.0.1"))
    assert not loopback_only.allows(ipaddress.ip_address("8.8.8.8"))
    assert AgentNetworks.parse("").allowed is None and AgentNetworks.parse(" , ").allowed is None
    assert AgentNetworks.parse("0.0.0.0/0,::/0").allows_everything
    assert not AgentNetworks.parse("0.0.0.0/0").allows_everything  # IPv6 still limited (to nothing)
    assert not DEFAULT.allows_everything


@given(st.lists(st.ip_addresses().map(str), min_size=1, max_size=5))
def test_item4_any_list_of_addresses_parses_and_allows_exactly_its_members(items: list[str]) -> None:
    networks = AgentNetworks.parse(",".join(items))
    for item in items:
        address = ipaddress.ip_address(item)
        if not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None):
            assert networks.allows(address)


@pytest.mark.parametrize("value", ["10.0.0.0/33", "nginx.local", "10.0.0.0/8;192.168.0.0/16", "::1/129"])
def test_item4_an_unreadable_setting_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({"MANAGEMENT_AGENT_NETWORKS": value})
    assert bad.value.variable == "MANAGEMENT_AGENT_NETWORKS"


def test_item4_the_setting_defaults_to_the_default_policy_and_reads_a_list() -> None:
    assert Settings.from_env({}).agent_networks == AgentNetworks()
    assert Settings.from_env({"MANAGEMENT_AGENT_NETWORKS": "10.0.0.0/8,2001:db8::/32"}).agent_networks == \
        AgentNetworks((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")))


@pytest.mark.parametrize(("variable", "value"), [("MANAGEMENT_MAX_OUTPUT_BYTES", "1000"),
                                                 ("MANAGEMENT_MAX_OUTPUT_BYTES", "lots"),
                                                 ("MANAGEMENT_MAX_OPERATIONS_PER_USER", "0")])
def test_item2_item5_limits_are_validated_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({variable: value})
    assert bad.value.variable == variable
    defaults = Settings.from_env({})
    assert (defaults.max_output_bytes, defaults.max_operations_per_user) == (4 * 1024 * 1024, 16)


def test_item4_registration_check_refuses_literals_and_names_resolving_to_refused_addresses() -> None:
    check = ResolvingAgentAddresses(AgentNetworks(), timeout=5)
    for refused in ("127.0.0.1", "[::1]", "169.254.169.254", "localhost"):
        with pytest.raises(AgentAddressRefused) as error:
            check.check(refused, 22)
        assert isinstance(error.value, ValidationFailed)  # a 422, naming the field
        assert [e.field for e in error.value.errors] == ["hostname"]
        assert "MANAGEMENT_AGENT_NETWORKS" in error.value.detail
    check.check("192.0.2.15", 22)
    check.check("10.1.2.3", 2222)


def test_item4_registration_check_asks_no_resolver_when_everything_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("resolved a name although every address is allowed")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    ResolvingAgentAddresses(AgentNetworks.parse(TEST_AGENT_NETWORKS)).check("hv1.example.com", 22)


def test_item4_a_name_that_does_not_resolve_passes_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    ResolvingAgentAddresses(AgentNetworks()).check("not-yet-in-dns.example", 22)  # connections check again


def test_item4_the_fake_keeps_the_ports_promise() -> None:
    fake = FakeAgentAddresses(names={"metadata.internal": ["169.254.169.254"], "hv.example": ["192.0.2.5"]})
    for refused in ("127.0.0.1", "metadata.internal"):
        with pytest.raises(AgentAddressRefused):
            fake.check(refused, 22)
    fake.check("hv.example", 22)
    fake.check("unknown.example", 22)
    assert fake.checked == [("127.0.0.1", 22), ("metadata.internal", 22), ("hv.example", 22),
                            ("unknown.example", 22)]


def test_item4_resolving_agent_names_never_takes_the_default_executors_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Names whose DNS never answers block their lookup threads; those are the resolver's own, so
    the use cases' and the database's threads (the default executor) stay free."""
    release = threading.Event()  # also set after 30 s, so a failing run cannot hang
    started: list[str] = []

    def hanging(host: str, *args: Any, **kwargs: Any) -> Any:
        started.append(host)
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)

    async def scenario() -> None:
        lookups = [asyncio.ensure_future(resolve(f"slow{n}.example", 22)) for n in range(12)]
        try:
            for _ in range(1000):  # until every resolver thread is stuck (at most ~10 s)
                if len(started) >= 8:
                    break
                await asyncio.sleep(0.01)
            assert len(started) == 8  # eight threads of its own, the other four lookups queue
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "database call"), timeout=10) == "database call"
        finally:
            release.set()
            await asyncio.gather(*lookups, return_exceptions=True)
        assert len(started) == 12

    asyncio.run(scenario())
