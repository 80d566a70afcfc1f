"""Turning pipeline output and gateway errors into Sanic responses."""

from __future__ import annotations

import itertools
import logging
import secrets
import uuid
from collections.abc import Iterator

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
from sanic.helpers import has_message_body
from sanic.response import HTTPResponse, ResponseStream
from sanic.response.types import HEADER_TRANSLATION_TABLE

from appliance.api.messages import translate as messages
from appliance.api.responses import translate as responses
from appliance.common.errors import GatewayError
from appliance.common.paths import PROXY, V1, canonical
from appliance.core import exchange as accounting
from appliance.server.access import stands_in
from appliance.storage.db import DatabaseUnavailable

log = logging.getLogger("appliance.server")

JSON = "application/json"
MESSAGES_PATH = "/v1/messages"
RESPONSES_PATH = "/v1/responses"
SSE = "text/event-stream; charset=utf-8"


def _clean(text: str) -> str:
    # A printable string holds no CR, LF or NUL: only the rare other one pays for str.translate.
    return text if text.isprintable() else text.translate(HEADER_TRANSLATION_TABLE)


class Response(HTTPResponse):
    """Sanic's HTTPResponse, with the same header cleaning done cheaper.

    Sanic runs str.translate over every header name and value of every response (~1 us each, ~6 % of a
    worker's CPU on a proxied request with its rate-limit headers); a printable string needs no change.
    """

    __slots__ = ()

    @property
    def processed_headers(self) -> Iterator[tuple[bytes, bytes]]:
        if has_message_body(self.status):
            self.headers.setdefault("content-type", self.content_type)
        return ((_clean(name).encode("ascii"), _clean(f"{value}").encode(errors="surrogateescape"))
                for name, value in self.headers.items())


class RawResponse(Response):
    """A backend's answer passed through: its headers as they came, no Content-Type of ours added."""

    __slots__ = ()

    @property
    def processed_headers(self) -> Iterator[tuple[bytes, bytes]]:
        return ((_clean(name).encode("ascii"), _clean(f"{value}").encode(errors="surrogateescape"))
                for name, value in self.headers.items())


class SanicResponder:
    """The pipeline's Responder over one Sanic request."""

    __slots__ = ("_request", "_stream", "response")

    def __init__(self, request: Request) -> None:
        self._request = request
        self._stream: HTTPResponse | ResponseStream | None = None
        self.response: HTTPResponse | None = None

    async def complete(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.response = Response(body, status=status, headers=headers, content_type=JSON)

    async def start_stream(self, headers: dict[str, str]) -> None:
        """Events, or (with a Content-Type among ``headers``) another body that goes out as it comes."""
        content_type = headers.pop("Content-Type", SSE)
        headers.setdefault("Cache-Control", "no-cache")
        headers["X-Accel-Buffering"] = "no"  # a reverse proxy in front must not buffer the stream
        self._stream = await self._request.respond(Response(status=200, headers=headers,
                                                            content_type=content_type))

    async def send(self, data: bytes) -> None:
        await self._stream.send(data)  # type: ignore[union-attr]

    async def end_stream(self, data: bytes) -> None:
        await self._stream.send(data, end_stream=True)  # type: ignore[union-attr]


class RequestIds:
    """Request ids for one process: a random prefix and a counter, cheaper than a uuid4 per request.

    They are shaped like UUIDs because some backends (llama-cpp-python) refuse any other X-Request-ID.
    """

    def __init__(self) -> None:
        prefix = secrets.token_hex(8)
        self._prefix = f"{prefix[:8]}-{prefix[8:12]}-{prefix[12:16]}-"
        self._count = itertools.count()

    def __call__(self) -> str:
        n = next(self._count)
        return f"{self._prefix}{n >> 48 & 0xFFFF:04x}-{n & 0xFFFFFFFFFFFF:012x}"


def _uuid_shaped(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


_MAX_CLIENT_ID = 200


def request_id(request: Request) -> str:
    """The client's X-Request-ID, echoed as sent, or a new one."""
    rid = getattr(request.ctx, "request_id", None)
    if rid is None:
        sent = request.headers.get("x-request-id")
        rid = sent if sent and len(sent) <= _MAX_CLIENT_ID and sent.isprintable() else request.app.ctx.request_ids()
        request.ctx.request_id = rid
    return rid


def exchange(request: Request) -> accounting.Exchange:
    rid = request_id(request)
    upstream_id = rid if "x-request-id" not in request.headers or _uuid_shaped(rid) else request.app.ctx.request_ids()
    headers = request.headers.items()
    x = accounting.Exchange(path=canonical(request.path), request_id=rid, upstream_id=upstream_id,
                            headers=accounting.forwardable(headers), controls=accounting.controls(headers),
                            principal=getattr(request.ctx, "principal", None), method=request.method,
                            client=request.ip)
    request.ctx.exchange = x
    return x


def json_response(data: bytes, request: Request, status: int = 200) -> HTTPResponse:
    return Response(data, status=status, headers={"X-Request-ID": request_id(request)}, content_type=JSON)


def as_gateway_error(exception: BaseException, request: Request) -> GatewayError:
    if isinstance(exception, GatewayError):
        return exception
    if isinstance(exception, RequestCancelled):  # the client left; nobody reads this answer
        return GatewayError("client_closed", "The client closed the connection.", status=accounting.CLIENT_CLOSED)
    if isinstance(exception, PayloadTooLarge):
        if stands_in(request):  # the head was too large: Sanic could not read a request at all
            return GatewayError("request_header_fields_too_large", "The request line and headers are larger "
                                "than this gateway accepts (server.max_header_kb).")
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
    if isinstance(exception, DatabaseUnavailable):
        return GatewayError("database_unavailable", "The database cannot be reached; try again shortly.")
    if isinstance(exception, BadRequest):
        return GatewayError("invalid_value", str(exception))
    if isinstance(exception, SanicException) and exception.status_code < 500:
        return GatewayError("invalid_value", str(exception), status=exception.status_code)
    return GatewayError("internal_error", "The gateway failed to handle this request; see its log.")


class GatewayErrorHandler(ErrorHandler):
    """Every error, ours or Sanic's, leaves in the OpenAI envelope with the true status."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        error = as_gateway_error(exception, request)
        if error.code == "internal_error":
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=exception)
        x = getattr(request.ctx, "exchange", None)
        gateway = getattr(request.app.ctx, "gateway", None)
        path = canonical(request.path)
        if x is None and path.startswith((V1, PROXY, "/rerank")) and gateway is not None:
            x = exchange(request)  # failed before its handler ran (e.g. body too large): still logged
        if x is not None and gateway is not None:
            accounting.record(gateway, x, error.status, error_code=error.code)
        headers = x.response_headers() if x is not None else {"X-Request-ID": request_id(request)}
        headers.update(error.headers)
        if path.startswith(MESSAGES_PATH):  # Anthropic clients read Anthropic's error shape
            return Response(messages.error_body(error, request_id(request)), status=messages.error_status(error),
                                headers=headers, content_type=JSON)
        if path.startswith(RESPONSES_PATH):
            return Response(responses.error_body(error, request_id(request)), status=error.status,
                                headers=headers, content_type=JSON)
        return Response(error.json_body(request_id(request)), status=error.status, headers=headers,
                            content_type=JSON)
