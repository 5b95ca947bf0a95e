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
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("prefix", SafeString(32), nullable=False, unique=True),
    sa.Column("digest", SafeString(128), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    # migration 6: named keys with scopes (space-separated, sorted), agents (comma-separated ids, or
    # NULL: every agent), an expiry; the user's full key (sign-up / rotate) has is_full
    sa.Column("name", SafeString(100), nullable=False),
    sa.Column("scopes", SafeString(100), nullable=False),
    sa.Column("agents", SafeText, nullable=True),
    sa.Column("expires_at", UtcDateTime, nullable=True),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
    sa.Column("is_full", sa.Boolean, nullable=False),
    sa.Index("ix_api_keys_user_id", "user_id"),
    sa.Index("ux_api_keys_one_full", "user_id", unique=True, sqlite_where=sa.text("is_full"),
             postgresql_where=sa.text("is_full")),
    sqlite_autoincrement=True,  # ids are never reused (audit events name them)
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
    sa.Column("key_id", sa.Integer, nullable=True),  # the API key that acted (migration 6); no foreign key
    sa.Column("key_name", ScrubbedString(100), nullable=True),
)

# --- consoles (issue 17): one-time console tickets, and the consoles they opened (migration 7)
console_tickets = sa.Table(
    "console_tickets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("digest", SafeString(128), nullable=False, unique=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("agent_id", sa.Integer, nullable=False),  # no foreign key: the audit outlives the agent
    sa.Column("vm", SafeString(255), nullable=False),
    sa.Column("kind", SafeString(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("opened_at", UtcDateTime, nullable=True),
    sa.Column("closed_at", UtcDateTime, nullable=True),
    sa.Index("ix_console_tickets_user_id_opened_at", "user_id", "opened_at"),
)

# ---------------------------------------------------------------------- events and the live mirror (issue 18)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("agent_id", sa.Integer, nullable=True),  # no foreign key: history outlives the agent
    sa.Column("vm", ScrubbedString(255), nullable=True),
    sa.Column("type", ScrubbedString(64), nullable=False),
    sa.Column("detail", ScrubbedText, nullable=False),
    sa.Index("ix_events_user_id_id", "user_id", "id"),
    sqlite_autoincrement=True,  # ids never come back: a reader resumes after the last one it saw
)

watches = sa.Table(
    "watches",
    metadata,
    sa.Column("agent_id", sa.Integer, sa.ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True,
              autoincrement=False),
    sa.Column("holder", SafeString(128), nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("connected", sa.Boolean, nullable=False),
    sa.Column("alive_at", UtcDateTime, nullable=True),
)

mirrored_vms = sa.Table(
    "mirrored_vms",
    metadata,
    sa.Column("agent_id", sa.Integer, sa.ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True,
              autoincrement=False),
    sa.Column("name", SafeString(255), primary_key=True),
    sa.Column("state", SafeString(32), nullable=False),
    sa.Column("domain_id", sa.Integer, nullable=True),
    sa.Column("changed_at", UtcDateTime, nullable=False),
)

# agents in use: a watcher runs for an agent while somebody used it recently (lists, actions, streams)
watch_demand = sa.Table(
    "watch_demand",
    metadata,
    sa.Column("agent_id", sa.Integer, sa.ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True,
              autoincrement=False),
    sa.Column("until", UtcDateTime, nullable=False),
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

# --- webhooks (issue 18, migration 10): subscriptions, the outbox of deliveries, each attempt
webhooks = sa.Table(
    "webhooks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("url", SafeText, nullable=False),
    sa.Column("types", SafeText, nullable=False),  # space-separated event types or families; "" = every type
    sa.Column("agents", SafeText, nullable=True),  # comma-separated agent ids, or NULL: every agent
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("sealed_secret", SafeText, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Index("ix_webhooks_user_id", "user_id"),
    sqlite_autoincrement=True,
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("webhook_id", sa.Integer, sa.ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("event_id", sa.BigInteger, nullable=False),  # no foreign key: events are pruned
    sa.Column("event_type", SafeString(64), nullable=False),
    sa.Column("body", SafeText, nullable=False),
    sa.Column("status", SafeString(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_at", UtcDateTime, nullable=True),
    sa.Column("lease_holder", SafeString(128), nullable=True),
    sa.Column("lease_until", UtcDateTime, nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Index("ix_webhook_deliveries_status_next_at", "status", "next_at"),
    sa.Index("ix_webhook_deliveries_webhook_id_id", "webhook_id", "id"),
    sqlite_autoincrement=True,  # ids are idempotency keys: never reused
)

webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("delivery_id", sa.BigInteger, sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("error", SafeText, nullable=True),
    sa.Column("response", SafeText, nullable=True),
    sa.Index("ix_webhook_attempts_delivery_id", "delivery_id"),
)
