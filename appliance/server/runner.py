"""Start the server: one appliance per data dir, migrations, workers or a single process, a watchdog."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import IO, Any

from sanic import Sanic
from sanic.mixins import startup
from sanic.worker.constants import ProcessState

from appliance.accounts import auth, reports
from appliance.accounts.limits import Limiter, SharedTable, table_size
from appliance.accounts.live_limits import RedisLimiter
from appliance.batches.runner import prepare_data_dir
from appliance.common.config import ConfigError, Settings
from appliance.common.resources import migrations_dir
from appliance.core import reload
from appliance.core.admission import QueueTable
from appliance.core.resilience import BackendTable
from appliance.observe import metrics, metricsdir
from appliance.server import lifecycle
from appliance.server.app import configure_logging, create_app
from appliance.storage.db import Database
from appliance.storage.engine import migrate_database, open_database
from appliance.storage.state import SharedState

log = logging.getLogger("appliance.server")

LOCK_FILE = "appliance.lock"
PID_FILE = "appliance.pid"


class AlreadyRunning(Exception):
    """Another appliance holds the data dir."""


@contextmanager
def data_dir_lock(data_dir: Path) -> Any:
    """Hold an exclusive lock on the data dir and publish our pid, for the process's lifetime."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        pid = _read_pid(data_dir / PID_FILE)
        owner = f" (pid {pid})" if pid else ""
        raise AlreadyRunning(
            f"another appliance is already running with data dir {data_dir}{owner}; "
            "stop it or pass a different --data-dir"
        ) from None
    pid_file = data_dir / PID_FILE
    pid_file.write_text(f"{_launcher_pid()}\n")
    try:
        yield
    finally:
        pid_file.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _launcher_pid() -> int:
    """The pid to signal: ours, or in the one-file binary the PyInstaller bootloader that started us
    (the process the user or systemd sees; it forwards signals to us and removes its _MEI* dir after)."""
    if getattr(sys, "frozen", False):
        try:
            if os.readlink(f"/proc/{os.getppid()}/exe") == os.readlink("/proc/self/exe"):
                return os.getppid()
        except OSError:
            pass
    return os.getpid()


def running_pid(data_dir: Path) -> int | None:
    """The pid of the appliance serving ``data_dir`` (None when none is: its lock is free)."""
    try:
        with open(data_dir / LOCK_FILE, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken: nobody holds it exclusively
            return None
    except BlockingIOError:
        return _read_pid(data_dir / PID_FILE)
    except OSError:
        return None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def serve(settings: Settings) -> None:
    configure_logging()
    if metricsdir.ENV not in os.environ:  # the CLI sets it before prometheus_client loads; see metricsdir
        log.warning("%s is not set: /metrics shows only the worker that answers", metricsdir.ENV)
    server = settings.server
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the reload handler is in place (children inherit it)
    with data_dir_lock(settings.data_dir):
        metricsdir.remove_stale()
        applied = migrate_database(settings.data_dir, settings.database.url, migrations_dir())
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        prepare_data_dir(settings)
        shared = not server.single_process  # one process needs no shared memory (nor its tracker process)
        table = SharedTable(table_size(settings), shared=shared)
        asyncio.run(prepare_keys(settings, table))
        board = reload.Board(1 if server.single_process else server.workers, shared=shared)
        reload.clear(settings.data_dir)  # a new run starts from its own config
        app = create_app(settings, table, BackendTable(shared=shared), time.time(), board, QueueTable(shared=shared))
        ssl = {"cert": str(server.tls_cert), "key": str(server.tls_key)} if server.tls_cert else None
        app.prepare(host=server.host, port=server.port, workers=1 if server.single_process else server.workers,
                    single_process=server.single_process, motd=False, access_log=False, ssl=ssl)
        scheme = "https" if ssl else "http"
        mode = "single process" if server.single_process else f"{server.workers} workers"
        log.info("appliance listening on %s://%s:%d (%s, data in %s)", scheme, server.host, server.port, mode,
                 settings.data_dir)
        # The CLI turned the collector off for the imports and the build (20-50 ms of collections over objects
        # that all stay). Frozen, no collection walks them again, and forked workers keep sharing their pages.
        gc.freeze()
        gc.enable()
        if server.single_process:
            _hold_early_signals(app)
            Sanic.serve_single(primary=app)
        else:
            app.main_process_ready(_relay_signals)
            app.main_process_ready(_start_watchdog)
            app.main_process_ready(partial(_reload_on_hangup, settings=settings, board=board))
            startup.Manager = _manager_that_stops_with_us
            _fork_workers()
            Sanic.serve(primary=app)  # each worker finds the app it inherited by name
        if metricsdir.ENV in os.environ:  # every worker has stopped: this run's samples (in memory) can go
            metricsdir.discard(Path(os.environ[metricsdir.ENV]))


def _fork_workers() -> None:
    """Workers are forked from this process, which has imported and built the app: a worker is serving
    in milliseconds, where a spawned one spent ~0.5 s of CPU importing it all again (more when frozen, where
    each re-ran the bootloader). Safe because nothing in this process holds a connection, loop or busy
    thread a worker could inherit half-done: each worker opens its own in open_gateway, after the fork.

    A worker must not inherit this process's signal handlers (they feed queues only this process reads):
    until Sanic and open_gateway install its own, a stop ends it and a reload is not its business.
    """
    Sanic.start_method = "fork"

    def reset_signals() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    os.register_at_fork(after_in_child=reset_signals)


def _manager_that_stops_with_us() -> SyncManager:
    """What Sanic.serve starts for its worker states, but ended by Linux when the main process dies.

    multiprocessing.Manager() takes no initializer, so a kill -9 of the main process left this one
    process behind (measured: one orphan per kill). Sanic is pinned; serve() looks up ``Manager`` in its
    own module at each call, which is where this is put.
    """
    manager = SyncManager(ctx=multiprocessing.get_context())
    manager.start(initializer=lifecycle.stop_with_parent)
    return manager


async def prepare_keys(settings: Settings, table: SharedTable) -> None:
    """Before the workers start: an admin key exists, and budgets carry what this period already spent."""
    db = await open_database(settings.data_dir, settings.database)
    try:
        generated = await auth.ensure_admin_key(db, os.environ.get("APPLIANCE_ADMIN_KEY"),
                                                slots=settings.limits.key_slots)
        if generated and settings.auth.mode == "keys":
            _announce(generated)
        if settings.state.url:
            await _seed_shared(settings, db)
            return
        limiter = Limiter(table, settings.limits.window_s)
        for scope, usd, tokens in await reports.budget_spend(db, time.time()):
            limiter.preload(scope, spent_usd=usd, spent_tokens=tokens)
    finally:
        await db.close()


async def _seed_shared(settings: Settings, db: Database) -> None:
    """[state] url: the period's spend goes to Redis once per period (the node that starts first seeds it; the
    others, and restarts, leave the live counters as they are), as a worker does when it reconnects."""
    state = SharedState.connect(settings.state)
    try:
        await reports.reseed_budgets(db, RedisLimiter(state, settings.limits.window_s))
    finally:
        await state.close()


def _announce(key: str) -> None:
    """The first admin key, shown once: only its hash is kept."""
    print(f"\n  Admin API key (shown once, store it now):\n\n    {key}\n\n"
          "  Create more with: appliance keys create --name NAME\n", file=sys.stderr, flush=True)


STARTUP_WAIT_S = 30.0


def _hold_early_signals(app: Sanic) -> None:
    """A stop that arrives while the single process is still starting must not kill it outright: note
    it; the worker's stop watcher (server/lifecycle.py) carries it out once the server runs."""

    def note(_signum: int, _frame: object) -> None:
        app.ctx.stop_requested = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, note)


def _relay_signals(app: Sanic) -> None:
    """Handle SIGTERM/SIGINT on a thread, not inside the signal handler's frame.

    Sanic's handler talks to its SyncManager over the same per-thread connection the main loop uses
    for worker state; a signal that lands mid-call (likely while workers start up) interleaves two
    requests on one connection and the main process waits forever. The relay thread has its own.
    """
    manager = app.manager
    received: queue.SimpleQueue[int] = queue.SimpleQueue()  # put() is safe inside a signal handler

    def started() -> bool:
        # Sanic's main thread must have left its startup wait (WorkerManager.wait_for_ack), not just have
        # every worker acknowledged: a stop that reaches that wait is re-queued forever once the workers
        # are TERMINATED (a busy hang, seen ~1 in 4 Ctrl-C right after start, frozen). Only the main
        # loop's _sync_states copies ACKED into process.state, so this is true only once it runs.
        return all(process.state >= ProcessState.ACKED for process in manager.transient_processes)

    def relay() -> None:
        while True:
            signum = received.get()
            # A worker interrupted half-way through its start never acknowledges and wedges Sanic's
            # startup wait; let the start finish (Sanic gives up on its own after 30 s), then stop.
            deadline = time.monotonic() + STARTUP_WAIT_S
            while not started() and time.monotonic() < deadline:
                time.sleep(0.05)
            if getattr(manager, "_shutting_down", False):
                log.warning("second %s: killing the workers", signal.Signals(signum).name)
                try:
                    manager.kill()
                finally:
                    os._exit(1)
            manager.shutdown_signal(signum, None)

    threading.Thread(target=relay, daemon=True, name="signal-relay").start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _frame: received.put(signum))


def _reload_on_hangup(app: Sanic, *, settings: Settings, board: reload.Board) -> None:
    """SIGHUP (and `appliance reload`): validate the config file and publish it to the workers, from a
    thread (a signal handler's frame is no place for file I/O and locks)."""
    asked: queue.SimpleQueue[int] = queue.SimpleQueue()

    def loop() -> None:
        while True:
            asked.get()
            try:
                reload.request(settings, board)
            except ConfigError as exc:
                log.error("config not reloaded, the running one stays: %s", exc)
            except Exception:
                log.exception("config reload failed")

    threading.Thread(target=loop, daemon=True, name="config-reload").start()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: asked.put(1))


WATCHDOG_INTERVAL_S = 1.0


def _start_watchdog(app: Sanic) -> None:
    """Respawn crashed workers: Sanic 25.12 leaves a worker that died as FAILED and never restarts it.

    Relies on WorkerManager internals (``_shutting_down``, the monitor message format), which is why
    Sanic is pinned; tests kill -9 a worker to hold it to that.
    """
    manager = app.manager
    restarted: dict[str, float] = {}  # name -> when we asked, so one death is not restarted twice

    def loop() -> None:
        while not getattr(manager, "_shutting_down", False):
            time.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            for process in list(manager.transient_processes):
                if process.state.name != "FAILED" or getattr(manager, "_shutting_down", False):
                    continue
                if now - restarted.get(process.name, 0.0) < 5 * WATCHDOG_INTERVAL_S:
                    continue
                restarted[process.name] = now
                log.warning("worker %s (pid %s) died; starting a new one", process.name, process.pid)
                if process.pid:
                    metrics.process_dead(process.pid)  # its in-flight and worker gauges stop counting
                manager.monitor_publisher.send(process.name)

    threading.Thread(target=loop, daemon=True, name="worker-watchdog").start()
