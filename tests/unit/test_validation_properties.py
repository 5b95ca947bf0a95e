"""Properties of the field rules in ``core.validation`` and of ``core.model.api_key_prefix``."""

from __future__ import annotations

import re
import sys
import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from adapters.hashing import HmacKeyHasher
from core import validation
from core.model import api_key_prefix

CONTROL_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}  # control, format (e.g. U+200E), line and paragraph separators


def is_control(char: str) -> bool:
    return unicodedata.category(char) in CONTROL_CATEGORIES


# Text biased towards the characters the rules care about, mixed with arbitrary text.
HOSTNAME_ISH = st.text(alphabet="abcxyz019-.:%_ \t\n\x00\u200b\u00a0", max_size=40)
USERNAME_ISH = st.text(alphabet="abzAZ09._-@ $;\n\t\x00\u00e9", max_size=70)
ANY_TEXT = st.one_of(st.text(), st.text(max_size=300))

# ---------------------------------------------------------------------------------------- hostname

DNS_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
# The last label is never all digits (RFC 3696 s2): "10.0.0.300" is a bad address, not a name.
TOP_LABEL = DNS_LABEL.filter(lambda label: not label.isdigit())
DNS_NAMES = st.builds(
    lambda labels, top, dot: ".".join([*labels, top]) + dot,
    st.lists(DNS_LABEL, max_size=3),
    TOP_LABEL,
    st.sampled_from(["", "."]),
).filter(lambda name: len(name.rstrip(".")) <= 253)


@given(st.one_of(ANY_TEXT, HOSTNAME_ISH))
@example("-oProxyCommand=id")
@example("a" * 256)
@example("host name")
def test_check_hostname_accepts_only_short_clean_text_not_starting_with_dash(text: str) -> None:
    if validation.check_hostname(text) is None:
        assert 1 <= len(text) <= 255
        assert not any(c.isspace() or is_control(c) for c in text)
        assert not text.startswith("-")


@given(st.text().map(lambda tail: "-" + tail))
def test_check_hostname_never_accepts_a_leading_dash(text: str) -> None:
    assert validation.check_hostname(text) is not None


@given(DNS_NAMES)
@example("localhost")
@example("xn--bcher-kva.example")
@example("a" * 63 + ".example")
def test_check_hostname_accepts_every_valid_dns_name(name: str) -> None:
    assert validation.check_hostname(name) is None


@given(st.ip_addresses())
def test_check_hostname_accepts_every_ip_address(address: object) -> None:
    assert validation.check_hostname(str(address)) is None


@pytest.mark.parametrize("text", ["::1%--help", "fe80::1%`id`", "fe80::1%$(reboot)"])
def test_check_hostname_refuses_ipv6_zone_ids_with_option_or_shell_syntax(text: str) -> None:
    assert validation.check_hostname(text) is not None


# ---------------------------------------------------------------------------------------- username

USERNAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


@given(st.one_of(ANY_TEXT, USERNAME_ISH).map(lambda tail: "-" + tail))
def test_check_username_never_accepts_a_leading_dash(text: str) -> None:
    assert validation.check_username(text) is not None


@given(st.from_regex(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,63}", fullmatch=True))
def test_check_username_accepts_portable_user_names(text: str) -> None:
    assert validation.check_username(text) is None


@given(st.one_of(ANY_TEXT, USERNAME_ISH))
@example("root\n")
def test_check_username_never_accepts_a_character_outside_the_portable_set(text: str) -> None:
    if validation.check_username(text) is None:
        assert set(text) <= USERNAME_CHARS


# ---------------------------------------------------------------------------------------- libvirt URI


def test_check_libvirt_uri_refuses_a_trailing_newline() -> None:
    assert validation.check_libvirt_uri("qemu:///system\n") is not None


@given(st.text())
def test_check_libvirt_uri_never_accepts_whitespace_or_control_characters(text: str) -> None:
    if validation.check_libvirt_uri(text) is None:
        assert not any(c.isspace() or is_control(c) for c in text)


# ---------------------------------------------------------------------------------------- name


NAME_ISH = st.text(alphabet=st.sampled_from("ab \t\n\x00\x1f\u200e\u2028\u00a0\u3000\u00e9\U0001f600"), max_size=110)


@given(st.one_of(ANY_TEXT, NAME_ISH, st.text(min_size=95, max_size=105)))
@example("")
@example("a" * 100)
@example("a" * 101)
@example(" a")
@example("a\n")
@example("a\u200eb")
def test_check_name_accepts_exactly_short_clean_trimmed_text(text: str) -> None:
    expected = 1 <= len(text) <= 100 and text == text.strip() and not any(is_control(c) for c in text)
    assert (validation.check_name(text) is None) == expected


# ---------------------------------------------------------------------------------------- port


@given(st.integers())
@example(0)
@example(1)
@example(65535)
@example(65536)
def test_check_port_accepts_exactly_1_to_65535(port: int) -> None:
    assert (validation.check_port(port) is None) == (1 <= port <= 65535)


# ---------------------------------------------------------------------------------------- e-mail

EMAILS = st.builds(
    lambda local, domain, tld: f"{local}@{domain}.{tld}",
    st.from_regex(r"[a-z0-9._+]{1,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)
WHITESPACE = st.sampled_from([chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()])


@given(EMAILS)
def test_check_email_accepts_plain_addresses(address: str) -> None:
    assert validation.check_email(address) is None


@given(EMAILS, WHITESPACE, st.integers(min_value=0))
def test_check_email_rejects_an_address_with_whitespace_anywhere(address: str, space: str, where: int) -> None:
    where %= len(address) + 1
    assert validation.check_email(address[:where] + space + address[where:]) is not None


@given(st.one_of(ANY_TEXT, st.text(alphabet="ab@. \t\n\u00a0", max_size=20)))
def test_check_email_never_accepts_whitespace(text: str) -> None:
    if validation.check_email(text) is None:
        assert not any(c.isspace() for c in text)


# ---------------------------------------------------------------------------------------- API key prefix

API_KEY_FORM = re.compile(r"mgmt_[0-9a-f]{12}_[A-Za-z0-9_-]{40,64}")
NEAR_KEYS = st.from_regex(r"(mgmt|MGMT|mgm)_[0-9a-fA-F]{11,13}_[A-Za-z0-9_=+/.-]{38,66}", fullmatch=True)


def test_api_key_prefix_recognises_every_issued_key() -> None:
    hasher = HmacKeyHasher(b"p" * 32)
    for _ in range(300):
        issued = hasher.issue()
        assert api_key_prefix(issued.plaintext) == issued.prefix


@given(st.one_of(st.text(), NEAR_KEYS))
@example("mgmt_0123456789ab_" + "A" * 43 + "\n")
@example("mgmt_0123456789ab_" + "A" * 39)
@example("mgmt_0123456789ab_" + "A" * 65)
@example("mgmt_0123456789AB_" + "A" * 43)
def test_api_key_prefix_is_none_for_text_not_of_the_key_form(text: str) -> None:
    if API_KEY_FORM.fullmatch(text):
        assert api_key_prefix(text) == text[:17]
    else:
        assert api_key_prefix(text) is None
