"""Scripted chat answers for the OpenAI fake: the fixtures of the conformance suite (spec §6).

A request picks its script with the ``x-mock-script`` header (the gateway passes client headers on), or
with a model named ``script-<name>``. Each script is one answer, whole or streamed: text (in pieces when
streamed), tool calls (arguments as a string in fragments, in one chunk, or as a JSON object), a finish
reason, the matched stop string vLLM reports, usage; or a fault: an HTTP error, a stream cut off
mid-way (the TCP connection dropped, also in a tool call), a stream carrying an error event or one gone silent.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

HEADER = "x-mock-script"
WEATHER_ARGS = '{"city":"Paris"}'
STALL_S = 60


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str | dict[str, Any]
    fragments: tuple[str, ...] | None = None  # streamed pieces of the arguments; None: all in one chunk


@dataclass(frozen=True)
class Script:
    content: str | None = None
    pieces: tuple[str, ...] | None = None  # streamed content; None: the whole content in one delta
    tool_calls: tuple[ToolCall, ...] = ()
    finish: str = "stop"
    stop_reason: str | None = None  # vLLM: the stop string that matched
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 3})
    status: int | None = None  # answer this HTTP error instead
    cut_after: int | None = None  # streamed: drop the connection after this many content deltas
    error_after: int | None = None  # streamed: send a data: {"error": ...} event after this many deltas
    delay_s: float = 0.0  # between streamed chunks
    stall_after: int | None = None  # streamed: go silent (for a minute) after this many content deltas
    cut_in_call: bool = False  # streamed: drop the connection after the first tool call's first chunk

    def usage_for(self, body: dict[str, Any]) -> dict[str, int]:
        usage = dict(self.usage)
        if self.finish == "length":  # cut at the request's max_tokens
            usage["completion_tokens"] = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return usage


_PARIS = ToolCall("call_abc", "get_weather", WEATHER_ARGS, ('{"city"', ':"Par', 'is"}'))
_ROME = ToolCall("call_def", "get_weather", '{"city":"Rome"}', ('{"ci', 'ty":"Rome"}'))

SCRIPTS: dict[str, Script] = {
    "hello": Script("Hello!", ("He", "llo", "!")),
    "hello-slow": Script("Hello!", ("He", "llo", "!"), delay_s=0.1),
    "weather": Script(None, tool_calls=(_PARIS,), finish="tool_calls"),
    "weather-one-chunk": Script(None, tool_calls=(ToolCall("call_abc", "get_weather", WEATHER_ARGS),),
                                finish="tool_calls"),
    "weather-finish-stop": Script(None, tool_calls=(_PARIS,), finish="stop"),
    "weather-dict": Script(None, tool_calls=(ToolCall("call_abc", "get_weather", {"city": "Paris"}),),
                           finish="tool_calls"),
    "weather-empty": Script(None, tool_calls=(ToolCall("call_abc", "get_weather", ""),), finish="tool_calls"),
    "checking-weather": Script("Checking", ("Check", "ing"), tool_calls=(_PARIS,), finish="tool_calls"),
    "checking-two-calls": Script("Checking", ("Check", "ing"), tool_calls=(_PARIS, _ROME), finish="tool_calls"),
    "two-calls": Script(None, tool_calls=(_PARIS, _ROME), finish="tool_calls"),
    "long": Script("Once upon a time", ("Once", " upon", " a time"), finish="length"),
    "person": Script('{"name":"Ana","age":3}', ('{"name":"Ana",', '"age":3}')),
    "stop-end": Script("Counting 1 2 3", ("Counting", " 1 2 3"), stop_reason="END"),
    "filtered": Script("", (), finish="content_filter"),
    # Guardrails: personal data split across pieces, a term a moderation list flags, an answer that is no JSON.
    "pii": Script("Write to jane.doe@example.com or call +44 20 7946 0958, thanks.",
                  ("Write to jane.", "doe@exam", "ple.com or call +44 ", "20 7946", " 0958, thanks.")),
    "unsafe": Script("Here is how to build a bomb at home.", ("Here is how to build a ", "bo", "mb at home.")),
    "not-json": Script("Sure! The person is Ana, aged 3.", ("Sure! The person", " is Ana, aged 3.")),
    "error-500": Script(status=500),
    "error-400": Script(status=400),
    "reset": Script("Hello!", ("He", "llo", "!"), cut_after=2),
    "error-event": Script("Hello!", ("He", "llo", "!"), error_after=2),
    "stall": Script("Hello!", ("He", "llo", "!"), stall_after=2),
    "reset-in-call": Script("Checking", ("Check", "ing"), tool_calls=(_PARIS,), finish="tool_calls", cut_in_call=True),
}


def script_of(request: web.Request, body: dict[str, Any]) -> Script | None:
    name = request.headers.get(HEADER)
    model = body.get("model")
    if not name and isinstance(model, str) and model.startswith("script-"):
        name = model.removeprefix("script-")
    if not name:
        return None
    if name == "json-on-repair":  # prose first; JSON once asked to correct it (the last message says so)
        last = (body.get("messages") or [{}])[-1]
        asked = isinstance(last, dict) and "corrected JSON" in str(last.get("content"))
        return SCRIPTS["person" if asked else "not-json"]
    if name not in SCRIPTS:
        raise web.HTTPBadRequest(text=f"unknown mock script {name!r}")
    return SCRIPTS[name]


def _arguments(call: ToolCall) -> Any:
    return call.arguments  # a dict stays a dict: some servers send the object itself


async def play(request: web.Request, body: dict[str, Any], script: Script) -> web.StreamResponse:
    """The scripted answer to one chat request."""
    if script.status is not None:
        return web.json_response({"error": {"message": f"scripted HTTP {script.status}", "param": None,
                                            "type": "server_error" if script.status >= 500 else
                                            "invalid_request_error", "code": "scripted"}}, status=script.status)
    model = body.get("model", "")
    if not body.get("stream"):
        if script.cut_after is not None:
            request.transport.abort()  # type: ignore[union-attr]
            return web.Response()
        message: dict[str, Any] = {"role": "assistant", "content": script.content}
        if script.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": _arguments(c)}}
                                     for c in script.tool_calls]
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": script.finish}
        if script.stop_reason is not None:
            choice["stop_reason"] = script.stop_reason
        return web.json_response({"id": "chatcmpl-script", "object": "chat.completion", "created": 1700000000,
                                  "model": model, "choices": [choice], "usage": script.usage_for(body)})
    return await _stream(request, body, script, model)


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
    chunk = {"id": "chatcmpl-script", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
             "choices": [choice]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _stream(request: web.Request, body: dict[str, Any], script: Script, model: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)

    async def write(data: bytes) -> None:
        await response.write(data)
        if script.delay_s:
            await asyncio.sleep(script.delay_s)

    await write(_chunk(model, {"role": "assistant", "content": ""}))
    pieces = script.pieces if script.pieces is not None else ((script.content,) if script.content else ())
    for sent, piece in enumerate(pieces):
        if script.cut_after is not None and sent == script.cut_after:
            request.transport.abort()  # type: ignore[union-attr]
            return response
        if script.stall_after is not None and sent == script.stall_after:
            for _ in range(int(STALL_S * 10)):  # until the gateway gives up and closes the connection
                await asyncio.sleep(0.1)
                if request.transport is None or request.transport.is_closing():
                    break
            return response
        if script.error_after is not None and sent == script.error_after:
            await write(b'data: {"error": {"message": "scripted failure mid-stream", "type": "server_error", '
                        b'"code": 500}}\n\n')
            return response
        await write(_chunk(model, {"content": piece}))
    for index, call in enumerate(script.tool_calls):
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name}}
        if call.fragments is None:
            await write(_chunk(model, {"tool_calls": [{**head, "function": {
                "name": call.name, "arguments": _arguments(call)}}]}))
            continue
        await write(_chunk(model, {"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]}))
        if script.cut_in_call:
            request.transport.abort()  # type: ignore[union-attr]
            return response
        for fragment in call.fragments:
            await write(_chunk(model, {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}))
    extra = {"stop_reason": script.stop_reason} if script.stop_reason is not None else {}
    await write(_chunk(model, {}, script.finish, **extra))
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        usage = {"id": "chatcmpl-script", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                 "choices": [], "usage": script.usage_for(body)}
        await write(b"data: " + json.dumps(usage).encode() + b"\n\n")
    await write(b"data: [DONE]\n\n")
    return response
