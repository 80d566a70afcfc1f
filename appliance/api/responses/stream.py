"""Chat completion chunks in, Responses stream events out (spec-responses-messages.md §1.5 and §3.3).

One ResponsesStream per response. Events are plain dicts so the same sequence can go out as SSE
(``sse``) or as WebSocket text frames (``orjson.dumps``). Items are never interleaved: each is closed,
through its ``output_item.done``, before the next is added, and ``output_index`` counts items in the order
they were added; the SDK accumulators and Codex both depend on that. The work per chunk is a few dict
lookups and one event dict per delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance.api.responses.translate import (
    call_item,
    custom_tool_names,
    delta_logprobs,
    failed_response,
    finished_response,
    incomplete_reason,
    logprob_entries,
    new_id,
    output_text_part,
    reasoning_item,
    response_skeleton,
    response_usage,
    valid_call_id,
)
from appliance.common.chat import reasoning_text
from appliance.common.errors import GatewayError

_NEW, _STREAMING, _DONE = 0, 1, 2


def sse(event: dict[str, Any]) -> bytes:
    """One event as SSE: the ``event:`` line names ``data.type``, which some SDKs dispatch on."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


# ------------------------------------------------------------------------------------------ open items


@dataclass(slots=True)
class _Message:
    id: str
    index: int
    parts: list[dict[str, Any]] = field(default_factory=list)  # closed parts, in final form
    kind: str | None = None  # the open part: "output_text" or "refusal"
    chunks: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # chat entries of the open part


@dataclass(slots=True)
class _Reasoning:
    id: str
    index: int
    chunks: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Call:
    backend_id: str | None
    call_id: str
    name: str | None
    custom: bool = False
    chunks: list[str] = field(default_factory=list)
    item_id: str | None = None  # set once output_item.added went out
    index: int = -1
    item: dict[str, Any] | None = None  # the closed item


# ------------------------------------------------------------------------------------------ the stream


class ResponsesStream:
    """Feed it parsed chat.completion.chunk dicts; it returns the Responses events to send, in order.

    ``start()`` → response.created, response.in_progress; ``feed(chunk)`` → item and delta events;
    ``finish(usage)`` → the open item's .done events, then response.completed or response.incomplete;
    ``fail(err)`` → response.failed. A chunk carrying ``error`` raises GatewayError: pass it to ``fail``.
    After ``finish`` or ``fail``, ``response`` is the final Response to store.
    """

    __slots__ = ("_base", "_calls", "_custom", "_finish", "_open", "_output", "_seq", "_state", "_stream_id",
                 "_usage", "response")

    def __init__(self, request: dict[str, Any], *, response_id: str, created_at: int) -> None:
        self._base = response_skeleton(request, response_id=response_id, created_at=created_at)
        self._custom = custom_tool_names(request)
        stream_id = request.get("stream_id")
        self._stream_id = stream_id if isinstance(stream_id, str) and stream_id else None  # WebSocket lanes
        self._seq = 0
        self._state = _NEW
        self._output: list[dict[str, Any]] = []  # closed items, in final form
        self._open: _Message | _Reasoning | _Call | None = None
        self._calls: dict[int, _Call] = {}  # the backend's tool-call index -> the latest call at it
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self.response: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self._seq}
        self._seq += 1
        if self._stream_id:
            event["stream_id"] = self._stream_id
        return event

    def _snapshot(self) -> dict[str, Any]:
        return {**self._base, "output": []}

    def start(self) -> list[dict[str, Any]]:
        if self._state != _NEW:
            return []
        self._state = _STREAMING
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    def warmup(self) -> list[dict[str, Any]]:
        """The two events of a WebSocket ``generate: false`` turn: no backend call, empty output (spec §2.3)."""
        if self._state != _NEW:
            return []
        self._state = _DONE
        created = self._event("response.created", response=self._snapshot())
        self.response = finished_response(self._base, [], None, response_usage({"prompt_tokens": 0,
                                                                                "completion_tokens": 0}))
        return [created, self._event("response.completed", response=self.response)]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if self._state == _DONE:
            return []
        events = self.start()
        if not isinstance(chunk, dict):
            return events
        if chunk.get("error") is not None:  # vLLM reports failures mid-stream this way
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise GatewayError("backend_error", message if isinstance(message, str) and message
                               else "The backend failed while streaming.")
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]  # the include_usage chunk, or a finish chunk that carries it
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if choice is None or self._finish is not None:
            return events
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        thinking = reasoning_text(delta)
        if thinking:
            events += self._reasoning(thinking)
        if isinstance(delta.get("content"), str) and delta["content"]:
            events += self._text("output_text", delta["content"], logprob_entries(choice.get("logprobs")))
        if isinstance(delta.get("refusal"), str) and delta["refusal"]:
            events += self._text("refusal", delta["refusal"], [])
        calls = delta.get("tool_calls")
        if isinstance(delta.get("function_call"), dict):  # the legacy single-call shape
            calls = [{"index": 0, "function": delta["function_call"]}]
        for entry in calls if isinstance(calls, list) else ():
            if isinstance(entry, dict):
                events += self._call(entry)
        if isinstance(choice.get("finish_reason"), str):
            self._finish = choice["finish_reason"]  # not the end yet: usage may follow
        return events

    def finish(self, usage: dict[str, Any] | None = None, *,
               appliance: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Close the stream after the backend's [DONE] or EOF. ``usage`` (chat shape) overrides the stream's:
        pass the gateway's estimate when the backend reported none. No finish_reason seen means the backend
        stopped mid-answer: the response fails. ``appliance``: the gateway's own note (a mid-stream failover)
        for the final event's response object (the stored response goes without it)."""
        if self._state == _DONE:
            return []
        if self._finish is None:
            return self.fail(GatewayError("backend_error", "The backend stream ended before the answer finished."))
        events = self.start()
        reason = incomplete_reason(self._finish)
        events += self._close("incomplete" if reason else "completed")
        self._state = _DONE
        self.response = finished_response(self._base, self._output, reason,
                                          response_usage(usage if usage is not None else self._usage))
        shown = self.response if appliance is None else {**self.response, "appliance": appliance}
        events.append(self._event("response.incomplete" if reason else "response.completed", response=shown))
        return events

    def fail(self, err: GatewayError) -> list[dict[str, Any]]:
        """response.failed after the open item is closed as incomplete; closed items keep their status."""
        if self._state == _DONE:
            return []
        events = self.start()
        events += self._close("incomplete")
        self._state = _DONE
        self.response = failed_response(self._base, self._output, err, response_usage(self._usage))
        events.append(self._event("response.failed", response=self.response))
        return events

    # -------------------------------------------------------------------------------------- items

    def _added(self, item: dict[str, Any]) -> dict[str, Any]:
        return self._event("response.output_item.added", output_index=len(self._output), item=item)

    def _done(self, item: dict[str, Any]) -> dict[str, Any]:
        index = len(self._output)
        self._output.append(item)
        return self._event("response.output_item.done", output_index=index, item=item)

    def _close(self, status: str) -> list[dict[str, Any]]:
        """The .done events of the open item, if any; it joins the output with ``status``."""
        item, self._open = self._open, None
        if isinstance(item, _Message):
            return self._close_message(item, status)
        if isinstance(item, _Reasoning):
            text = "".join(item.chunks)
            return [self._event("response.reasoning_text.done", item_id=item.id, output_index=item.index,
                                content_index=0, text=text),
                    self._done(reasoning_item(item.id, text, status))]
        if isinstance(item, _Call):
            return self._close_call(item, status)
        return []

    def _reasoning(self, text: str) -> list[dict[str, Any]]:
        events = []
        item = self._open
        if not isinstance(item, _Reasoning):
            events += self._close("completed")
            item = self._open = _Reasoning(new_id("rs_"), len(self._output))
            events.append(self._added({"type": "reasoning", "id": item.id, "summary": [], "content": [],
                                       "encrypted_content": None, "status": "in_progress"}))
        item.chunks.append(text)
        events.append(self._event("response.reasoning_text.delta", item_id=item.id, output_index=item.index,
                                  content_index=0, delta=text))
        return events

    def _text(self, kind: str, text: str, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events = []
        message = self._open
        if not isinstance(message, _Message):
            events += self._close("completed")
            message = self._open = _Message(new_id("msg_"), len(self._output))
            events.append(self._added({"type": "message", "id": message.id, "status": "in_progress",
                                       "role": "assistant", "content": []}))
        if message.kind != kind:
            events += self._close_part(message)
            message.kind = kind
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "output_text" \
                else {"type": "refusal", "refusal": ""}
            events.append(self._event("response.content_part.added", item_id=message.id, output_index=message.index,
                                      content_index=len(message.parts), part=part))
        message.chunks.append(text)
        if kind == "refusal":
            events.append(self._event("response.refusal.delta", item_id=message.id, output_index=message.index,
                                      content_index=len(message.parts), delta=text))
        else:
            message.logprobs += logprobs
            events.append(self._event("response.output_text.delta", item_id=message.id, output_index=message.index,
                                      content_index=len(message.parts), delta=text,
                                      logprobs=delta_logprobs(logprobs)))
        return events

    def _close_part(self, message: _Message) -> list[dict[str, Any]]:
        if message.kind is None:
            return []
        text, index = "".join(message.chunks), len(message.parts)
        where = {"item_id": message.id, "output_index": message.index, "content_index": index}
        if message.kind == "refusal":
            part = {"type": "refusal", "refusal": text}
            done = self._event("response.refusal.done", **where, refusal=text)
        else:
            part = output_text_part(text, message.logprobs)
            done = self._event("response.output_text.done", **where, text=text,
                               logprobs=delta_logprobs(message.logprobs))
        message.parts.append(part)
        message.kind, message.chunks, message.logprobs = None, [], []
        return [done, self._event("response.content_part.done", **where, part=part)]

    def _close_message(self, message: _Message, status: str) -> list[dict[str, Any]]:
        events = self._close_part(message)
        events.append(self._done({"type": "message", "id": message.id, "status": status, "role": "assistant",
                                  "content": message.parts}))
        return events

    # -------------------------------------------------------------------------------------- tool calls

    def _call(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        index = entry.get("index") if isinstance(entry.get("index"), int) else 0
        backend_id = entry.get("id") if isinstance(entry.get("id"), str) and entry["id"] else None
        function = entry.get("function") if isinstance(entry.get("function"), dict) else {}
        name = function.get("name") if isinstance(function.get("name"), str) and function["name"] else None
        arguments = function.get("arguments")
        if not isinstance(arguments, str):  # an object instead of JSON text (Ollama via some proxies)
            arguments = orjson.dumps(arguments).decode() if arguments is not None else ""
        events = []
        call = self._calls.get(index)
        # Some servers put every parallel call at index 0: a new id there is a new call.
        if call is None or (backend_id is not None and call.backend_id not in (None, backend_id)):
            events += self._close("completed")
            call = self._calls[index] = _Call(backend_id, valid_call_id(backend_id), None)
            self._open = call
        elif backend_id is not None and call.backend_id is None:
            call.backend_id = backend_id
            if call.item_id is None:  # once announced, call_id must not change (the SDK checks it)
                call.call_id = valid_call_id(backend_id)
        if name and call.name is None:
            call.name, call.custom = name, name in self._custom
        if call.item is not None:
            # A fragment for a call already closed (the server interleaved calls): it can no longer be
            # streamed, but the final Response still gets whole arguments.
            call.chunks.append(arguments)
            if not call.custom:
                call.item["arguments"] = "".join(call.chunks) or "{}"
            return events
        if arguments:
            call.chunks.append(arguments)
        # added must carry the name: wait for it. Custom calls wait for the end, to unwrap their input.
        if call.item_id is None and call.name is not None and not call.custom:
            events.append(self._announce(call))
            if call.chunks:
                events.append(self._arguments_delta(call, "".join(call.chunks)))
        elif call.item_id is not None and arguments:
            events.append(self._arguments_delta(call, arguments))
        return events

    def _announce(self, call: _Call) -> dict[str, Any]:
        call.item_id, call.index = new_id("ctc_" if call.custom else "fc_"), len(self._output)
        return self._added(call_item(call.call_id, call.name or "", "", custom=call.custom, status="in_progress",
                                     item_id=call.item_id))

    def _arguments_delta(self, call: _Call, delta: str) -> dict[str, Any]:
        return self._event("response.function_call_arguments.delta", item_id=call.item_id, output_index=call.index,
                           delta=delta)

    def _close_call(self, call: _Call, status: str) -> list[dict[str, Any]]:
        events = []
        if call.item_id is None:
            events.append(self._announce(call))
        arguments = "".join(call.chunks)
        item = call_item(call.call_id, call.name or "", arguments or "{}", custom=call.custom, status=status,
                         item_id=call.item_id)
        where = {"item_id": call.item_id, "output_index": call.index}
        if call.custom:
            text = item["input"]
            if text:
                events.append(self._event("response.custom_tool_call_input.delta", **where, delta=text))
            events.append(self._event("response.custom_tool_call_input.done", **where, input=text))
        else:
            if not arguments:
                # "" is normalised to "{}": stream it too, so the deltas still add up to the final arguments.
                events.append(self._arguments_delta(call, "{}"))
            events.append(self._event("response.function_call_arguments.done", **where, name=item["name"],
                                      arguments=item["arguments"]))
        call.item = item
        events.append(self._done(item))
        return events


# ------------------------------------------------------------------------------------------ websocket


def ws_request(frame: str | bytes) -> tuple[dict[str, Any], bool]:
    """A WebSocket ``response.create`` frame as a CreateResponse body (always streamed), and its ``generate``.

    Fields may be flat or under a legacy ``response`` object (flat wins). A bad frame raises GatewayError,
    answered with ``ws_error_frame``; the socket stays open (spec §2.3).
    """
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise GatewayError("invalid_json", "invalid websocket JSON payload: send one JSON object per message.") \
            from None
    if not isinstance(event, dict) or not event:
        raise GatewayError("invalid_json", "empty websocket payload: send one JSON object per message.")
    kind = event.get("type")
    if kind != "response.create":
        message = (f"unsupported websocket event type {kind!r}; send 'response.create'." if isinstance(kind, str)
                   else "websocket payload requires a string type.")
        raise GatewayError("invalid_value", message, param="type")
    nested = event.get("response")
    body = {**nested, **event} if isinstance(nested, dict) else dict(event)
    for name in ("type", "response", "stream"):
        body.pop(name, None)
    generate = body.pop("generate", True)
    if not isinstance(generate, bool):
        raise GatewayError("invalid_value", "'generate' must be a boolean.", param="generate")
    stream_id = body.get("stream_id")
    if stream_id is not None and not _lane(stream_id):
        raise GatewayError("invalid_value", "stream_id must be 1-256 characters of letters, digits, '_', '.' or '-'.",
                           param="stream_id")
    body["stream"] = True
    return body, generate


def _lane(stream_id: Any) -> bool:
    return (isinstance(stream_id, str) and 0 < len(stream_id) <= 256
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in stream_id))
