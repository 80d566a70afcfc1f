"""`appliance reload`: have the running appliance re-read its config file (a SIGHUP), and say how it went.

The file is validated here first (main.py builds Settings from it), so a broken file is reported with its
line without bothering the server; the server validates again with its own environment and writes the
outcome to ``data_dir/reload.status.json``, which this command waits for.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from appliance.common.config import Settings
from appliance.core import reload
from appliance.server.runner import running_pid

EXIT_FAILED, EXIT_CONFIG = 1, 2
WAIT_S = 10.0


def run(settings: Settings) -> int:
    pid = running_pid(settings.data_dir)
    if pid is None:
        print(f"appliance: no appliance is running with data dir {settings.data_dir}", file=sys.stderr)
        return EXIT_FAILED
    before = (reload.read_snapshot(settings.data_dir, reload.STATUS) or {}).get("at")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status = reload.read_snapshot(settings.data_dir, reload.STATUS)
        if status is not None and status.get("at") != before:
            return _report(status)
        time.sleep(0.05)
    print(f"appliance: pid {pid} did not answer the reload within {WAIT_S:g} s; see its log", file=sys.stderr)
    return EXIT_FAILED


def _report(status: dict[str, object]) -> int:
    if status.get("error"):
        print(f"appliance: config not reloaded, the running one stays: {status['error']}", file=sys.stderr)
        return EXIT_CONFIG
    if status.get("reloaded"):
        print(f"reloaded (generation {status['generation']})")
    else:
        print("no change: the file says what already runs")
    restart = status.get("restart_required") or []
    if restart:
        print(f"needs a restart to take effect: {', '.join(restart)}")  # type: ignore[arg-type]
    return 0
