"""Per-worker start and stop: open the gateway's resources, drain, flush, close."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading

from sanic import Sanic

from appliance.accounts import reports
from appliance.accounts.auth import Authenticator
from appliance.accounts.credentials import Vault
from appliance.accounts.limits import Limiter, worker_index
from appliance.accounts.live_limits import RedisLimiter
from appliance.batches.files import FileStore
from appliance.batches.runner import BatchRunner
from appliance.common.config import ConfigError, Settings
from appliance.core import reload
from appliance.core.cache import ResponseCache
from appliance.core.gateway import Gateway
from appliance.core.resilience import Breakers
from appliance.core.shared_breakers import BreakerSync
from appliance.core.shared_cache import SharedCache
from appliance.core.timings import RecentTimings
from appliance.observe import metrics
from appliance.observe.profiler import LoopProfiler
from appliance.providers.transport import Transport
from appliance.server.responses import RequestIds
from appliance.server.statsz import StatszCache
from appliance.storage import keys_repo
from appliance.storage.db import Database
from appliance.storage.engine import open_database
from appliance.storage.journal import Journal, journal_dir
from appliance.storage.state import SharedState
from appliance.storage.writer import BufferedWriter

log = logging.getLogger("appliance.server")


def register(app: Sanic) -> None:
    app.before_server_start(open_gateway)
    app.after_server_start(mark_serving)
    app.before_server_stop(start_draining)
    app.after_server_stop(close_gateway)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_STOP_RETRY_S = 0.25


def _watch_signals(app: Sanic, *, reloads: bool) -> None:
    """Turn SIGTERM/SIGINT into a stop that sticks, whenever it arrives; with ``reloads`` (single-process
    mode: this process is the one that reloads), SIGHUP into a config reload.

    Sanic's own handlers lose signals around startup: it resets them to SIG_IGN (which discards a
    pending one) just before serving, and a stop that lands while its after_server_start event runs
    is swallowed by the event loop it was meant to end; a loop handler for SIGHUP likewise missed one
    landing between two of Sanic's start-up runs of the loop (frozen, on a loaded machine). Instead, the
    signals are blocked in every thread of this process (called before it starts any, so all inherit the
    mask) and taken by one sigwait thread, which only records a stop or schedules a reload; a small task
    then stops the loop, again if needed, until the stop takes.
    """
    watched = _STOP_SIGNALS | ({signal.SIGHUP} if reloads else set())
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    loop = asyncio.get_running_loop()

    def wait_for_signals() -> None:
        # Ctrl-C reaches a worker twice (the terminal's group signal and Sanic's own), so a repeat
        # means nothing more than the first.
        while True:
            if signal.sigwait(watched) == signal.SIGHUP:
                loop.call_soon_threadsafe(_reload_here, app)
            else:
                app.ctx.stop_requested = True

    async def apply_stop() -> None:
        # loop.stop() is all a stop is: run_forever returns and Sanic's own shutdown (drain, then the
        # after_server_stop flush) follows. Repeated, because one issued before run_forever is lost.
        while True:
            await asyncio.sleep(_STOP_RETRY_S)
            if getattr(app.ctx, "stop_requested", False) and getattr(app.ctx, "serving", False):
                loop.stop()

    threading.Thread(target=wait_for_signals, daemon=True, name="signals").start()
    app.ctx.stop_task = loop.create_task(apply_stop(), name="stop-signals")


async def mark_serving(app: Sanic) -> None:
    app.ctx.serving = True


def stop_with_parent() -> None:
    """Ask Linux to SIGTERM this process (a worker, Sanic's SyncManager) if the main process dies (kill -9,
    OOM): no orphan keeps the port or lingers."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


async def open_gateway(app: Sanic) -> None:
    single = app.ctx.settings.server.single_process
    _watch_signals(app, reloads=single)  # first: before this process starts any thread
    app.ctx.request_ids = RequestIds()  # here, in each worker: forked ones must not share a prefix
    board: reload.Board = app.ctx.reload_board
    settings = app.ctx.settings = reload.latest(app.ctx.settings, board)  # a replaced worker: the last reload's
    if not single:
        stop_with_parent()
    db = await open_database(settings.data_dir, settings.database)
    journal = Journal(journal_dir(settings.data_dir))
    writer = BufferedWriter(db, settings.server.flush_interval_ms / 1000, journal,
                            on_flush=metrics.Recorder.write_queue, on_error=metrics.Recorder.write_failed)
    writer.start()
    transport = await Transport.open()
    authenticator = Authenticator(db, await keys_repo.install_secret(db), settings.auth.cache_ttl_s,
                                  enabled=settings.auth.mode == "keys", vault=Vault(settings.data_dir))
    worker = worker_index()
    state = SharedState.connect(settings.state, on_error=metrics.Recorder.state_failed) if settings.state.url else None
    limiter: Limiter | RedisLimiter
    if state is not None:
        limiter = RedisLimiter(state, settings.limits.window_s)  # shared with every worker of every node
        _reseed_on_reconnect(state, db, limiter)
    else:
        limiter = Limiter(app.ctx.limit_table, settings.limits.window_s, worker)
        limiter.forget_worker()  # a worker that replaces a dead one inherits its column, not its count
    breakers = Breakers(app.ctx.backend_table, settings.routing, worker)
    breakers.forget_worker()
    cache = ResponseCache(db, writer, settings.cache, shared=SharedCache(state) if state is not None else None)
    cache.start()
    sync = BreakerSync(state, breakers, app.ctx.node_id) if state is not None else None
    gateway = Gateway(settings, transport, db, writer, authenticator, limiter, breakers, cache, app.ctx.queue_table,
                      state, sync)
    if sync is not None:
        sync.start()
    gateway.admission.forget_worker()  # a dead predecessor's places in the queue are gone with it
    gateway.start()
    app.ctx.gateway = gateway
    app.ctx.statsz = StatszCache(gateway, app.ctx.started_at)
    app.ctx.profiler = LoopProfiler()
    app.ctx.timings = RecentTimings(db)  # /v1/providers
    metrics.worker_started()
    runner = BatchRunner(gateway, FileStore.of(settings))  # acts only while it holds the lease
    runner.start()
    app.ctx.batch_runner = runner
    app.ctx.reload_task = asyncio.get_running_loop().create_task(
        reload.watch(board, worker % board.workers, settings,
                     lambda new: _apply(app, new)), name="config-reload")


def _reseed_on_reconnect(state: SharedState, db: Database, limiter: RedisLimiter) -> None:
    """Each time this worker connects to the shared state again, budgets get the ledger's spend back where Redis
    lost it (restarted without its data); a Redis that kept its counters is left as it is."""
    running: set[asyncio.Task[None]] = set()

    def recovered() -> None:
        task = asyncio.get_running_loop().create_task(reports.reseed_budgets(db, limiter), name="budgets-reseed")
        running.add(task)
        task.add_done_callback(running.discard)

    state.on_reconnect = recovered


def _apply(app: Sanic, settings: Settings) -> None:
    app.ctx.gateway.reconfigure(settings)
    app.ctx.settings = settings


def _reload_here(app: Sanic) -> None:
    """SIGHUP in single-process mode: this process is the one that reloads."""
    try:
        reload.request(app.ctx.settings, app.ctx.reload_board)
    except ConfigError as exc:
        log.error("config not reloaded, the running one stays: %s", exc)


async def start_draining(app: Sanic) -> None:
    """/ready turns 503 now; the listener closes after the configured delay, then requests drain."""
    app.ctx.serving = False
    app.ctx.stop_task.cancel()
    app.ctx.reload_task.cancel()
    gateway: Gateway = app.ctx.gateway
    gateway.draining = True
    await app.ctx.batch_runner.stop()  # its lines in flight go back to pending, for the next start
    delay = app.ctx.settings.server.drain_delay_s
    if delay:
        await asyncio.sleep(delay)


async def close_gateway(app: Sanic) -> None:
    """Runs after in-flight requests drained: the final flush happens here."""
    gateway: Gateway = app.ctx.gateway
    await gateway.stop()
    await gateway.transport.close()
    await gateway.db.close()
    metrics.process_dead(os.getpid())
