"""The Anthropic Messages surface: /v1/messages and /v1/messages/count_tokens, over chat backends."""

from __future__ import annotations

import orjson
from sanic import Blueprint, Request
from sanic.response import HTTPResponse

from appliance import messages, pipeline, surfaces
from appliance.exchange import allowed_routes
from appliance.providers.base import CHAT
from appliance.server.responses import SanicResponder, exchange, json_response

bp = Blueprint("anthropic")


@bp.post("/v1/messages")
async def create_message(request: Request) -> HTTPResponse | None:
    x = exchange(request)  # a refused body is logged by the error handler, with this exchange
    x.body = body = pipeline.parse_body(request.body)
    chat = messages.chat_request(body)
    responder = SanicResponder(request)
    surface = surfaces.messages_surface(body["model"], messages.wants_thinking(body))
    await pipeline.serve(request.app.ctx.gateway, CHAT, chat, x, responder, surface)
    return responder.response


@bp.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> HTTPResponse:
    """An estimate (about four characters per token) for a model the key may use."""
    gateway = request.app.ctx.gateway
    body = pipeline.parse_body(request.body)
    counted = messages.count_tokens(body)
    await gateway.wait_discovered()
    allowed_routes(exchange(request), gateway.catalog.plan(body["model"]).routes)
    return json_response(orjson.dumps(counted), request)
