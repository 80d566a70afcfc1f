#!/usr/bin/env python3
"""Where a start from source goes, phase by phase (issue 14, point 11).

    .venv/bin/python tests/perf/startup_phases.py [--runs 3] [--workers 2]

startup.py times the whole start (exec to the first 200 on /health) of both forms; this runs `appliance serve`
from source with the start-up's steps wrapped and prints when each one ended, in ms since the interpreter
began running this file: the CLI's imports, the settings (pydantic), the server's imports, the migrations, the
shared tables, the app, then in each forked worker Sanic's own start (signals, routers, TouchUp) and the
appliance's open_gateway. No backends, discovery off, a fresh data dir each run. The one-file binary adds
the bootloader's unpacking in front of all this (tests/perf/README.md, "Start-up", for how to time it).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent.parent


def _mark(what: str) -> None:
    print(f"{(time.perf_counter() - STARTED) * 1000:8.1f} ms  [{os.getpid()}] {what}", file=sys.stderr, flush=True)


def _timed(owner: Any, name: str, label: str) -> None:
    """Replace ``owner.name`` with a wrapper that marks when it ended and how long it took."""
    original = getattr(owner, name)
    if asyncio.iscoroutinefunction(original):
        @functools.wraps(original)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            result = await original(*args, **kwargs)
            _mark(f"{label} ({(time.perf_counter() - began) * 1000:.1f} ms)")
            return result
        setattr(owner, name, timed_async)
        return

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        result = original(*args, **kwargs)
        _mark(f"{label} ({(time.perf_counter() - began) * 1000:.1f} ms)")
        return result
    setattr(owner, name, timed)


def serve(argv: list[str]) -> int:
    """`appliance serve` with its phases marked (runs in the measured process)."""
    sys.path.insert(0, str(REPO))
    from appliance.cli import main as cli

    _mark("CLI imported")
    serve_settings = cli._serve

    def marked_serve(settings: Any) -> int:
        _mark("settings loaded (config module and pydantic models)")
        import sanic
        import sanic.touchup

        from appliance.server import lifecycle, runner
        _mark("server modules imported (Sanic, aiohttp, the app's modules)")
        for name in ("migrate_database", "prepare_keys", "SharedTable", "BackendTable", "QueueTable", "create_app"):
            _timed(runner, name, name)
        _timed(sanic.Sanic, "serve", "Sanic.serve returned (the run ended)")
        for name in ("signalize", "finalize"):
            _timed(sanic.Sanic, name, f"worker: Sanic.{name}")
        _timed(sanic.touchup.TouchUp, "run", "worker: Sanic's TouchUp")
        _timed(lifecycle, "open_gateway", "worker: open_gateway")
        _timed(lifecycle, "mark_serving", "worker: serving")
        return serve_settings(settings)

    cli._serve = marked_serve
    return cli.main(argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def run_once(python: str, workers: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="appliance-phases-"))
    port = _free_port()
    config = work / "appliance.toml"
    config.write_text(f"[server]\nport = {port}\n[discovery]\nenabled = false\n")
    args = ["--workers", str(workers)] if workers > 1 else ["--single-process"]
    env = {**os.environ, "TMPDIR": str(work)}
    began = time.perf_counter()
    proc = subprocess.Popen([python, __file__, "--serve", "serve", "--config", str(config), "--data-dir",
                             str(work / "data"), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = began + 30
        while not _answers(f"http://127.0.0.1:{port}/health"):
            if time.perf_counter() > deadline or proc.poll() is not None:
                raise SystemExit(f"no 200 on /health; stderr:\n{proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(0.01)
        first = time.perf_counter() - began
        time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n# exec to the first 200 on /health: {first * 1000:.0f} ms (as seen by the poller)")
    for line in err.splitlines():
        if " ms  [" in line and "returned (the run ended)" not in line:
            print(line)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the appliance")
    a = parser.parse_args()
    for _ in range(a.runs):
        run_once(a.python, a.workers)


if __name__ == "__main__":
    main()
