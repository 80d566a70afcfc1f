"""The OpenAI-compatible surface: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

from urllib.parse import unquote

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.accounts.auth import model_not_allowed
from appliance.core import pipeline, router
from appliance.providers.base import CHAT, COMPLETIONS, EMBEDDINGS
from appliance.server.responses import SanicResponder, exchange, json_response
from appliance.server.routes import Routes

bp = Routes("openai")


async def _proxy(request: Request, endpoint: str) -> HTTPResponse | None:
    responder = SanicResponder(request)
    await pipeline.proxy(request.app.ctx.gateway, endpoint, request.body, exchange(request), responder)
    return responder.response


@bp.post("/v1/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    return await _proxy(request, CHAT)


@bp.post("/v1/completions")
async def completions(request: Request) -> HTTPResponse | None:
    return await _proxy(request, COMPLETIONS)


@bp.post("/v1/embeddings")
async def embeddings(request: Request) -> HTTPResponse | None:
    return await _proxy(request, EMBEDDINGS)


@bp.get("/v1/models")
async def list_models(request: Request) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    await gateway.wait_discovered()
    models = gateway.catalog.list_models()
    may_use = request.ctx.principal.may_use
    if may_use is not None:  # a key sees the models it may use, by the rule its requests meet
        models = [m for m in models if gateway.catalog.usable(m["id"], may_use)]
    routing = router.model_entry(gateway.router.settings, gateway.catalog, may_use)
    if routing is not None:
        models.append(routing)
    return json_response(orjson.dumps({"object": "list", "data": models}), request)


@bp.get("/v1/models/<model:path>")
async def get_model(request: Request, model: str) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    await gateway.wait_discovered()
    model = unquote(model)  # SDKs percent-encode the '/' in ids like Qwen/Qwen2.5-7B-Instruct
    may_use = request.ctx.principal.may_use
    if gateway.router.serves(model):
        entry = router.model_entry(gateway.router.settings, gateway.catalog, may_use)
        if entry is None:
            raise model_not_allowed(model)
        return json_response(orjson.dumps(entry), request)
    entry = gateway.catalog.describe(model)
    if entry is None:
        raise gateway.catalog.not_found(model, may_use)
    if not gateway.catalog.usable(model, may_use):
        raise model_not_allowed(model)
    return json_response(orjson.dumps(entry), request)
