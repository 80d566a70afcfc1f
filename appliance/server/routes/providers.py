"""/v1/providers: the provider catalog (core/provider_catalog.py), for any valid key."""

from __future__ import annotations

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.common.errors import GatewayError
from appliance.core import provider_catalog
from appliance.server.query import query_args
from appliance.server.responses import json_response
from appliance.server.routes import Routes

bp = Routes("providers")


@bp.get("/v1/providers")
async def list_providers(request: Request) -> HTTPResponse:
    model = query_args(request).get("model")
    if model is not None and not model:
        raise GatewayError("invalid_value", "'model' must be a model name (or left out for every backend).",
                           param="model")
    gateway = request.app.ctx.gateway
    await gateway.wait_discovered()
    timings = await request.app.ctx.timings.get()
    answer = provider_catalog.build(gateway, model, request.ctx.principal.may_use, timings)
    response = json_response(orjson.dumps(answer), request)
    response.headers["Cache-Control"] = "no-store"
    return response
