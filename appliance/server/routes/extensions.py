"""The extension endpoints, routed by model like chat: rerank and score, moderations, images, audio.

JSON bodies go through the pipeline as chat's do. Multipart bodies (image edits, transcriptions, translations)
are streamed: Sanic hands the body over as it arrives, and core/uploads.py passes it on without holding it.
"""

from __future__ import annotations

from sanic import Request
from sanic.response import HTTPResponse

from appliance.common import multipart
from appliance.common.errors import GatewayError
from appliance.core import pipeline
from appliance.core.uploads import Upload
from appliance.providers.base import (
    IMAGE_EDITS,
    IMAGES,
    MODERATIONS,
    RERANK,
    SCORE,
    SPEECH,
    TRANSCRIPTIONS,
    TRANSLATIONS,
)
from appliance.server.responses import SanicResponder, exchange
from appliance.server.routes import Routes

bp = Routes("extensions")

_DRAIN_MAX = 64 * 1024 * 1024  # how much of a refused upload is read so the client sees the error
_JSON = "application/json"


async def _proxy(request: Request, endpoint: str) -> HTTPResponse | None:
    responder = SanicResponder(request)
    await pipeline.proxy(request.app.ctx.gateway, endpoint, request.body, exchange(request), responder)
    return responder.response


@bp.post("/v1/rerank")
async def rerank(request: Request) -> HTTPResponse | None:
    return await _proxy(request, RERANK)


@bp.post("/rerank")
async def rerank_unversioned(request: Request) -> HTTPResponse | None:
    return await _proxy(request, RERANK)


@bp.post("/v1/score")
async def score(request: Request) -> HTTPResponse | None:
    return await _proxy(request, SCORE)


@bp.post("/v1/moderations")
async def moderations(request: Request) -> HTTPResponse | None:
    return await _proxy(request, MODERATIONS)


@bp.post("/v1/images/generations")
async def image_generations(request: Request) -> HTTPResponse | None:
    return await _proxy(request, IMAGES)


@bp.post("/v1/audio/speech")
async def speech(request: Request) -> HTTPResponse | None:
    return await _proxy(request, SPEECH)


class _Body:
    """The request body as Sanic streams it in."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    async def read(self) -> bytes | None:
        return await self._request.stream.read()  # type: ignore[union-attr]


async def _upload(request: Request, endpoint: str) -> HTTPResponse | None:
    settings = request.app.ctx.settings
    content_type = request.headers.get("content-type", "")
    boundary = multipart.boundary_of(content_type)
    if boundary is None and endpoint == IMAGE_EDITS and content_type.split(";")[0].strip().lower() == _JSON:
        return await _json_edit(request)  # OpenAI also takes image edits as JSON (images by URL or file id)
    x = exchange(request)
    upload = Upload(_Body(request), content_type, boundary or b"", declared=_declared(request),
                    max_bytes=int(settings.server.max_upload_mb * 1024 * 1024), spool_dir=settings.data_dir)
    responder = SanicResponder(request)
    try:
        if boundary is None:
            raise GatewayError("invalid_value", f"/v1/{endpoint} takes multipart/form-data (a file and a "
                               "'model' field).")
        await pipeline.proxy_upload(request.app.ctx.gateway, endpoint, upload, x, responder)
    except GatewayError:
        await upload.drain(_DRAIN_MAX)
        raise
    finally:
        upload.close()
    return responder.response


async def _json_edit(request: Request) -> HTTPResponse | None:
    body = bytearray()
    limit = request.app.ctx.settings.server.max_body_mb * 1024 * 1024
    while (chunk := await request.stream.read()) is not None:  # type: ignore[union-attr]
        body += chunk
        if len(body) > limit:
            raise GatewayError("body_too_large", "The request body is larger than this gateway accepts "
                               "(server.max_body_mb).")
    responder = SanicResponder(request)
    await pipeline.proxy(request.app.ctx.gateway, IMAGE_EDITS, bytes(body), exchange(request), responder)
    return responder.response


def _declared(request: Request) -> int | None:
    length = request.headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


@bp.post("/v1/images/edits", stream=True)
async def image_edits(request: Request) -> HTTPResponse | None:
    return await _upload(request, IMAGE_EDITS)


@bp.post("/v1/audio/transcriptions", stream=True)
async def transcriptions(request: Request) -> HTTPResponse | None:
    return await _upload(request, TRANSCRIPTIONS)


@bp.post("/v1/audio/translations", stream=True)
async def translations(request: Request) -> HTTPResponse | None:
    return await _upload(request, TRANSLATIONS)
