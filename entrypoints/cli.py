"""The command line, for the operator on the portal host: ``manage-playrservers``.

    manage-playrservers serve                          run the server (same as python main.py)
    manage-playrservers users create --name N [--email E]
    manage-playrservers users list [--json]
    manage-playrservers users rotate-key (--id N | --email E)
    manage-playrservers db upgrade | db version | db backup PATH
    manage-playrservers secret-key                     print a new value for MANAGEMENT_SECRET_KEY
    manage-playrservers agents list [--json]           (as the user whose key is in MANAGEMENT_API_KEY)
    manage-playrservers vms list AGENT [--json]
    manage-playrservers vms info AGENT VM [--json]
    manage-playrservers vms start|shutdown|force-stop|reboot|suspend|resume AGENT VM [--wait S] [--json]
    manage-playrservers vms autostart AGENT VM on|off [--json]
    manage-playrservers vms stats AGENT VM [--json]
    manage-playrservers vms snapshots list AGENT VM [--json]
    manage-playrservers vms snapshots create AGENT VM NAME [--description TEXT] [--json]
    manage-playrservers vms snapshots revert|delete AGENT VM NAME [--json]
    manage-playrservers vms fleet [--agent ID]... [--state STATE]... [--json]
    manage-playrservers agents host|check AGENT [--json]   (check exits 1 when the host fails)

It reads the same ``MANAGEMENT_*`` variables as the server. Commands that act as a user take that
user's API key from ``MANAGEMENT_API_KEY`` (never from the command line, where other local users
could read it). Errors print ``error: <code>: <detail>`` and exit 1; configuration errors name the
variable and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.errors import PortalError
from entrypoints.settings import ConfigError, Settings
from entrypoints.shapes import UserView, UserWithKeyView, dump

if TYPE_CHECKING:
    from core.ports import CommandResult
    from entrypoints.library import Session


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manage-playrservers",
                                     description="PlayrServers QEMU Management Portal")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP server (gunicorn with ASGI workers)")

    users = commands.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    create = users.add_parser("create", help="create a user and print its API key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--email")
    listing = users.add_parser("list", help="list users")
    listing.add_argument("--json", action="store_true", help="print JSON")
    rotate = users.add_parser("rotate-key", help="issue a new API key for a user (the old one dies)")
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int)
    which.add_argument("--email")

    db = commands.add_parser("db", help="database maintenance").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="migrate the database schema to the latest version (and create the secret "
                                  "key file if there is none)")
    db.add_parser("version", help="print the schema version")
    backup = db.add_parser("backup", help="copy a consistent snapshot (SQLite online backup), safe while serving")
    backup.add_argument("path")

    commands.add_parser("secret-key", help="print a new random value for MANAGEMENT_SECRET_KEY")

    agents = commands.add_parser("agents", help="your agents (needs MANAGEMENT_API_KEY)")
    agents_actions = agents.add_subparsers(dest="action", required=True)
    agents_list = agents_actions.add_parser("list", help="list your agents")
    agents_list.add_argument("--json", action="store_true", help="print JSON")
    for name, text in [("public-key", "print the agent's authorized_keys line (restricted to the agent shell)"),
                       ("rotate-key", "replace the agent's key with a new generated pair; prints the new "
                                      "authorized_keys line (re-run scripts/agent-install.sh on the host)")]:
        one = agents_actions.add_parser(name, help=text)
        one.add_argument("agent", type=int, help="agent id")
        one.add_argument("--json", action="store_true", help="print JSON")
    for name, text in [("host", "the host's name, processors, memory and libvirt/QEMU versions"),
                       ("check", "can the portal reach the host, log in and reach libvirt?")]:
        one = agents_actions.add_parser(name, help=text)
        one.add_argument("agent", type=int, help="agent id")
        one.add_argument("--json", action="store_true", help="print JSON")

    vms = commands.add_parser("vms", help="drive VMs on an agent (needs MANAGEMENT_API_KEY)")
    vm_actions = vms.add_subparsers(dest="action", required=True)
    vms_list = vm_actions.add_parser("list", help="list the agent's VMs")
    vms_list.add_argument("agent", type=int, help="agent id")
    vms_list.add_argument("--json", action="store_true", help="print JSON")
    for name, text in [("info", "virsh dominfo"), ("start", "start the VM"),
                       ("shutdown", "graceful shutdown (ACPI)"), ("force-stop", "virsh destroy"),
                       ("reboot", "reboot the VM"), ("suspend", "pause the VM (virsh suspend)"),
                       ("resume", "resume a paused VM"), ("stats", "virsh domstats")]:
        one = vm_actions.add_parser(name, help=text)
        one.add_argument("agent", type=int, help="agent id")
        one.add_argument("vm", help="VM name")
        one.add_argument("--json", action="store_true", help="print JSON")
        if name not in ("info", "stats"):
            one.add_argument("--wait", type=int, metavar="SECONDS",
                             help="wait up to SECONDS (0-300) for the VM to reach the action's state")
    autostart = vm_actions.add_parser("autostart", help="start the VM with the host, or not")
    autostart.add_argument("agent", type=int, help="agent id")
    autostart.add_argument("vm", help="VM name")
    autostart.add_argument("enabled", choices=["on", "off"])
    autostart.add_argument("--json", action="store_true", help="print JSON")
    snapshots = vm_actions.add_parser("snapshots", help="internal snapshots of a VM")
    snapshot_actions = snapshots.add_subparsers(dest="snapshot_action", required=True)
    for name, text in [("list", "list the VM's snapshots"), ("create", "take a snapshot"),
                       ("revert", "revert the VM to a snapshot"), ("delete", "delete a snapshot")]:
        one = snapshot_actions.add_parser(name, help=text)
        one.add_argument("agent", type=int, help="agent id")
        one.add_argument("vm", help="VM name")
        if name != "list":
            one.add_argument("snapshot", help="snapshot name")
        if name == "create":
            one.add_argument("--description", help="free text kept with the snapshot")
        one.add_argument("--json", action="store_true", help="print JSON")
    fleet = vm_actions.add_parser("fleet", help="every VM on every agent of yours")
    fleet.add_argument("--agent", type=int, action="append", default=[], help="only this agent (repeatable)")
    fleet.add_argument("--state", action="append", default=[], help="only VMs in this state, e.g. running, "
                                                                     "'shut off' (repeatable)")
    fleet.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return _dispatch(args, settings)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except PortalError as error:
        print(f"error: {error.code}: {error.detail}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        from entrypoints.server import serve

        serve(settings)
        return 0
    if args.command == "secret-key":
        from adapters.sealing import generate_key

        print(generate_key())
        return 0
    if args.command == "db":
        return _db(args, settings)
    if args.command in ("agents", "vms"):
        return _as_user(args, settings)
    return _users(args, settings)


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.sql import migrations
    from entrypoints.bootstrap import open_storage, secret_box

    storage = open_storage(settings, migrate=args.action != "version")
    try:
        if args.action == "upgrade":
            secret_box(settings)  # everything the server needs at start: schema and secret key
            print(f"database at schema version {storage.schema_version()} (latest {migrations.LATEST})")
        elif args.action == "version":
            print(storage.schema_version())
        else:
            try:
                storage.backup(args.path)
            except (RuntimeError, FileExistsError) as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
            print(f"backup written to {args.path}")
    finally:
        storage.dispose()
    return 0


def _users(args: argparse.Namespace, settings: Settings) -> int:
    from entrypoints.library import connect

    with connect(settings=settings) as library:
        portal = library.portal
        if args.action == "create":
            created = library.create_user(args.name, args.email)
            _print_json(UserWithKeyView.with_key(created.user, created.api_key))
            print("store the api_key now: it is not shown again", file=sys.stderr)
        elif args.action == "list":
            users = portal.users.list_users()
            if args.json:
                _print_json([UserView.of(u) for u in users])
            else:
                print(f"{'ID':>5}  {'NAME':<24} {'EMAIL':<32} KEY PREFIX")
                for user in users:
                    print(f"{user.id:>5}  {user.name[:24]:<24} {(user.email or '-')[:32]:<32} {user.api_key_prefix}")
        else:
            session = library.login_as(portal.users.find_user(user_id=args.id, email=args.email))
            api_key = session.rotate_api_key()  # also brings session.user up to date
            _print_json(UserWithKeyView.with_key(session.user, api_key))
    return 0


def _as_user(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from entrypoints.library import connect
    from entrypoints.shapes import AgentView, PublicKeyView, VmInfoView, VmView

    api_key = os.environ.get("MANAGEMENT_API_KEY", "").strip()
    if not api_key:
        print("error: missing_api_key: set MANAGEMENT_API_KEY to your API key", file=sys.stderr)
        return 1
    with connect(settings=settings) as library:
        me = library.login(api_key)
        if args.action in _MORE_VM_COMMANDS.get(args.command, ()):
            return _more(me, args)
        if args.command == "agents" and args.action in ("public-key", "rotate-key"):
            agent = me.rotate_agent_key(args.agent) if args.action == "rotate-key" else me.agent(args.agent)
            published = PublicKeyView.of(agent)
            if args.json:
                _print_json(published)
            else:
                print(published.authorized_keys_line)
        elif args.command == "agents":
            agents = me.agents()
            if args.json:
                _print_json([AgentView.of(a) for a in agents])
            else:
                print(f"{'ID':>5}  {'NAME':<24} {'ADDRESS':<32} {'USER':<16} HOST KEY")
                for a in agents:
                    address = f"{a.hostname}:{a.port}"
                    pinned = a.host_key.fingerprint if a.host_key else "(not pinned)"
                    print(f"{a.id:>5}  {a.name[:24]:<24} {address[:32]:<32} {a.username[:16]:<16} {pinned}")
        elif args.action == "list":
            vms = me.vms(args.agent)
            if args.json:
                _print_json([VmView.of(vm) for vm in vms])
            else:
                print(f"{'ID':>5}  {'NAME':<40} STATE")
                for vm in vms:
                    print(f"{vm.id if vm.id is not None else '-':>5}  {vm.name:<40} {vm.state}")
        elif args.action == "info":
            info = me.vm_info(args.agent, args.vm)
            if args.json:
                _print_json(VmInfoView.of(info))
            else:
                for key, value in info.dominfo.items():
                    print(f"{key:<16} {value if value is not None else '-'}")
        else:
            return _act(me, args)
    return 0


_MORE_VM_COMMANDS = {"agents": ("host", "check"), "vms": ("autostart", "stats", "snapshots", "fleet")}


def _act(me: Session, args: argparse.Namespace) -> int:
    """A lifecycle action (start, shutdown, force-stop, reboot, suspend, resume), and with
    ``--wait`` the wait for its state, shown on stderr while it lasts."""
    from entrypoints.shapes import WaitedActionView

    if args.wait is None:
        return _print_result(me.vm_action(args.agent, args.vm, args.action), args.json, f"{args.action}: done")
    progress = _Progress(args.vm)
    try:
        waited = me.vm_action_and_wait(args.agent, args.vm, args.action, args.wait, progress)
    finally:
        progress.finish()
    if args.json:
        _print_json(WaitedActionView.of_waited(waited))
    else:
        print(f"{waited.result.stdout.strip() or args.action + ': done'}; {waited.state} after "
              f"{waited.waited_seconds:.1f} s")
    return 0


def _more(me: Session, args: argparse.Namespace) -> int:
    """The commands beyond the seed's lifecycle: autostart, stats, snapshots, the fleet view, host
    facts and checks. A check that found the host failing prints its answer and exits 1."""
    from entrypoints.shapes import AutostartView, CommandView, FleetEntryView

    if args.command == "agents":
        value: Any = me.host(args.agent) if args.action == "host" else me.check_agent(args.agent)
        if args.json:
            _print_json(value)
        else:
            _print_fields(dump(value))
        failure = getattr(value, "error", None)
        if failure is not None:
            print(f"error: {failure.code}: {failure.detail}", file=sys.stderr)
            return 1
        return 0
    if args.action == "fleet":
        entries = me.fleet(agent_ids=args.agent, states=args.state)
        if args.json:
            _print_json([FleetEntryView.of(e) for e in entries])
            return 0
        print(f"{'AGENT':<24} {'ID':>5}  {'VM':<40} STATE")
        for entry in entries:
            agent = f"{entry.agent_name[:18]} ({entry.agent_id})"
            if entry.error is not None:
                print(f"{agent:<24} {'':>5}  error: {entry.error.code}: {entry.error.detail}")
            for vm in entry.vms or []:
                print(f"{agent:<24} {vm.id if vm.id is not None else '-':>5}  {vm.name:<40} {vm.state}")
        return 0
    if args.action == "autostart":
        enabled = args.enabled == "on"
        result = me.set_autostart(args.agent, args.vm, enabled)
        if args.json:
            _print_json(AutostartView(vm=args.vm, enabled=enabled, result=CommandView.of(result)))
        else:
            print(result.stdout.strip() or f"autostart {args.enabled}")
        return 0
    if args.action == "stats":
        stats = me.vm_stats(args.agent, args.vm)
        if args.json:
            _print_json(stats)
        else:
            _print_fields({k: v for k, v in dump(stats).items() if k != "fields"})
        return 0
    return _snapshots(me, args)


def _snapshots(me: Session, args: argparse.Namespace) -> int:
    action = args.snapshot_action
    if action == "list":
        snapshots = me.snapshots(args.agent, args.vm)
        if args.json:
            _print_json(snapshots)
            return 0
        print(f"  {'NAME':<32} {'CREATED':<21} {'STATE':<14} PARENT")
        for snap in snapshots:
            when = snap.created_at.strftime("%Y-%m-%d %H:%M:%S") if snap.created_at else "-"
            print(f"{'*' if snap.current else ' '} {snap.name:<32} {when:<21} {snap.state:<14} {snap.parent or '-'}")
        return 0
    if action == "create":
        created = me.create_snapshot(args.agent, args.vm, args.snapshot, args.description)
        if args.json:
            _print_json(created)
        else:
            print(f"snapshot {created.name} created ({created.state})")
        return 0
    if action == "revert":
        return _print_result(me.revert_snapshot(args.agent, args.vm, args.snapshot), args.json,
                             f"reverted to {args.snapshot}")
    me.delete_snapshot(args.agent, args.vm, args.snapshot)
    if args.json:
        _print_json({"deleted": args.snapshot})
    else:
        print(f"snapshot {args.snapshot} deleted")
    return 0


class _Progress:
    """Shows a wait on stderr: one line redrawn on a terminal, a line per change of state otherwise."""

    def __init__(self, vm: str) -> None:
        self.vm = vm
        self.last: str | None = None
        self.tty = sys.stderr.isatty()

    def __call__(self, state: str | None, elapsed: float) -> None:
        text = f"waiting for {self.vm}: {state or 'unknown'} ({elapsed:.1f} s)"
        if self.tty:
            print(f"\r{text}\033[K", end="", file=sys.stderr, flush=True)
        elif state != self.last:
            print(text, file=sys.stderr, flush=True)
        self.last = state

    def finish(self) -> None:
        if self.tty and self.last is not None:
            print(file=sys.stderr)


def _print_fields(values: dict[str, Any], prefix: str = "") -> None:
    """Nested values as aligned ``key  value`` lines (``node.cpus  2``)."""
    for key, value in values.items():
        if isinstance(value, dict):
            _print_fields(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _print_fields(item, f"{prefix}{key}.{i}.")
                else:
                    print(f"{f'{prefix}{key}.{i}':<28} {item}")
        else:
            print(f"{prefix + key:<28} {'-' if value is None else value}")


def _print_result(result: CommandResult, as_json: bool, done: str) -> int:
    """A command's result: as JSON, or what virsh printed (``done`` when it printed nothing)."""
    from entrypoints.shapes import CommandView

    if as_json:
        _print_json(CommandView.of(result))
    else:
        print(result.stdout.strip() or done)
    return 0


def _print_json(value: Any) -> None:
    print(json.dumps(dump(value), indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
