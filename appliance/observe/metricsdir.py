"""Where the workers' Prometheus samples live: set up by the main process before prometheus_client loads.

prometheus_client picks its multiprocess value class when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``; so the CLI calls ``use`` before importing the server. Each run gets its own
folder under ``base(data_dir)`` (a second appliance refused by the data dir lock touches nothing of the
running one's, and a pid reused after a restart finds no old file); the run that holds the lock removes
the others (``remove_stale``). Workers inherit the variable; they never clear anything.

The samples live in memory (/dev/shm) where the host has it, not on the data disk: prometheus_client
writes them through mmap into sparse files, and a page first touched while that disk is full kills the
process with SIGBUS (seen: a worker died as soon as the data dir's filesystem filled up).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER = "metrics"
SHARED_MEMORY = Path("/dev/shm")


def base(data_dir: Path, memory: Path = SHARED_MEMORY) -> Path:
    """The folder of every run on ``data_dir``: one per data dir in ``memory`` when it is writable, else on disk."""
    if memory.is_dir() and os.access(memory, os.W_OK | os.X_OK):
        digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
        return memory / f"appliance-metrics-{digest}"
    return data_dir / FOLDER


def use(data_dir: Path) -> Path:
    """Main process, before anything imports prometheus_client: this run's folder, made and exported."""
    path = base(data_dir) / f"run-{os.getpid()}-{time.time_ns()}"
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
    """A run that stopped, or never served (the data dir was taken): leave no folder behind."""
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only if no other run's folder is in it
