"""The command line: serve, check-config, version.

Thin on purpose: parse arguments, build Settings, call into the layers below. Heavy imports (the web
server) happen only once a command needs them, so `appliance --help` stays fast, frozen too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from appliance import __version__

if TYPE_CHECKING:
    from appliance.config import Settings

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

    commands.add_parser("version", help="print the version")
    return parser


def _settings(args: argparse.Namespace, config_file: str | None = None) -> Settings:
    from appliance.config import load_settings

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
    # Imported here, not at the top: building the pydantic models costs ~0.2 s that --help and version
    # need not pay (nor, from source, Sanic's SyncManager child, which re-imports appliance.__main__).
    from appliance.config import ConfigError

    try:
        settings = _settings(args, getattr(args, "file", None))
    except ConfigError as exc:
        print(f"appliance: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(json.dumps(settings.masked(), indent=2))
        return 0
    return _serve(settings)


def _serve(settings: Settings) -> int:
    from appliance.server.runner import AlreadyRunning, serve
    from appliance.storage.migrate import SchemaError

    try:
        serve(settings)
    except AlreadyRunning as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except SchemaError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. the port is taken
        print(f"appliance: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
