"""Shared fixtures: real SSH key material, settings on a temporary SQLite file, and an HTTP client
for the app built by the composition root."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from hypothesis import settings as hypothesis_settings

from entrypoints import bootstrap
from entrypoints.http.app import create_app
from entrypoints.settings import Settings
from tests.postgres import postgres, postgres_databases, postgres_url  # noqa: F401 - fixtures
from tests.support import Api, KeyMaterial, make_settings, portal_client

# Properties are about results, not speed: no per-example deadline (CI runs on two shared cores,
# where a slow example would otherwise fail as "deadline exceeded").
hypothesis_settings.register_profile("portal", deadline=None)
hypothesis_settings.load_profile("portal")


@pytest.fixture(scope="session")
def keys() -> KeyMaterial:
    ed = asyncssh.generate_private_key("ssh-ed25519")
    ecdsa = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    passphrase = "correct horse battery staple"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*bcrypt.kdf.*")  # few rounds keep the suite fast
        encrypted = ed.export_private_key("openssh", passphrase=passphrase, rounds=4).decode()
    return KeyMaterial(
        openssh=ed.export_private_key("openssh").decode(),
        openssh_encrypted=encrypted,
        pem_rsa=rsa.export_private_key("pkcs1-pem").decode(),
        pem_encrypted=ecdsa.export_private_key("pkcs8-pem", passphrase=passphrase).decode(),
        passphrase=passphrase,
        host_key=asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().strip(),
        other_host_key=asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().strip(),
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[bootstrap.Runtime]:
    runtime = bootstrap.build_runtime(settings)
    yield runtime
    runtime.close()


@pytest.fixture
def api(runtime: bootstrap.Runtime) -> Api:
    return Api(portal_client(create_app(runtime)))


@pytest.fixture
def open_api(tmp_path: Path) -> Iterator[Api]:
    """An app whose sign-up is open, for tests that need several users over HTTP."""
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_SIGNUP="open"))
    yield Api(portal_client(create_app(runtime)))
    runtime.close()
