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
    manage-playrservers vms snapshots show|revert|delete AGENT VM NAME [--json]
    manage-playrservers vms fleet [--agent ID]... [--state STATE]... [--json]
    manage-playrservers agents host|check AGENT [--json]   (check exits 1 when the host fails)
    manage-playrservers keys list|current [--json]
    manage-playrservers keys create NAME --scope S [--scope S]... [--agent ID]... [--expires-at TIME] [--json]
    manage-playrservers keys revoke KEY [--json]
    manage-playrservers vms console AGENT VM [--url URL]   (the serial console, through the HTTP API;
                                                          Ctrl-] detaches)

Commands that act as a user (the ``USER_COMMANDS`` table) take that user's API key from
``MANAGEMENT_API_KEY`` (or ``--api-key``, or the configuration file). With a portal URL
(``MANAGEMENT_URL``, ``--url`` or the configuration file: see ``entrypoints/remote.py``) they run
through the HTTP client (``entrypoints/client.py``) from any machine; without one, in-process on
the portal host with the same ``MANAGEMENT_*`` variables as the server. Either way they print the
same thing: text and ``--json`` are rendered from the operation's view. The operator's commands
(``serve``, ``users``, ``db``, ``secret-key``) run only on the portal host.

Errors print ``error: <code>: <detail>`` (configuration errors name the variable) and exit with
the code of their kind: 1 the portal or host failed, 2 usage/configuration/invalid input, 3 not
found, 4 authentication/permission, 5 conflict, 6 too many requests, 7 portal unreachable
(``entrypoints/remote.py``, docs/client.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from core.errors import PortalError
from entrypoints import remote
from entrypoints.operations import BY_NAME, Operation
from entrypoints.settings import ConfigError, Settings
from entrypoints.shapes import EventView, PublicKeyView, UserView, UserWithKeyView, dump

if TYPE_CHECKING:
    from entrypoints.client import Client
    from entrypoints.library import Session

Handler = Callable[[argparse.Namespace, Settings], int]


# ---------------------------------------------------------------------- user commands, from the operation table


@attrs.frozen
class UserCommand:
    """A command that acts as the user of ``MANAGEMENT_API_KEY`` and runs one operation of the
    table: its arguments follow from the operation's path (``agent``, ``vm``, ``snapshot``), its
    query (``--wait``, repeatable ``--agent``/``--state``) and ``body`` (how the body is made from
    the arguments); ``--json`` prints the operation's view, ``text`` prints for people.

    It runs in-process or through the HTTP client (``MANAGEMENT_URL``) with no code of its own:
    ``text`` and ``json`` get the operation's VIEW (``entrypoints/shapes.py``: what ``--json`` and the
    HTTP API answer, locally made by ``op.view``, remotely decoded from the answer), never a core
    value; a ``run`` (rarely needed) gets the in-process ``Session`` or the HTTP ``Client`` and may
    only use what both have: ``call(name, …)``, the operations' methods, ``vm_action`` and
    ``vm_action_and_wait``; locally its result goes through ``op.view``."""

    words: tuple[str, str] | tuple[str, str, str]
    operation: str
    help: str
    text: Callable[[Any, argparse.Namespace], int]
    body: tuple[tuple[str, dict[str, Any]], ...] = ()  # extra arguments that make the body's fields
    make_body: Callable[[argparse.Namespace], dict[str, Any]] = lambda _args: {}
    run: Callable[[Session | Client, Operation, argparse.Namespace], Any] | None = None  # instead of the plain call
    json: Callable[[Any, argparse.Namespace], Any] | None = None  # from the operation's view, instead of it
    fails_on_error: bool = False  # an answer carrying an ``error`` (a failed check) exits 1


_PATH_ARGUMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "agent_id": ("agent", {"type": int, "help": "agent id"}),
    "vm": ("vm", {"help": "VM name"}),
    "snapshot": ("snapshot", {"help": "snapshot name"}),
    "key_id": ("key", {"type": int, "help": "API key id (keys list shows it)"}),
    "pool": ("pool", {"help": "storage pool name"}),
    "webhook_id": ("webhook", {"type": int, "help": "webhook id (webhooks list shows it)"}),
}
_QUERY_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "wait": ("--wait", {"type": int, "metavar": "SECONDS",
                        "help": "wait up to SECONDS (0-300) for the VM to reach the action's state"}),
    "agent": ("--agent", {"type": int, "action": "append", "default": [], "help": "only this agent (repeatable)"}),
    "after": ("--after", {"type": int, "metavar": "ID", "help": "only agents with an id above ID (the next page)"}),
    "limit": ("--limit", {"type": int, "metavar": "N", "help": "at most N of them"}),
    "state": ("--state", {"action": "append", "default": [],
                          "help": "only VMs in this state, e.g. running, 'shut off' (repeatable)"}),
    "force": ("--force", {"action": "store_const", "const": "true",
                          "help": "destroy a running VM first"}),
    "remove_storage": ("--remove-storage", {"action": "store_const", "const": "true",
                                            "help": "also delete the pool volumes its disks use"}),
    "source": ("--source", {"choices": ["agent", "lease", "arp"],
                            "help": "where addresses come from (default: guest agent, then DHCP lease)"}),
    # issue 18
    "fresh": ("--fresh", {"action": "store_const", "const": "true",
                          "help": "ask the host even when the agent's live mirror is fresh"}),
    "vm": ("--vm", {"help": "only events of this VM"}),
    "type": ("--type", {"action": "append", "default": [], "help": "only events of this type, e.g. vm.started "
                                                                   "(repeatable)"}),
}
# Query options whose meaning differs for one operation (issue 18: the events' single --agent).
_QUERY_OPTIONS_OF: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("list_webhook_deliveries", "before"): ("--before", {"type": int, "metavar": "ID",
                                                         "help": "only deliveries with an id below ID"}),
    ("list_events", "agent"): ("--agent", {"type": int, "help": "only events of this agent"}),
    ("list_events", "after"): ("--after", {"type": int, "metavar": "ID", "help": "only events with an id above ID"}),
}


def _arguments(command: UserCommand, op: Operation, args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The operation's arguments, in the library's (and the HTTP client's) calling convention."""
    path_values = [getattr(args, _PATH_ARGUMENTS[name][0]) for name in op.path_parameters]
    query = {q.name: getattr(args, q.name) for q in op.query if getattr(args, q.name, None) is not None}
    return path_values, {**command.make_body(args), **query}


def _render(command: UserCommand, view: Any, args: argparse.Namespace) -> int:
    """Print the operation's view (the same code for an answer made here and one from the HTTP client)."""
    if args.json:
        if command.json is not None:
            _print_json(command.json(view, args))
        elif view is not None:
            _print_json(view)
        status = 0
    else:
        status = command.text(view, args)
    failure = getattr(view, "error", None) if command.fails_on_error else None
    if failure is not None:
        print(f"error: {failure.code}: {failure.detail}", file=sys.stderr)
        return remote.EXIT_FAILED
    return status


def _no_api_key() -> ConfigError:
    return ConfigError("MANAGEMENT_API_KEY", "set it to your API key (or pass --api-key, or put api_key in "
                                             "~/.config/manage-playrservers/config.toml)")


def _run_local(command: UserCommand, args: argparse.Namespace, settings: Settings, api_key: str | None) -> int:
    """The command in-process, on the portal host (the library)."""
    from entrypoints.library import connect

    if not api_key:
        raise _no_api_key()
    op = BY_NAME[command.operation]
    with connect(settings=settings) as library:
        me = library.login(api_key)
        path_values, arguments = _arguments(command, op, args)
        call = me.prepare(op, *path_values, **arguments)
        result = command.run(me, op, args) if command.run is not None else me.run(op, call)
        return _render(command, op.view(result, call) if op.view is not None else None, args)


def _run_remote(command: UserCommand, args: argparse.Namespace, target: remote.Target) -> int:
    """The command through the HTTP client, from any machine."""
    from entrypoints.client import Client

    if not target.api_key:
        raise _no_api_key()
    op = BY_NAME[command.operation]
    with Client(target.url, target.api_key, verify=target.verify, timeout=target.timeout) as client:
        path_values, arguments = _arguments(command, op, args)
        view = command.run(client, op, args) if command.run is not None else \
            client.call(op.name, *path_values, **arguments)
        return _render(command, view, args)


def _lifecycle(me: Session | Client, op: Operation, args: argparse.Namespace) -> Any:
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
        print(f"{result.stdout.strip() or action + ': done'}; {result.state} after "
              f"{result.waited_seconds:.1f} s")
    else:
        print(result.stdout.strip() or f"{action}: done")
    return 0


def _agents_text(agents: Any, _args: argparse.Namespace) -> int:
    print(f"{'ID':>5}  {'NAME':<24} {'ADDRESS':<32} {'USER':<16} HOST KEY")
    for a in agents:
        address = f"{a.hostname}:{a.port}"
        pinned = a.host_key_fingerprint or "(not pinned)"
        print(f"{a.id:>5}  {a.name[:24]:<24} {address[:32]:<32} {a.username[:16]:<16} {pinned}")
    return 0


def _vms_text(vms: Any, _args: argparse.Namespace) -> int:
    print(f"{'ID':>5}  {'NAME':<40} STATE")
    for vm in vms:
        print(f"{vm.id if vm.id is not None else '-':>5}  {vm.name:<40} {vm.state}")
    return 0


def _dominfo_text(info: Any, _args: argparse.Namespace) -> int:
    for key, value in info.dominfo.text.items():
        print(f"{key:<16} {value}")
    return 0


def _fields_text(value: Any, _args: argparse.Namespace) -> int:
    """Nested fields as ``key  value`` lines."""
    _print_fields({k: v for k, v in dump(value).items() if k != "fields"})
    return 0


def _public_key_text(view: Any, _args: argparse.Namespace) -> int:
    """The authorized_keys line of a ``PublicKeyView``, or of an ``AgentView`` (a rotated key)."""
    print((view if isinstance(view, PublicKeyView) else PublicKeyView.of_view(view)).authorized_keys_line)
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


def _keys_text(keys: Any, _args: argparse.Namespace) -> int:
    print(f"{'ID':>5}  {'NAME':<24} {'PREFIX':<18} {'SCOPES':<40} {'AGENTS':<12} {'EXPIRES':<20} LAST USED")
    for key in keys:
        agents = "all" if key.agents is None else ",".join(str(a) for a in sorted(key.agents))
        scopes = "all (full key)" if key.full else " ".join(key.scopes)
        expires = key.expires_at.strftime("%Y-%m-%d %H:%M") if key.expires_at else "never"
        used = key.last_used_at.strftime("%Y-%m-%d %H:%M") if key.last_used_at else "never"
        print(f"{key.id:>5}  {key.name[:24]:<24} {key.prefix:<18} {scopes:<40} {agents[:12]:<12} {expires:<20} {used}")
    return 0


def _new_key_text(created: Any, _args: argparse.Namespace) -> int:
    print(f"API key {created.id} ({created.name}); shown once, keep it now:")
    print(created.api_key)
    return 0


# ---------------------------------------------------------------------- provisioning (issue 16)

_NEW_VM_ARGUMENTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("name", {"help": "the new VM's name"}),
    ("--vcpus", {"type": int, "default": 1, "help": "virtual CPUs (default 1)"}),
    ("--memory-mib", {"type": int, "default": 1024, "help": "memory in MiB (default 1024)"}),
    ("--pool", {"required": True, "help": "storage pool for the disk (and the seed)"}),
    ("--size-gib", {"type": int, "required": True, "help": "disk size in GiB"}),
    ("--base-volume", {"help": "a volume of the pool to start from (e.g. a cloud image); else a blank disk"}),
    ("--network", {"help": "libvirt network to attach to"}),
    ("--bridge", {"help": "host bridge to attach to (instead of --network)"}),
    ("--hostname", {"help": "guest host name (cloud-init; default: the VM name)"}),
    ("--ssh-key", {"action": "append", "default": [], "help": "an OpenSSH public key line (repeatable)"}),
    ("--ssh-key-file", {"action": "append", "default": [], "help": "a file of public keys on this machine"}),
    ("--user-data-file", {"help": "cloud-init user data from a file on this machine (#cloud-config or script)"}),
    ("--network-config-file", {"help": "cloud-init network-config (YAML) from a file on this machine"}),
    ("--no-cloud-init", {"action": "store_true", "help": "no seed at all"}),
    ("--no-start", {"action": "store_true", "help": "define only, do not start"}),
    ("--autostart", {"action": "store_true", "help": "start with the host"}),
)


def _read(path: str | None) -> str | None:
    return None if path is None else Path(path).read_text(encoding="utf-8")


def _new_vm_body(args: argparse.Namespace) -> dict[str, Any]:
    keys = list(args.ssh_key)
    for path in args.ssh_key_file:
        keys += [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
    body: dict[str, Any] = {"name": args.name, "vcpus": args.vcpus, "memory_mib": args.memory_mib,
                            "disk": {"pool": args.pool, "size_gib": args.size_gib, "base_volume": args.base_volume},
                            "network": {"bridge": args.bridge} if args.bridge else args.network,
                            "start": not args.no_start, "autostart": args.autostart}
    if not args.no_cloud_init:
        body["cloud_init"] = {"hostname": args.hostname, "ssh_authorized_keys": keys,
                              "user_data": _read(args.user_data_file),
                              "network_config": _read(args.network_config_file)}
    return body


class _Steps:
    """Shows the steps of a creation on stderr (then the wait for 'running', like _Progress)."""

    def __init__(self, vm: str) -> None:
        self.vm = vm

    def __call__(self, step: str | None, elapsed: float) -> None:
        print(f"{self.vm}: {step or 'unknown'} ({elapsed:.1f} s)", file=sys.stderr, flush=True)


def _create(me: Session | Client, op: Operation, args: argparse.Namespace) -> Any:
    body = _new_vm_body(args)
    from entrypoints.library import Session

    if isinstance(me, Session):  # in-process: every step is shown as it happens
        call = me.prepare(op, args.agent, **body)
        return me.create_vm_and_watch(args.agent, call.body, wait=args.wait, progress=_Steps(args.name))
    print(f"{args.name}: creating through {me.url}" + (f", waiting up to {args.wait} s" if args.wait else ""),
          file=sys.stderr, flush=True)
    return me.create_vm(args.agent, **body, **({"wait": args.wait} if args.wait is not None else {}))


def _created_text(created: Any, _args: argparse.Namespace) -> int:
    state = f"; {created.state} after {created.waited_seconds:.1f} s" if created.state else ""
    print(f"{created.dominfo.name}: {created.dominfo.state}{state}")
    for volume in created.volumes:
        print(f"  volume {volume.pool}/{volume.name} ({volume.format}, {volume.capacity_bytes} bytes)")
    return 0


def _interfaces_text(interfaces: Any, _args: argparse.Namespace) -> int:
    print(f"{'NAME':<12} {'MAC':<18} {'NETWORK':<20} ADDRESSES")
    for i in interfaces:
        addresses = ", ".join(f"{a.address}/{a.prefix}" if a.prefix is not None else a.address
                              for a in i.addresses) or "-"
        print(f"{i.name:<12} {i.mac or '-':<18} {i.network or '-':<20} {addresses}")
    return 0


def _table(rows: Any, *columns: tuple[str, str]) -> int:
    """Rows as aligned columns (None as '-')."""
    cells = [[str(title) for title, _ in columns]] + [
        ["-" if getattr(row, field) is None else str(getattr(row, field)) for _, field in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def _events_text(page: Any, _args: argparse.Namespace) -> int:
    for event in page.events:
        _print_event(event)
    return 0


def _print_event(event: Any) -> None:
    print(f"{event.id:>8}  {event.at.isoformat(timespec='milliseconds')}  agent {event.agent_id or '-':<4} "
          f"{event.type:<20} {event.vm or '-':<24} {event.detail}", flush=True)


def _tail(me: Session | Client, _op: Operation, args: argparse.Namespace) -> Any:
    """Follow the events until interrupted; prints each as it comes. In-process through the
    library's iterator; remotely by asking ``GET /events?after=`` every second (from the newest
    event when no ``--after`` is given)."""
    def show(event: EventView) -> None:
        if args.json:
            print(json.dumps(dump(event)), flush=True)
        else:
            _print_event(event)

    from entrypoints.library import Session

    try:
        if isinstance(me, Session):
            for event in me.follow_events(after=args.after, agent_id=args.agent, vm=args.vm, types=args.type):
                show(EventView.of(event))
        else:
            import time

            filters = {"agent": args.agent, "vm": args.vm, "type": args.type}
            filters = {name: value for name, value in filters.items() if value not in (None, [])}
            cursor, catching_up = (args.after, False) if args.after is not None else (0, True)
            while True:
                page = me.list_events(after=cursor, limit=500, **filters)
                if not catching_up:
                    for event in page.events:
                        show(event)
                cursor = page.last_id
                if not page.events:
                    catching_up = False
                    time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    args.json = False  # every event was printed as it came
    return []


# --- webhooks (issue 18)
_WEBHOOK_ARGUMENTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--event", {"action": "append", "dest": "events", "metavar": "TYPE",
                 "help": "deliver this event type or family, e.g. vm.stopped, vm.* (repeatable; default: "
                         "every event)"}),
    ("--agent", {"action": "append", "type": int, "dest": "agents", "metavar": "ID",
                 "help": "only this agent's events (repeatable; default: every agent)"}),
    ("--active", {"choices": ["true", "false"], "help": "false: make no deliveries until set true again"}),
)


def _webhook_body(args: argparse.Namespace, *, new: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.webhook_url is not None:  # (--url is the portal's own URL)
        body["url"] = args.webhook_url
    if args.events or (not new and args.all_events):
        body["events"] = args.events or []
    if args.agents or (not new and args.all_agents):
        body["agents"] = args.agents or None
    if args.active is not None:
        body["active"] = args.active == "true"
    return body


def _webhooks_text(hooks: Any, _args: argparse.Namespace) -> int:
    print(f"{'ID':>5}  {'ACTIVE':<6}  {'EVENTS':<30} {'AGENTS':<12} URL")
    for hook in hooks:
        agents = "all" if hook.agents is None else ",".join(str(a) for a in hook.agents)
        events = " ".join(hook.events) or "all"
        print(f"{hook.id:>5}  {'yes' if hook.active else 'no':<6}  {events[:30]:<30} {agents[:12]:<12} {hook.url}")
    return 0


def _new_webhook_text(created: Any, _args: argparse.Namespace) -> int:
    print(f"webhook {created.id} -> {created.url}; its signing secret, shown once, keep it now:")
    print(created.secret)
    return 0


def _deliveries_text(deliveries: Any, _args: argparse.Namespace) -> int:
    for d in deliveries:
        when = f"next attempt {d.next_attempt_at.isoformat(timespec='seconds')}" if d.next_attempt_at else (
            f"finished {d.finished_at.isoformat(timespec='seconds')}" if d.finished_at else "")
        print(f"delivery {d.id}  event {d.event_id} {d.event_type}  {d.status}  {len(d.attempts)} attempts  {when}")
        for a in d.attempts:
            outcome = f"HTTP {a.status_code}" if a.status_code is not None else "no answer"
            error = f"  {a.error}" if a.error else ""
            print(f"  #{a.number} {a.at.isoformat(timespec='seconds')} {outcome} in {a.seconds:.3f} s{error}")
    return 0


USER_COMMANDS: tuple[UserCommand, ...] = (
    UserCommand(("agents", "list"), "list_agents", "list your agents", _agents_text),
    UserCommand(("agents", "public-key"), "get_public_key", "print the agent's authorized_keys line (restricted "
                                                            "to the agent shell)", _public_key_text),
    UserCommand(("agents", "rotate-key"), "rotate_agent_key", "replace the agent's key with a new generated pair; "
                "prints the new authorized_keys line (re-run scripts/agent-install.sh on the host)", _public_key_text,
                json=lambda agent, _args: PublicKeyView.of_view(agent)),
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
                _said(lambda done, args: done.result.stdout.strip() or f"autostart {args.enabled}"),
                body=(("enabled", {"choices": ["on", "off"]}),),
                make_body=lambda args: {"enabled": args.enabled == "on"}),
    UserCommand(("vms", "stats"), "get_vm_stats", "virsh domstats", _fields_text),
    UserCommand(("vms", "fleet"), "list_fleet", "every VM on every agent of yours", _fleet_text),
    # --- provisioning (issue 16)
    UserCommand(("pools", "list"), "list_pools", "the host's storage pools", lambda pools, _args: _table(
        pools, ("NAME", "name"), ("STATE", "state"), ("AUTOSTART", "autostart"), ("CAPACITY", "capacity_bytes"),
        ("ALLOCATED", "allocation_bytes"), ("AVAILABLE", "available_bytes"))),
    UserCommand(("volumes", "list"), "list_volumes", "the volumes of a storage pool", lambda volumes, _args: _table(
        volumes, ("NAME", "name"), ("FORMAT", "format"), ("CAPACITY", "capacity_bytes"),
        ("ALLOCATED", "allocation_bytes"), ("PATH", "path"))),
    UserCommand(("networks", "list"), "list_networks", "the host's libvirt networks", lambda nets, _args: _table(
        nets, ("NAME", "name"), ("STATE", "state"), ("AUTOSTART", "autostart"), ("BRIDGE", "bridge"))),
    UserCommand(("vms", "create"), "create_vm", "create a VM from a base image (cloud-init seed, started)",
                _created_text, body=_NEW_VM_ARGUMENTS, make_body=_new_vm_body, run=_create),
    UserCommand(("vms", "delete"), "delete_vm", "undefine a VM (--remove-storage: and its volumes)",
                _said(lambda _result, args: f"{args.vm} deleted"), json=lambda _result, args: {"deleted": args.vm}),
    UserCommand(("vms", "clone"), "clone_vm", "copy a shut-off VM (new disks, UUID and MAC addresses)",
                _created_text, body=(("name", {"help": "the clone's name"}),
                                     ("--start", {"action": "store_true", "help": "start the clone"})),
                make_body=lambda args: {"name": args.name, "start": args.start}),
    UserCommand(("vms", "interfaces"), "list_vm_interfaces", "the guest's interfaces and addresses",
                _interfaces_text),
    UserCommand(("vms", "snapshots", "list"), "list_snapshots", "list the VM's snapshots", _snapshots_text),
    UserCommand(("vms", "snapshots", "create"), "create_snapshot", "take a snapshot",
                _said(lambda created, _args: f"snapshot {created.name} created ({created.state})"),
                body=(("snapshot", {"help": "snapshot name"}),
                      ("--description", {"help": "free text kept with the snapshot"})),
                make_body=lambda args: {"name": args.snapshot, "description": args.description}),
    UserCommand(("vms", "snapshots", "show"), "get_snapshot", "one snapshot",
                lambda snap, args: _snapshots_text([snap], args)),
    UserCommand(("vms", "snapshots", "revert"), "revert_snapshot", "revert the VM to a snapshot",
                _printed(lambda args: f"reverted to {args.snapshot}")),
    UserCommand(("vms", "snapshots", "delete"), "delete_snapshot", "delete a snapshot",
                _said(lambda _result, args: f"snapshot {args.snapshot} deleted"),
                json=lambda _result, args: {"deleted": args.snapshot}),
    # --- API keys and scopes (issue 20)
    UserCommand(("keys", "list"), "list_api_keys", "list your API keys (never the keys themselves)", _keys_text),
    UserCommand(("keys", "current"), "get_current_api_key", "what the key in MANAGEMENT_API_KEY may do",
                lambda key, args: _keys_text([key], args)),
    UserCommand(("keys", "create"), "create_api_key", "create a key with some scopes (printed once)",
                _new_key_text,
                body=(("name", {"help": "what the key is for"}),
                      ("--scope", {"action": "append", "required": True, "dest": "scopes",
                                   "choices": ["read", "operate", "provision", "agents", "credentials", "keys"],
                                   "help": "a scope of the key (repeat for several)"}),
                      ("--agent", {"action": "append", "type": int, "dest": "agents", "metavar": "ID",
                                   "help": "only this agent (repeatable; default: every agent)"}),
                      ("--expires-at", {"metavar": "TIME", "help": "RFC 3339, e.g. 2027-01-31T00:00:00Z"})),
                make_body=lambda args: {"name": args.name, "scopes": args.scopes, "agents": args.agents,
                                        "expires_at": args.expires_at}),
    UserCommand(("keys", "revoke"), "revoke_api_key", "revoke a key: refused at its next request everywhere",
                _said(lambda _result, args: f"key {args.key} revoked"),
                json=lambda _result, args: {"revoked": args.key}),
    # issue 18
    UserCommand(("events", "list"), "list_events", "your events after an id (--after), oldest first",
                _events_text),
    UserCommand(("events", "tail"), "list_events", "follow your events as they happen (Ctrl-C ends)",
                lambda _result, _args: 0, run=_tail, json=lambda _result, _args: None),
    # --- webhooks (issue 18)
    UserCommand(("webhooks", "list"), "list_webhooks", "list your webhooks", _webhooks_text),
    UserCommand(("webhooks", "show"), "get_webhook", "one webhook", lambda hook, args: _webhooks_text([hook], args)),
    UserCommand(("webhooks", "create"), "create_webhook", "create a webhook (its secret is printed once)",
                _new_webhook_text,
                body=(*_WEBHOOK_ARGUMENTS, ("webhook_url", {"metavar": "URL", "help": "http(s) URL for the events"})),
                make_body=lambda args: _webhook_body(args, new=True)),
    UserCommand(("webhooks", "update"), "update_webhook", "change a webhook (only what you give changes)",
                lambda hook, args: _webhooks_text([hook], args),
                body=(*_WEBHOOK_ARGUMENTS, ("--set-url", {"dest": "webhook_url", "metavar": "URL",
                                                                 "help": "a new http(s) URL"}),
                      ("--all-agents", {"action": "store_true", "help": "deliver every agent's events"}),
                      ("--all-events", {"action": "store_true", "help": "deliver every event type"})),
                make_body=lambda args: _webhook_body(args, new=False)),
    UserCommand(("webhooks", "delete"), "delete_webhook", "delete a webhook and its pending deliveries",
                _said(lambda _result, args: f"webhook {args.webhook} deleted"),
                json=lambda _result, args: {"deleted": args.webhook}),
    UserCommand(("webhooks", "rotate-secret"), "rotate_webhook_secret", "give a webhook a new secret (printed once)",
                _new_webhook_text),
    UserCommand(("webhooks", "deliveries"), "list_webhook_deliveries", "a webhook's deliveries and their attempts",
                _deliveries_text),
)

# ---------------------------------------------------------------------- the parser


def _remote_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--url`` and friends, before the command or after it (``default``: SUPPRESS after it, so a
    value given before is kept)."""
    group = parser.add_argument_group("remote use (docs/client.md)")
    group.add_argument("--url", default=default, help="the portal's URL: run through its HTTP API (default: "
                                                      "MANAGEMENT_URL, then the configuration file)")
    group.add_argument("--api-key", default=default, help="your API key (default: MANAGEMENT_API_KEY, then the "
                                                          "configuration file; on the command line other local "
                                                          "users may see it)")
    group.add_argument("--ca-file", default=default, help="CA certificate(s) to verify the portal's TLS certificate "
                                                          "with (default: MANAGEMENT_CA_FILE, the system's CAs)")
    group.add_argument("--timeout", type=float, default=default, metavar="SECONDS",
                       help="time-out of each request to the portal (default 30; --wait adds its own)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manage-playrservers", description="PlayrServers QEMU Management Portal",
        epilog="exit codes: " + "; ".join(f"{code} {text}" for code, text in remote.EXIT_CODES))
    _remote_options(parser, None)
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
                       ("keys", "your API keys and their scopes (needs MANAGEMENT_API_KEY)"),
                       ("pools", "storage pools of an agent (needs MANAGEMENT_API_KEY)"),
                       ("volumes", "volumes of a storage pool (needs MANAGEMENT_API_KEY)"),
                       ("networks", "libvirt networks of an agent (needs MANAGEMENT_API_KEY)"),
                       ("events", "what happened on your agents and VMs (needs MANAGEMENT_API_KEY)"),
                       ("webhooks", "signed deliveries of your events to your URLs (needs MANAGEMENT_API_KEY)")):
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
        _remote_options(one, argparse.SUPPRESS)
        one.set_defaults(user_command=command, words=command.words)
    # --- consoles (issue 17)
    console = groups[("vms",)].add_parser(
        "console", help="attach this terminal to a VM's serial console through the portal's HTTP API (Ctrl-] "
                        "detaches); needs MANAGEMENT_API_KEY, and the portal's URL in --url or MANAGEMENT_URL")
    console.add_argument("agent", type=int, help="agent id")
    console.add_argument("vm", help="VM name")
    _remote_options(console, argparse.SUPPRESS)  # default: MANAGEMENT_URL, the config file, else this host's portal
    console.set_defaults(handler=_vms_console, anywhere=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from entrypoints.client import ApiError, TransportError

    try:
        command: UserCommand | None = getattr(args, "user_command", None)
        if command is not None:
            choice = remote.choose(args, os.environ)
            if choice.target is not None:
                return _run_remote(command, args, choice.target)
            return _run_local(command, args, Settings.from_env(), choice.api_key)
        asked = remote.explicit_url(args, os.environ)
        if asked is not None and not getattr(args, "anywhere", False):
            words = " ".join(w for w in (args.command, getattr(args, "action", None)) if w)
            print(f"error: '{words}' is an operator command: it runs only on the portal host, against its database, "
                  f"never through the HTTP API; unset {asked} to run it here", file=sys.stderr)
            return remote.EXIT_USAGE
        handler: Handler = args.handler
        return handler(args, Settings.from_env())
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return remote.EXIT_USAGE
    except PortalError as error:
        from entrypoints.http.errors import status_of

        print(f"error: {error.code}: {' '.join(error.detail.splitlines())}", file=sys.stderr)
        return remote.exit_code(error.status if isinstance(error, ApiError) else status_of(error))
    except TransportError as error:
        print(f"error: {error}", file=sys.stderr)
        return remote.EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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


# ---------------------------------------------------------------------- consoles (issue 17)


def _vms_console(args: argparse.Namespace, settings: Settings) -> int:
    """``vms console AGENT VM``: works from any machine that reaches the portal's HTTP API."""
    import asyncio

    from entrypoints.console_client import ConsoleError, attach_terminal

    choice = remote.choose(args, os.environ)  # --url, MANAGEMENT_URL or the config file, as every user command
    api_key = choice.api_key
    if not api_key:
        raise ConfigError("MANAGEMENT_API_KEY", "set it (or --api-key, or api_key in the configuration file) to "
                                                "your API key")
    url = choice.target.url if choice.target is not None else f"http://127.0.0.1:{settings.port}"
    try:
        ended = asyncio.run(attach_terminal(url, api_key, args.agent, args.vm))
    except ConsoleError as error:
        print(f"error: {error.code}: {error.detail}", file=sys.stderr)
        return 1
    print(f"console of {args.vm}: {ended}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

