"""Operations: liveness, readiness, the status page and config reloads."""

from __future__ import annotations

import asyncio
import os

import orjson
from sanic import Request
from sanic.response import HTTPResponse, file

from appliance import __version__
from appliance.common.config import ConfigError
from appliance.common.errors import GatewayError
from appliance.common.resources import static_dir
from appliance.core import reload
from appliance.server.responses import json_response
from appliance.server.routes import Routes

bp = Routes("ops")


@bp.get("/health", name="health")
@bp.get("/healthz", name="healthz")
async def health(request: Request) -> HTTPResponse:
    return json_response(orjson.dumps({"status": "ok", "version": __version__, "pid": os.getpid()}), request)


@bp.get("/ready")
async def ready(request: Request) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    ok, reason = gateway.readiness()
    backends = {
        name: {"state": state.state, "kind": state.kind, "models": len(state.models), "error": state.last_error,
               "breaker": gateway.breakers.state(name)}
        for name, state in gateway.catalog.backends.items()
    }
    # Degraded is still ready: answers flow, only their accounting waits (in memory and the journal).
    degraded = gateway.degraded()
    status = ("degraded" if degraded else "ready") if ok else "not_ready"
    body = {"status": status, "reason": "degraded: " + ", ".join(degraded) if ok and degraded else reason,
            "degraded": degraded, "backends": backends}
    return json_response(orjson.dumps(body), request, status=200 if ok else 503)


@bp.get("/", name="root")
@bp.get("/status", name="status")
async def status_page(request: Request) -> HTTPResponse:
    return await file(static_dir() / "index.html", mime_type="text/html; charset=utf-8")


@bp.post("/admin/reload")
async def reload_config(request: Request) -> HTTPResponse:
    """Re-read the config file; answer once every worker runs it (or name the ones still behind)."""
    board = request.app.ctx.reload_board
    try:
        outcome = await asyncio.to_thread(reload.request, request.app.ctx.settings, board)
    except ConfigError as exc:
        raise GatewayError("invalid_config", f"The config was not reloaded; the running one stays. {exc}") from None
    behind = await reload.wait_applied(board, outcome.generation)
    body = {"reloaded": outcome.changed, "generation": outcome.generation,
            "restart_required": outcome.restart_required, "workers_behind": behind}
    return json_response(orjson.dumps(body), request)
