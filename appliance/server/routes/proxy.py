"""/proxy/{backend}/{path}: a raw passthrough to one backend (core/passthrough.py), bodies streamed both ways."""

from __future__ import annotations

import asyncio

from sanic import Request
from sanic.compat import Header
from sanic.response import HTTPResponse

from appliance.core import passthrough
from appliance.server.responses import RawResponse, exchange
from appliance.server.routes import Routes

bp = Routes("proxy")

# OPTIONS is left to the CORS preflight middleware (app.py), which answers it before any route.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))


class RawResponder:
    """core.passthrough's RawResponder over one Sanic request."""

    __slots__ = ("_request", "_response")

    def __init__(self, request: Request) -> None:
        self._request = request
        self._response: HTTPResponse | None = None

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self._response = await self._request.respond(RawResponse(status=status, headers=Header(headers)))

    async def send(self, data: bytes) -> None:
        await self._response.send(data)  # type: ignore[union-attr]

    async def end(self) -> None:
        # Sanic ends every answer itself once the handler returns; a HEAD answer cannot take a second end
        # (sanic 25.12: its head_response_ignored is not awaitable), so it is left to that.
        if self._request.method != "HEAD":
            await self._response.eof()  # type: ignore[union-attr]

    async def abort(self) -> None:
        self._request.transport.abort()
        # What a client that left mid-answer causes: Sanic ends the request quietly and sends nothing more.
        raise asyncio.CancelledError


@bp.route("/proxy/<backend>/<path:path>", methods=METHODS, stream=True)
async def proxy(request: Request, backend: str, path: str) -> None:
    gateway = request.app.ctx.gateway
    x = exchange(request)
    stream = request.stream
    body = None
    if stream is not None and stream.request_body:
        body = passthrough.Upload(stream.read, int(gateway.settings.server.max_body_mb * 1024 * 1024))
    call = passthrough.Call(request.method, backend, path, request.query_string, list(request.headers.items()),
                            body)
    await passthrough.forward(gateway, x, call, RawResponder(request))
