"""create_app(settings): the one factory, rebuilt in every worker by Sanic's AppLoader."""

from __future__ import annotations

import logging
import secrets
import socket
import sys
import time

from sanic import Request, Sanic
from sanic.http import Http
from sanic.response import HTTPResponse

from appliance.accounts.limits import SharedTable, table_size
from appliance.common.config import Settings
from appliance.common.resources import static_dir
from appliance.core import reload
from appliance.core.admission import QueueTable
from appliance.core.resilience import BackendTable
from appliance.observe import profiler
from appliance.server import access, lifecycle
from appliance.server.request import GatewayRequest
from appliance.server.responses import GatewayErrorHandler
from appliance.server.routes import anthropic as anthropic_routes
from appliance.server.routes import batches as batches_routes
from appliance.server.routes import extensions as extension_routes
from appliance.server.routes import files as files_routes
from appliance.server.routes import keys as keys_routes
from appliance.server.routes import observability, ops, responses_ws
from appliance.server.routes import openai as openai_routes
from appliance.server.routes import openapi as openapi_routes
from appliance.server.routes import providers as providers_routes
from appliance.server.routes import proxy as proxy_routes
from appliance.server.routes import responses as responses_routes
from appliance.server.routes import router as router_routes
from appliance.server.routes import templates as templates_routes

APP_NAME = "appliance"
# Sanic's own response timeout must never cut a backend call the settings still allow.
_RESPONSE_TIMEOUT_MARGIN_S = 30
_READ_BUFFER = 65536  # Sanic's default REQUEST_BUFFER_SIZE: reading pauses when this much is waiting


def configure_logging() -> None:
    logger = logging.getLogger("appliance")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def create_app(settings: Settings, limit_table: SharedTable | None = None,
               backend_table: BackendTable | None = None, started_at: float | None = None,
               reload_board: reload.Board | None = None, queue_table: QueueTable | None = None) -> Sanic:
    """The tables hold what all workers share live (limit counters; breakers and in-flight counts per
    backend; the fair admission queue; config reloads); the main process makes them before the workers
    start. Without them: this process only. ``started_at``: when the appliance started (its uptime
    survives a worker's restart)."""
    configure_logging()
    app = Sanic(APP_NAME, error_handler=GatewayErrorHandler(), request_class=GatewayRequest)
    app.config.update(
        REQUEST_MAX_SIZE=int(settings.server.max_body_mb * 1024 * 1024),
        **_header_limit(settings.server.max_header_kb),
        RESPONSE_TIMEOUT=max(settings.longest_timeout_s, profiler.MAX_SECONDS) + _RESPONSE_TIMEOUT_MARGIN_S,
        REQUEST_TIMEOUT=60,
        KEEP_ALIVE_TIMEOUT=75,
        GRACEFUL_SHUTDOWN_TIMEOUT=settings.server.graceful_timeout_s,
        NOISY_EXCEPTIONS=False,
        FALLBACK_ERROR_FORMAT="json",
        MOTD=False,
        ACCESS_LOG=False,
    )
    app.ctx.settings = settings
    app.ctx.limit_table = limit_table or SharedTable(table_size(settings), shared=False)
    app.ctx.backend_table = backend_table or BackendTable(shared=False)
    app.ctx.queue_table = queue_table or QueueTable(shared=False)
    app.ctx.reload_board = reload_board or reload.Board(1, shared=False)
    app.ctx.started_at = started_at or time.time()
    # This appliance among those sharing [state] url: made before the workers fork, so all of them share it.
    app.ctx.node_id = f"{socket.gethostname()}-{secrets.token_hex(4)}"
    app.blueprint(openai_routes.bp)
    app.blueprint(extension_routes.bp)
    app.blueprint(anthropic_routes.bp)
    app.blueprint(responses_routes.bp)
    app.blueprint(responses_ws.bp)
    app.blueprint(keys_routes.bp)
    app.blueprint(templates_routes.bp)
    app.blueprint(ops.bp)
    app.blueprint(observability.bp)
    app.blueprint(files_routes.bp)
    app.blueprint(batches_routes.bp)
    app.blueprint(openapi_routes.bp)
    app.blueprint(proxy_routes.bp)
    app.blueprint(providers_routes.bp)
    app.blueprint(router_routes.bp)
    app.static("/static", static_dir(), name="static", use_content_range=True)  # HEAD gets Content-Length
    if settings.server.cors_origins:
        _add_cors(app, settings.server.cors_origins)  # first: a preflight carries no key
    if settings.log.access != "off":
        app.on_request(observability.note_arrival)
        app.on_response(observability.log_access)
    app.on_request(access.authenticate)
    lifecycle.register(app)
    return app


def _header_limit(max_kb: int) -> dict[str, int]:
    """Sanic's settings for a request head (request line and headers) under ``max_kb`` KB.

    Sanic refuses a head of REQUEST_MAX_HEADER_SIZE bytes or more, but caps that setting at
    Http.HEADER_CEILING (16 KB) and at its read buffer less 4 KB, so both are raised to fit. The ceiling
    is a class constant that Sanic leaves to be raised this way (sanic-org/sanic#2155); like Sanic's own
    limit it holds for the whole process, and only ever grows here.
    """
    size = max_kb * 1024
    Http.HEADER_CEILING = max(Http.HEADER_CEILING, size)
    return {"REQUEST_MAX_HEADER_SIZE": size, "REQUEST_BUFFER_SIZE": max(_READ_BUFFER, size + 4096)}


def _add_cors(app: Sanic, origins: list[str]) -> None:
    """Answer preflights and label responses for the configured origins (no sanic-ext needed)."""
    any_origin = "*" in origins

    def allowed(request: Request) -> str | None:
        origin = request.headers.get("origin")
        if origin and (any_origin or origin in origins):
            return origin
        return None

    @app.on_request
    async def preflight(request: Request) -> HTTPResponse | None:
        # A middleware, not a route: an OPTIONS route would lose to the path's own POST route (405).
        if request.method != "OPTIONS":
            return None
        origin = allowed(request)
        if origin is None:
            return HTTPResponse(status=403)
        return HTTPResponse(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get("access-control-request-headers", "*"),
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        })

    @app.on_response
    async def label(request: Request, response: HTTPResponse) -> None:
        origin = allowed(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "*"
            response.headers["Vary"] = "Origin"
