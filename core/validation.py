"""Field rules shared by every way into the portal (HTTP, command line, library).

Each ``check_*`` returns an error message, or ``None`` when the value is acceptable. They are pure
and property-tested (``tests/unit/test_validation_properties.py``).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from core.errors import FieldError

NAME_MAX = 100
EMAIL_MAX = 255
HOSTNAME_MAX = 255
USERNAME_MAX = 64
LIBVIRT_URI_MAX = 255
SECRET_TEXT_MAX = 64 * 1024  # a 16384-bit RSA key in PEM is ~13 KiB; anything bigger is not a key

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_USERNAME = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_LIBVIRT_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]*$")


def has_control_characters(text: str) -> bool:
    return any(unicodedata.category(c) in {"Cc", "Cf", "Cs", "Zl", "Zp"} for c in text)


def check_name(value: str) -> str | None:
    if not 1 <= len(value) <= NAME_MAX:
        return f"must be 1 to {NAME_MAX} characters"
    if not value.strip():
        return "must not be blank"
    if value != value.strip():
        return "must not start or end with whitespace"
    if has_control_characters(value):
        return "must not contain control characters"
    return None


def check_email(value: str) -> str | None:
    if len(value) > EMAIL_MAX:
        return f"must be at most {EMAIL_MAX} characters"
    if has_control_characters(value) or not _EMAIL.fullmatch(value):
        return "must be an e-mail address like name@example.com"
    return None


def check_hostname(value: str) -> str | None:
    """A DNS name (RFC 1123 labels) or an IPv4/IPv6 literal; never an option-like string."""
    if not 1 <= len(value) <= HOSTNAME_MAX:
        return f"must be 1 to {HOSTNAME_MAX} characters"
    if value.startswith("-"):
        return "must not start with '-'"
    if any(c.isspace() for c in value) or has_control_characters(value):
        return "must not contain whitespace or control characters"
    if "%" in value:
        return "must not carry an IPv6 zone ('%...')"
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return "must be a DNS name (letters, digits, '-' and '.') or an IP address"
    if labels[-1].isdigit():
        return "is neither a valid IP address nor a DNS name"
    return None


def check_port(value: int) -> str | None:
    if not 1 <= value <= 65535:
        return "must be between 1 and 65535"
    return None


def check_username(value: str) -> str | None:
    if not 1 <= len(value) <= USERNAME_MAX:
        return f"must be 1 to {USERNAME_MAX} characters"
    if value.startswith("-"):
        return "must not start with '-'"
    if not _USERNAME.fullmatch(value):
        return "may contain only letters, digits, '.', '_' and '-'"
    return None


def check_libvirt_uri(value: str) -> str | None:
    if not 1 <= len(value) <= LIBVIRT_URI_MAX:
        return f"must be 1 to {LIBVIRT_URI_MAX} characters"
    if not _LIBVIRT_URI.fullmatch(value):
        return "must be a libvirt URI such as qemu:///system"
    return None


def check_secret_text(value: str) -> str | None:
    if len(value) > SECRET_TEXT_MAX:
        return f"must be at most {SECRET_TEXT_MAX} characters"
    if "\x00" in value:
        return "must not contain NUL characters"
    return None


def normalize_email(value: str) -> str:
    """The form in which e-mail addresses are compared for uniqueness."""
    return value.casefold()


def collect(*checks: tuple[str, str | None]) -> list[FieldError]:
    """The failed checks of ``(field, message or None)`` pairs, as field errors."""
    return [FieldError(field, message) for field, message in checks if message is not None]
