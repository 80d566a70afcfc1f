"""A fake Anthropic Messages API: GET /v1/models, POST /v1/messages (whole or streamed), count_tokens.

It checks what the real API checks first: ``x-api-key`` (401 ``authentication_error`` when it is not
API_KEY) and ``anthropic-version``. The model name picks the answer:

  claude-fake             a text Message (stream: the exact event sequence, text split over deltas)
  claude-fake-tools       a short text, then a tool_use block (stream: input_json_delta fragments)
  claude-fake-overloaded  HTTP 529 overloaded_error
  claude-fake-broken      as claude-fake, but its stream stops after the text with an ``error`` event
  claude-fake-cut         as claude-fake, but its stream ends after the text without message_stop
  anything else           HTTP 404 not_found_error "model: <name>"

While ``fail_next`` is above 0, each POST /v1/messages takes one off it and gets HTTP 500 ``api_error``.

POST /v1/messages/count_tokens answers ``{"input_tokens": count_of(body)}``, or a bare 404 (a proxy
without the route) while ``count_tokens`` is False.

Every request is recorded (path, headers with lower-case names, parsed body, query, and the exact bytes
of the answer it streamed).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.threaded import ThreadedServer

API_KEY = "sk-ant-test"
VERSION = "2023-06-01"
TEXT_MODEL = "claude-fake"
TOOLS_MODEL = "claude-fake-tools"
OVERLOADED_MODEL = "claude-fake-overloaded"
BROKEN_MODEL = "claude-fake-broken"
CUT_MODEL = "claude-fake-cut"
MODELS = [TEXT_MODEL, TOOLS_MODEL, OVERLOADED_MODEL, BROKEN_MODEL, CUT_MODEL]

TEXT_PIECES = ["Hello", " from", " Claude."]
TOOLS_TEXT = "Let me check."
TOOL_ID = "toolu_01FakeWeather"
TOOL_INPUT = {"city": "Paris"}
JSON_PIECES = ["", '{"ci', 'ty": "P', 'aris"}']
USAGE = {"input_tokens": 21, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4}


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any
    query: dict[str, str] = field(default_factory=dict)
    streamed: bytes = b""  # the SSE bytes sent, as written


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message},
                              "request_id": "req_fake"}, status=status)


def _content(model: str) -> list[dict[str, Any]]:
    if model == TOOLS_MODEL:
        return [{"type": "text", "text": TOOLS_TEXT},
                {"type": "tool_use", "id": TOOL_ID, "name": "get_weather", "input": TOOL_INPUT}]
    return [{"type": "text", "text": "".join(TEXT_PIECES)}]


def count_of(body: dict[str, Any]) -> int:
    """The fake's token count of a count_tokens body: one per four characters of its prompt fields."""
    prompt = {name: body.get(name) for name in ("system", "messages", "tools")}
    return 1 + len(json.dumps(prompt)) // 4


class FakeAnthropic(ThreadedServer):
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.count_tokens = True
        self.fail_next = 0
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count)
        super().__init__(app)

    def seen(self, path: str) -> list[Seen]:
        return [seen for seen in self.requests if seen.path == path]

    def last(self, path: str = "/v1/messages") -> Seen:
        found = self.seen(path)
        if not found:
            raise LookupError(f"the fake saw no request to {path}")
        return found[-1]

    async def _record(self, request: web.Request) -> Seen:
        raw = await request.read()
        body: Any = raw or None  # kept as received when it is not JSON
        with contextlib.suppress(ValueError):
            body = json.loads(raw)
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append(Seen(request.path, headers, body, dict(request.query)))
        return self.requests[-1]

    @staticmethod
    def _refused(request: web.Request) -> web.Response | None:
        if request.headers.get("x-api-key") != API_KEY:
            return _error(401, "authentication_error", "invalid x-api-key")
        if request.headers.get("anthropic-version") != VERSION:
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    async def models(self, request: web.Request) -> web.Response:
        await self._record(request)
        refused = self._refused(request)
        if refused is not None:
            return refused
        data = [{"type": "model", "id": model, "display_name": model.replace("-", " ").title(),
                 "created_at": "2025-05-14T00:00:00Z", "max_input_tokens": 200000, "max_tokens": 64000,
                 "capabilities": {"image_input": {"supported": True}, "thinking": {"supported": False}}}
                for model in MODELS]
        return web.json_response({"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]})

    async def count(self, request: web.Request) -> web.Response:
        seen = await self._record(request)
        if not self.count_tokens:
            return web.Response(status=404, text="Not Found")
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = seen.body if isinstance(seen.body, dict) else {}
        if body.get("model") not in MODELS:
            return _error(404, "not_found_error", f"model: {body.get('model')}")
        return web.json_response({"input_tokens": count_of(body)})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = seen.body if isinstance(seen.body, dict) else {}
        model = body.get("model")
        if self.fail_next > 0:
            self.fail_next -= 1
            return _error(500, "api_error", "Internal server error")
        if not isinstance(body.get("max_tokens"), int) or not body.get("messages"):
            return _error(400, "invalid_request_error", "max_tokens and messages are required")
        if model == OVERLOADED_MODEL:
            return _error(529, "overloaded_error", "Overloaded")
        if model not in MODELS:
            return _error(404, "not_found_error", f"model: {model}")
        if body.get("stream"):
            return await self._stream(request, model, seen)
        stop = "tool_use" if model == TOOLS_MODEL else "end_turn"
        return web.json_response({"id": "msg_fake01", "type": "message", "role": "assistant", "model": model,
                                  "content": _content(model), "stop_reason": stop, "stop_sequence": None,
                                  "usage": USAGE}, headers={"request-id": "req_fake"})

    async def _stream(self, request: web.Request, model: str, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "request-id": "req_fake"})
        await response.prepare(request)

        async def send(data: dict[str, Any]) -> None:
            event = f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()
            seen.streamed += event
            await response.write(event)

        start_usage = {**USAGE, "output_tokens": 1}
        await send({"type": "message_start", "message": {
            "id": "msg_fake01", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
        pieces = [TOOLS_TEXT] if model == TOOLS_MODEL else TEXT_PIECES
        await send({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        await send({"type": "ping"})
        for piece in pieces:
            await send({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
        if model == BROKEN_MODEL:
            await send({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        if model in (BROKEN_MODEL, CUT_MODEL):
            return response
        await send({"type": "content_block_stop", "index": 0})
        if model == TOOLS_MODEL:
            await send({"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": TOOL_ID, "name": "get_weather", "input": {}}})
            for piece in JSON_PIECES:
                await send({"type": "content_block_delta", "index": 1,
                            "delta": {"type": "input_json_delta", "partial_json": piece}})
            await send({"type": "content_block_stop", "index": 1})
        stop = "tool_use" if model == TOOLS_MODEL else "end_turn"
        await send({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": USAGE["output_tokens"]}})
        await send({"type": "message_stop"})
        return response
