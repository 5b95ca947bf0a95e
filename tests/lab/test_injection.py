"""Injection, proven on the real sshd: an agent whose key is bound (in authorized_keys) to a
recording forced command, so the host records exactly the command line it was asked to run and
runs nothing. For any VM name and any libvirt URI hypothesis generates, the portal either refuses
it (422) or the host receives exactly the intended argument vector."""

from __future__ import annotations

import pwd
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncssh
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.lab.conftest import Lab
from tests.support import Server

pytestmark = pytest.mark.lab

RECORDER = """#!/bin/sh
# Records the command line the client asked for, runs nothing.
printf '%s\\n' "$SSH_ORIGINAL_COMMAND" >> "{log}"
"""


@pytest.fixture(scope="module")
def recording_agent(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, Path]]:
    workdir = tmp_path_factory.mktemp("injection")
    home = Path(pwd.getpwnam(lab.user).pw_dir)
    log = home / "recorded-commands.log"
    recorder = home / "record-command.sh"
    recorder.write_text(RECORDER.format(log=log))
    recorder.chmod(0o755)
    log.write_text("")
    pw = pwd.getpwnam(lab.user)
    for path in (recorder, log):
        subprocess.run(["chown", f"{pw.pw_uid}:{pw.pw_gid}", str(path)], check=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    line = (f'command="{recorder}",restrict ' + key.export_public_key("openssh").decode().strip()
            + " playr-injection-test\n")
    authorized = home / ".ssh" / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + line)
    server = Server(workdir, MANAGEMENT_WORKERS="1", MANAGEMENT_SIGNUP="open").start()
    try:
        api_key = server.request("POST", "/users", body={"name": "injector"})[1]["api_key"]
        private_key = key.export_private_key("openssh").decode()
        status, agent, _ = server.request("POST", "/agents", api_key, {
            "name": "recorder", "hostname": lab.host, "port": lab.port, "username": lab.user,
            "private_key": private_key, "host_key": lab.host_key})
        assert status == 201, agent
        server.agent_id = agent["id"]  # type: ignore[attr-defined]
        server.private_key = private_key  # type: ignore[attr-defined]
        yield server, api_key, log
    finally:
        server.stop()
        authorized.write_text(original)
        recorder.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def recorded(log: Path) -> list[str]:
    return [line for line in log.read_text().split("\n") if line]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.text(min_size=1, max_size=40))
@example(name="a;id")
@example(name="$(reboot)")
@example(name="`id`")
@example(name="--help")
@example(name="web 1")
@example(name="x' ; touch /tmp/pwned ; '")
@example(name="déjà-vu_2.0")
def test_any_vm_name_is_refused_or_reaches_the_host_exactly(recording_agent: Any, name: str) -> None:
    server, api_key, log = recording_agent
    _use_the_default_libvirt_uri(server, api_key)  # the URI test above leaves any URI behind
    before = len(recorded(log))
    status, body, _ = server.request("POST", f"/agents/{server.agent_id}/vms/{quote(name, safe='')}/start",
                                     api_key)
    commands = recorded(log)[before:]
    if status == 200:
        assert len(commands) == 1
        assert shlex.split(commands[0]) == ["virsh", "--connect", "qemu:///system", "start", "--domain", name]
        assert body["command"] == ["virsh", "--connect", "qemu:///system", "start", "--domain", name]
    else:
        assert status in (404, 422), body  # 404 only where a '/' or '..' changes the route itself
        assert commands == []


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(uri=st.text(min_size=1, max_size=60))
@example(uri="qemu:///system; id")
@example(uri="qemu+ssh://h/system?x=$(id)")
@example(uri="--help")
def test_any_libvirt_uri_is_refused_or_reaches_the_host_exactly(recording_agent: Any, uri: str) -> None:
    server, api_key, log = recording_agent
    status, _, _ = server.request("PATCH", f"/agents/{server.agent_id}", api_key, {"libvirt_uri": uri})
    before = len(recorded(log))
    listed, _, _ = server.request("GET", f"/agents/{server.agent_id}/vms", api_key)
    commands = recorded(log)[before:]
    if status == 200:
        assert listed == 200
        assert [shlex.split(c) for c in commands] == [["virsh", "--connect", uri, "list", "--all"]]
    else:
        assert status == 422
        assert listed == 200 and len(commands) == 1  # the previous, valid URI is still the one used
        assert shlex.split(commands[0])[2] != uri


def _use_the_default_libvirt_uri(server: Any, api_key: str) -> None:
    status, agent, _ = server.request("GET", f"/agents/{server.agent_id}", api_key)
    if agent["libvirt_uri"] != "qemu:///system":
        status, agent, _ = server.request("PATCH", f"/agents/{server.agent_id}", api_key, {"libvirt_uri": None})
        assert status == 200 and agent["libvirt_uri"] == "qemu:///system", agent


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.text(min_size=1, max_size=40), description=st.text(max_size=60))
@example(name="before upgrade", description="--help; $(id) `id` 'x' \"y\" | tee /tmp/pwned &")
@example(name="s1", description="--name other")
@example(name="--help", description="")
def test_any_snapshot_name_and_description_are_refused_or_reach_the_host_exactly(recording_agent: Any, name: str,
                                                                                 description: str) -> None:
    server, api_key, log = recording_agent
    _use_the_default_libvirt_uri(server, api_key)  # the URI test above leaves any URI behind
    before = len(recorded(log))
    status, body, _ = server.request("POST", f"/agents/{server.agent_id}/vms/lab-disk/snapshots", api_key,
                                     {"name": name, "description": description})
    commands = [shlex.split(c) for c in recorded(log)[before:]]
    if status == 422:
        assert commands == []
        return
    # The recorder runs nothing, so the list the portal reads afterwards lacks the new snapshot.
    assert (status, body["code"]) == (404, "snapshot_not_found"), body
    assert commands[0] == ["virsh", "--connect", "qemu:///system", "snapshot-create-as", "--domain", "lab-disk",
                           "--name", name, *(["--description", description] if description else [])]
    assert sorted(c[3] for c in commands[1:]) == ["snapshot-current", "snapshot-list"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.text(min_size=1, max_size=40))
@example(name="--help")
@example(name="$(id)")
@example(name="s 1")
def test_any_snapshot_name_in_a_path_is_refused_or_reaches_the_host_exactly(recording_agent: Any, name: str) -> None:
    server, api_key, log = recording_agent
    _use_the_default_libvirt_uri(server, api_key)  # the URI test above leaves any URI behind
    before = len(recorded(log))
    status, body, _ = server.request(
        "POST", f"/agents/{server.agent_id}/vms/lab-disk/snapshots/{quote(name, safe='')}/revert", api_key)
    commands = recorded(log)[before:]
    if status == 200:
        assert [shlex.split(c) for c in commands] == [["virsh", "--connect", "qemu:///system", "snapshot-revert",
                                                       "--domain", "lab-disk", "--snapshotname", name]]
    else:
        assert status in (404, 422), body  # 404 only where a '/' or '..' changes the route itself
        assert commands == []
