"""The Anthropic Messages surface: /v1/messages and /v1/messages/count_tokens, over chat backends."""

from __future__ import annotations

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.api import surfaces
from appliance.api.messages import native as messages_native
from appliance.api.messages import request as messages_request
from appliance.common.errors import GatewayError
from appliance.core import pipeline, templates
from appliance.core.exchange import DROPPED_TOOLS_HEADER, allowed_routes, may_use
from appliance.providers.base import CHAT
from appliance.server.responses import SanicResponder, exchange, json_response
from appliance.server.routes import Routes

bp = Routes("anthropic")


@bp.post("/v1/messages")
async def create_message(request: Request) -> HTTPResponse | None:
    x = exchange(request)  # a refused body is logged by the error handler, with this exchange
    x.body = body = pipeline.parse_body(request.body)
    if "template" in body:  # rendered in Messages' own shape, so a backend that speaks it gets them too
        x.template, rendered = await templates.rendered_for(request.app.ctx.gateway.templates, body["template"])
        body = templates.as_messages_body(body, rendered)
    translatable = True
    try:
        chat = messages_request.chat_request(body)  # validated and translated even when it may pass through
    except GatewayError as exc:  # maybe only a chat backend could not take it (a PDF document, say)
        if exc.status != 400 or not await messages_native.only_native(request.app.ctx.gateway, x, body):
            raise
        chat = messages_native.untranslated(body)
        translatable = False
    chat.update((name, body[name]) for name in pipeline.GATEWAY_FIELDS if name in body)
    dropped = messages_request.dropped_tools(body)
    if dropped:  # on a chat backend; an Anthropic backend gets them all, passed through
        x.notes = {DROPPED_TOOLS_HEADER: ", ".join(dropped)}
    responder = SanicResponder(request)
    surface = surfaces.messages_surface(body["model"], messages_request.wants_thinking(body), body,
                                        translatable=translatable)
    await pipeline.serve(request.app.ctx.gateway, CHAT, chat, x, responder, surface)
    return responder.response


@bp.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> HTTPResponse:
    """The count of an Anthropic backend that has the endpoint, else an estimate (about four characters per token).

    The X-Appliance-Token-Count header says which: ``backend`` or ``estimate``.
    """
    gateway = request.app.ctx.gateway
    body = pipeline.parse_body(request.body)
    if "template" in body:  # counted as the model would see the prompt
        _, rendered = await templates.rendered_for(gateway.templates, body["template"])
        body = templates.as_messages_body(body, rendered)
    estimate = messages_request.count_tokens(body)  # validates, whoever counts
    await gateway.wait_discovered()
    x = exchange(request)
    routes = allowed_routes(gateway, x, gateway.catalog.plan(body["model"], may_use(x)).routes)
    counted = await messages_native.count_tokens(gateway, body, x, routes)
    response = json_response(counted or orjson.dumps(estimate), request)
    response.headers["X-Appliance-Token-Count"] = "backend" if counted else "estimate"
    return response
