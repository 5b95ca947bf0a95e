"""The command line, for the operator on the portal host: ``manage-playrservers``.

    manage-playrservers serve                          run the server (same as python main.py)
    manage-playrservers users create --name N [--email E]
    manage-playrservers users list [--json]
    manage-playrservers users rotate-key (--id N | --email E)
    manage-playrservers db upgrade | db version | db backup PATH
    manage-playrservers secret-key                     print a new value for MANAGEMENT_SECRET_KEY

It reads the same ``MANAGEMENT_*`` variables as the server. Errors print ``error: <code>: <detail>``
and exit 1; configuration errors name the variable and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from core.errors import PortalError
from entrypoints.settings import ConfigError, Settings
from entrypoints.shapes import UserView, UserWithKeyView, dump


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
    db.add_parser("upgrade", help="migrate the database schema to the latest version")
    db.add_parser("version", help="print the schema version")
    backup = db.add_parser("backup", help="copy a consistent snapshot (SQLite online backup), safe while serving")
    backup.add_argument("path")

    commands.add_parser("secret-key", help="print a new random value for MANAGEMENT_SECRET_KEY")
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
    return _users(args, settings)


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.sql import migrations
    from entrypoints.bootstrap import open_storage

    storage = open_storage(settings, migrate=args.action != "version")
    try:
        if args.action == "upgrade":
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
            users = portal.list_users()
            if args.json:
                _print_json([UserView.of(u) for u in users])
            else:
                print(f"{'ID':>5}  {'NAME':<24} {'EMAIL':<32} KEY PREFIX")
                for user in users:
                    print(f"{user.id:>5}  {user.name[:24]:<24} {(user.email or '-')[:32]:<32} {user.api_key_prefix}")
        else:
            user = portal.find_user(user_id=args.id, email=args.email)
            api_key = library.login_as(user).rotate_api_key()
            _print_json(UserWithKeyView.with_key(portal.find_user(user_id=user.id), api_key))
    return 0


def _print_json(value: Any) -> None:
    print(json.dumps(dump(value), indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
