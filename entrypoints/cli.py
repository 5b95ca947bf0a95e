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
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from core.errors import MissingApiKey, PortalError
from entrypoints.operations import BY_NAME, Operation
from entrypoints.settings import ConfigError, Settings
from entrypoints.shapes import EventView, PublicKeyView, UserView, UserWithKeyView, dump

if TYPE_CHECKING:
    from entrypoints.library import Session

Handler = Callable[[argparse.Namespace, Settings], int]


# ---------------------------------------------------------------------- user commands, from the operation table


@attrs.frozen
class UserCommand:
    """A command that acts as the user of ``MANAGEMENT_API_KEY`` and runs one operation of the
    table: its arguments follow from the operation's path (``agent``, ``vm``, ``snapshot``), its
    query (``--wait``, repeatable ``--agent``/``--state``) and ``body`` (how the body is made from
    the arguments); ``--json`` prints the operation's view, ``text`` prints for people."""

    words: tuple[str, str] | tuple[str, str, str]
    operation: str
    help: str
    text: Callable[[Any, argparse.Namespace], int]
    body: tuple[tuple[str, dict[str, Any]], ...] = ()  # extra arguments that make the body's fields
    make_body: Callable[[argparse.Namespace], dict[str, Any]] = lambda _args: {}
    run: Callable[[Session, Operation, argparse.Namespace], Any] | None = None  # instead of the plain call
    json: Callable[[Any, argparse.Namespace], Any] | None = None  # instead of the operation's view
    fails_on_error: bool = False  # an answer carrying an ``error`` (a failed check) exits 1


_PATH_ARGUMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "agent_id": ("agent", {"type": int, "help": "agent id"}),
    "vm": ("vm", {"help": "VM name"}),
    "snapshot": ("snapshot", {"help": "snapshot name"}),
}
_QUERY_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "wait": ("--wait", {"type": int, "metavar": "SECONDS",
                        "help": "wait up to SECONDS (0-300) for the VM to reach the action's state"}),
    "agent": ("--agent", {"type": int, "action": "append", "default": [], "help": "only this agent (repeatable)"}),
    "after": ("--after", {"type": int, "metavar": "ID", "help": "only agents with an id above ID (the next page)"}),
    "limit": ("--limit", {"type": int, "metavar": "N", "help": "at most N of them"}),
    "state": ("--state", {"action": "append", "default": [],
                          "help": "only VMs in this state, e.g. running, 'shut off' (repeatable)"}),
    # issue 18
    "fresh": ("--fresh", {"action": "store_const", "const": "true",
                          "help": "ask the host even when the agent's live mirror is fresh"}),
    "vm": ("--vm", {"help": "only events of this VM"}),
    "type": ("--type", {"action": "append", "default": [], "help": "only events of this type, e.g. vm.started "
                                                                   "(repeatable)"}),
}
# Query options whose meaning differs for one operation (issue 18: the events' single --agent).
_QUERY_OPTIONS_OF: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("list_events", "agent"): ("--agent", {"type": int, "help": "only events of this agent"}),
    ("list_events", "after"): ("--after", {"type": int, "metavar": "ID", "help": "only events with an id above ID"}),
}


def _run_user_command(command: UserCommand) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        from entrypoints.library import connect

        api_key = os.environ.get("MANAGEMENT_API_KEY", "").strip()
        if not api_key:
            raise MissingApiKey("set MANAGEMENT_API_KEY to your API key")
        op = BY_NAME[command.operation]
        with connect(settings=settings) as library:
            me = library.login(api_key)
            path_values = [getattr(args, _PATH_ARGUMENTS[name][0]) for name in op.path_parameters]
            query = {q.name: getattr(args, q.name) for q in op.query if getattr(args, q.name, None) is not None}
            call = me.prepare(op, *path_values, **command.make_body(args), **query)
            result = command.run(me, op, args) if command.run is not None else me.run(op, call)
            if args.json:
                if command.json is not None:
                    _print_json(command.json(result, args))
                elif op.view is not None:
                    _print_json(op.view(result, call))
                status = 0
            else:
                status = command.text(result, args)
            failure = getattr(result, "error", None) if command.fails_on_error else None
            if failure is not None:
                print(f"error: {failure.code}: {failure.detail}", file=sys.stderr)
                return 1
            return status

    return handler


def _lifecycle(me: Session, op: Operation, args: argparse.Namespace) -> Any:
    """A lifecycle action, and with ``--wait`` the wait for its state, shown on stderr while it lasts."""
    action = args.words[-1]
    if args.wait is None:
        return me.vm_action(args.agent, args.vm, action)
    progress = _Progress(args.vm)
    try:
        return me.vm_action_and_wait(args.agent, args.vm, action, args.wait, progress)
    finally:
        progress.finish()


def _lifecycle_text(result: Any, args: argparse.Namespace) -> int:
    action = args.words[-1]
    if hasattr(result, "waited_seconds"):
        print(f"{result.result.stdout.strip() or action + ': done'}; {result.state} after "
              f"{result.waited_seconds:.1f} s")
    else:
        print(result.stdout.strip() or f"{action}: done")
    return 0


def _agents_text(agents: Any, _args: argparse.Namespace) -> int:
    print(f"{'ID':>5}  {'NAME':<24} {'ADDRESS':<32} {'USER':<16} HOST KEY")
    for a in agents:
        address = f"{a.hostname}:{a.port}"
        pinned = a.host_key.fingerprint if a.host_key else "(not pinned)"
        print(f"{a.id:>5}  {a.name[:24]:<24} {address[:32]:<32} {a.username[:16]:<16} {pinned}")
    return 0


def _vms_text(vms: Any, _args: argparse.Namespace) -> int:
    print(f"{'ID':>5}  {'NAME':<40} STATE")
    for vm in vms:
        print(f"{vm.id if vm.id is not None else '-':>5}  {vm.name:<40} {vm.state}")
    return 0


def _dominfo_text(info: Any, _args: argparse.Namespace) -> int:
    for key, value in info.dominfo.items():
        print(f"{key:<16} {value if value is not None else '-'}")
    return 0


def _fields_text(value: Any, _args: argparse.Namespace) -> int:
    """Nested fields as ``key  value`` lines."""
    _print_fields({k: v for k, v in dump(value).items() if k != "fields"})
    return 0


def _public_key_text(agent: Any, _args: argparse.Namespace) -> int:
    print(PublicKeyView.of(agent).authorized_keys_line)
    return 0


def _fleet_text(entries: Any, _args: argparse.Namespace) -> int:
    print(f"{'AGENT':<24} {'ID':>5}  {'VM':<40} STATE")
    for entry in entries:
        agent = f"{entry.agent_name[:18]} ({entry.agent_id})"
        if entry.error is not None:
            print(f"{agent:<24} {'':>5}  error: {entry.error.code}: {entry.error.detail}")
        for vm in entry.vms or []:
            print(f"{agent:<24} {vm.id if vm.id is not None else '-':>5}  {vm.name:<40} {vm.state}")
    return 0


def _snapshots_text(snapshots: Any, _args: argparse.Namespace) -> int:
    print(f"  {'NAME':<32} {'CREATED':<21} {'STATE':<14} PARENT")
    for snap in snapshots:
        when = snap.created_at.strftime("%Y-%m-%d %H:%M:%S") if snap.created_at else "-"
        print(f"{'*' if snap.current else ' '} {snap.name:<32} {when:<21} {snap.state:<14} {snap.parent or '-'}")
    return 0


def _printed(done: Callable[[argparse.Namespace], str]) -> Callable[[Any, argparse.Namespace], int]:
    """What virsh printed, or ``done(args)`` when it printed nothing."""
    def text(result: Any, args: argparse.Namespace) -> int:
        print(result.stdout.strip() or done(args))
        return 0
    return text


def _said(message: Callable[[Any, argparse.Namespace], str]) -> Callable[[Any, argparse.Namespace], int]:
    def text(result: Any, args: argparse.Namespace) -> int:
        print(message(result, args))
        return 0
    return text


def _events_text(events: Any, _args: argparse.Namespace) -> int:
    for event in events:
        _print_event(event)
    return 0


def _print_event(event: Any) -> None:
    print(f"{event.id:>8}  {event.at.isoformat(timespec='milliseconds')}  agent {event.agent_id or '-':<4} "
          f"{event.type:<20} {event.vm or '-':<24} {event.detail}", flush=True)


def _tail(me: Session, _op: Operation, args: argparse.Namespace) -> list[Any]:
    """Follow the events (the library's iterator) until interrupted; prints each as it comes."""
    try:
        for event in me.follow_events(after=args.after, agent_id=args.agent, vm=args.vm, types=args.type):
            if args.json:
                _print_json(EventView.of(event))
            else:
                _print_event(event)
    except KeyboardInterrupt:
        pass
    args.json = False  # every event was printed as it came
    return []


USER_COMMANDS: tuple[UserCommand, ...] = (
    UserCommand(("agents", "list"), "list_agents", "list your agents", _agents_text),
    UserCommand(("agents", "public-key"), "get_public_key", "print the agent's authorized_keys line (restricted "
                                                            "to the agent shell)", _public_key_text),
    UserCommand(("agents", "rotate-key"), "rotate_agent_key", "replace the agent's key with a new generated pair; "
                "prints the new authorized_keys line (re-run scripts/agent-install.sh on the host)", _public_key_text,
                json=lambda agent, _args: PublicKeyView.of(agent)),
    UserCommand(("agents", "host"), "get_host", "the host's name, processors, memory and libvirt/QEMU versions",
                _fields_text),
    UserCommand(("agents", "check"), "check_agent", "can the portal reach the host, log in and reach libvirt? "
                                                    "(exits 1 when the host fails)", _fields_text,
                fails_on_error=True),
    UserCommand(("vms", "list"), "list_vms", "list the agent's VMs", _vms_text),
    UserCommand(("vms", "info"), "get_vm", "virsh dominfo", _dominfo_text),
    *(UserCommand(("vms", word), f"{word.replace('-', '_')}_vm", text, _lifecycle_text, run=_lifecycle)
      for word, text in (("start", "start the VM"), ("shutdown", "graceful shutdown (ACPI)"),
                         ("force-stop", "virsh destroy"), ("reboot", "reboot the VM"),
                         ("suspend", "pause the VM (virsh suspend)"), ("resume", "resume a paused VM"))),
    UserCommand(("vms", "autostart"), "set_autostart", "start the VM with the host, or not",
                _printed(lambda args: f"autostart {args.enabled}"), body=(("enabled", {"choices": ["on", "off"]}),),
                make_body=lambda args: {"enabled": args.enabled == "on"}),
    UserCommand(("vms", "stats"), "get_vm_stats", "virsh domstats", _fields_text),
    UserCommand(("vms", "fleet"), "list_fleet", "every VM on every agent of yours", _fleet_text,
                run=lambda me, _op, args: me.fleet(agent_ids=args.agent, states=args.state)),
    UserCommand(("vms", "snapshots", "list"), "list_snapshots", "list the VM's snapshots", _snapshots_text),
    UserCommand(("vms", "snapshots", "create"), "create_snapshot", "take a snapshot",
                _said(lambda created, _args: f"snapshot {created.name} created ({created.state})"),
                body=(("snapshot", {"help": "snapshot name"}),
                      ("--description", {"help": "free text kept with the snapshot"})),
                make_body=lambda args: {"name": args.snapshot, "description": args.description}),
    UserCommand(("vms", "snapshots", "revert"), "revert_snapshot", "revert the VM to a snapshot",
                _printed(lambda args: f"reverted to {args.snapshot}")),
    UserCommand(("vms", "snapshots", "delete"), "delete_snapshot", "delete a snapshot",
                _said(lambda _result, args: f"snapshot {args.snapshot} deleted"),
                json=lambda _result, args: {"deleted": args.snapshot}),
    # issue 18
    UserCommand(("events", "list"), "list_events", "your events after an id (--after), oldest first",
                _events_text),
    UserCommand(("events", "tail"), "list_events", "follow your events as they happen (Ctrl-C ends)",
                lambda _result, _args: 0, run=_tail, json=lambda _result, _args: None),
)

# ---------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manage-playrservers",
                                     description="PlayrServers QEMU Management Portal")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP server (gunicorn with ASGI workers)").set_defaults(
        handler=_serve)

    users = commands.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    create = users.add_parser("create", help="create a user and print its API key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--email")
    create.set_defaults(handler=_users_create)
    listing = users.add_parser("list", help="list users")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_users_list)
    rotate = users.add_parser("rotate-key", help="issue a new API key for a user (the old one dies)")
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int)
    which.add_argument("--email")
    rotate.set_defaults(handler=_users_rotate_key)

    db = commands.add_parser("db", help="database maintenance").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="migrate the database schema to the latest version (and create the secret "
                                  "key file if there is none)").set_defaults(handler=_db)
    db.add_parser("version", help="print the schema version").set_defaults(handler=_db)
    backup = db.add_parser("backup", help="copy a consistent snapshot (SQLite online backup), safe while serving")
    backup.add_argument("path")
    backup.set_defaults(handler=_db)

    commands.add_parser("secret-key", help="print a new random value for MANAGEMENT_SECRET_KEY").set_defaults(
        handler=_secret_key)

    groups: dict[tuple[str, ...], Any] = {}
    for area, text in (("agents", "your agents (needs MANAGEMENT_API_KEY)"),
                       ("vms", "drive VMs on an agent (needs MANAGEMENT_API_KEY)"),
                       ("events", "what happened on your agents and VMs (needs MANAGEMENT_API_KEY)")):
        groups[(area,)] = commands.add_parser(area, help=text).add_subparsers(dest="action", required=True)
    groups[("vms", "snapshots")] = groups[("vms",)].add_parser(
        "snapshots", help="internal snapshots of a VM").add_subparsers(dest="snapshot_action", required=True)
    for command in USER_COMMANDS:
        op = BY_NAME[command.operation]
        one = groups[command.words[:-1]].add_parser(command.words[-1], help=command.help)
        for name in op.path_parameters:
            flag, options = _PATH_ARGUMENTS[name]
            one.add_argument(flag, **options)
        for flag, options in command.body:
            one.add_argument(flag, **options)
        for q in op.query:
            flag, options = _QUERY_OPTIONS_OF.get((op.name, q.name)) or _QUERY_OPTIONS[q.name]
            one.add_argument(flag, dest=q.name, **options)
        one.add_argument("--json", action="store_true", help="print JSON")
        one.set_defaults(handler=_run_user_command(command), words=command.words)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        handler: Handler = args.handler
        return handler(args, settings)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except PortalError as error:
        print(f"error: {error.code}: {error.detail}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- the operator's commands (local only)


def _serve(_args: argparse.Namespace, settings: Settings) -> int:
    from entrypoints.server import serve

    serve(settings)
    return 0


def _secret_key(_args: argparse.Namespace, _settings: Settings) -> int:
    from entrypoints.bootstrap import new_secret_key

    print(new_secret_key())
    return 0


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from entrypoints.bootstrap import LATEST_SCHEMA_VERSION, open_storage, secret_box

    storage = open_storage(settings, migrate=args.action != "version")
    try:
        if args.action == "upgrade":
            secret_box(settings)  # everything the server needs at start: schema and secret key
            print(f"database at schema version {storage.schema_version()} (latest {LATEST_SCHEMA_VERSION})")
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


def _users_create(args: argparse.Namespace, settings: Settings) -> int:
    from entrypoints.library import connect

    with connect(settings=settings) as library:
        created = library.create_user(args.name, args.email)
        _print_json(UserWithKeyView.with_key(created.user, created.api_key))
        print("store the api_key now: it is not shown again", file=sys.stderr)
    return 0


def _users_list(args: argparse.Namespace, settings: Settings) -> int:
    from entrypoints.library import connect

    with connect(settings=settings) as library:
        users = library.portal.users.list_users()
    if args.json:
        _print_json([UserView.of(u) for u in users])
    else:
        print(f"{'ID':>5}  {'NAME':<24} {'EMAIL':<32} KEY PREFIX")
        for user in users:
            print(f"{user.id:>5}  {user.name[:24]:<24} {(user.email or '-')[:32]:<32} {user.api_key_prefix}")
    return 0


def _users_rotate_key(args: argparse.Namespace, settings: Settings) -> int:
    from entrypoints.library import connect

    with connect(settings=settings) as library:
        session = library.login_as(library.portal.users.find_user(user_id=args.id, email=args.email))
        api_key = session.rotate_api_key()  # also brings session.user up to date
        _print_json(UserWithKeyView.with_key(session.user, api_key))
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


def _print_json(value: Any) -> None:
    print(json.dumps(dump(value), indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
