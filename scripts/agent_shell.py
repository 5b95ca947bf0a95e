#!/usr/bin/python3 -IS
"""playr-agent-shell: the only program the portal's SSH key may run on an enrolled hypervisor.

``scripts/agent-install.sh`` installs this file as /usr/local/libexec/playr-agent-shell and forces
it on the portal's key in ``authorized_keys`` (``restrict,command="…"``), so whoever holds that key
(the portal, or a thief of its database *and* secret key) can run exactly the virsh commands the
portal sends and nothing else: no shell, no file transfer, no forwarding.

sshd passes the client's command in ``SSH_ORIGINAL_COMMAND``. It is split like a POSIX shell
would (the portal shell-quotes each argument) but never given to one: the words must be
``virsh --connect URI SUBCOMMAND OPTION…`` with an allowed URI, an allowed subcommand, and only
that subcommand's options, each value checked (VM and snapshot names by the portal's own rules).
virsh then replaces this process (no shell, same exit status). Every command, run or refused, is
logged to syslog (auth facility) and to a log file. Refusals exit 126 with the reason on stderr.
virsh runs with a fixed environment (C locale, so its output is the English the portal parses).

Standard library only: it runs on the hypervisor, where the portal is not installed.
"""

from __future__ import annotations

import datetime
import os
import pwd
import re
import shlex
import sys
import syslog
import unicodedata

CONFIG_FILE = "/etc/playr-agent/shell.conf"
DEFAULTS = {
    "libvirt_uris": "qemu:///system",
    "log_file": "/var/log/playr-agent/commands.log",
    "virsh": "/usr/bin/virsh",
}
REFUSED = 126  # "command found but not executable": what a shell answers for a forbidden command
VIRSH_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}

VM_NAME_MAX = 200
# Kept equal to core/virsh.py's rule (tests/unit/test_agent_shell.py proves it for any text).
_VM_NAME = re.compile(r"^\w[\w .+:@,=%-]*$")
DESCRIPTION_MAX = 1000

FLAG, VM, SNAPSHOT, TEXT = "flag", "vm", "snapshot", "text"
_DOMAIN = {"--domain": VM}
# subcommand -> the options it may take and the kind of value each carries. This is every
# command the portal sends (core/virsh.py); tests/unit/test_agent_shell.py checks both agree.
COMMANDS: dict[str, dict[str, str]] = {
    "list": {"--all": FLAG},
    "dominfo": _DOMAIN,
    "start": _DOMAIN,
    "shutdown": _DOMAIN,
    "destroy": _DOMAIN,
    "reboot": _DOMAIN,
    "suspend": _DOMAIN,
    "resume": _DOMAIN,
    "autostart": {**_DOMAIN, "--disable": FLAG},
    "domstats": {**_DOMAIN, "--state": FLAG, "--cpu-total": FLAG, "--balloon": FLAG, "--vcpu": FLAG,
                 "--interface": FLAG, "--block": FLAG},
    "snapshot-list": {**_DOMAIN, "--parent": FLAG},
    "snapshot-current": {**_DOMAIN, "--name": FLAG},
    "snapshot-create-as": {**_DOMAIN, "--name": SNAPSHOT, "--description": TEXT},
    "snapshot-revert": {**_DOMAIN, "--snapshotname": SNAPSHOT},
    "snapshot-delete": {**_DOMAIN, "--snapshotname": SNAPSHOT},
    "nodeinfo": {},
    "version": {"--daemon": FLAG},
    "hostname": {},
    "uri": {},
    # issue 18: the agent's watcher (one long-lived stream of every VM's events)
    "event": {"--all": FLAG, "--loop": FLAG, "--timestamp": FLAG},
}
# subcommand -> the options the portal always sends with it (core/virsh.py builds no command
# without them; tests/unit/test_agent_shell.py derives this from core/virsh.py and compares): a
# command missing one is not the portal's, so it is refused. A bare ``domstats`` would report on
# every VM of the host, a bare ``snapshot-current`` would print the snapshot's whole XML.
REQUIRED: dict[str, tuple[str, ...]] = {
    "list": ("--all",),
    "dominfo": ("--domain",),
    "start": ("--domain",),
    "shutdown": ("--domain",),
    "destroy": ("--domain",),
    "reboot": ("--domain",),
    "suspend": ("--domain",),
    "resume": ("--domain",),
    "autostart": ("--domain",),
    "domstats": ("--domain", "--state"),
    "snapshot-list": ("--domain", "--parent"),
    "snapshot-current": ("--domain", "--name"),
    "snapshot-create-as": ("--domain", "--name"),
    "snapshot-revert": ("--domain", "--snapshotname"),
    "snapshot-delete": ("--domain", "--snapshotname"),
    "nodeinfo": (),
    "version": ("--daemon",),
    "hostname": (),
    "uri": (),
    "event": ("--all", "--loop", "--timestamp"),
}
LOG_TEXT_MAX = 1024  # characters of a command or reason written to the logs (the rest is counted)


class Refused(Exception):
    """The command is not one the portal may run here; the message says why."""


def check_vm_name(name: str) -> str | None:
    """Why ``name`` is refused as a VM name, or None (the portal's rule): virsh tries a --domain
    value as an id, then a UUID, then a name, so digits-only and UUID-like names are refused."""
    problem = check_snapshot_name(name)
    digits = name.replace("-", "").replace(" ", "")  # virUUIDParse skips both
    if problem is None and name.isascii() and name.isdigit():
        return "must not be only digits (virsh would take it for a domain id)"
    if problem is None and len(digits) == 32 and all(char in "0123456789abcdefABCDEF" for char in digits):
        return "must not look like a UUID (virsh would take it for a domain UUID)"
    return problem


def check_snapshot_name(name: str) -> str | None:
    """Why ``name`` is refused as a snapshot name, or None (the portal's rule)."""
    if not 1 <= len(name) <= VM_NAME_MAX:
        return f"must be 1 to {VM_NAME_MAX} characters"
    if name.startswith("-"):
        return "must not start with '-'"
    if name != name.strip():
        return "must not start or end with whitespace"
    if not _VM_NAME.fullmatch(name):
        return "must start with a letter or digit and contain only letters, digits, spaces and . _ - + : @ , = %"
    return None


def check_text(text: str) -> str | None:
    if len(text) > DESCRIPTION_MAX:
        return f"must be at most {DESCRIPTION_MAX} characters"
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in text):
        return "must not contain control characters or line breaks"
    return None


def parse(command: str | None, allowed_uris: frozenset[str]) -> list[str]:
    """The argv to run for ``command`` (sshd's SSH_ORIGINAL_COMMAND), or ``Refused``."""
    if command is None:
        raise Refused("this key may only run the portal's virsh commands (no login shell, no file transfer)")
    try:
        words = shlex.split(command)
    except ValueError as error:
        raise Refused(f"cannot split the command ({error})") from None
    if len(words) < 4 or words[0] != "virsh" or words[1] != "--connect":
        raise Refused("only 'virsh --connect URI SUBCOMMAND ...' may run with this key")
    uri, subcommand, options = words[2], words[3], words[4:]
    if uri not in allowed_uris:
        raise Refused(f"libvirt URI {uri!r} is not allowed here (allowed: {', '.join(sorted(allowed_uris))})")
    spec = COMMANDS.get(subcommand)
    if spec is None:
        raise Refused(f"virsh {subcommand!r} is not a command the portal uses")
    seen: set[str] = set()
    position = 0
    while position < len(options):
        option = options[position]
        kind = spec.get(option)
        if kind is None:
            raise Refused(f"virsh {subcommand} does not take {option!r} from the portal")
        if option in seen:
            raise Refused(f"{option} given twice")
        seen.add(option)
        position += 1
        if kind == FLAG:
            continue
        if position == len(options):
            raise Refused(f"{option} needs a value")
        value = options[position]
        problem = {TEXT: check_text, VM: check_vm_name, SNAPSHOT: check_snapshot_name}[kind](value)
        if problem is not None:
            raise Refused(f"{option} value {value!r} {problem}")
        position += 1
    missing = [option for option in REQUIRED[subcommand] if option not in seen]
    if missing:
        raise Refused(f"virsh {subcommand} from the portal always has {', '.join(missing)}")
    return words


def clip(text: str, limit: int = LOG_TEXT_MAX) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: a refused command can be as
    long as sshd allows (hundreds of KiB), and each one would otherwise be logged whole."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def read_config(path: str = CONFIG_FILE) -> dict[str, str]:
    config = dict(DEFAULTS)
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                name, sep, value = line.strip().partition("=")
                if sep and not name.startswith("#"):
                    config[name.strip()] = value.strip()
    except FileNotFoundError:
        pass
    return config


def log(config: dict[str, str], verdict: str, command: str | None, reason: str = "") -> None:
    client = (os.environ.get("SSH_CONNECTION") or "local").split(" ", 1)[0]
    shown = None if command is None else clip(command)
    line = f"{verdict} from={client} command={shown!r}" + (f" reason={clip(reason)!r}" if reason else "")
    syslog.openlog("playr-agent-shell", syslog.LOG_PID, syslog.LOG_AUTH)
    syslog.syslog(syslog.LOG_NOTICE if verdict == "run" else syslog.LOG_WARNING, line)
    try:
        # datetime.UTC is 3.11+; hypervisors may run an older python3
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")  # noqa: UP017
        with open(config["log_file"], "a", encoding="utf-8") as file:
            file.write(f"{stamp} pid={os.getpid()} {line}\n")
    except OSError as error:
        print(f"playr-agent-shell: cannot write {config['log_file']}: {error}", file=sys.stderr)


def main(args: list[str]) -> int:
    # The forced command in authorized_keys fixes the arguments: only "--config PATH" (tests) is read.
    config = read_config(args[1] if len(args) == 2 and args[0] == "--config" else CONFIG_FILE)
    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    allowed = frozenset(uri.strip() for uri in config["libvirt_uris"].split(",") if uri.strip())
    try:
        argv = parse(command, allowed)
    except Refused as refusal:
        log(config, "refused", command, str(refusal))
        print(f"playr-agent-shell: refused: {clip(str(refusal))}", file=sys.stderr)
        return REFUSED
    log(config, "run", command)
    try:
        # A fixed environment: nothing of the session's (PAM may set LANG from /etc/default/locale,
        # and translated virsh output would not parse in the portal).
        environment = {**VIRSH_ENVIRONMENT, "HOME": pwd.getpwuid(os.getuid()).pw_dir}
        os.execve(config["virsh"], [config["virsh"], *argv[1:]], environment)  # noqa: S606 - no shell
    except OSError as error:
        print(f"playr-agent-shell: cannot run {config['virsh']}: {error}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
