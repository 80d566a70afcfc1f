"""Where the workers' Prometheus samples live: set up by the main process before prometheus_client loads.

prometheus_client picks its multiprocess value class when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``; so the CLI calls ``use`` before importing the server. Each run gets its own
folder under ``<data_dir>/metrics`` (a second appliance refused by the data dir lock touches nothing of
the running one's, and a pid reused after a restart finds no old file); the run that holds the lock
removes the others (``remove_stale``). Workers inherit the variable; they never clear anything.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER = "metrics"


def use(data_dir: Path) -> Path:
    """Main process, before anything imports prometheus_client: this run's folder, made and exported."""
    path = data_dir / FOLDER / f"run-{os.getpid()}-{time.time_ns()}"
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    return path


def remove_stale() -> None:
    """Main process, holding the data dir lock: drop the folders earlier runs left (killed ones too)."""
    current = os.environ.get(ENV)
    if not current:
        return
    ours = Path(current)
    for entry in ours.parent.glob("run-*"):
        if entry != ours:
            shutil.rmtree(entry, ignore_errors=True)


def discard(path: Path) -> None:
    """A run that never served (the data dir was taken): leave no folder behind."""
    shutil.rmtree(path, ignore_errors=True)
