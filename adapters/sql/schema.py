"""The current database schema, as SQLAlchemy Core tables (dialect-neutral: SQLite and PostgreSQL).

This describes the schema the latest migration produces; ``migrations.py`` builds it step by step
and a test checks that the two agree.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect (SQLite keeps no zone, so we add it back)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# PostgreSQL refuses a NUL character in any text ("A string literal cannot contain NUL (0x00)
# characters", a 500), and neither backend can encode a lone surrogate as UTF-8 (which strict JSON
# lets a client send as "\ud800"). Validation keeps both out of every field it checks; this is the last
# line for what it does not: every text column replaces them with U+FFFD on the way in. The audit's
# columns (which record what was asked, hostile or not) also scrub on the way out: SQLite stored
# NULs there before this existed. Other columns were always validated, so their reads skip the
# per-value call (a list of 1000 agents would pay it ~12 000 times).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: str) -> str:
    """``value`` without NUL or lone surrogates (each replaced by U+FFFD)."""
    if value.isascii() and "\x00" not in value:
        return value  # the common case: one flag read and one memchr
    return _UNSTORABLE.sub("\ufffd", value)


class SafeString(sa.TypeDecorator[str]):
    """``VARCHAR(n)`` that never stores NUL or a lone surrogate (same DDL as ``String``)."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else storable(value)


class SafeText(sa.TypeDecorator[str]):
    """``TEXT`` that never stores NUL or a lone surrogate (same DDL as ``Text``)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else storable(value)


class ScrubbedString(SafeString):
    """``SafeString`` that also never returns NUL or a lone surrogate (audit columns)."""

    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else storable(value)


class ScrubbedText(SafeText):
    """``SafeText`` that also never returns NUL or a lone surrogate (audit columns)."""

    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else storable(value)


metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", SafeString(100), nullable=False),
    sa.Column("email", SafeString(255), nullable=True),
    # casefolded e-mail: uniqueness is case-insensitive while the address is kept as typed
    sa.Column("email_key", SafeString(255), nullable=True, unique=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, unique=True),
    sa.Column("prefix", SafeString(32), nullable=False, unique=True),
    sa.Column("digest", SafeString(128), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", SafeString(100), nullable=False),
    sa.Column("hostname", SafeString(255), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("username", SafeString(64), nullable=False),
    sa.Column("allow_unknown_hosts", sa.Boolean, nullable=False),
    sa.Column("host_key", SafeText, nullable=True),
    sa.Column("host_key_fingerprint", SafeString(128), nullable=True),
    sa.Column("libvirt_uri", SafeString(255), nullable=False),
    sa.Column("public_key", SafeText, nullable=False),
    sa.Column("key_fingerprint", SafeString(128), nullable=False),
    sa.Column("sealed_private_key", SafeText, nullable=False),
    sa.Column("sealed_passphrase", SafeText, nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False, server_default="1"),
    # the portal generated the private key: never exported (migration 5)
    sa.Column("key_generated", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.UniqueConstraint("owner_id", "name", name="uq_agents_owner_name"),
    sqlite_autoincrement=True,  # ids are never reused (migration 3)
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("action", ScrubbedString(64), nullable=False),
    sa.Column("outcome", ScrubbedString(64), nullable=False),
    sa.Column("agent_id", sa.Integer, nullable=True),  # no foreign key: history outlives the agent
    sa.Column("vm", ScrubbedString(255), nullable=True),
    sa.Column("detail", ScrubbedText, nullable=True),
    sa.Column("request_id", ScrubbedString(64), nullable=False),
    sa.Column("client_address", ScrubbedString(64), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Index("ix_audit_events_user_id_id", "user_id", "id"),
)

# --- web console sessions (issue 19, migration 9): found by the SHA-256 digest of their token
web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("digest", SafeString(64), nullable=False, unique=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("last_seen_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("key_prefix", SafeString(32), nullable=False),  # the API key it was signed in with
    sa.Index("ix_web_sessions_user_id", "user_id"),
)
