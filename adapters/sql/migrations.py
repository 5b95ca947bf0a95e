"""Versioned schema migrations: a small runner instead of alembic (see docs/architecture.md).

Each step is a function of a connection, applied in order inside one transaction that holds the
database's write lock, so several workers starting at once migrate exactly once and a failed step
leaves the database as it was. Steps are frozen: once released, a step never changes; a new
schema change is a new step appended to ``STEPS``.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from adapters.sql.schema import UtcDateTime

Step = Callable[[sa.Connection], None]

_version_table = sa.Table(
    "schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, nullable=False),
)


def _v1_initial(conn: sa.Connection) -> None:
    """Users, API keys, agents and audit events as first released."""
    md = sa.MetaData()
    sa.Table(
        "users", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("email", sa.String(255), nullable=True),
        sa.Column("email_key", sa.String(255), nullable=True, unique=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    sa.Table(
        "api_keys", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False, unique=True),
        sa.Column("prefix", sa.String(32), nullable=False, unique=True),
        sa.Column("digest", sa.String(128), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    sa.Table(
        "agents", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("allow_unknown_hosts", sa.Boolean, nullable=False),
        sa.Column("host_key", sa.Text, nullable=True),
        sa.Column("host_key_fingerprint", sa.String(128), nullable=True),
        sa.Column("libvirt_uri", sa.String(255), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("key_fingerprint", sa.String(128), nullable=False),
        sa.Column("sealed_private_key", sa.Text, nullable=False),
        sa.Column("sealed_passphrase", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint("owner_id", "name", name="uq_agents_owner_name"),
    )
    sa.Table(
        "audit_events", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("agent_id", sa.Integer, nullable=True),
        sa.Column("vm", sa.String(255), nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("client_address", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Index("ix_audit_events_user_id_id", "user_id", "id"),
    )
    md.create_all(conn)


def _v2_agent_revision(conn: sa.Connection) -> None:
    """Agents get a revision number, bumped when connection settings change, so pooled SSH
    connections opened with older settings can be told apart and dropped."""
    conn.execute(sa.text("ALTER TABLE agents ADD COLUMN revision INTEGER NOT NULL DEFAULT 1"))


_AGENT_COLUMNS = ("id, owner_id, name, hostname, port, username, allow_unknown_hosts, host_key, "
                  "host_key_fingerprint, libvirt_uri, public_key, key_fingerprint, sealed_private_key, "
                  "sealed_passphrase, created_at, updated_at, revision")


def _v3_agent_ids_never_reused(conn: sa.Connection) -> None:
    """SQLite reuses the largest rowid once it is deleted; an agent id must never come back (a new
    agent must not inherit an old one's pooled connections or history), so the table is rebuilt
    with AUTOINCREMENT. PostgreSQL sequences never go back: nothing to do there."""
    if conn.dialect.name != "sqlite":
        return
    conn.execute(sa.text(
        "CREATE TABLE agents_new ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " owner_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,"
        " name VARCHAR(100) NOT NULL, hostname VARCHAR(255) NOT NULL, port INTEGER NOT NULL,"
        " username VARCHAR(64) NOT NULL, allow_unknown_hosts BOOLEAN NOT NULL, host_key TEXT,"
        " host_key_fingerprint VARCHAR(128), libvirt_uri VARCHAR(255) NOT NULL, public_key TEXT NOT NULL,"
        " key_fingerprint VARCHAR(128) NOT NULL, sealed_private_key TEXT NOT NULL, sealed_passphrase TEXT,"
        " created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, revision INTEGER NOT NULL DEFAULT 1,"
        " CONSTRAINT uq_agents_owner_name UNIQUE (owner_id, name))"
    ))
    copy = f"INSERT INTO agents_new ({_AGENT_COLUMNS}) SELECT {_AGENT_COLUMNS} FROM agents"  # noqa: S608 - constants
    conn.execute(sa.text(copy))
    conn.execute(sa.text("DROP TABLE agents"))
    conn.execute(sa.text("ALTER TABLE agents_new RENAME TO agents"))


# The execution option through which ``upgrade`` hands migration 4 the function that re-keys a
# stored API-key digest with the server's pepper (``adapters.hashing.HmacKeyHasher.rekey``): steps
# take only a connection, and only this one needs the server's secret.
REKEY_OPTION = "rekey_api_key_digest"


class SecretNeeded(RuntimeError):
    """A migration step needs the server's secret key and was not given it."""


def _v4_keyed_api_key_digests(conn: sa.Connection) -> None:
    """API-key digests were an unkeyed SHA-256, which anyone able to write the database could forge.
    The key itself is unknown here, so each ``sha256:<hex>`` digest is re-keyed as it stands:
    ``hmac-sha256-of-sha256:<HMAC(pepper, old digest)>``, which the hasher checks by hashing the
    presented key the old way first. Every existing key keeps working; no unkeyed digest is left
    (the hasher refuses that form from now on, wherever it comes from)."""
    api_keys = sa.table("api_keys", sa.column("id"), sa.column("digest"))
    legacy = conn.execute(sa.select(api_keys.c.id, api_keys.c.digest)
                          .where(api_keys.c.digest.like("sha256:%"))).all()
    if not legacy:
        return
    rekey = conn.get_execution_options().get(REKEY_OPTION)
    if rekey is None:
        raise SecretNeeded(
            "migration 4 re-keys the stored API-key digests with the server's secret key; run it with the "
            "portal's settings (start the portal, or `manage-playrservers db upgrade`)")
    for key_id, digest in legacy:
        conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(digest=rekey(digest)))


def _v5_agent_key_generated(conn: sa.Connection) -> None:
    """Agents remember whether the portal generated their private key (such a key is never
    exported). Existing agents cannot tell, so they keep the old behaviour: exportable."""
    conn.execute(sa.text("ALTER TABLE agents ADD COLUMN key_generated BOOLEAN NOT NULL DEFAULT false"))


# ---------------------------------------------------------------------- API keys and scopes (issue 20)

ALL_SCOPES_TEXT = "agents credentials keys operate provision read"  # core.model.ALL_SCOPES, as stored


def _v6_scoped_api_keys(conn: sa.Connection) -> None:
    """A user has any number of named API keys, each with scopes, optionally limited to some agents
    and with an expiry; the key each user had becomes their *full* key (every scope, every agent,
    no expiry: it works exactly as before). At most one full key per user (a partial unique index).
    Audit events record which key acted. SQLite rebuilds the table (its ``user_id`` was unique, and
    key ids must never be reused: audit events name them)."""
    if conn.dialect.name == "sqlite":
        conn.execute(sa.text(
            "CREATE TABLE api_keys_new ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,"
            " prefix VARCHAR(32) NOT NULL, digest VARCHAR(128) NOT NULL, created_at DATETIME NOT NULL,"
            " name VARCHAR(100) NOT NULL, scopes VARCHAR(100) NOT NULL, agents TEXT,"
            " expires_at DATETIME, last_used_at DATETIME, is_full BOOLEAN NOT NULL, UNIQUE (prefix))"))
        conn.execute(sa.text(
            "INSERT INTO api_keys_new (id, user_id, prefix, digest, created_at, name, scopes, is_full)"
            " SELECT id, user_id, prefix, digest, created_at, 'full', :scopes, 1 FROM api_keys"),
            {"scopes": ALL_SCOPES_TEXT})
        conn.execute(sa.text("DROP TABLE api_keys"))
        conn.execute(sa.text("ALTER TABLE api_keys_new RENAME TO api_keys"))
        timestamp = "DATETIME"
    else:
        for unique in sa.inspect(conn).get_unique_constraints("api_keys"):
            if unique["column_names"] == ["user_id"]:
                conn.execute(sa.text(f'ALTER TABLE api_keys DROP CONSTRAINT "{unique["name"]}"'))
        timestamp = "TIMESTAMP WITH TIME ZONE"
        for column, ddl, value in (("name", "VARCHAR(100)", "'full'"), ("scopes", "VARCHAR(100)",
                                                                        f"'{ALL_SCOPES_TEXT}'"),
                                   ("is_full", "BOOLEAN", "true")):
            conn.execute(sa.text(f"ALTER TABLE api_keys ADD COLUMN {column} {ddl} NOT NULL DEFAULT {value}"))
            conn.execute(sa.text(f"ALTER TABLE api_keys ALTER COLUMN {column} DROP DEFAULT"))
        conn.execute(sa.text("ALTER TABLE api_keys ADD COLUMN agents TEXT"))
        conn.execute(sa.text(f"ALTER TABLE api_keys ADD COLUMN expires_at {timestamp}"))
        conn.execute(sa.text(f"ALTER TABLE api_keys ADD COLUMN last_used_at {timestamp}"))
    conn.execute(sa.text("CREATE INDEX ix_api_keys_user_id ON api_keys (user_id)"))
    conn.execute(sa.text("CREATE UNIQUE INDEX ux_api_keys_one_full ON api_keys (user_id) WHERE is_full"))
    conn.execute(sa.text("ALTER TABLE audit_events ADD COLUMN key_id INTEGER"))
    conn.execute(sa.text("ALTER TABLE audit_events ADD COLUMN key_name VARCHAR(100)"))


def _v7_console_tickets(conn: sa.Connection) -> None:
    """Consoles (issue 17): one-time tickets, stored as keyed digests, and the consoles they opened
    (open ones are counted per user across every worker and instance)."""
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True))  # exists: create_all skips it
    sa.Table(
        "console_tickets", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("digest", sa.String(128), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("agent_id", sa.Integer, nullable=False),
        sa.Column("vm", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.Column("opened_at", UtcDateTime, nullable=True),
        sa.Column("closed_at", UtcDateTime, nullable=True),
        sa.Index("ix_console_tickets_user_id_opened_at", "user_id", "opened_at"),
    )
    md.create_all(conn)


def _v8_events_and_live_mirror(conn: sa.Connection) -> None:
    """Issue 18: each user's events (ids never reused), each agent's watcher lease, the mirror
    of its VMs that the watcher keeps, and until when each agent is in use (wants a watcher)."""
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table("agents", md, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table(
        "events", md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("agent_id", sa.Integer, nullable=True),
        sa.Column("vm", sa.String(255), nullable=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Index("ix_events_user_id_id", "user_id", "id"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "watches", md,
        sa.Column("agent_id", sa.Integer, sa.ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True,
                  autoincrement=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.Column("connected", sa.Boolean, nullable=False),
        sa.Column("alive_at", UtcDateTime, nullable=True),
    )
    sa.Table(
        "mirrored_vms", md,
        sa.Column("agent_id", sa.Integer, sa.ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True,
                  autoincrement=False),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("domain_id", sa.Integer, nullable=True),
        sa.Column("changed_at", UtcDateTime, nullable=False),
    )
    sa.Table(
        "watch_demand", md,
        sa.Column("agent_id", sa.Integer, sa.ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True,
                  autoincrement=False),
        sa.Column("until", UtcDateTime, nullable=False),
    )
    for name in ("events", "watches", "mirrored_vms", "watch_demand"):
        md.tables[name].create(conn)


# --- web console (issue 19)


def _v9_web_sessions(conn: sa.Connection) -> None:
    """Browser sessions of the web console, stored by the SHA-256 digest of their token only."""
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table(
        "web_sessions", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("last_seen_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.Column("key_prefix", sa.String(32), nullable=False),
        sa.Index("ix_web_sessions_user_id", "user_id"),
    )
    md.tables["web_sessions"].create(conn)


# --- webhooks (issue 18)


def _v10_webhooks(conn: sa.Connection) -> None:
    """Webhooks, the outbox of their deliveries (one row per event and webhook, written with the
    event) and every attempt of each delivery."""
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table(
        "webhooks", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("types", sa.Text, nullable=False),
        sa.Column("agents", sa.Text, nullable=True),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("sealed_secret", sa.Text, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Index("ix_webhooks_user_id", "user_id"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "webhook_deliveries", md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("webhook_id", sa.Integer, sa.ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("event_id", sa.BigInteger, nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_at", UtcDateTime, nullable=True),
        sa.Column("lease_holder", sa.String(128), nullable=True),
        sa.Column("lease_until", UtcDateTime, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("finished_at", UtcDateTime, nullable=True),
        sa.Index("ix_webhook_deliveries_status_next_at", "status", "next_at"),
        sa.Index("ix_webhook_deliveries_webhook_id_id", "webhook_id", "id"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "webhook_attempts", md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.BigInteger, sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("response", sa.Text, nullable=True),
        sa.Index("ix_webhook_attempts_delivery_id", "delivery_id"),
    )
    for name in ("webhooks", "webhook_deliveries", "webhook_attempts"):
        md.tables[name].create(conn)


STEPS: tuple[Step, ...] = (_v1_initial, _v2_agent_revision, _v3_agent_ids_never_reused,
                           _v4_keyed_api_key_digests, _v5_agent_key_generated, _v6_scoped_api_keys,
                           _v7_console_tickets, _v8_events_and_live_mirror, _v9_web_sessions,
                           _v10_webhooks)
LATEST = len(STEPS)


def current_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    version = conn.execute(sa.select(_version_table.c.version)).scalar()
    return int(version or 0)


def upgrade(conn: sa.Connection, target: int = LATEST, *,
            rekey_api_key_digest: Callable[[str], str] | None = None) -> tuple[int, int]:
    """Apply the missing steps up to ``target`` on a connection inside a write transaction.
    ``rekey_api_key_digest`` (the server's key hasher's ``rekey``) is needed only when migration 4
    finds digests to re-key (``SecretNeeded`` otherwise).

    Returns (version before, version after). Refuses a database newer than this code knows.
    """
    if rekey_api_key_digest is not None:
        conn.execution_options(**{REKEY_OPTION: rekey_api_key_digest})
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7252017)"))  # serialise migrators
    _version_table.create(conn, checkfirst=True)
    before = current_version(conn)
    if before > LATEST:
        raise RuntimeError(
            f"the database is at schema version {before}, newer than this portal knows ({LATEST}); "
            "upgrade the portal instead"
        )
    if conn.execute(sa.select(sa.func.count()).select_from(_version_table)).scalar() == 0:
        conn.execute(_version_table.insert().values(version=0))
    for number in range(before + 1, target + 1):
        STEPS[number - 1](conn)
        conn.execute(_version_table.update().values(version=number))
    return before, max(before, target)
