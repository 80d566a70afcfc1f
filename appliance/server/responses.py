"""Turning pipeline output and gateway errors into Sanic responses."""

from __future__ import annotations

import logging

from sanic import Request
from sanic.exceptions import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestCancelled,
    RequestTimeout,
    SanicException,
    ServiceUnavailable,
)
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse, ResponseStream

from appliance import pipeline
from appliance.errors import GatewayError

log = logging.getLogger("appliance.server")

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"


class SanicResponder:
    """The pipeline's Responder over one Sanic request."""

    __slots__ = ("_request", "_stream", "response")

    def __init__(self, request: Request) -> None:
        self._request = request
        self._stream: HTTPResponse | ResponseStream | None = None
        self.response: HTTPResponse | None = None

    async def complete(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.response = HTTPResponse(body, status=status, headers=headers, content_type=JSON)

    async def start_stream(self, headers: dict[str, str]) -> None:
        headers.setdefault("Cache-Control", "no-cache")
        headers["X-Accel-Buffering"] = "no"  # a reverse proxy in front must not buffer the stream
        self._stream = await self._request.respond(status=200, headers=headers, content_type=SSE)

    async def send(self, data: bytes) -> None:
        await self._stream.send(data)  # type: ignore[union-attr]

    async def end_stream(self) -> None:
        await self._stream.eof()  # type: ignore[union-attr]


def exchange(request: Request) -> pipeline.Exchange:
    x = pipeline.Exchange(path=request.path, request_id=str(request.id), headers=dict(request.headers))
    request.ctx.exchange = x
    return x


def json_response(data: bytes, request: Request, status: int = 200) -> HTTPResponse:
    return HTTPResponse(data, status=status, headers={"X-Request-ID": str(request.id)}, content_type=JSON)


def as_gateway_error(exception: BaseException) -> GatewayError:
    if isinstance(exception, GatewayError):
        return exception
    if isinstance(exception, RequestCancelled):  # the client left; nobody reads this answer
        return GatewayError("client_closed", "The client closed the connection.", status=pipeline.CLIENT_CLOSED)
    if isinstance(exception, PayloadTooLarge):
        return GatewayError("body_too_large", "The request body is larger than this gateway accepts "
                            "(server.max_body_mb).")
    if isinstance(exception, NotFound):
        return GatewayError("not_found", "Unknown path. See GET /v1/models and the README for the endpoints.")
    if isinstance(exception, MethodNotAllowed):
        return GatewayError("method_not_allowed", str(exception), headers=dict(exception.headers or {}))
    if isinstance(exception, RequestTimeout):
        return GatewayError("invalid_value", "The request body did not arrive in time.", status=408)
    if isinstance(exception, ServiceUnavailable):  # Sanic's response timeout
        return GatewayError("backend_timeout", "The request took longer than the gateway allows.")
    if isinstance(exception, BadRequest):
        return GatewayError("invalid_value", str(exception))
    if isinstance(exception, SanicException) and exception.status_code < 500:
        return GatewayError("invalid_value", str(exception), status=exception.status_code)
    return GatewayError("internal_error", "The gateway failed to handle this request; see its log.")


class GatewayErrorHandler(ErrorHandler):
    """Every error, ours or Sanic's, leaves in the OpenAI envelope with the true status."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        error = as_gateway_error(exception)
        if error.code == "internal_error":
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=exception)
        x = getattr(request.ctx, "exchange", None)
        gateway = getattr(request.app.ctx, "gateway", None)
        if x is None and request.path.startswith("/v1/") and gateway is not None:
            x = exchange(request)  # failed before its handler ran (e.g. body too large): still logged
        if x is not None and gateway is not None:
            pipeline.record(gateway, x, error.status, error_code=error.code)
        headers = x.response_headers() if x is not None else {"X-Request-ID": str(request.id)}
        headers.update(error.headers)
        return HTTPResponse(error.json_body(str(request.id)), status=error.status, headers=headers,
                            content_type=JSON)
