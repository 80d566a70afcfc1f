"""Responses over a WebSocket (GET /v1/responses): response.create frames in, the stream's events out.

One response in flight per connection: frames are handled in order, each to its terminal event. A bad
frame or a failed turn is answered with an error frame and the socket stays open. The connection keeps
its latest response so ``previous_response_id`` works even with ``store: false``; a failed continuation
forgets it. The key is checked on the handshake (a bad one gets HTTP 401, no upgrade).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from sanic import Request
from sanic.server.websockets.impl import WebsocketImplProtocol

from appliance.api import surfaces
from appliance.api.responses import stream as responses_stream
from appliance.api.responses import translate as responses
from appliance.common.errors import GatewayError
from appliance.common.paths import canonical
from appliance.common.sse import EventSplitter, event_data
from appliance.core import exchange as accounting
from appliance.core import pipeline
from appliance.providers.base import CHAT
from appliance.server.routes import Routes

bp = Routes("responses_ws")

SESSION_HEADER = accounting.SESSION_HEADER


class WebSocketResponder:
    """The pipeline's Responder over a socket: each SSE event's data goes out as one text frame."""

    def __init__(self, ws: WebsocketImplProtocol) -> None:
        self._ws = ws
        self._splitter = EventSplitter()

    async def complete(self, status: int, headers: dict[str, str], body: bytes) -> None:
        await self._ws.send(body.decode())

    async def start_stream(self, headers: dict[str, str]) -> None:
        return None

    async def send(self, data: bytes) -> None:
        for event in self._splitter.feed(data):
            payload = event_data(event)
            if payload and payload != b"[DONE]":
                await self._ws.send(payload.decode())

    async def end_stream(self, data: bytes) -> None:
        await self.send(data)


@bp.websocket("/v1/responses")
async def responses_socket(request: Request, ws: WebsocketImplProtocol) -> None:
    gateway = request.app.ctx.gateway
    session = accounting.session_id_of(request.headers.get(SESSION_HEADER)) or f"wsresp_{uuid.uuid4()}"
    closes_at = time.monotonic() + gateway.settings.responses.ws_max_minutes * 60
    latest: dict[str, list[dict[str, Any]]] = {}  # this connection's latest response -> its conversation
    while True:
        try:
            frame = await asyncio.wait_for(ws.recv(), max(0.0, closes_at - time.monotonic()))
        except TimeoutError:
            await _send(ws, responses.ws_error_frame(GatewayError(
                "websocket_connection_limit_reached", "This WebSocket connection has reached its time limit "
                f"({gateway.settings.responses.ws_max_minutes:g} minutes); open a new one.", status=400,
                type="invalid_request_error")))
            await ws.close(1000)
            return
        if frame is None:  # the client closed
            return
        await _turn(request, ws, frame, session, latest)


async def _turn(request: Request, ws: WebsocketImplProtocol, frame: str | bytes, session: str,
                latest: dict[str, list[dict[str, Any]]]) -> None:
    gateway = request.app.ctx.gateway
    principal = request.ctx.principal
    x = _exchange(request, session)
    stream_id: str | None = None
    try:
        body, generate = responses_stream.ws_request(frame)
        stream_id = body.get("stream_id") if isinstance(body.get("stream_id"), str) else None
        x.body = body
        turn = await surfaces.responses_turn(gateway, body, principal.key_id, latest)
        if not generate:
            await _warm_up(gateway, ws, turn)
        else:
            await pipeline.serve(gateway, CHAT, turn.chat, x, WebSocketResponder(ws),
                                 surfaces.responses_surface(turn))
    except GatewayError as exc:
        accounting.record(gateway, x, exc.status, error_code=exc.code)
        latest.pop(str((x.body or {}).get("previous_response_id")), None)  # a failed continuation forgets it
        await _send(ws, responses.ws_error_frame(exc, stream_id=stream_id))
        return
    latest.clear()  # only the latest response stays continuable from memory
    if turn.conversation is not None:
        latest[turn.response_id] = turn.conversation


async def _warm_up(gateway: Any, ws: WebsocketImplProtocol, turn: surfaces.ResponsesTurn) -> None:
    """``generate: false``: no backend call; a response with empty output to chain from."""
    stream = responses_stream.ResponsesStream(turn.request, response_id=turn.response_id, created_at=turn.created_at)
    events = stream.warmup()
    if stream.response is not None:
        await turn.store(gateway, stream.response)
    for event in events:
        await _send(ws, event)


def _exchange(request: Request, session: str) -> accounting.Exchange:
    """One turn's exchange: its own request id; the session id travels to the backend and into the request log."""
    rid = request.app.ctx.request_ids()
    headers = accounting.forwardable(request.headers.items())
    headers[SESSION_HEADER] = session
    return accounting.Exchange(path=canonical(request.path), request_id=rid, upstream_id=rid, headers=headers,
                               principal=request.ctx.principal, session_id=session)


async def _send(ws: WebsocketImplProtocol, event: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(event).decode())
