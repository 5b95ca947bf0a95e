"""Properties of the audit event's text fields (issue 14 item 6): whatever a client asked (a VM name
with NUL, terminal escapes, lone surrogates, 10 000 characters) is recorded printable, escaped and
cut to its column, the same on every storage backend."""

from __future__ import annotations

from datetime import UTC, datetime

import attrs
from hypothesis import example, given
from hypothesis import strategies as st

from adapters.sql.schema import audit_events, storable
from core.model import AuditEvent, printable

NOW = datetime(2026, 1, 1, tzinfo=UTC)
# Any character, plus lone surrogates (which st.characters() never draws) and NUL/escape/bidi often.
ANY_TEXT = st.text(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from("\x00\x1b\u202e")),
                   max_size=600)


def event(text: str) -> AuditEvent:
    return AuditEvent(id=0, user_id=1, action=text, outcome=text, agent_id=None, vm=text, detail=text,
                      request_id=text, client_address=text, created_at=NOW)


@given(ANY_TEXT)
@example("a\x00b")
@example("v" * 256)
@example("\x1b[31mred\x1b[0m\u202e\ud800\n")
def test_item6_every_audit_text_field_is_printable_and_fits_its_column(text: str) -> None:
    built = event(text)
    for column in ("action", "outcome", "vm", "detail", "request_id", "client_address"):
        value = getattr(built, column)
        assert value.isprintable()
        # storable on PostgreSQL: no NUL, no lone surrogate (encoding would raise)
        assert "\x00" not in value and value.encode("utf-8") is not None
        length = getattr(audit_events.c[column].type, "length", None)
        assert length is None or len(value) <= length
    assert len(built.detail or "") <= 500


@given(ANY_TEXT)
def test_item6_making_audit_text_safe_is_idempotent_and_keeps_printable_text(text: str) -> None:
    built = event(text)
    assert attrs.evolve(built) == built  # re-building (evolve, a read from storage) changes nothing
    if text.isprintable() and len(text) <= 64:
        assert built.action == text


def test_item6_control_characters_are_escaped_readably() -> None:
    assert printable("a\x00b", 255) == "a\\x00b"
    assert printable("\x1b[0m\u202e", 255) == "\\x1b[0m\\u202e"
    assert printable("x" * 300, 255) == "x" * 254 + "\u2026"


@given(ANY_TEXT)
def test_item6_storage_replaces_nul_and_lone_surrogates_and_nothing_else(text: str) -> None:
    stored = storable(text)
    assert len(stored) == len(text)
    assert "\x00" not in stored and stored.encode("utf-8") is not None
    assert all(a == b or a in "\x00" or 0xD800 <= ord(a) <= 0xDFFF for a, b in zip(text, stored, strict=True))
