"""/v1/files: multipart uploads streamed to disk, list, retrieve, content (streamed from disk), delete.

Files belong to the key that uploaded them; another non-admin key gets 404 for them (their existence
does not leak); admin keys see every file.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from sanic import Request
from sanic.response import HTTPResponse

from appliance.batches import files
from appliance.common import multipart
from appliance.common.errors import GatewayError
from appliance.server.query import query_args
from appliance.server.responses import json_response, request_id
from appliance.server.routes import Routes
from appliance.storage import files_repo

bp = Routes("files")

_FIELD_MAX = 64 * 1024  # a form field other than the file (purpose, expires_after[...])
_DRAIN_MAX = 64 * 1024 * 1024  # how much of a refused body is read so the client sees the error


def owner_filter(request: Request) -> str | None:
    """The owner a listing or lookup is limited to: the key itself, or None (everything) for admin keys."""
    principal = request.ctx.principal
    return None if principal.role == "admin" else principal.key_id


def store(request: Request) -> files.FileStore:
    return files.FileStore.of(request.app.ctx.settings)


async def owned_file(request: Request, file_id: str, param: str = "id") -> dict[str, Any]:
    row = await files_repo.get(request.app.ctx.gateway.db, file_id, int(time.time()))
    owner = owner_filter(request)
    if row is None or (owner is not None and row["owner_key_id"] != owner):
        raise files.not_found(file_id, param)
    return row


async def _drain(request: Request) -> None:
    """Read what is left of the body (up to a bound), so the error reaches a client still sending."""
    read = 0
    while read < _DRAIN_MAX:
        chunk = await request.stream.read()  # type: ignore[union-attr]
        if chunk is None:
            return
        read += len(chunk)


class _Upload:
    """The state of one multipart upload: its form fields and its file part on its way to disk."""

    def __init__(self, store: files.FileStore, max_bytes: int, batch_max_bytes: int) -> None:
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.writer: files.ContentWriter | None = None
        self._store = store
        self._max_bytes = max_bytes
        self._batch_max_bytes = batch_max_bytes
        self._field: tuple[str, bytearray] | None = None
        self._in_file = False

    async def handle(self, event: multipart.Event) -> None:
        if isinstance(event, multipart.Part):
            if event.name == "file" and event.filename is not None and self.writer is None:
                self.filename = event.filename
                self.writer = self._store.writer()
                self._in_file = True
            else:
                self._field = (event.name, bytearray())
        elif isinstance(event, multipart.Data):
            if self._in_file:
                assert self.writer is not None
                await self.writer.write(event.data)
                if self.writer.size > self._limit():
                    raise files.too_large(self._limit())
            elif self._field is not None:
                self._field[1].extend(event.data)
                if len(self._field[1]) > _FIELD_MAX:
                    raise GatewayError("invalid_value", f"The form field '{self._field[0]}' is too long.",
                                       param=self._field[0])
        else:
            if self._field is not None:
                self.fields.setdefault(self._field[0], self._field[1].decode("utf-8", "replace"))
            self._field = None
            self._in_file = False

    def _limit(self) -> int:
        # The purpose is known here only when its field came before the file (the SDK sends it first).
        return self._batch_max_bytes if self.fields.get("purpose") == "batch" else self._max_bytes

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.discard()


@bp.post("/v1/files", stream=True)
async def create_file(request: Request) -> HTTPResponse:
    settings = request.app.ctx.settings.files
    boundary = multipart.boundary_of(request.headers.get("content-type"))
    if boundary is None:
        await _drain(request)
        raise GatewayError("invalid_value", "Uploads must be multipart/form-data with a 'file' and a 'purpose'.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_bytes + 1024 * 1024:
        await _drain(request)
        raise files.too_large(settings.max_bytes)
    upload = _Upload(store(request), settings.max_bytes, settings.batch_max_bytes)
    try:
        await _receive(request, boundary, upload)
        return await _register(request, upload)
    finally:
        upload.discard()  # a no-op once the content was committed under its id


async def _receive(request: Request, boundary: bytes, upload: _Upload) -> None:
    parser = multipart.MultipartParser(boundary)
    try:
        while True:
            chunk = await request.stream.read()  # type: ignore[union-attr]
            if chunk is None:
                break
            for event in parser.feed(chunk):
                await upload.handle(event)
        parser.close()
    except multipart.MultipartError as exc:
        await _drain(request)
        raise GatewayError("invalid_value", f"The multipart body is malformed: {exc}.") from None
    except GatewayError:
        await _drain(request)
        raise


async def _register(request: Request, upload: _Upload) -> HTTPResponse:
    settings = request.app.ctx.settings.files
    gateway = request.app.ctx.gateway
    purpose = files.check_purpose(upload.fields.get("purpose"))
    if upload.writer is None or upload.filename is None:
        raise GatewayError("missing_field", "Missing required parameter: 'file' (a file part with a filename).",
                           param="file")
    files.check_filename(purpose, upload.filename)
    if purpose == "batch" and upload.writer.size > settings.batch_max_bytes:
        raise files.too_large(settings.batch_max_bytes)
    created_at = int(time.time())
    expires_at = files.expires_at(purpose, created_at, *files.expiry_fields(upload.fields))
    if settings.quota_bytes is not None and (
            await files_repo.stored_bytes(gateway.db) + upload.writer.size > settings.quota_bytes):
        raise GatewayError("storage_quota_exceeded", "The appliance's file storage quota "
                           f"({settings.quota_bytes} bytes) would be exceeded; delete files first.")
    file_id = files.new_file_id()
    await upload.writer.commit(store(request).path(file_id))
    row = {"id": file_id, "owner_key_id": request.ctx.principal.key_id, "filename": upload.filename,
           "purpose": purpose, "bytes": upload.writer.size, "sha256": upload.writer.sha256,
           "created_at": created_at, "expires_at": expires_at}
    try:
        await files_repo.insert(gateway.db, row)
    except BaseException:
        store(request).remove(file_id)
        raise
    return json_response(orjson.dumps(files.file_object({**row, "status": "processed"})), request)


def _list_args(request: Request) -> tuple[int, str]:
    args = query_args(request)
    raw = args.get("limit", str(files.MAX_LIST_LIMIT))
    limit = int(raw) if raw.lstrip("-").isdigit() else 0
    if not 1 <= limit <= files.MAX_LIST_LIMIT:
        raise GatewayError("invalid_value", f"'limit' must be an integer from 1 to {files.MAX_LIST_LIMIT}.",
                           param="limit")
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise GatewayError("invalid_value", "'order' must be 'asc' or 'desc'.", param="order")
    return limit, order


@bp.get("/v1/files")
async def list_files(request: Request) -> HTTPResponse:
    limit, order = _list_args(request)
    db = request.app.ctx.gateway.db
    now = int(time.time())
    owner = owner_filter(request)
    after = None
    args = query_args(request)
    after_id = args.get("after")
    if after_id is not None:
        after = await files_repo.get(db, after_id, now)
        if after is None or (owner is not None and after["owner_key_id"] != owner):
            raise GatewayError("invalid_value", f"'after' names no file of yours: {after_id}", param="after")
    rows = await files_repo.page(db, owner=owner, purpose=args.get("purpose"), order=order, after=after,
                                 limit=limit, now=now)
    data = [files.file_object(row) for row in rows[:limit]]
    body = {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}
    return json_response(orjson.dumps(body), request)


@bp.get("/v1/files/<file_id>")
async def retrieve_file(request: Request, file_id: str) -> HTTPResponse:
    return json_response(orjson.dumps(files.file_object(await owned_file(request, file_id))), request)


@bp.get("/v1/files/<file_id>/content")
async def file_content(request: Request, file_id: str) -> None:
    row = await owned_file(request, file_id)
    try:
        handle = await store(request).open(file_id)
    except FileNotFoundError:  # deleted since the lookup
        raise files.not_found(file_id) from None
    filename = row["filename"].replace('"', "").replace("\r", "").replace("\n", "")
    response = await request.respond(status=200, content_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(row["bytes"]),
        "X-Request-ID": request_id(request)})
    if request.method == "HEAD":  # the headers say it all; Sanic would read the file only to drop it
        handle.close()
    else:
        async for chunk in files.chunks(handle):
            await response.send(chunk)
    await response.eof()


@bp.delete("/v1/files/<file_id>")
async def delete_file(request: Request, file_id: str) -> HTTPResponse:
    await owned_file(request, file_id)
    if not await files_repo.delete(request.app.ctx.gateway.db, file_id):
        raise files.not_found(file_id)
    store(request).remove(file_id)
    return json_response(orjson.dumps({"id": file_id, "object": "file", "deleted": True}), request)
