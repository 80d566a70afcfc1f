"""Observability: /metrics (Prometheus), /statsz (the status page's data), /admin/requests (the request log),
/admin/debug/profile (a live CPU profile of a worker), and the access-log line of requests that are not
proxied (those are logged with their ledger row)."""

from __future__ import annotations

import asyncio
import os
import time

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.accounts import reports
from appliance.common.errors import GatewayError
from appliance.observe import metrics, profiler
from appliance.server.query import query_args
from appliance.server.responses import Response, json_response, request_id
from appliance.server.routes import Routes

bp = Routes("observability")


@bp.get("/metrics")
async def prometheus_metrics(request: Request) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    breakers, catalog = gateway.breakers, gateway.catalog
    live = metrics.LiveCollector(lambda: [(name, breakers.state(name)) for name in list(catalog.backends)])
    return HTTPResponse(metrics.render(live, gateway.settings.metrics.per_key), content_type=metrics.CONTENT_TYPE)


@bp.get("/statsz")
async def statsz(request: Request) -> HTTPResponse:
    response = json_response(orjson.dumps(await request.app.ctx.statsz.get()), request)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/admin/requests")
async def admin_requests(request: Request) -> HTTPResponse:
    query = query_args(request)
    args = {name: query.get(name) for name in query}
    rows = await reports.request_log(request.app.ctx.gateway.db, args)
    return json_response(orjson.dumps({"object": "list", "data": rows}), request)


@bp.get("/admin/debug/profile")
async def profile(request: Request) -> HTTPResponse:
    """Sample the worker that took this request for ``seconds``, then answer its profile."""
    seconds, fmt = _profile_args(request)
    try:
        session = await request.app.ctx.profiler.sample(seconds)
    except profiler.ProfileRunning:
        raise GatewayError("profile_in_progress", f"A profile of this worker (pid {os.getpid()}) is already "
                           "running; ask again when it ends.") from None
    body = await asyncio.to_thread(profiler.render, session, fmt)  # not on the loop the next requests need
    return Response(body, headers={"X-Request-ID": request_id(request), "X-Appliance-Worker": str(os.getpid())},
                    content_type=profiler.FORMATS[fmt])


def _profile_args(request: Request) -> tuple[int, str]:
    query = query_args(request)
    for name in query:
        if name not in ("seconds", "format"):
            raise GatewayError("invalid_value", f"Unknown parameter: {name}.", param=name)
    text = query.get("seconds", str(profiler.DEFAULT_SECONDS))
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= profiler.MAX_SECONDS):
        raise GatewayError("invalid_value", f"'seconds' must be a whole number from 1 to {profiler.MAX_SECONDS}.",
                           param="seconds")
    fmt = query.get("format", "text")
    if fmt not in profiler.FORMATS:
        raise GatewayError("invalid_value", f"'format' must be one of {', '.join(profiler.FORMATS)}.",
                           param="format")
    return int(text), fmt


def note_arrival(request: Request) -> None:
    """Request middleware (only with an access log): when the request arrived."""
    request.ctx.arrived = time.time()


def log_access(request: Request, response: HTTPResponse) -> None:
    """Response middleware (only with an access log): one line for a request that has no ledger row."""
    x = getattr(request.ctx, "exchange", None)
    if x is not None and (x.recorded or x.in_flight):
        return  # proxied: logged with its ledger row (a stream: when it ends)
    gateway = getattr(request.app.ctx, "gateway", None)
    if gateway is None or gateway.access_log is None:
        return
    arrived = getattr(request.ctx, "arrived", None) or time.time()
    principal = getattr(request.ctx, "principal", None)
    gateway.access_log.write({
        "time": arrived, "request_id": request_id(request), "method": request.method, "path": request.path,
        "status": response.status, "latency_ms": round((time.time() - arrived) * 1000, 3),
        "key_id": principal.key_id if principal is not None else None, "client": request.ip,
    })
