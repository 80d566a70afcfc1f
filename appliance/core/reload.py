"""Config hot reload: re-read the config file, validate it, and swap it into every worker.

Whoever asks (the main process on SIGHUP, a worker on POST /admin/reload) validates the file and, when it
is good, publishes it: its text goes to ``data_dir/reload.json`` and a generation number in shared memory
goes up. Each worker watches that number and applies the published text; a worker that starts later
(one the watchdog replaced) starts from it. Every worker parses the same text with the same environment
(they inherit the main process's), so they all end up with the same settings; an invalid file is
refused where it was asked for and the running config stays.

What only a restart can change (the listener, the workers, the data dir: ``config_file.RESTART_ONLY``) keeps
its running value; the answer names those keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from appliance.common.config import ConfigError, Settings
from appliance.common.config_file import keep_restart_only, load_settings, read_text, restart_only_changes
from appliance.storage.shared_rows import SharedRows

log = logging.getLogger("appliance.core.reload")

SNAPSHOT = "reload.json"
STATUS = "reload.status.json"  # the last request's outcome, for `appliance reload` (it cannot see the board)
WATCH_INTERVAL_S = 0.1


class _Row(ctypes.Structure):
    _fields_ = [("generation", ctypes.c_int64)]


class Board:
    """Row 0: the published generation; row 1 + i: the generation worker i has applied."""

    def __init__(self, workers: int, *, shared: bool = True) -> None:
        self.workers = workers
        self._rows = SharedRows(_Row, workers + 1, shared=shared)

    @property
    def published(self) -> int:
        return int(self._rows.slots[0].generation)

    def publish(self) -> int:
        with self._rows.lock:
            self._rows.slots[0].generation += 1
            return int(self._rows.slots[0].generation)

    def applied(self, worker: int, generation: int) -> None:
        self._rows.slots[1 + worker].generation = generation

    def lagging(self, generation: int) -> list[int]:
        """The workers that have not applied ``generation`` yet."""
        return [i for i in range(self.workers) if self._rows.slots[1 + i].generation < generation]


@dataclass(frozen=True, slots=True)
class Outcome:
    generation: int
    restart_required: list[str]  # keys that changed but keep their running value until a restart
    changed: bool  # False: the file says what already runs


def settings_from(running: Settings, text: str) -> Settings:
    """``text`` as the config file's new content, over what runs: restart-only settings keep their value."""
    return keep_restart_only(running, load_settings(running.config_file, text=text))


def request(running: Settings, board: Board) -> Outcome:
    """Validate the config file and publish it (ConfigError, naming file, line and key, when it is wrong).

    Either way the outcome goes to ``data_dir/reload.status.json``.
    """
    try:
        outcome = _request(running, board)
    except ConfigError as exc:
        _write(running.data_dir / STATUS, {"at": time.time(), "error": str(exc)})
        raise
    _write(running.data_dir / STATUS, {"at": time.time(), "error": None, "generation": outcome.generation,
                                       "reloaded": outcome.changed, "restart_required": outcome.restart_required})
    return outcome


def _request(running: Settings, board: Board) -> Outcome:
    if running.config_file is None:
        raise ConfigError("the appliance runs without a config file: nothing to reload")
    text = read_text(running.config_file)
    fresh = load_settings(running.config_file, text=text)  # the whole file, restart-only keys included
    restart = restart_only_changes(running, fresh)
    with _lock(running.data_dir):
        current = latest(running, board)
        new = settings_from(running, text)
        if new == current:
            return Outcome(board.published, restart, changed=False)
        generation = board.published + 1
        _write(running.data_dir / SNAPSHOT, {"generation": generation, "config_file": str(running.config_file),
                                             "text": text, "at": time.time()})
        board.publish()
    log.info("config reloaded from %s (generation %d)%s", running.config_file, generation,
             f"; needs a restart to change: {', '.join(restart)}" if restart else "")
    return Outcome(generation, restart, changed=True)


def latest(running: Settings, board: Board) -> Settings:
    """The settings a worker should run: the last published ones, else those it was started with."""
    if board.published == 0:
        return running
    snapshot = read_snapshot(running.data_dir)
    if snapshot is None:
        return running
    return settings_from(running, snapshot["text"])


def read_snapshot(data_dir: Path, name: str = SNAPSHOT) -> dict[str, Any] | None:
    try:
        return orjson.loads((data_dir / name).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def clear(data_dir: Path) -> None:
    """At start (main process, holding the data dir lock): a new run starts from its own config."""
    for name in (SNAPSHOT, STATUS):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / name).unlink()


async def watch(board: Board, worker: int, started_with: Settings, apply: Callable[[Settings], None]) -> None:
    """A worker's task: apply each published generation, in turn."""
    seen = board.published
    board.applied(worker, seen)
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        published = board.published
        if published == seen:
            continue
        try:
            apply(latest(started_with, board))
        except ConfigError as exc:  # the file was valid where it was asked for; never here, but say so
            log.error("config generation %d not applied: %s", published, exc)
        seen = published
        board.applied(worker, seen)


async def wait_applied(board: Board, generation: int, timeout_s: float = 5.0) -> list[int]:
    """Wait until every worker applied ``generation``; the ones still behind after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (behind := board.lagging(generation)) and time.monotonic() < deadline:
        await asyncio.sleep(WATCH_INTERVAL_S / 2)
    return behind


def _write(path: Path, document: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold secrets (${VAR} unresolved)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(document))
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(data_dir: Path):  # type: ignore[no-untyped-def]
    """One publisher at a time, whichever process asks."""
    fd = os.open(data_dir / "reload.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
