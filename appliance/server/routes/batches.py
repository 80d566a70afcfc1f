"""/v1/batches: create (the runner takes it from there), retrieve, cancel, list.

Problems with the create request itself (fields, the input file's reference) are answered at once;
problems with the file's content fail the batch later, as OpenAI does (see appliance/batches/batch.py).
"""

from __future__ import annotations

import time

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.batches import batch as batches
from appliance.common.errors import GatewayError
from appliance.core import pipeline
from appliance.server.query import query_args
from appliance.server.responses import json_response
from appliance.server.routes import Routes
from appliance.server.routes.files import owned_file, owner_filter
from appliance.storage import batches_repo

bp = Routes("batches")

_MAX_LIMIT = 100


async def _owned(request: Request, batch_id: str) -> dict:
    row = await batches_repo.get(request.app.ctx.gateway.db, batch_id)
    owner = owner_filter(request)
    if row is None or (owner is not None and row["owner_key_id"] != owner):
        raise batches.not_found(batch_id)
    return row


def _wake_runner(request: Request) -> None:
    runner = getattr(request.app.ctx, "batch_runner", None)
    if runner is not None:
        runner.wake()  # the runner of this worker, if it holds the lease; others poll


@bp.post("/v1/batches")
async def create_batch(request: Request) -> HTTPResponse:
    gateway = request.app.ctx.gateway
    settings = gateway.settings.batches
    wanted = batches.parse_create(pipeline.parse_body(request.body))
    source = await owned_file(request, wanted.input_file_id, param="input_file_id")
    if source["purpose"] != "batch":
        raise GatewayError("invalid_file_purpose", f"The file {wanted.input_file_id} has purpose "
                           f"'{source['purpose']}'; batches need a file uploaded with purpose 'batch'.",
                           param="input_file_id")
    principal = request.ctx.principal
    if await batches_repo.count_active(gateway.db, principal.key_id) >= settings.max_active_per_key:
        raise GatewayError("batch_limit_exceeded", f"This key already has {settings.max_active_per_key} "
                           "unfinished batches; wait for some to end.")
    now = int(time.time())
    window = settings.window_seconds_override or batches.WINDOW_S
    row = {"id": batches.new_batch_id(), "owner_key_id": principal.key_id, "endpoint": wanted.endpoint,
           "input_file_id": wanted.input_file_id, "completion_window": batches.WINDOW, "status": "validating",
           "metadata_json": orjson.dumps(wanted.metadata).decode() if wanted.metadata is not None else None,
           "output_expires_s": wanted.output_expires_s, "created_at": now, "expires_at": int(now + window)}
    await batches_repo.create(gateway.db, row)
    _wake_runner(request)
    return json_response(orjson.dumps(batches.batch_object(await _owned(request, row["id"]))), request)


@bp.get("/v1/batches/<batch_id>")
async def retrieve_batch(request: Request, batch_id: str) -> HTTPResponse:
    return json_response(orjson.dumps(batches.batch_object(await _owned(request, batch_id))), request)


@bp.post("/v1/batches/<batch_id>/cancel")
async def cancel_batch(request: Request, batch_id: str) -> HTTPResponse:
    row = await _owned(request, batch_id)
    if batches.cancel_needed(row):
        row = await batches_repo.request_cancel(request.app.ctx.gateway.db, batch_id, int(time.time())) or row
        batches.cancel_needed(row)  # raises if it moved on meanwhile (e.g. to finalizing)
        _wake_runner(request)
    return json_response(orjson.dumps(batches.batch_object(row)), request)


@bp.get("/v1/batches")
async def list_batches(request: Request) -> HTTPResponse:
    args = query_args(request)
    raw = args.get("limit", "20")
    limit = int(raw) if raw.lstrip("-").isdigit() else 0
    if not 1 <= limit <= _MAX_LIMIT:
        raise GatewayError("invalid_value", f"'limit' must be an integer from 1 to {_MAX_LIMIT}.", param="limit")
    db = request.app.ctx.gateway.db
    owner = owner_filter(request)
    after = None
    after_id = args.get("after")
    if after_id is not None:
        after = await batches_repo.get(db, after_id)
        if after is None or (owner is not None and after["owner_key_id"] != owner):
            raise GatewayError("invalid_value", f"'after' names no batch of yours: {after_id}", param="after")
    rows = await batches_repo.page(db, owner=owner, after=after, limit=limit)
    data = [batches.batch_object(row) for row in rows[:limit]]
    body = {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}
    return json_response(orjson.dumps(body), request)
