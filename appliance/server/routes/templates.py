"""Prompt templates: the admin API (/admin/templates). Admin keys only, as every /admin route."""

from __future__ import annotations

from typing import Any

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.core import templates
from appliance.core.pipeline import parse_body
from appliance.server.query import query_args
from appliance.server.responses import json_response
from appliance.server.routes import Routes

bp = Routes("templates")


def _json(request: Request, data: Any, status: int = 200) -> HTTPResponse:
    return json_response(orjson.dumps(data), request, status)


@bp.post("/admin/templates")
async def create_template(request: Request) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    created = await templates.create(gateway.db, parse_body(request.body))
    gateway.templates.forget(created["id"])  # a deleted template of that id may still be cached here
    return _json(request, created, 201)


@bp.get("/admin/templates")
async def list_templates(request: Request) -> HTTPResponse:
    return _json(request, {"object": "list", "data": await templates.list_templates(request.app.ctx.gateway.db)})


@bp.get("/admin/templates/<template_id>")
async def get_template(request: Request, template_id: str) -> HTTPResponse:
    args = query_args(request)
    number = templates.version_number(args.get("version"))
    return _json(request, await templates.get(request.app.ctx.gateway.db, template_id, number))


@bp.get("/admin/templates/<template_id>/versions")
async def list_versions(request: Request, template_id: str) -> HTTPResponse:
    return _json(request, {"object": "list", "data": await templates.versions(request.app.ctx.gateway.db,
                                                                              template_id)})


@bp.post("/admin/templates/<template_id>/versions")
async def add_version(request: Request, template_id: str) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    added = await templates.add_version(gateway.db, template_id, parse_body(request.body))
    gateway.templates.forget(template_id)  # this worker's requests get the new latest at once
    return _json(request, added, 201)


@bp.delete("/admin/templates/<template_id>")
async def delete_template(request: Request, template_id: str) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    deleted = await templates.delete(gateway.db, template_id)
    gateway.templates.forget(template_id)
    return _json(request, deleted)
