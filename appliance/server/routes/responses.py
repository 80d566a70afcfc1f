"""The OpenAI Responses surface over chat backends: create (JSON and SSE), retrieve, delete, input items."""

from __future__ import annotations

from typing import Any

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.api import surfaces
from appliance.api.responses import translate as responses
from appliance.common.errors import GatewayError
from appliance.core import pipeline
from appliance.core.exchange import DROPPED_TOOLS_HEADER
from appliance.providers.base import CHAT
from appliance.server.query import query_args
from appliance.server.responses import SanicResponder, exchange, json_response
from appliance.server.routes import Routes

bp = Routes("responses")

_MAX_LIMIT = 100


def _key_id(request: Request) -> str | None:
    principal = getattr(request.ctx, "principal", None)
    return principal.key_id if principal is not None else None


@bp.post("/v1/responses")
async def create_response(request: Request) -> HTTPResponse | None:
    gateway = request.app.ctx.gateway
    x = exchange(request)  # a refused body is logged by the error handler, with this exchange
    x.body = body = pipeline.parse_body(request.body)
    turn = await surfaces.responses_turn(gateway, body, _key_id(request))
    dropped = responses.dropped_tools(body)
    if dropped:
        x.notes = {DROPPED_TOOLS_HEADER: ", ".join(dropped)}
    responder = SanicResponder(request)
    await pipeline.serve(gateway, CHAT, turn.chat, x, responder, surfaces.responses_surface(turn))
    return responder.response


async def _stored(request: Request, response_id: str) -> dict[str, Any]:
    row = await surfaces.stored_response(request.app.ctx.gateway, response_id, _key_id(request))
    if row is None:
        raise GatewayError("not_found", f"No response found with id '{response_id}'.", param="response_id")
    return row


@bp.get("/v1/responses/<response_id>")
async def get_response(request: Request, response_id: str) -> HTTPResponse:
    return json_response(orjson.dumps((await _stored(request, response_id))["response"]), request)


@bp.delete("/v1/responses/<response_id>")
async def delete_response(request: Request, response_id: str) -> HTTPResponse:
    await _stored(request, response_id)
    await request.app.ctx.gateway.responses.delete(response_id)
    return json_response(orjson.dumps({"id": response_id, "object": "response", "deleted": True}), request)


@bp.get("/v1/responses/<response_id>/input_items")
async def input_items(request: Request, response_id: str) -> HTTPResponse:
    """This response's input items, newest first unless order=asc; ``after`` and ``limit`` page them."""
    items = list((await _stored(request, response_id))["input_items"])
    args = query_args(request)
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise GatewayError("invalid_value", "'order' must be 'asc' or 'desc'.", param="order")
    if order == "desc":
        items.reverse()
    after = args.get("after")
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise GatewayError("invalid_value", f"No input item with id '{after}'.", param="after")
        items = items[ids.index(after) + 1:]
    try:
        limit = int(args.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= _MAX_LIMIT:
        raise GatewayError("invalid_value", f"'limit' must be an integer from 1 to {_MAX_LIMIT}.", param="limit")
    page = items[:limit]
    body = {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
    return json_response(orjson.dumps(body), request)
