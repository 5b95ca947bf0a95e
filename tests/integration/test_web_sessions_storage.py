"""Browser sessions on the real storage, SQLite and PostgreSQL (migration 9): signed in, found by the
token's digest only, touched, ended by sign-out, by the lifetime and by a rotated key, and a user's
deletion takes their sessions (foreign key)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from adapters.hashing import HmacKeyHasher
from adapters.memory import FakeSshKeys, ManualClock, ReversibleSecretBox
from adapters.sql.storage import SqlStorage, sqlite_url
from core.commands import NewUser
from core.errors import SessionEnded
from core.model import Caller, Origin
from core.portal import Portal, assemble
from core.web_sessions import session_digest

ORIGIN = Origin(request_id="req-1", client_address="192.0.2.1")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStorage]:
    url = sqlite_url(tmp_path / "db.sqlite3") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = SqlStorage(url)
    store.upgrade()
    yield store
    store.dispose()


def make_portal(storage: SqlStorage, clock: ManualClock) -> Portal:
    return assemble(storage=storage, hasher=HmacKeyHasher(b"p" * 32), secrets=ReversibleSecretBox(),
                    ssh_keys=FakeSshKeys(), clock=clock, session_lifetime=timedelta(hours=1),
                    session_idle=timedelta(minutes=10))


def test_sessions_are_kept_by_digest_and_end_as_they_should(storage: SqlStorage) -> None:
    clock = ManualClock()
    portal = make_portal(storage, clock)
    created = portal.users.create_user(NewUser(name="alice"), ORIGIN)
    signed = portal.sessions.sign_in(created.api_key, ORIGIN)
    with storage.begin(write=False) as conn:
        rows = conn.execute(sa.text("SELECT digest FROM web_sessions")).scalars().all()
    assert rows == [session_digest(signed.token)]
    clock.current += timedelta(minutes=5)
    assert portal.sessions.resolve(signed.token)[0].id == created.user.id  # touched: idle restarts
    clock.current += timedelta(minutes=8)
    assert portal.sessions.resolve(signed.token)[0].id == created.user.id
    portal.sessions.sign_out(signed.token, ORIGIN)
    with pytest.raises(SessionEnded):
        portal.sessions.resolve(signed.token)
    again = portal.sessions.sign_in(created.api_key, ORIGIN)
    portal.users.rotate_api_key(Caller(user=created.user, request_id="req-2", client_address="192.0.2.1"))
    with pytest.raises(SessionEnded):
        portal.sessions.resolve(again.token)
