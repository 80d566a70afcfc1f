"""Token accounting: usage reported by backends, estimated when they report none.

Estimates use about four characters per token (plus a few tokens of chat framing per message), the
rule of thumb for English with BPE tokenizers; they are marked ``estimated`` wherever they appear.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from appliance.common.chat import content_text
from appliance.common.sse import DONE, event_data

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4


@dataclass(slots=True)
class Tokens:
    prompt: int | None = None
    completion: int | None = None
    estimated: bool = False
    cached: int = 0  # prompt tokens the backend served from its cache

    @property
    def total(self) -> int:
        return (self.prompt or 0) + (self.completion or 0)

    def as_usage(self) -> dict[str, Any]:
        prompt, completion = self.prompt or 0, self.completion or 0
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        if self.estimated:
            usage["estimated"] = True
        return usage


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None  # None: cached prompt tokens cost the input price

    @property
    def free(self) -> bool:
        return not (self.input or self.output or self.cached_input)


@dataclass(frozen=True, slots=True)
class Cost:
    input: float = 0.0
    output: float = 0.0

    @property
    def total(self) -> float:
        return self.input + self.output

    def as_usage(self) -> dict[str, float]:
        return {"input_cost_usd": round(self.input, 9), "output_cost_usd": round(self.output, 9),
                "total_cost_usd": round(self.total, 9)}


FREE = Price()
NO_COST = Cost()


def cost_of(price: Price, tokens: Tokens) -> Cost:
    if price.free:
        return NO_COST
    cached = min(tokens.cached, tokens.prompt or 0)
    cached_price = price.input if price.cached_input is None else price.cached_input
    uncached = (tokens.prompt or 0) - cached
    return Cost((uncached * price.input + cached * cached_price) / 1e6, (tokens.completion or 0) * price.output / 1e6)


class Prices:
    """Prices from [[models]]: by `backend/model` first, then by model name; unpriced models are free.

    They attach to the backend model that served (an alias's price to its target), so a fallback to a
    free local model costs nothing.
    """

    def __init__(self, models: list[Any]) -> None:
        self._by_name = {m.served_model: Price(m.input_per_mtok, m.output_per_mtok, m.cached_input_per_mtok)
                         for m in models if m.input_per_mtok or m.output_per_mtok or m.cached_input_per_mtok}

    def of(self, backend: str, model: str) -> Price:
        if not self._by_name:
            return FREE
        return self._by_name.get(f"{backend}/{model}") or self._by_name.get(model) or FREE


class ComputeRates:
    """What a backend's busy time costs, from [[backends]] cost_per_hour: USD per second of its busy seconds.

    A backend without one (or one discovery found) costs 0: it is charged nothing and reports no compute cost.
    """

    def __init__(self, backends: list[Any]) -> None:
        self._per_s = {b.name: b.cost_per_hour / 3600 for b in backends if b.cost_per_hour > 0}

    def per_second(self, backend: str) -> float:
        if not self._per_s:
            return 0.0
        return self._per_s.get(backend, 0.0)


def estimate_text(text: str) -> int:
    return -(-len(text) // _CHARS_PER_TOKEN) if text else 0


def estimate_prompt(body: dict[str, Any]) -> int:
    """Prompt tokens of a chat, completions or embeddings body, estimated."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = 3
        for message in messages:
            if isinstance(message, dict):
                total += _TOKENS_PER_MESSAGE + estimate_text(content_text(message.get("content")))
                if message.get("tool_calls"):
                    total += estimate_text(orjson.dumps(message["tool_calls"]).decode())
        if body.get("tools"):
            total += estimate_text(orjson.dumps(body["tools"]).decode())
        return total
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return estimate_text(prompt)
    if isinstance(prompt, list):
        return sum(estimate_text(p) if isinstance(p, str) else (len(p) if isinstance(p, list) else 1)
                   for p in prompt)
    return sum(_estimate_texts(body.get(name)) for name in _TEXT_FIELDS)


# The text fields of rerank (Cohere, Jina, vLLM, llama.cpp) and score (vLLM) bodies.
_TEXT_FIELDS = ("query", "documents", "text_1", "text_2", "queries", "items", "data_1", "data_2")


def _estimate_texts(value: Any) -> int:
    """A string, a list of them, or of {"text": ...} objects (Cohere's documents), estimated."""
    if isinstance(value, str):
        return estimate_text(value)
    if isinstance(value, dict):
        return _estimate_texts(value.get("text"))
    if isinstance(value, list):
        return sum(_estimate_texts(item) for item in value)
    return 0


def _reported(usage: Any) -> Tokens | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Tokens(prompt, completion if isinstance(completion, int) else 0,
                  cached=cached if isinstance(cached, int) else 0)


def from_reply(data: dict[str, Any] | None, body: dict[str, Any]) -> Tokens:
    """Tokens of a non-streaming answer: its usage, else an estimate from its text."""
    reported = _reported(data.get("usage")) if data else None
    if reported:
        return reported
    text = ""
    for choice in (data or {}).get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message") or {}
            text += content_text(message.get("content")) if isinstance(message, dict) else ""
            text += choice.get("text") or "" if isinstance(choice.get("text"), str) else ""
    return Tokens(estimate_prompt(body), estimate_text(text), estimated=True)


def from_extension(data: dict[str, Any] | None, body: dict[str, Any]) -> Tokens:
    """Tokens of a rerank, score, moderation, image or audio answer: what the backend reports, else an estimate.

    Reported as OpenAI's ``usage`` (prompt/completion or input/output tokens), a rerank's ``usage.total_tokens``
    (vLLM, Jina, llama.cpp), or Cohere's ``meta.billed_units`` / ``meta.tokens``.
    """
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict):
        prompt = _first_int(usage, "prompt_tokens", "input_tokens", "total_tokens")
        if prompt is not None:
            return Tokens(prompt, _first_int(usage, "completion_tokens", "output_tokens") or 0)
    meta = data.get("meta") if isinstance(data, dict) else None
    if isinstance(meta, dict):
        for part in ("billed_units", "tokens"):
            counted = meta.get(part)
            if isinstance(counted, dict) and isinstance(counted.get("input_tokens"), int):
                output = counted.get("output_tokens")
                return Tokens(counted["input_tokens"], output if isinstance(output, int) else 0)
    return Tokens(estimate_prompt(body), 0, estimated=True)


def _first_int(values: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# A chunk that carries output: a non-empty content, text or tool-call arguments string.
_OUTPUT = re.compile(rb'"(?:content|text|arguments)":\s*"(?!")')


class StreamMeter:
    """Watches a relayed SSE stream for usage, errors and the first token; decides what is forwarded.

    The gateway always asks the backend for a usage chunk; when the client did not ask for one, that
    chunk is dropped here. ``[DONE]`` is held back so an estimated usage chunk can precede it. Only the
    first chunk and those that mention usage or an error are parsed; the rest are counted by a byte
    search (about one token per streamed chunk), which is what an estimate needs.
    """

    __slots__ = ("_drop_usage", "_extras", "_template", "content_events", "done", "error", "first_event_at",
                 "tokens")

    def __init__(self, *, client_wants_usage: bool,
                 extras: Callable[[Tokens], dict[str, Any]] | None = None) -> None:
        self._drop_usage = not client_wants_usage
        self._extras = extras  # more usage fields for the client (costs, timings)
        self._template: dict[str, Any] | None = None
        self.first_event_at: float | None = None
        self.tokens: Tokens | None = None
        self.error: dict[str, Any] | None = None
        self.content_events = 0
        self.done = False

    def feed(self, events: list[bytes]) -> bytes:
        if self.first_event_at is None:
            self.first_event_at = time.perf_counter()
        kept = []
        for event in events:
            data = event_data(event)
            if data == b"[DONE]":
                self.done = True
                continue
            if data:
                if _OUTPUT.search(data):
                    self.content_events += 1
                if self._worth_parsing(data):
                    replacement = self._observe(data)
                    if replacement is not None:
                        if replacement:
                            kept.append(replacement)
                        continue
            kept.append(event)
        return b"".join(kept) if len(kept) != 1 else kept[0]

    def _worth_parsing(self, data: bytes) -> bool:
        if self._template is None or b'"error"' in data:
            return True
        return b'"usage"' in data and b'"usage":null' not in data  # OpenAI puts "usage":null in every chunk

    def _observe(self, data: bytes) -> bytes | None:
        """Note what the chunk tells. None: forward it as it came; b"": drop it; else the event to send."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk:
            self.error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            return None
        if self._template is None:
            self._template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        reported = _reported(chunk.get("usage"))
        if not reported:
            return None
        self.tokens = reported
        if self._drop_usage and not chunk.get("choices"):
            return b""
        if self._extras is None:
            return None
        chunk["usage"].update(self._extras(reported))
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def final_tokens(self, body: dict[str, Any]) -> Tokens:
        if self.tokens is not None:
            return self.tokens
        return Tokens(estimate_prompt(body), self.content_events, estimated=True)

    def finish(self, body: dict[str, Any], appliance: dict[str, Any] | None = None) -> bytes:
        """What ends the stream: an estimated usage chunk when the client asked and got none, then [DONE].
        ``appliance``: the gateway's note for that last chunk (a mid-stream failover)."""
        tail = b""
        if not self._drop_usage and self.tokens is None and self.error is None:
            tokens = self.final_tokens(body)
            usage = tokens.as_usage()
            if self._extras is not None:
                usage.update(self._extras(tokens))
            chunk = {**(self._template or {}), "choices": [], "usage": usage}
            if appliance is not None:
                chunk["appliance"] = appliance
            tail = b"data: " + orjson.dumps(chunk) + b"\n\n"
        return tail + DONE
