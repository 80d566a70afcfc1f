"""The keys, templates, usage, batches and backup commands: the admin API's operations, on the data dir directly.

They work while the server runs (SQLite in WAL mode, or the ``[database]`` PostgreSQL; key changes reach the
workers within ``auth.cache_ttl_s``). Errors print the same messages the admin API returns.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import sys
from typing import Any

from appliance.accounts import auth, reports
from appliance.accounts.credentials import Vault
from appliance.cli import batches as batches_cli
from appliance.cli import templates as templates_cli
from appliance.common.config import Settings, masked_url
from appliance.common.errors import GatewayError
from appliance.common.resources import migrations_dir
from appliance.storage import db as storage
from appliance.storage.engine import migrate_database, open_database
from appliance.storage.migrate import SchemaError, database_path

EXIT_FAILED = 1
_FIELDS = ("name", "role", "rpm", "tpm", "max_concurrent", "budget_usd", "budget_tokens", "budget_period",
           "budget_counts", "weight")
_LISTED = ("id", "name", "role", "prefix", "enabled", "models", "rpm", "tpm", "budget_usd", "budget_period",
           "budget_counts", "weight", "expires_at", "upstream_keys")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "backup" and settings.database.url:
        # PostgreSQL's own tools make a consistent copy of a live database; a half-faked one would not.
        print(f"appliance: the database is PostgreSQL ({masked_url(settings.database.url)}): back it up with "
              "pg_dump (e.g. pg_dump -Fc -f appliance.dump DBNAME); `appliance backup` copies SQLite only",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        migrate_database(settings.data_dir, settings.database.url, migrations_dir())
    except SchemaError as exc:  # e.g. PostgreSQL unreachable, or a database newer than this appliance
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "backup":
        path = database_path(settings.data_dir)
        try:
            storage.backup(path, args.target)
        except OSError as exc:
            print(f"appliance: backup failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"backed up {path} to {args.target}")
        return 0
    try:
        fields = _fields(args) if args.command == "keys" and args.action in ("create", "update") else {}
        return asyncio.run(_run(args, settings, fields))
    except GatewayError as exc:
        where = f" ({exc.param})" if exc.param else ""
        print(f"appliance: {exc.message}{where}", file=sys.stderr)
        return EXIT_FAILED


async def _run(args: argparse.Namespace, settings: Settings, fields: dict[str, Any]) -> int:
    db = await open_database(settings.data_dir, settings.database)
    try:
        if args.command == "usage":
            rows = await reports.report(db, key_id=args.key, model=args.model, start=args.start, end=args.end,
                                        group_by=args.group_by)
            _print_rows(rows, as_json=args.json)
            return 0
        if args.command == "batches":
            return await batches_cli.run(db, args)
        if args.command == "templates":
            return await templates_cli.run(db, args)
        return await _keys(db, args, settings, fields)
    finally:
        await db.close()


async def _keys(db: storage.Database, args: argparse.Namespace, settings: Settings, fields: dict[str, Any]) -> int:
    action = args.action
    # Upstream keys may name the configured backends (the CLI does not see what a server discovered).
    upstream: dict[str, Any] = {"vault": Vault(settings.data_dir), "backends": [b.name for b in settings.backends]}
    if action == "create":
        row, secret = await auth.create_key(db, fields, slots=settings.limits.key_slots, **upstream)
        _print_secret(row, secret)
    elif action == "rotate":
        row, secret = await auth.rotate_key(db, args.id)
        _print_secret(row, secret)
    elif action == "list":
        rows = [auth.public_view(row) for row in await auth.list_keys(db)]
        _print_rows([{k: row[k] for k in _LISTED} for row in rows] if not args.json else rows, as_json=args.json)
    elif action == "show":
        print(json.dumps(auth.public_view(await auth.get_key(db, args.id)), indent=2))
    elif action in ("enable", "disable"):
        row = await auth.update_key(db, args.id, {"enabled": action == "enable"})
        print(f"{row['id']} {action}d")
    elif action == "update":
        print(json.dumps(auth.public_view(await auth.update_key(db, args.id, fields, **upstream)), indent=2))
    elif action == "delete":
        await auth.delete_key(db, args.id)
        print(f"{args.id} deleted")
    return 0


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as admin API fields (absent flags: defaults on create, unchanged on update)."""
    fields = {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}
    for name in ("models", "endpoints", "guardrails"):
        given = getattr(args, name)
        if given:
            fields[name] = [p.strip() for item in given for p in item.split(",") if p.strip()]
    if args.expires:
        fields["expires_at"] = _timestamp(args.expires)
    if args.metadata:
        try:
            fields["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise GatewayError("invalid_value", f"--metadata is not JSON: {exc}", param="metadata") from None
    upstream: dict[str, str | None] = {backend: _read_secret(backend) for backend in args.upstream_key or ()}
    upstream.update(dict.fromkeys(args.remove_upstream_key or ()))
    if upstream:
        fields["upstream_keys"] = upstream
    return fields


def _read_secret(backend: str) -> str:
    """One backend's secret from standard input: asked for (not echoed) on a terminal, else its next line."""
    if sys.stdin.isatty():
        return getpass.getpass(f"API key for backend {backend!r}: ").strip()
    line = sys.stdin.readline()
    if not line.strip():
        raise GatewayError("missing_field", f"--upstream-key {backend}: no key on standard input (one line per "
                           "--upstream-key).", param=f"upstream_keys.{backend}")
    return line.strip()


def _timestamp(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise GatewayError("invalid_value", "--expires takes an ISO date-time or unix seconds.",
                           param="expires_at") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _print_secret(row: dict[str, Any], secret: str) -> None:
    print(f"id:   {row['id']}\nname: {row['name']}\nrole: {row['role']}\nkey:  {secret}\n")
    print("Store the key now: it is shown once and only its hash is kept.", file=sys.stderr)


def _print_rows(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float) and value > 1e9:  # a timestamp
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
    return str(value)
