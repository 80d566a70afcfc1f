"""The Anthropic Messages stream, without I/O: chat completion chunks in, Anthropic SSE events out.

``MessagesStream`` is the state machine of spec-responses-messages.md §5.3; the request and answer
mappings it shares (tool ids and arguments, usage, stop reasons, error wording) are in translate.py.

Tool-call arguments are buffered per call and sent as one ``input_json_delta`` of validated JSON when the
call ends. The SDK re-parses every prefix, so one invalid fragment from a small model would kill the
client's stream, and ``""`` has to become ``{}`` anyway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance.accounts.usage import Tokens, estimate_prompt
from appliance.api.messages.request import _is_int
from appliance.api.messages.translate import (
    _loads,
    _stop_reason,
    _usage_dict,
    anthropic_usage,
    error_message,
    error_status,
    error_type,
    new_id,
    tool_input,
    tool_use_id,
)
from appliance.common.chat import reasoning_text
from appliance.common.errors import GatewayError

# While tool arguments are being buffered nothing reaches the client; a ping keeps proxies that drop idle
# connections (nginx: 60 s) from cutting a long tool call short.
PING_EVERY_S = 15.0


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One named SSE event: the SDK dispatches on the ``event:`` line and drops unnamed ones."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass(slots=True)
class _Call:
    """One tool call being buffered until it is complete."""

    id: str | None
    name: str | None
    parts: list[str] = field(default_factory=list)

    def arguments(self) -> str:
        return "".join(self.parts)


class MessagesStream:
    """Chat completion chunks in, Anthropic SSE events out (spec §5.3).

    ``start()`` when the backend answered 200, ``feed()`` per parsed chunk, then ``finish()`` when the
    backend stream ended normally or ``error()`` when it broke. Text and thinking stream as they come;
    tool calls are buffered and each is sent whole at the finish, so text always precedes tool use and
    the client never sees an unparseable argument prefix. The message_delta waits for ``finish()``
    because usage arrives in a chunk after the finish reason. Nothing is sent after message_stop.
    """

    __slots__ = ("_by_index", "_calls", "_finish", "_last_sent", "_matched", "_next_index", "_open",
                 "_output_chars", "_refused", "_request", "_state", "_thinking", "_tool_blocks", "id",
                 "input_tokens", "model", "stop_reason", "stop_sequence", "usage")

    def __init__(self, model: str, *, request: dict[str, Any] | None = None, input_tokens: int | None = None,
                 thinking: bool = False) -> None:
        self.id = new_id("msg_")
        self.model = model
        self._request = request
        # Claude Code keeps the usage of message_start: 0 there breaks its accounting (spec §5.4 pitfall 7).
        self.input_tokens = input_tokens if input_tokens is not None else estimate_prompt(request or {})
        self._thinking = thinking
        self._state = "new"  # new -> open -> closed
        self._next_index = 0
        self._open: str | None = None  # the kind of the content block open now: "text" or "thinking"
        self._calls: list[_Call] = []  # buffered, in the order they first appeared
        self._by_index: dict[int, _Call] = {}  # the chat tool-call index -> the call its fragments extend
        self._tool_blocks = 0
        self._refused = False
        self._finish: str | None = None
        self._matched: Any = None
        self._output_chars = 0
        self._last_sent = time.monotonic()
        self.usage: dict[str, Any] | None = None  # the last chat usage the backend reported
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    # -- what the caller reads once the stream is over

    @property
    def output_tokens(self) -> int:
        """The backend's completion tokens, else an estimate from the characters streamed."""
        completion = self.usage.get("completion_tokens") if self.usage else None
        return completion if _is_int(completion) else -(-self._output_chars // 4)

    @property
    def tokens(self) -> Tokens:
        """Usage to record: reported by the backend, else estimated."""
        usage = anthropic_usage(self.usage)
        if usage is None:
            return Tokens(self.input_tokens, self.output_tokens, estimated=True)
        prompt = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
        return Tokens(prompt, self.output_tokens, cached=usage["cache_read_input_tokens"])

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    # -- events

    def start(self) -> bytes:
        """message_start (an empty message). The first ping follows the first content_block_start, as Anthropic
        sends them (and as spec §6 case 19 orders them)."""
        if self._state != "new":
            return b""
        self._state = "open"
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": _usage_dict(self.input_tokens, 0)}
        return self._sent(sse_event("message_start", {"type": "message_start", "message": message}))

    def ping(self) -> bytes:
        return b"event: ping\ndata: {\"type\":\"ping\"}\n\n" if self._state == "open" else b""

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events one chat.completion.chunk yields (often none)."""
        if self._state == "closed" or not isinstance(chunk, dict):
            return b""
        out = [self.start()]
        if chunk.get("error") is not None:  # vLLM and others report a failure mid-stream as a chunk
            return b"".join(out) + self.error(_chunk_error(chunk["error"]))
        usage = chunk.get("usage")
        if isinstance(usage, dict) and _is_int(usage.get("prompt_tokens")):
            self.usage = usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)
        events = b"".join(out)
        if events:
            return self._sent(events)
        if self._calls and time.monotonic() - self._last_sent >= PING_EVERY_S:
            return self._sent(self.ping())
        return b""

    def finish(self, usage: dict[str, Any] | None = None, *, appliance: dict[str, Any] | None = None) -> bytes:
        """The end of a stream that ended normally: open blocks closed, buffered tool calls, message_delta
        (stop reason, usage) and message_stop. ``usage``: chat usage to report instead of the last seen.
        ``appliance``: the gateway's own note for the message_delta (a mid-stream failover)."""
        if self._state == "closed":
            return b""
        out = [self.start()]
        if usage is not None:
            self.usage = usage
        self._close_block(out)
        self._flush_calls(out)
        self.stop_reason, self.stop_sequence = _stop_reason(
            self._finish, tools=self._tool_blocks > 0, refused=self._refused,
            matched=self._matched, completion=self.usage.get("completion_tokens") if self.usage else None,
            request=self._request)
        delta_usage = anthropic_usage(self.usage) or _usage_dict(self.input_tokens, self.output_tokens)
        message_delta: dict[str, Any] = {
            "type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
            "usage": {"output_tokens": delta_usage.pop("output_tokens"), **delta_usage}}
        if appliance is not None:
            message_delta["appliance"] = appliance
        out.append(sse_event("message_delta", message_delta))
        out.append(sse_event("message_stop", {"type": "message_stop"}))
        self._state = "closed"
        return b"".join(out)

    def error(self, err: GatewayError) -> bytes:
        """An ``event: error`` after the open block is closed; no message_stop follows (the SDK raises)."""
        if self._state == "closed":
            return b""
        out: list[bytes] = []
        if self._state == "open":
            self._close_block(out)
        self._calls.clear()
        self._state = "closed"
        out.append(sse_event("error", {"type": "error", "error": {"type": error_type(error_status(err, answered=True)),
                                                                   "message": error_message(err)}}))
        return b"".join(out)

    # -- state machine

    def _sent(self, events: bytes) -> bytes:
        self._last_sent = time.monotonic()
        return events

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        # Content first, then the finish reason: fake-streaming servers put both in one chunk (pitfall 2).
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        reasoning = reasoning_text(delta)
        if reasoning:
            self._output_chars += len(reasoning)
            if self._thinking:
                self._delta(out, "thinking", {"type": "thinking_delta", "thinking": reasoning})
        content = delta.get("content")
        refusal = delta.get("refusal")  # OpenAI streams a refusal beside the content, never with it
        if not content and isinstance(refusal, str) and refusal:
            content, self._refused = refusal, True
        if isinstance(content, str) and content:
            self._output_chars += len(content)
            self._delta(out, "text", {"type": "text_delta", "text": content})
        calls = delta.get("tool_calls")
        for entry in calls if isinstance(calls, list) else ():
            if isinstance(entry, dict):
                self._tool_fragment(entry)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._close_block(out)
            self._flush_calls(out)
            self._finish, self._matched = finish, choice.get("stop_reason")

    def _delta(self, out: list[bytes], kind: str, delta: dict[str, Any]) -> None:
        if self._open != kind:
            self._close_block(out)
            block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "",
                                                                           "signature": ""}
            self._start_block(out, block)
            self._open = kind
        out.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": self._next_index - 1,
                                                     "delta": delta}))

    def _start_block(self, out: list[bytes], block: dict[str, Any]) -> None:
        out.append(sse_event("content_block_start", {"type": "content_block_start", "index": self._next_index,
                                                     "content_block": block}))
        if self._next_index == 0:
            out.append(self.ping())
        self._next_index += 1

    def _close_block(self, out: list[bytes]) -> None:
        if self._open is None:
            return
        index = self._next_index - 1
        if self._open == "thinking":  # the SDK expects a signature before a thinking block ends
            out.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                         "delta": {"type": "signature_delta", "signature": ""}}))
        out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        self._open = None

    def _tool_fragment(self, entry: dict[str, Any]) -> None:
        """Add one tool_calls delta entry to the call it belongs to, or start a new call.

        A call is identified by its index, but Ollama sends parallel calls all at index 0 (each whole,
        with its own id and name), and some servers repeat or change the id in every chunk without a name.
        """
        index = entry.get("index") if _is_int(entry.get("index")) else 0
        function = entry.get("function") if isinstance(entry.get("function"), dict) else {}
        call_id = entry.get("id") if isinstance(entry.get("id"), str) and entry["id"] else None
        name = function.get("name") if isinstance(function.get("name"), str) and function["name"] else None
        arguments = function.get("arguments")
        if isinstance(arguments, dict | list):  # an object instead of a JSON string (pitfall 4)
            arguments = orjson.dumps(arguments).decode()
        current = self._by_index.get(index)
        if current is None or (name and (
                (call_id and current.id and call_id != current.id)
                or (not call_id and arguments and isinstance(_loads(current.arguments()), dict)))):
            current = _Call(call_id, name)
            self._calls.append(current)
            self._by_index[index] = current
        else:
            current.id = current.id or call_id
            current.name = current.name or name
        if isinstance(arguments, str) and arguments:
            current.parts.append(arguments)
            self._output_chars += len(arguments)

    def _flush_calls(self, out: list[bytes]) -> None:
        """Each buffered call as a whole tool_use block: start, one input_json_delta of valid JSON, stop."""
        if not self._calls:
            return
        self._close_block(out)
        for call in self._calls:
            if call.name is None and not call.parts:
                continue  # an id with nothing else: not a call
            index = self._next_index
            self._start_block(out, {"type": "tool_use", "id": tool_use_id(call.id), "name": call.name or "",
                                    "input": {}})
            out.append(sse_event("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta",
                          "partial_json": orjson.dumps(tool_input(call.arguments())).decode()}}))
            out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
            self._tool_blocks += 1
        self._calls.clear()
        self._by_index.clear()


def _chunk_error(error: Any) -> GatewayError:
    """An ``{"error": ...}`` chunk from the backend, mid-stream."""
    if isinstance(error, dict):
        message = error.get("message")
        return GatewayError("backend_error", message if isinstance(message, str) and message
                            else orjson.dumps(error).decode())
    return GatewayError("backend_error", str(error))
