"""The semantic router: POST /v1/router (decide, or decide and answer) and GET /v1/router/profiles."""

from __future__ import annotations

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.core import pipeline, router
from appliance.server.responses import SanicResponder, exchange, json_response
from appliance.server.routes import Routes

bp = Routes("router")


@bp.post("/v1/router")
async def route(request: Request) -> HTTPResponse | None:
    responder = SanicResponder(request)
    await pipeline.route(request.app.ctx.gateway, request.body, exchange(request), responder)
    return responder.response


@bp.get("/v1/router/profiles")
async def profiles(request: Request) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    await gateway.wait_discovered()
    data = router.listing(gateway.router.settings.profiles, gateway.catalog, gateway.prices,
                          request.ctx.principal.may_use)
    return json_response(orjson.dumps({"object": "list", "data": data}), request)
