"""GET /openapi.json: the appliance's own OpenAPI 3.1 document (public, like /health)."""

from __future__ import annotations

import logging

import orjson
from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse

from appliance.server.openapi import document, vendored
from appliance.server.responses import json_response

bp = Blueprint("openapi")
log = logging.getLogger("appliance.server")


@bp.get("/openapi.json")
async def openapi_document(request: Request) -> HTTPResponse:
    # Built on first use and kept for the worker's life: the route table does not change after start.
    body = getattr(request.app.ctx, "openapi_json", None)
    if body is None:
        body = request.app.ctx.openapi_json = render(request.app)
    return json_response(body, request)


def build(app: Sanic) -> document.Document:
    return document.build(document.registered(app.router.routes), vendored.load())


def render(app: Sanic) -> bytes:
    built = build(app)
    if built.undescribed:  # tests/unit/test_openapi.py fails on this; a running appliance just says so
        log.warning("routes missing from /openapi.json: %s", ", ".join(f"{m} {p}" for m, p in built.undescribed))
    return orjson.dumps(built.body)
