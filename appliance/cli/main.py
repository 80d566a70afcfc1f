"""The command line: serve, check-config, reload, keys, templates, usage, batches, backup, version.

Thin on purpose: parse arguments, build Settings, call into the layers below. Heavy imports (the web
server) happen only once a command needs them, so `appliance --help` stays fast, frozen too.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.cli import templates as templates_cli

if TYPE_CHECKING:
    from appliance.common.config import Settings

EXIT_CONFIG = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (env: APPLIANCE_CONFIG)")
    parser.add_argument("--data-dir", metavar="DIR", help="database and files folder (env: APPLIANCE_DATA_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="A self-hosted LLM gateway: one OpenAI-compatible endpoint for your model servers.",
        epilog="Run 'appliance COMMAND --help' for a command's options. Docs: README.md.",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway (zero config: finds local model servers)")
    _common(serve)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8100)")
    serve.add_argument("--workers", type=int, help="worker processes (default: CPU count)")
    serve.add_argument("--single-process", action="store_true", default=None,
                       help="serve from one process, no workers (tiny hosts)")

    check = commands.add_parser("check-config", help="validate a config and print it resolved (secrets masked)")
    check.add_argument("file", nargs="?", metavar="FILE", help="config file (same as --config)")
    _common(check)

    _add_key_commands(commands)

    usage = commands.add_parser("usage", help="requests, tokens and cost from the ledger")
    _common(usage)
    usage.add_argument("--key", metavar="ID", help="only this key")
    usage.add_argument("--model", help="only this model (as requested)")
    usage.add_argument("--from", dest="start", metavar="DAY", help="first UTC day, YYYY-MM-DD")
    usage.add_argument("--to", dest="end", metavar="DAY", help="last UTC day, YYYY-MM-DD")
    usage.add_argument("--group-by", choices=("day", "model", "key"), default="day")
    usage.add_argument("--json", action="store_true", help="print JSON")

    _add_batch_commands(commands)
    templates_cli.add_commands(commands, _common)

    backup = commands.add_parser("backup", help="copy the database to FILE, safely, also while serving")
    backup.add_argument("target", metavar="FILE")
    _common(backup)

    reload = commands.add_parser("reload", help="have the running appliance re-read its config file")
    _common(reload)

    commands.add_parser("version", help="print the version")
    return parser


def _add_batch_commands(commands: Any) -> None:
    batches = commands.add_parser("batches", help="list, show and cancel batches (works while the server runs)")
    actions = batches.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="batches, newest first, with their progress")
    _common(listing)
    listing.add_argument("--key", metavar="ID", help="only this key's batches")
    listing.add_argument("--status", help="only batches in this status (validating, in_progress, completed...)")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print the Batch objects as JSON")
    for action, text in (("show", "one batch, as its Batch object (JSON)"),
                         ("cancel", "cancel a validating or in-progress batch")):
        command = actions.add_parser(action, help=text)
        command.add_argument("id")
        _common(command)


def _add_key_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="create and manage API keys (works while the server runs)")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key and print its secret (shown once)")
    _common(create)
    create.add_argument("--name", required=True)
    _key_fields(create)
    update = actions.add_parser("update", help="change a key's settings")
    update.add_argument("id")
    _common(update)
    update.add_argument("--name")
    _key_fields(update)
    listing = actions.add_parser("list", help="list keys (prefixes only: secrets are not stored)")
    _common(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (("show", "show one key"), ("disable", "stop a key from working"),
                         ("enable", "let a disabled key work again"),
                         ("rotate", "give a key a new secret (printed once); the old one stops working"),
                         ("delete", "delete a key")):
        command = actions.add_parser(action, help=text)
        command.add_argument("id")
        _common(command)


def _key_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=("admin", "user", "read-only"))
    parser.add_argument("--models", action="append", metavar="GLOB",
                        help="allowed models, glob patterns (repeat or comma-separate; default all)")
    parser.add_argument("--endpoints", action="append", metavar="GLOB",
                        help="allowed paths, e.g. '/v1/chat/*' (default: all but /admin)")
    parser.add_argument("--guardrails", action="append", metavar="NAMES",
                        help="guardrails for every request of the key: pii, content_moderation, schema_validation "
                        "(repeat or comma-separate; '' clears them)")
    parser.add_argument("--expires", metavar="WHEN", help="expiry: ISO date-time (UTC) or unix seconds")
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute")
    parser.add_argument("--max-concurrent", type=int, help="requests in flight")
    parser.add_argument("--budget-usd", type=float, help="USD per budget period")
    parser.add_argument("--budget-tokens", type=int, help="tokens per budget period")
    parser.add_argument("--budget-period", choices=("day", "week", "month"))
    parser.add_argument("--budget-counts", choices=("price", "compute", "both"),
                        help="what --budget-usd counts: token prices (default), compute cost, or both")
    parser.add_argument("--weight", type=float, help="share when requests wait for a backend at capacity "
                        "(default: [admission] default_weight)")
    parser.add_argument("--metadata", metavar="JSON", help="a JSON object kept with the key")
    parser.add_argument("--upstream-key", action="append", metavar="BACKEND",
                        help="give the key its own API key for BACKEND, read from standard input (one line per "
                        "flag; asked for on a terminal), never from the command line")
    parser.add_argument("--remove-upstream-key", action="append", metavar="BACKEND",
                        help="remove the key's own API key for BACKEND")


def _settings(args: argparse.Namespace, config_file: str | None = None) -> Settings:
    from appliance.common.config_file import load_settings

    server: dict[str, Any] = {"data_dir": args.data_dir}
    for name in ("host", "port", "workers", "single_process"):
        server[name] = getattr(args, name, None)
    return load_settings(config_file or args.config, overrides={"server": server})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "version":
        print(f"appliance {__version__}")
        return 0
    if args.command == "serve":
        gc.disable()  # start-up builds objects that live as long as the process: runner.serve freezes them
    # Imported here, not at the top: building the pydantic models costs ~0.2 s that --help and version
    # need not pay (nor, from source, Sanic's SyncManager child, which re-imports appliance.__main__).
    from appliance.common.config import ConfigError

    try:
        settings = _settings(args, getattr(args, "file", None))
    except ConfigError as exc:
        print(f"appliance: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(json.dumps(settings.masked(), indent=2))
        from appliance.cli import engines

        return 0 if engines.check(settings) else EXIT_CONFIG
    if args.command == "serve":
        return _serve(settings)
    if args.command == "reload":
        from appliance.cli import reload

        return reload.run(settings)
    from appliance.cli import admin as admin_cli

    return admin_cli.run(args, settings)


def _serve(settings: Settings) -> int:
    from appliance.observe import metricsdir

    try:
        metrics_dir = metricsdir.use(settings.data_dir)  # before the server's imports load prometheus_client
    except OSError as exc:
        print(f"appliance: cannot start: {exc}", file=sys.stderr)
        return 1
    from appliance.server.runner import AlreadyRunning, serve
    from appliance.storage.migrate import SchemaError

    try:
        serve(settings)
    except AlreadyRunning as exc:
        metricsdir.discard(metrics_dir)  # the running appliance's folder is another one: untouched
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except SchemaError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. the port is taken
        print(f"appliance: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
