"""Per-worker start and stop: open the gateway's resources, drain, flush, close."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys

from sanic import Sanic

from appliance.gateway import Gateway
from appliance.storage.db import BufferedWriter, Database
from appliance.storage.migrate import database_path
from appliance.transport import Transport

log = logging.getLogger("appliance.server")


def register(app: Sanic) -> None:
    app.before_server_start(open_gateway)
    app.before_server_stop(start_draining)
    app.after_server_stop(close_gateway)


def _stop_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the main process dies (kill -9, OOM): no orphan keeps the port."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


async def open_gateway(app: Sanic) -> None:
    settings = app.ctx.settings
    if not settings.server.single_process:
        _stop_with_parent()
    db = await Database.open(database_path(settings.data_dir))
    writer = BufferedWriter(db, settings.server.flush_interval_ms / 1000)
    writer.start()
    transport = await Transport.open()
    gateway = Gateway(settings, transport, db, writer)
    gateway.start()
    app.ctx.gateway = gateway


async def start_draining(app: Sanic) -> None:
    """/ready turns 503 now; the listener closes after the configured delay, then requests drain."""
    gateway: Gateway = app.ctx.gateway
    gateway.draining = True
    delay = app.ctx.settings.server.drain_delay_s
    if delay:
        await asyncio.sleep(delay)


async def close_gateway(app: Sanic) -> None:
    """Runs after in-flight requests drained: the final flush happens here."""
    gateway: Gateway = app.ctx.gateway
    await gateway.stop()
    await gateway.transport.close()
    await gateway.db.close()
