"""Keys and usage: the admin API (/admin/keys, /admin/usage) and a key's view of itself (/v1/key)."""

from __future__ import annotations

from typing import Any

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.accounts import auth, reports
from appliance.common.errors import GatewayError
from appliance.core.pipeline import parse_body
from appliance.server.query import query_args
from appliance.server.responses import json_response
from appliance.server.routes import Routes

bp = Routes("keys")


def _json(request: Request, data: Any, status: int = 200) -> HTTPResponse:
    return json_response(orjson.dumps(data), request, status)


def _slots(request: Request) -> int:
    return request.app.ctx.settings.limits.key_slots


def _upstream(request: Request) -> dict[str, Any]:
    """What upstream_keys need: the vault that seals them and the backends they may name (this generation's)."""
    gateway = request.app.ctx.gateway
    return {"vault": gateway.authenticator.vault, "backends": set(gateway.upstreams.backends)}


@bp.post("/admin/keys")
async def create_key(request: Request) -> HTTPResponse:
    db = request.app.ctx.gateway.db
    row, secret = await auth.create_key(db, parse_body(request.body), slots=_slots(request), **_upstream(request))
    return _json(request, {**auth.public_view(row), "key": secret}, 201)


@bp.get("/admin/keys")
async def list_keys(request: Request) -> HTTPResponse:
    rows = await auth.list_keys(request.app.ctx.gateway.db)
    return _json(request, {"object": "list", "data": [auth.public_view(row) for row in rows]})


@bp.get("/admin/keys/<key_id>")
async def get_key(request: Request, key_id: str) -> HTTPResponse:
    return _json(request, auth.public_view(await auth.get_key(request.app.ctx.gateway.db, key_id)))


@bp.patch("/admin/keys/<key_id>")
async def update_key(request: Request, key_id: str) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    before = await auth.get_key(gateway.db, key_id)
    row = await auth.update_key(gateway.db, key_id, parse_body(request.body), **_upstream(request))
    if row["budget_counts"] != before["budget_counts"]:
        await reports.recount_budget(gateway.db, gateway.limiter, row)
    return _json(request, auth.public_view(row))


@bp.delete("/admin/keys/<key_id>")
async def delete_key(request: Request, key_id: str) -> HTTPResponse:
    await auth.delete_key(request.app.ctx.gateway.db, key_id)
    return _json(request, {"id": key_id, "object": "api_key", "deleted": True})


@bp.post("/admin/keys/<key_id>/rotate")
async def rotate_key(request: Request, key_id: str) -> HTTPResponse:
    row, secret = await auth.rotate_key(request.app.ctx.gateway.db, key_id)
    return _json(request, {**auth.public_view(row), "key": secret})


@bp.get("/admin/usage")
async def usage(request: Request) -> HTTPResponse:
    args = query_args(request)
    group_by = args.get("group_by", "day")
    if group_by not in reports.GROUPS:
        raise GatewayError("invalid_value", f"group_by must be one of {', '.join(reports.GROUPS)}.",
                           param="group_by")
    rows = await reports.report(request.app.ctx.gateway.db, key_id=args.get("key"), model=args.get("model"),
                                     start=args.get("from"), end=args.get("to"), group_by=group_by)
    return _json(request, {"object": "list", "group_by": group_by, "data": rows})


@bp.get("/v1/key")
async def own_key(request: Request) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    return _json(request, await reports.key_view(gateway.db, gateway.limiter, request.ctx.principal))
