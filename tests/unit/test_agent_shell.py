"""The restricted shell installed on enrolled hypervisors (scripts/agent_shell.py).

It must accept every command the portal sends, exactly as sent, and nothing else: the portal's
name rules and its own are proved equal for any text, and every argv builder of core/virsh.py is
run through the shell's parser."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core import virsh
from core.errors import ValidationFailed
from tests.support import REPO

SHELL_FILE = REPO / "scripts" / "agent_shell.py"
URI = "qemu:///system"
ALLOWED = frozenset({URI})
POOL = "images"  # the pool the portal may write to in these tests (shell.conf's pools)
POOLS = frozenset({POOL})


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_shell", SHELL_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shell = _load()
names = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["guest1", "web 01", "-x", " a", "a;id", "$(reboot)", "a`id`", "é", "a\n", "x" * 201, "db:primary@2",
     "7", "\u0667", "0123", "4dea22b3-1d52-d8f3-2516-782e98ab3fa0", "4dea22b31d52d8f32516782e98ab3fa0",
     "4dea-22b3", "4DEA22B3-1D52-D8F3-2516-782E98AB3FA0", "01234567 89ab cdef 0123 456789abcdef",
     "4dea22b3 1d52-d8f3 2516 782e98ab3fa0",
     "4d ea 22 b3 1d 52 d8 f3 25 16 78 2e 98 ab 3f a0"]) | st.uuids().map(str) | st.integers(0).map(str)


def portal_commands(vm: str, snapshot: str, description: str) -> list[tuple[str, ...]]:
    """Every argv core/virsh.py builds (the portal sends nothing else)."""
    return [
        virsh.list_command(URI), virsh.dominfo_command(URI, vm),
        *(virsh.action_command(URI, vm, action) for action in virsh.VmAction),
        virsh.state_command(URI, vm), virsh.stats_command(URI, vm),
        virsh.autostart_command(URI, vm, True), virsh.autostart_command(URI, vm, False),
        virsh.snapshot_list_command(URI, vm), virsh.snapshot_current_command(URI, vm),
        virsh.snapshot_create_command(URI, vm, snapshot), virsh.snapshot_create_command(URI, vm, snapshot, description),
        virsh.snapshot_revert_command(URI, vm, snapshot), virsh.snapshot_delete_command(URI, vm, snapshot),
        virsh.nodeinfo_command(URI), virsh.version_command(URI), virsh.hostname_command(URI),
        virsh.check_command(URI),
        virsh.host_stats_command(URI),  # issue 21: every VM of the host, for GET /metrics/vms
        # provisioning (issue 16): volumes and networks named like snapshots
        virsh.pool_names_command(URI), virsh.pool_info_command(URI, POOL), virsh.volume_names_command(URI, POOL),
        virsh.volume_xml_command(URI, POOL, snapshot), virsh.network_names_command(URI),
        virsh.network_info_command(URI, snapshot),
        virsh.volume_create_command(URI, POOL, snapshot, 1 << 30, "qcow2"),
        virsh.volume_create_command(URI, POOL, snapshot, 1 << 30, "qcow2", (snapshot, "raw")),
        virsh.volume_upload_command(URI, POOL, snapshot), virsh.volume_clone_command(URI, POOL, snapshot, snapshot),
        virsh.volume_delete_command(URI, POOL, snapshot), virsh.define_command(URI),
        virsh.domain_xml_command(URI, vm), virsh.domain_xml_command(URI, vm, inactive=False),
        virsh.undefine_command(URI, vm, True), virsh.undefine_command(URI, vm, False),
        *(virsh.interfaces_command(URI, vm, source) for source in virsh.INTERFACE_SOURCES),
        # consoles (issue 17)
        virsh.serial_console_command(URI, vm), virsh.ttyconsole_command(URI, vm),
        virsh.vnc_display_command(URI, vm), virsh.vnc_relay_command(URI, vm),
        virsh.check_command(URI), virsh.event_command(URI),
    ]


@given(names)
def test_the_shell_and_the_portal_accept_exactly_the_same_names(name: str) -> None:
    assert (shell.check_vm_name(name) is None) == (virsh.check_vm_name(name) is None)
    assert (shell.check_snapshot_name(name) is None) == (virsh.check_snapshot_name(name) is None)


@given(names)
def test_the_shell_and_the_portal_accept_exactly_the_same_descriptions(text: str) -> None:
    assert (shell.check_text(text) is None) == (virsh.check_description(text) is None)


@given(vm=names, snapshot=names, description=names)
def test_every_command_the_portal_sends_runs_exactly_as_sent(vm: str, snapshot: str, description: str) -> None:
    try:
        commands = portal_commands(vm, snapshot, description)
    except ValidationFailed:
        return  # the portal refuses to send it
    for argv in commands:
        assert shell.parse(virsh.command_line(argv), ALLOWED, POOLS) == list(argv)


def test_the_shell_knows_no_subcommand_the_portal_does_not_use() -> None:
    used = {argv[3] for argv in portal_commands("guest1", "snap1", "before upgrade")}
    assert used == set(shell.COMMANDS)


@pytest.mark.parametrize("command", [
    None,                                                   # an interactive login
    "",
    "id",
    "sh -c id",
    "internal-sftp",
    "/usr/lib/openssh/sftp-server",
    "scp -t /tmp",
    "virsh undefine guest1",
    "virsh --connect qemu:///system undefine --domain guest1",
    "virsh start guest1; id",
    "virsh --connect qemu:///system start guest1; id",
    "virsh --connect qemu:///system start --domain 'guest1; id'",
    "virsh --connect qemu:///system start --domain guest1 --domain guest2",
    "virsh --connect qemu:///system start --domain",
    "virsh --connect qemu:///system start --domain -guest",
    "virsh --connect qemu:///system destroy --domain 1",
    "virsh --connect qemu:///system destroy --domain 4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
    "virsh --connect qemu:///system start --domain guest1 --force-boot",
    "virsh --connect qemu:///system list --all --name",
    "virsh --connect qemu+ssh://other/system list --all",
    "virsh --connect 'qemu:///system' 'list --all'",
    "virsh --connect qemu:///system snapshot-create-as --domain g --name s --description 'a\nb'",
    "virsh --connect qemu:///system snapshot-create-as --domain g --name s --xmlfile /etc/shadow",
    "virsh --connect qemu:///system 'list' \"--all\" '",
    "virsh -c qemu:///system list --all",
    "/usr/bin/virsh --connect qemu:///system list --all",
    # consoles (issue 17): exact arguments only
    "virsh --connect qemu:///system console --domain guest1",
    "virsh --connect qemu:///system console --domain guest1 --force --devname serial1",
    "virsh --connect qemu:///system console --domain 'guest1; id' --force",
    "virsh --connect qemu:///system domdisplay --domain guest1 --type spice",
    "virsh --connect qemu:///system domdisplay --domain guest1",
    "virsh --connect qemu:///system domdisplay --domain guest1 --type vnc --include-password",
    "virsh --connect qemu:///system console-vnc",
    "virsh --connect qemu:///system console-vnc --domain guest1 --port 22",
    "virsh --connect qemu:///system ttyconsole --domain -x",
])
def test_anything_else_is_refused(command: str | None) -> None:
    with pytest.raises(shell.Refused):
        shell.parse(command, ALLOWED)


def _run(tmp_path: Path, command: str | None) -> subprocess.CompletedProcess[str]:
    log = tmp_path / "commands.log"
    config = tmp_path / "shell.conf"
    config.write_text(f"# test\nlibvirt_uris = {URI}\nlog_file = {log}\nvirsh = /bin/echo\n")
    env = {"PATH": "/usr/bin:/bin", "SSH_CONNECTION": "192.0.2.9 50000 192.0.2.1 22"}
    if command is not None:
        env["SSH_ORIGINAL_COMMAND"] = command
    return subprocess.run([sys.executable, str(SHELL_FILE), "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=30)


def test_an_allowed_command_replaces_the_shell_with_virsh_and_is_logged(tmp_path: Path) -> None:
    result = _run(tmp_path, "virsh --connect qemu:///system start --domain 'web 01'")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "--connect qemu:///system start --domain web 01\n"  # /bin/echo stands in for virsh
    (line,) = (tmp_path / "commands.log").read_text().splitlines()
    assert " run from=192.0.2.9 command=" in line and "web 01" in line


def test_virsh_runs_with_a_fixed_environment_in_the_c_locale(tmp_path: Path) -> None:
    log = tmp_path / "commands.log"
    config = tmp_path / "shell.conf"
    fake_virsh = tmp_path / "virsh"
    fake_virsh.write_text("#!/bin/sh\nexec /usr/bin/env\n")  # prints the environment it got
    fake_virsh.chmod(0o755)
    config.write_text(f"libvirt_uris = {URI}\nlog_file = {log}\nvirsh = {fake_virsh}\n")
    env = {"PATH": "/tmp/evil:/usr/bin:/bin", "LANG": "de_DE.UTF-8", "LC_MESSAGES": "fr_FR.UTF-8",
           "SSH_CONNECTION": "192.0.2.9 50000 192.0.2.1 22",
           "SSH_ORIGINAL_COMMAND": "virsh --connect qemu:///system uri"}
    result = subprocess.run([sys.executable, str(SHELL_FILE), "--config", str(config)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    printed = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert printed.pop("PWD", None) in (None, str(Path.cwd()))  # /bin/sh adds it
    assert printed == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C", "HOME": str(Path.home())}


def test_a_refused_command_exits_126_with_the_reason_and_is_logged(tmp_path: Path) -> None:
    result = _run(tmp_path, "virsh --connect qemu:///system start --domain guest1; id")
    assert result.returncode == 126
    assert result.stdout == ""
    assert result.stderr.startswith("playr-agent-shell: refused: ")
    (line,) = (tmp_path / "commands.log").read_text().splitlines()
    assert " refused from=192.0.2.9 " in line and "reason=" in line
    login = _run(tmp_path, None)
    assert login.returncode == 126 and "no login shell" in login.stderr


@pytest.mark.parametrize("name", ["01234567 89ab cdef 0123 456789abcdef", "4dea22b3 1d52-d8f3 2516 782e98ab3fa0",
                                  "4d ea 22 b3 1d 52 d8 f3 25 16 78 2e 98 ab 3f a0"])
def test_item10_the_shell_refuses_names_virsh_reads_as_a_uuid_once_spaces_are_skipped(name: str) -> None:
    assert shell.check_vm_name(name) is not None
    with pytest.raises(shell.Refused):
        shell.parse(f"virsh --connect {URI} destroy --domain '{name}'", ALLOWED)


# ---------------------------------------------------------------------------------------- issue 14, item 11


def _always_sent() -> dict[str, set[str]]:
    """subcommand -> the options every argv core/virsh.py builds for it carries."""
    always: dict[str, set[str]] = {}
    for argv in portal_commands("guest1", "snap1", "before upgrade"):
        options = {word for word in argv[4:] if word in shell.COMMANDS[argv[3]]}
        always[argv[3]] = always[argv[3]] & options if argv[3] in always else options
    return always


def test_item11_the_shell_requires_exactly_the_options_the_portal_always_sends() -> None:
    assert {sub: set(options) for sub, options in shell.REQUIRED.items()} == _always_sent()


@pytest.mark.parametrize("command", [
    "virsh --connect qemu:///system domstats",
    "virsh --connect qemu:///system domstats --state",
    "virsh --connect qemu:///system domstats --domain guest1",
    "virsh --connect qemu:///system snapshot-current --domain guest1",
    "virsh --connect qemu:///system snapshot-create-as --domain guest1",
    "virsh --connect qemu:///system snapshot-create-as --domain guest1 --description x",
    "virsh --connect qemu:///system snapshot-list --domain guest1",
    "virsh --connect qemu:///system snapshot-delete --domain guest1",
    "virsh --connect qemu:///system start",
    "virsh --connect qemu:///system list",
    "virsh --connect qemu:///system version",
])
def test_item11_a_command_without_an_option_the_portal_always_sends_is_refused(command: str) -> None:
    with pytest.raises(shell.Refused, match="always has"):
        shell.parse(command, ALLOWED)


@given(vm=names, snapshot=names, data=st.data())
def test_item11_dropping_any_required_option_from_a_portal_command_is_refused(
        vm: str, snapshot: str, data: st.DataObject) -> None:
    try:
        commands = portal_commands(vm, snapshot, "d")
    except ValidationFailed:
        return
    argv = list(data.draw(st.sampled_from(commands)))
    required = shell.REQUIRED[argv[3]]
    if not required:
        return
    option = data.draw(st.sampled_from(required))
    at = argv.index(option, 4)
    del argv[at:at + (1 if shell.COMMANDS[argv[3]][option] == shell.FLAG else 2)]
    with pytest.raises(shell.Refused):
        shell.parse(virsh.command_line(argv), ALLOWED)


def test_item11_a_huge_refused_command_is_logged_cut_to_a_bounded_length(tmp_path: Path) -> None:
    huge = "virsh --connect qemu:///system start --domain " + "a" * 100_000 + " --bogus " + "b" * 20_000
    result = _run(tmp_path, huge)
    assert result.returncode == 126
    assert len(result.stderr) < 2 * shell.LOG_TEXT_MAX
    (line,) = (tmp_path / "commands.log").read_text().splitlines()
    assert len(line) < 3 * shell.LOG_TEXT_MAX
    assert f"({len(huge)} characters)" in line


# ---------------------------------------------------------------------------------------- issue 21


def test_a_whole_host_domstats_must_carry_exactly_the_groups_the_portal_sends() -> None:
    argv = virsh.host_stats_command(URI)
    assert "--domain" not in argv
    assert set(shell.WHOLE_HOST["domstats"]) == set(argv[4:])
    assert shell.parse(virsh.command_line(argv), ALLOWED) == list(argv)
    for dropped in argv[4:]:
        with pytest.raises(shell.Refused):
            shell.parse(virsh.command_line([word for word in argv if word != dropped]), ALLOWED)


# ---------------------------------------------------------------------------------------- consoles (issue 17)


@given(vm=names, snapshot=names, description=names)
def test_only_the_serial_console_may_run_on_a_terminal(vm: str, snapshot: str, description: str) -> None:
    try:
        commands = portal_commands(vm, snapshot, description)
    except ValidationFailed:
        return
    for argv in commands:
        words = shell.parse(virsh.command_line(argv), ALLOWED, POOLS)
        shell.check_terminal(words, False)
        if argv[3] == "console":
            shell.check_terminal(words, True)
        else:
            with pytest.raises(shell.Refused):
                shell.check_terminal(words, True)


@given(st.text(max_size=60) | st.builds(lambda host, display: f"vnc://{host}:{display}",
                                         st.sampled_from(["127.0.0.1", "localhost", "[::1]", "::1", "10.0.0.1", ""]),
                                         st.text("0123456789٣", max_size=7)))
def test_the_shell_and_the_portal_read_vnc_displays_alike(text: str) -> None:
    assert shell.parse_vnc_display(text) == virsh.parse_vnc_display(text)


def test_a_command_given_a_terminal_is_refused_unless_it_is_the_serial_console(tmp_path: Path) -> None:
    log = tmp_path / "commands.log"
    config = tmp_path / "shell.conf"
    config.write_text(f"libvirt_uris = {URI}\nlog_file = {log}\nvirsh = /bin/echo\n")
    env = {"PATH": "/usr/bin:/bin", "SSH_CONNECTION": "192.0.2.9 50000 192.0.2.1 22", "SSH_TTY": "/dev/pts/9"}
    listing = subprocess.run([sys.executable, str(SHELL_FILE), "--config", str(config)], capture_output=True,
                             env={**env, "SSH_ORIGINAL_COMMAND": f"virsh --connect {URI} list --all"}, text=True,
                             timeout=30)
    assert listing.returncode == 126 and "terminal" in listing.stderr
    console = subprocess.run([sys.executable, str(SHELL_FILE), "--config", str(config)], capture_output=True,
                             env={**env, "SSH_ORIGINAL_COMMAND": f"virsh --connect {URI} console --domain g1 --force"},
                             text=True, timeout=30)
    assert console.returncode == 0 and console.stdout.split() == ["--connect", URI, "console", "--domain", "g1",
                                                                  "--force"]
