"""`appliance templates create|list|show|add-version|delete`: on the data dir directly, also while the server runs.

A version's fields (messages, variables, description) come from a JSON or TOML file, or standard input
(``-`` or no ``--file``). Running workers see a new version within ``templates.cache_ttl_s`` and a delete
within ``templates.version_ttl_s``, as when another worker's admin API made the change.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.common.errors import GatewayError

if TYPE_CHECKING:
    from appliance.storage.db import Database


def add_commands(commands: Any, common: Any) -> None:
    """The ``templates`` subcommands (``common`` adds --config and --data-dir)."""
    group = commands.add_parser("templates", help="create and manage prompt templates (works while the server runs)")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a template (its version 1) from a JSON or TOML file")
    create.add_argument("id", help="the template's id: a slug like 'support' or 'summarize-v2'")
    add = actions.add_parser("add-version", help="add the next version of a template from a JSON or TOML file")
    add.add_argument("id")
    for command in (create, add):
        command.add_argument("--file", dest="source", metavar="FILE", default="-",
                             help="messages, variables and description as JSON or TOML ('-' or none: standard input)")
        common(command)
    listing = actions.add_parser("list", help="templates: id, latest version, description, times")
    listing.add_argument("--json", action="store_true", help="print JSON")
    common(listing)
    show = actions.add_parser("show", help="one version of a template as JSON (the latest unless --version)")
    show.add_argument("id")
    show.add_argument("--version", metavar="N", help="this version")
    show.add_argument("--all", action="store_true", help="every version")
    common(show)
    delete = actions.add_parser("delete", help="delete a template and all its versions")
    delete.add_argument("id")
    common(delete)


async def run(db: Database, args: argparse.Namespace) -> int:
    from appliance.core import templates  # here, not at the top: `appliance --help` stays light

    action = args.action
    if action == "create":
        created = await templates.create(db, {"id": args.id, **_read(args.source)})
        print(json.dumps(created, indent=2))
    elif action == "add-version":
        added = await templates.add_version(db, args.id, _read(args.source))
        print(json.dumps(added, indent=2))
    elif action == "list":
        rows = await templates.list_templates(db)
        _print(rows, as_json=args.json)
    elif action == "show":
        if args.all:
            print(json.dumps(await templates.versions(db, args.id), indent=2))
        else:
            print(json.dumps(await templates.get(db, args.id, templates.version_number(args.version)), indent=2))
    elif action == "delete":
        deleted = await templates.delete(db, args.id)
        print(f"{args.id} deleted ({deleted['versions']} version(s))")
    return 0


def _read(source: str) -> dict[str, Any]:
    """A version's fields from a file (TOML when it ends in .toml) or standard input (JSON, else TOML)."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise GatewayError("invalid_value", f"cannot read {source}: {exc.strerror}", param="--file") from None
    if source.endswith(".toml"):
        return _toml(text, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if source != "-":
            raise GatewayError("invalid_json", f"{source} is not JSON: {exc}", param="--file") from None
        return _toml(text, "standard input")
    if not isinstance(data, dict):
        raise GatewayError("invalid_value", f"{source}: expected an object with 'messages'.", param="--file")
    return data


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GatewayError("invalid_value", f"{source} is neither JSON nor TOML: {exc}", param="--file") from None


def _print(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    for row in rows:
        description = row["description"] or "-"
        print(f"{row['id']}  v{row['latest_version']}  {description}")
