"""A scriptable OpenAI-compatible upstream, for what a real server cannot show: faults and exact timing.

The model name picks the behaviour:

  fake-chat         a normal answer with usage (stream: role, 3 content chunks, finish, usage if asked)
  fake-tools        answers with a tool call (streamed as argument fragments)
  fake-nousage      answers without usage, streams without a usage chunk
  fake-500          HTTP 500 with an OpenAI error envelope
  fake-500-text     HTTP 500 with a plain-text body
  fake-400          HTTP 400 with an envelope naming param "temperature"
  fake-vllm-error   HTTP 400 in vLLM's shape (integer code)
  fake-404-bare     HTTP 404 with a non-JSON body (a server without the route)
  fake-slow-<ms>    a normal answer after <ms> milliseconds
  fake-fail-<n>-<status>[-ra<s>]-<tag>
                    the first <n> requests with this exact name get HTTP <status> (with Retry-After: <s>
                    when given), later ones a normal answer: a backend that recovers
  fake-hang         never answers
  fake-reset        streams two chunks, then drops the connection
  fake-garbage      streams bytes that are no SSE (not even UTF-8), then [DONE]
  fake-garbage-late streams its content chunks, then such bytes, then its finish chunk and [DONE]
  fake-long         streams a chunk every 50 ms for 30 s; notes when the client went away
  fake-embed        embeddings (8 dims)
  org/fake-slash    a normal answer (a model id that contains a slash)
  fake-rerank, fake-moderation, fake-image, fake-whisper, fake-tts
                    names for the extension endpoints (tests/fakes/extensions.py: rerank and score,
                    moderations, images, transcriptions and translations, speech); any name is answered there

A request with an ``x-mock-script`` header (or a model named ``script-<name>``) gets a scripted answer
instead: the conformance fixtures of tests/fakes/chat_scripts.py. ``GET /_mock/last_request`` answers the
body of the latest chat request (``last_chat()`` in-process).

Two body fields (which the gateway passes through, as any unknown field) script one request whatever its
model: ``fake_status`` answers that HTTP status with an error envelope, ``fake_delay_ms`` waits first.

Every request is recorded (path, headers, parsed body, and for fake-long when it was cancelled). Chat
requests that carry ``X-Appliance-Batch`` (batch lines) are counted while in flight: ``batch_max_in_flight``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import chat_scripts, extensions
from tests.support.threaded import ThreadedServer

MODELS = ["fake-chat", "fake-tools", "fake-nousage", "fake-500", "fake-500-text", "fake-400", "fake-vllm-error",
          "fake-404-bare", "fake-hang", "fake-reset", "fake-long", "fake-embed", "fake-slow-300", "org/fake-slash",
          "fake-rerank", "fake-moderation", "fake-image", "fake-whisper", "fake-tts"]
GARBAGE = b"\x00\xff\xfe\x81 not an event \xc3\x28\n\n"  # what a broken upstream might send mid-stream
REPLY_TEXT = "Hello from the fake."
STREAM_PIECES = ["Hello", " from", " the fake."]
USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)
    cancelled_at: float | None = None
    finished_at: float | None = None


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.failures: dict[str, int] = {}  # fake-fail-* name -> failures served so far
        self.batch_in_flight = 0
        self.batch_max_in_flight = 0
        self.uploads: list[extensions.Upload] = []  # multipart bodies as received (extensions.py)
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/_mock/last_request", self.last_request)
        extensions.add_routes(app, self)
        self.server = ThreadedServer(app)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> FakeOpenAI:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def chats(self) -> list[Seen]:
        """The chat requests seen with a JSON object for a body, oldest first (a /proxy test's raw bytes are not)."""
        return [seen for seen in self.requests if seen.path == "/v1/chat/completions" and isinstance(seen.body, dict)]

    def last_chat(self) -> Any:
        """The body of the latest chat request."""
        found = self.chats()
        if not found:
            raise LookupError("the fake saw no chat request")
        return found[-1].body

    def find(self, request_id: str) -> Seen:
        for seen in reversed(self.requests):
            if seen.headers.get("X-Request-ID") == request_id:
                return seen
        raise LookupError(f"the fake saw no request with id {request_id}")

    async def _record(self, request: web.Request) -> Seen:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        seen = Seen(request.path, dict(request.headers), body)
        self.requests.append(seen)
        return seen

    async def last_request(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self.last_chat())
        except LookupError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=404)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in MODELS]})

    async def _fault(self, model: str) -> web.StreamResponse | None:
        if model == "fake-500":
            return web.json_response({"error": {"message": "the fake broke", "type": "server_error", "param": None,
                                                "code": "fake_failure"}}, status=500)
        if model == "fake-500-text":
            return web.Response(status=500, text="upstream exploded")
        if model == "fake-400":
            return web.json_response({"error": {"message": "temperature too hot", "type": "invalid_request_error",
                                                "param": "temperature", "code": "invalid_value"}}, status=400)
        if model == "fake-vllm-error":
            return web.json_response({"error": {"message": "bad things", "type": "BadRequestError", "param": None,
                                                "code": 400}}, status=400)
        if model == "fake-404-bare":
            return web.Response(status=404, text="Not Found")
        if model == "fake-hang":
            await asyncio.sleep(3600)
        if model.startswith("fake-slow-"):
            await asyncio.sleep(int(model.rsplit("-", 1)[1]) / 1000)
        if model.startswith("fake-fail-"):
            return self._scripted_failure(model)
        return None

    def _scripted_failure(self, model: str) -> web.Response | None:
        parts = model.split("-")
        count, status = int(parts[2]), int(parts[3])
        served = self.failures.get(model, 0)
        if served >= count:
            return None
        self.failures[model] = served + 1
        headers = {"Retry-After": parts[4][2:]} if parts[4].startswith("ra") else {}
        return web.json_response({"error": {"message": f"scripted failure {served + 1} of {count}",
                                            "type": "server_error", "param": None, "code": "scripted"}},
                                 status=status, headers=headers)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if "X-Appliance-Batch" not in request.headers:
            return await self._chat(request)
        self.batch_in_flight += 1
        self.batch_max_in_flight = max(self.batch_max_in_flight, self.batch_in_flight)
        try:
            return await self._chat(request)
        finally:
            self.batch_in_flight -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        body = seen.body if isinstance(seen.body, dict) else {}
        model = body.get("model", "")
        script = chat_scripts.script_of(request, body)
        if script is not None:
            try:
                return await chat_scripts.play(request, body, script)
            finally:
                seen.finished_at = time.time()
        try:
            if body.get("fake_delay_ms"):
                await asyncio.sleep(body["fake_delay_ms"] / 1000)
            if body.get("fake_status"):
                return web.json_response({"error": {"message": f"scripted status {body['fake_status']}",
                                                    "type": "invalid_request_error", "param": None,
                                                    "code": "scripted"}}, status=body["fake_status"])
            fault = await self._fault(model)
        except asyncio.CancelledError:
            seen.cancelled_at = time.time()
            raise
        if fault is not None:
            return fault
        if body.get("stream"):
            return await self._stream_chat(request, seen, body, model)
        message: dict[str, Any] = {"role": "assistant", "content": REPLY_TEXT}
        finish = "stop"
        if model == "fake-tools":
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_fake1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}]}
            finish = "tool_calls"
        reply: dict[str, Any] = {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "system_fingerprint": "fp_fake",
        }
        if model != "fake-nousage":
            reply["usage"] = USAGE
        return web.json_response(reply, headers={"x-fake-upstream": "yes"})

    def _chunk(self, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def _stream_chat(self, request: web.Request, seen: Seen, body: dict[str, Any],
                           model: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            if model == "fake-garbage":
                await response.write(GARBAGE)
                await response.write(b"data: [DONE]\n\n")
                return response
            await response.write(self._chunk(model, {"role": "assistant", "content": ""}))
            if model == "fake-tools":
                call = {"index": 0, "id": "call_fake1", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
                await response.write(self._chunk(model, {"tool_calls": [call]}))
                for piece in ('{"city"', ': "Tok', 'yo"}'):
                    await response.write(self._chunk(model, {"tool_calls": [
                        {"index": 0, "function": {"arguments": piece}}]}))
                finish = "tool_calls"
            elif model == "fake-long":
                for i in range(600):
                    await response.write(self._chunk(model, {"content": f" w{i}"}))
                    await asyncio.sleep(0.05)
                finish = "length"
            else:
                for piece in STREAM_PIECES:
                    await response.write(self._chunk(model, {"content": piece}))
                if model == "fake-reset":
                    await asyncio.sleep(0.05)
                    request.transport.abort()  # type: ignore[union-attr]
                    return response
                if model == "fake-garbage-late":
                    await response.write(GARBAGE)
                finish = "stop"
            await response.write(self._chunk(model, {}, finish))
            options = body.get("stream_options") or {}
            if options.get("include_usage") and model != "fake-nousage":
                usage = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                         "model": model, "choices": [], "usage": USAGE}
                await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            seen.finished_at = time.time()
        except (asyncio.CancelledError, ConnectionResetError):
            seen.cancelled_at = time.time()
            raise
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        body = seen.body if isinstance(seen.body, dict) else {}
        model = body.get("model", "")
        fault = await self._fault(model)
        if fault is not None:
            return fault
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for piece in STREAM_PIECES:
                chunk = {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model,
                         "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]}
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model,
                         "choices": [], "usage": USAGE}
                await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.json_response({
            "id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "text": REPLY_TEXT, "logprobs": None, "finish_reason": "stop"}],
            "usage": USAGE,
        })

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        body = seen.body if isinstance(seen.body, dict) else {}
        fault = await self._fault(body.get("model", ""))
        if fault is not None:
            return fault
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.125 * (i + 1)] * 8} for i in range(len(inputs))]
        return web.json_response({"object": "list", "data": data, "model": body.get("model"),
                                  "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}})
