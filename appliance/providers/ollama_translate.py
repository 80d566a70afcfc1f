"""OpenAI <-> Ollama's native API, without I/O: request bodies, answers, stream chunks, errors, model facts.

The mapping is the gateway's own (spec §3.9) and differs from Ollama's /v1 on purpose:
``max_completion_tokens`` is honoured, an absent temperature or top_p leaves the Modelfile default in
place, and reasoning comes back under both names clients look for.
"""

from __future__ import annotations

import base64
import secrets
import struct
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from appliance.common.chat import tool_call_function
from appliance.common.errors import GatewayError, retry_after_headers
from appliance.common.sse import DONE, encode
from appliance.providers.base import CHAT, ModelInfo

# OpenAI fields Ollama has no equivalent for: dropped (the provider logs each once).
DROPPED_FIELDS = ("tool_choice", "logit_bias", "user", "parallel_tool_calls")

# OpenAI sampling fields that keep their names inside Ollama's options.
_OPTION_FIELDS = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty")

# Ollama takes bare base64 images; these are the data URLs its own middleware accepts.
_IMAGE_PREFIXES = (*(f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp")), "data:;base64,")
_IMAGE_URL_MESSAGE = "image URLs are not currently supported, please use base64 encoded data instead"

# Ollama's think levels; OpenAI's extra efforts fold into the nearest one.
_EFFORTS = {"minimal": "low", "xhigh": "high"}

# A full Ollama queue says only "server busy": retry once a few requests have had time to finish.
BUSY_RETRY_S = 2.0


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ------------------------------------------------------------------------------------------ requests


def chat_request(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """An OpenAI chat completions body as an /api/chat body."""
    _one_choice(body)
    out: dict[str, Any] = {"model": body["model"], "messages": ollama_messages(body["messages"]), "stream": stream}
    if body.get("tools"):
        out["tools"] = body["tools"]
    _add_generation_fields(out, body)
    return out


def generate_request(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """An OpenAI completions body as an /api/generate body: a raw prompt, no chat template."""
    _one_choice(body)
    out: dict[str, Any] = {"model": body["model"], "prompt": _prompt(body.get("prompt")), "raw": True,
                           "stream": stream}
    if isinstance(body.get("suffix"), str):
        out["suffix"] = body["suffix"]
    _add_generation_fields(out, body)
    return out


def embed_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI embeddings body as an /api/embed body."""
    inputs = body.get("input")
    texts_only = isinstance(inputs, list) and inputs and all(isinstance(item, str) for item in inputs)
    if not (isinstance(inputs, str) or texts_only):
        raise GatewayError("invalid_value", "Ollama embeds text only: 'input' must be a string or a non-empty "
                           "list of strings (token arrays are not supported).", param="input")
    encoding_format(body)
    out: dict[str, Any] = {"model": body["model"], "input": inputs}
    if body.get("dimensions") is not None:
        out["dimensions"] = body["dimensions"]
    for name in ("truncate", "keep_alive", "options"):  # Ollama's own fields, passed through
        if name in body:
            out[name] = body[name]
    return out


def encoding_format(body: dict[str, Any]) -> str:
    value = body.get("encoding_format") or "float"
    if value not in ("float", "base64"):
        raise GatewayError("invalid_value", f"encoding_format must be 'float' or 'base64', not {value!r}.",
                           param="encoding_format")
    return value


def _one_choice(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise GatewayError("invalid_value", "Ollama generates one choice per request: 'n' must be 1.", param="n")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise GatewayError("invalid_value", "Ollama takes one text prompt per request: send a string or a list "
                       "holding one string.", param="prompt")


def _add_generation_fields(out: dict[str, Any], body: dict[str, Any]) -> None:
    options = ollama_options(body)
    if options:
        out["options"] = options
    fmt = ollama_format(body.get("response_format"))
    if fmt is not None:
        out["format"] = fmt
    think = ollama_think(body)
    if think is not None:
        out["think"] = think
    if "keep_alive" in body:
        out["keep_alive"] = body["keep_alive"]


def ollama_options(body: dict[str, Any]) -> dict[str, Any]:
    """Sampling settings as Ollama options; absent ones stay absent so the Modelfile defaults apply.

    An ``options`` object in the body is Ollama's own (num_ctx and friends, which its /v1 cannot set)
    and is the base the OpenAI fields are laid over.
    """
    extra = body.get("options")
    options = dict(extra) if isinstance(extra, dict) else {}
    for name in _OPTION_FIELDS:
        if body.get(name) is not None:
            options[name] = body[name]
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list) and stop:
        options["stop"] = stop
    return options


def ollama_format(response_format: Any) -> str | dict[str, Any] | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else "json"
    raise GatewayError("invalid_value", f"response_format type {kind!r} is not supported; use 'text', "
                       "'json_object' or 'json_schema'.", param="response_format")


def ollama_think(body: dict[str, Any]) -> bool | str | None:
    effort = body.get("reasoning_effort")
    reasoning = body.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    if effort is None:
        think = body.get("think")  # Ollama's own field, passed through
        return think if isinstance(think, bool | str) else None
    if effort == "none":
        return False
    return _EFFORTS.get(effort, effort)


def ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as Ollama messages; tool results learn their tool's name from the earlier call."""
    tool_names: dict[str, str] = {}
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        text, images = _content(message.get("content"), i)
        converted: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if images:
            converted["images"] = images
        thinking = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(thinking, str) and thinking:
            converted["thinking"] = thinking
        calls = message.get("tool_calls")
        if role == "assistant" and isinstance(calls, list) and calls:
            converted["tool_calls"] = [_ollama_tool_call(call, i, tool_names) for call in calls]
        if role == "tool":
            call_id = message.get("tool_call_id")
            name = tool_names.get(call_id) if isinstance(call_id, str) else None
            name = name or message.get("name")
            if isinstance(name, str):
                converted["tool_name"] = name
            if isinstance(call_id, str):
                converted["tool_call_id"] = call_id
        out.append(converted)
    return out


def _content(content: Any, i: int) -> tuple[str, list[str]]:
    """Text and bare-base64 images of one message's content."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    param = f"messages.[{i}].content"
    if not isinstance(content, list):
        raise GatewayError("invalid_value", f"messages[{i}].content must be a string or an array of parts.",
                           param=param)
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_image(part.get("image_url"), param))
        else:
            raise GatewayError("invalid_value", f"messages[{i}]: content parts of type {kind!r} cannot be sent "
                               "to Ollama.", param=param)
    return "\n".join(texts), images


def _image(value: Any, param: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, str):
        for prefix in _IMAGE_PREFIXES:
            if url.startswith(prefix):
                return url[len(prefix):]
        if url.startswith(("http://", "https://")):
            raise GatewayError("invalid_value", _IMAGE_URL_MESSAGE, param=param)
    raise GatewayError("invalid_value", "invalid image input: send a data:image/(jpeg|png|webp);base64 URL.",
                       param=param)


def _ollama_tool_call(call: Any, i: int, names: dict[str, str]) -> dict[str, Any]:
    name, arguments = tool_call_function(call, i)
    out: dict[str, Any] = {"function": {"name": name, "arguments": arguments}}
    call_id = call.get("id")
    if isinstance(call_id, str):
        out["id"] = call_id
        names[call_id] = name
    return out


# ------------------------------------------------------------------------------------------ answers


def chat_completion(data: dict[str, Any], model: str) -> dict[str, Any]:
    """An /api/chat answer (stream false) as an OpenAI chat.completion."""
    message = data.get("message") if isinstance(data.get("message"), dict) else {}
    tool_calls = openai_tool_calls(message.get("tool_calls"))
    content = message.get("content") or ""
    reply: dict[str, Any] = {"role": "assistant", "content": content if content or not tool_calls else None,
                             "refusal": None}
    _add_thinking(reply, message.get("thinking"))
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": unix_time(data.get("created_at")),
        "model": data.get("model") or model,
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": finish_reason(data.get("done_reason"), bool(tool_calls))}],
        "usage": usage(data),
    }


def text_completion(data: dict[str, Any], model: str) -> dict[str, Any]:
    """An /api/generate answer (stream false) as an OpenAI text_completion."""
    text = data.get("response")
    return {
        "id": new_id("cmpl-"),
        "object": "text_completion",
        "created": unix_time(data.get("created_at")),
        "model": data.get("model") or model,
        "choices": [{"index": 0, "text": text if isinstance(text, str) else "", "logprobs": None,
                     "finish_reason": finish_reason(data.get("done_reason"), False)}],
        "usage": usage(data),
    }


def embedding_list(data: dict[str, Any], model: str, fmt: str) -> dict[str, Any]:
    """An /api/embed answer as an OpenAI embeddings list; base64 is float32 little-endian, as OpenAI's."""
    vectors = data.get("embeddings")
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise GatewayError("backend_error", "Ollama answered /api/embed without embeddings.")
    tokens = _count(data.get("prompt_eval_count"))
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _base64(v) if fmt == "base64" else v}
                 for i, v in enumerate(vectors)],
        "model": data.get("model") or model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def openai_tool_calls(calls: Any, start: int = 0) -> list[dict[str, Any]]:
    """Ollama's whole tool calls (arguments as an object) in OpenAI's shape (arguments as a JSON string)."""
    out = []
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
        call_id = call.get("id")
        out.append({
            "index": start + len(out),
            "id": call_id if isinstance(call_id, str) and call_id else new_id("call_"),  # older builds send none
            "type": "function",
            "function": {"name": str(function.get("name") or ""), "arguments": arguments},
        })
    return out


def _add_thinking(target: dict[str, Any], thinking: Any) -> None:
    # reasoning_content is what DeepSeek-style clients read, reasoning what Ollama's own /v1 sends.
    if isinstance(thinking, str) and thinking:
        target["reasoning_content"] = thinking
        target["reasoning"] = thinking


def finish_reason(done_reason: Any, called_tools: bool) -> str:
    if done_reason == "length":
        return "length"
    return "tool_calls" if called_tools else "stop"


def usage(data: dict[str, Any]) -> dict[str, int]:
    prompt, completion = _count(data.get("prompt_eval_count")), _count(data.get("eval_count"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def unix_time(value: Any) -> int:
    """Unix seconds of an RFC 3339 time (Ollama's created_at); now when it is missing or unreadable."""
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value).timestamp())
        except ValueError:
            pass
    return int(time.time())


# ------------------------------------------------------------------------------------------ streams


class LineSplitter:
    """Cuts an NDJSON byte stream into objects; a line split across reads waits for its end."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        return [_parse_line(line) for line in lines if line.strip()]

    def close(self) -> list[dict[str, Any]]:
        tail, self._tail = self._tail, b""
        return [_parse_line(tail)] if tail.strip() else []


def _parse_line(line: bytes) -> dict[str, Any]:
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError:
        item = None
    if not isinstance(item, dict):
        raise GatewayError("backend_error", "Ollama sent a stream line that is not a JSON object.")
    return item


class ChunkTranslator:
    """Ollama stream objects in, OpenAI SSE events out: chat.completion.chunk, or text_completion.

    The first chat chunk carries the role, the finish reason travels alone in the last chunk, the usage
    chunk (``choices: []``) follows when asked for, then ``[DONE]``. An ``{"error"}`` line raises.
    """

    def __init__(self, endpoint: str, model: str, *, include_usage: bool) -> None:
        self._chat = endpoint == CHAT
        self._include_usage = include_usage
        self._head: dict[str, Any] = {"id": new_id("chatcmpl-" if self._chat else "cmpl-"),
                                      "object": "chat.completion.chunk" if self._chat else "text_completion",
                                      "created": None, "model": model}
        self._started = False
        self._tool_calls = 0
        self.done = False

    def feed(self, item: dict[str, Any]) -> list[bytes]:
        if "error" in item:
            error = item["error"]
            raise GatewayError("backend_error", error if isinstance(error, str) else orjson.dumps(error).decode())
        if self.done:
            return []
        if self._head["created"] is None:
            self._head["created"] = unix_time(item.get("created_at"))
            self._head["model"] = item.get("model") or self._head["model"]
        events = self._chat_events(item) if self._chat else self._text_events(item)
        if item.get("done"):
            self.done = True
            events += self._final_events(item)
        return events

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return encode(orjson.dumps({**self._head, "choices": choices, **extra}))

    def _chat_events(self, item: dict[str, Any]) -> list[bytes]:
        message = item.get("message") if isinstance(item.get("message"), dict) else {}
        content = message.get("content") if isinstance(message.get("content"), str) else ""
        calls = openai_tool_calls(message.get("tool_calls"), self._tool_calls)
        self._tool_calls += len(calls)
        delta: dict[str, Any] = {}
        if not self._started:
            self._started = True
            delta = {"role": "assistant", "content": content if content or not calls else None}
        elif content:
            delta["content"] = content
        _add_thinking(delta, message.get("thinking"))
        if calls:
            delta["tool_calls"] = calls
        if not delta:
            return []
        return [self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])]

    def _text_events(self, item: dict[str, Any]) -> list[bytes]:
        text = item.get("response")
        if not isinstance(text, str) or not text:
            return []
        return [self._event([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])]

    def _final_events(self, item: dict[str, Any]) -> list[bytes]:
        finish = finish_reason(item.get("done_reason"), self._tool_calls > 0)
        last = ({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish} if self._chat
                else {"index": 0, "text": "", "logprobs": None, "finish_reason": finish})
        events = [self._event([last])]
        if self._include_usage:
            events.append(self._event([], usage=usage(item)))
        events.append(DONE)
        return events


# ------------------------------------------------------------------------------------------ errors


def ollama_error(status: int, body: bytes, backend: str, path: str) -> GatewayError:
    """An Ollama error status (its body is ``{"error": "..."}``) in the gateway's vocabulary."""
    message = _error_message(body)
    if status == 404 and message is None:
        # A bare 404 page: this Ollama has no such route (too old for /api/embed, say).
        return GatewayError("backend_error", f"backend {backend!r} has no {path} (is Ollama up to date?)")
    message = message or f"backend {backend!r} answered HTTP {status}"
    if status == 404:
        return GatewayError("model_not_found", message, param="model")
    if status == 400:
        return GatewayError("invalid_value", message)
    if status == 503:
        return GatewayError("backend_overloaded", message, headers=retry_after_headers(BUSY_RETRY_S))
    return GatewayError("backend_error", message)


def _error_message(body: bytes) -> str | None:
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) and error else None


# ------------------------------------------------------------------------------------------ models


@dataclass(frozen=True, slots=True)
class ShownModel:
    """What /api/show tells the catalog about one model (kept per digest)."""

    capabilities: dict[str, bool]
    context_window_trained: int | None


def shown_model(data: dict[str, Any]) -> ShownModel:
    return ShownModel(capabilities(data.get("capabilities")), trained_window(data.get("model_info")))


def capabilities(names: Any) -> dict[str, bool]:
    """Ollama's capability names as the catalog's keys; {} when unknown."""
    if not isinstance(names, list):
        return {}
    listed = {name for name in names if isinstance(name, str)}
    generates = "completion" in listed
    return {"chat": generates, "completions": generates, "embeddings": "embedding" in listed,
            "tools": "tools" in listed, "vision": "vision" in listed, "reasoning": "thinking" in listed}


def trained_window(model_info: Any) -> int | None:
    """``<general.architecture>.context_length`` from GGUF metadata."""
    if not isinstance(model_info, dict):
        return None
    arch = model_info.get("general.architecture")
    return _positive(model_info.get(f"{arch}.context_length")) if isinstance(arch, str) else None


def model_entry(tag: dict[str, Any], shown: ShownModel | None, running: dict[str, int | None] | None) -> ModelInfo:
    """One /api/tags entry, with /api/show facts and the /api/ps view (None: /api/ps did not answer)."""
    name = str(tag["name"])
    details = tag.get("details") if isinstance(tag.get("details"), dict) else {}
    loaded = None if running is None else name in running
    modified = tag.get("modified_at")
    return ModelInfo(
        id=name,
        created=unix_time(modified) if isinstance(modified, str) else None,
        context_window=running.get(name) if running else None,
        context_window_trained=(shown and shown.context_window_trained) or _positive(details.get("context_length")),
        capabilities=dict(shown.capabilities) if shown else capabilities(tag.get("capabilities")),
        loaded=loaded,
        aliases=(name.removesuffix(":latest"),) if name.endswith(":latest") else (),
    )


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None
