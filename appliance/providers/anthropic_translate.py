"""OpenAI chat <-> a remote Anthropic Messages API, without I/O: request bodies, answers, stream events, errors.

For backends of ``type = "anthropic"``: chat clients (and the gateway's other surfaces, which speak chat
internally) reach Claude through this mapping, the reverse of spec §5. Anthropic is stricter than chat
servers, so the request side does the tidying they forgive: system text hoisted to ``system``, turns
merged so roles alternate, tool results gathered at the head of the user turn that follows the tool
calls, ``max_tokens`` always set, temperature clamped to Anthropic's 0..1.

What survives the round trip back through appliance/api/messages/: the matched stop sequence travels in
``choices[].stop_reason`` (vLLM's field) and cache writes in ``prompt_tokens_details.cache_write_tokens``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from appliance.common import system_messages
from appliance.common.chat import tool_call_function
from appliance.common.errors import GatewayError, retry_after_headers

# What Anthropic needs and chat does not require: the answer's length limit.
DEFAULT_MAX_TOKENS = 4096

# An overloaded Anthropic often says nothing about when to come back; a short wait before retrying.
OVERLOADED_RETRY_S = 2.0

# Anthropic stop reasons as chat finish reasons (spec §5.2, reverse direction).
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_TOOL_CHOICES = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}

# Anthropic error types as (our code, the status the client gets). Credentials, permission and billing are
# the gateway's own problem with the upstream, not the client's: a 502, so no client drops a good key.
_CREDENTIAL_ERRORS = frozenset({"authentication_error", "permission_error", "billing_error"})
_ERRORS: dict[str, tuple[str, int | None]] = {
    "authentication_error": ("backend_error", 502),
    "permission_error": ("backend_error", 502),
    "billing_error": ("backend_error", 502),
    "not_found_error": ("not_found", 404),
    "request_too_large": ("body_too_large", 413),
    "rate_limit_error": ("rate_limit_exceeded", 429),
    "api_error": ("backend_error", None),  # None: the status as received (a proxy's 502 stays a 502)
    "overloaded_error": ("backend_overloaded", 503),
    "timeout_error": ("backend_timeout", 504),
}


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ------------------------------------------------------------------------------------------ requests


def messages_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completions body as an Anthropic Messages body."""
    n = body.get("n")
    if n is not None and n != 1:
        raise GatewayError("invalid_value", "Anthropic generates one choice per request: 'n' must be 1.", param="n")
    system, messages = anthropic_messages(body.get("messages"))
    out: dict[str, Any] = {"model": body.get("model"), "max_tokens": _max_tokens(body), "messages": messages}
    if system:
        out["system"] = system
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(max(temperature, 0.0), 1.0)  # OpenAI goes to 2, Anthropic stops at 1
    for name in ("top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop:
        out["stop_sequences"] = [s for s in stop if isinstance(s, str)]
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False and choice.get("type") != "none":
            choice = {**choice, "disable_parallel_tool_use": True}
        if choice != {"type": "auto"}:
            out["tool_choice"] = choice
    fmt = _output_format(body.get("response_format"))
    if fmt is not None:
        out["output_config"] = {"format": fmt}
    out["stream"] = bool(body.get("stream"))
    return out


def _max_tokens(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return DEFAULT_MAX_TOKENS


def anthropic_messages(messages: Any) -> tuple[str, list[dict[str, Any]]]:
    """Chat messages as (system text, Anthropic turns)."""
    if not isinstance(messages, list):
        raise GatewayError("invalid_value", "'messages' must be an array of messages.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise GatewayError("invalid_value", f"messages[{i}] must be an object.", param=f"messages.[{i}]")
    system, rest = system_messages.split(messages)  # Anthropic takes it top-level (system_messages.placement)
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for i, message in rest:
        role = message.get("role")
        if role == "user":
            blocks = _user_blocks(message.get("content"), i)
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
        elif role == "tool":
            role, blocks = "user", [_tool_result(message, i)]
        else:
            raise GatewayError("invalid_value", f"messages[{i}]: role {role!r} cannot be sent to Anthropic.",
                               param=f"messages.[{i}].role")
        if not blocks:
            continue  # Anthropic rejects empty turns and empty text blocks
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    if turns and turns[-1][0] == "assistant" and turns[-1][1][-1]["type"] == "text":
        # A prefill: Anthropic refuses one that ends in whitespace.
        last = turns[-1][1]
        last[-1] = {"type": "text", "text": last[-1]["text"].rstrip()}
        if not last[-1]["text"]:
            last.pop()
            if not last:
                turns.pop()
    return system, [_turn(role, blocks) for role, blocks in turns]


def _turn(role: str, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    if role == "user":
        # Tool results must open the user turn after the tool calls ("tool_use ids were found without
        # tool_result blocks immediately after", spec §5.4 pitfall 5); sorted() keeps each group's order.
        blocks = sorted(blocks, key=lambda block: block["type"] != "tool_result")
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        return {"role": role, "content": blocks[0]["text"]}
    return {"role": role, "content": blocks}


def _user_blocks(content: Any, i: int) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    param = f"messages.[{i}].content"
    if not isinstance(content, list):
        raise GatewayError("invalid_value", f"messages[{i}].content must be a string or an array of parts.",
                           param=param)
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), param))
        else:
            raise GatewayError("invalid_value", f"messages[{i}]: content parts of type {kind!r} cannot be sent "
                               "to Anthropic.", param=param)
    return blocks


def _image(value: Any, param: str) -> dict[str, Any]:
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
        media_type, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type or "image/png", "data": data}}
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise GatewayError("invalid_value", "invalid image input: send a data:image/...;base64 URL or an http(s) URL.",
                       param=param)


def _assistant_blocks(message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            text = part.get("text" if kind == "text" else "refusal") if kind in ("text", "refusal") else None
            if not isinstance(text, str):
                raise GatewayError("invalid_value", f"messages[{i}]: assistant content parts of type {kind!r} "
                                   "cannot be sent to Anthropic.", param=f"messages.[{i}].content")
            if text:
                blocks.append({"type": "text", "text": text})
    elif content is not None:
        raise GatewayError("invalid_value", f"messages[{i}].content must be a string or an array of parts.",
                           param=f"messages.[{i}].content")
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        blocks.append(_tool_use(call, i))
    return blocks  # reasoning is dropped: Anthropic wants its own signed thinking blocks back, not text


def _tool_use(call: Any, i: int) -> dict[str, Any]:
    name, arguments = tool_call_function(call, i, needs_id=True)
    return {"type": "tool_use", "id": str(call["id"]), "name": name, "input": arguments}


def _tool_result(message: dict[str, Any], i: int) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise GatewayError("missing_field", f"messages[{i}]: a tool message needs its tool_call_id.",
                           param=f"messages.[{i}].tool_call_id")
    block = {"type": "tool_result", "tool_use_id": call_id}
    text = system_messages.text_of(message.get("content"), i)
    if text:  # content is optional, and Anthropic refuses empty text
        block["content"] = text
    return block


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise GatewayError("invalid_value", "Anthropic backends take function tools only.",
                               param=f"tools.[{i}]")
        converted: dict[str, Any] = {"name": function["name"]}
        if isinstance(function.get("description"), str):
            converted["description"] = function["description"]
        parameters = function.get("parameters")
        converted["input_schema"] = parameters if isinstance(parameters, dict) else {"type": "object",
                                                                                     "properties": {}}
        out.append(converted)
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice is None:
        return {"type": "auto"}
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return dict(_TOOL_CHOICES[choice])
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"type": "tool", "name": function["name"]}
    raise GatewayError("invalid_value", "tool_choice must be 'auto', 'required', 'none' or a function.",
                       param="tool_choice")


def _output_format(response_format: Any) -> dict[str, Any] | None:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return {"type": "json_schema", "schema": spec["schema"]}
        raise GatewayError("invalid_value", "response_format json_schema needs a schema.",
                           param="response_format.json_schema")
    return None  # json_object has no Anthropic equivalent; text is the default


# ------------------------------------------------------------------------------------------ answers


def chat_response(message: dict[str, Any], *, model: str) -> dict[str, Any]:
    """An Anthropic Message as an OpenAI chat.completion."""
    texts, thinking, calls = [], [], []
    for block in message.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id") or new_id("call_")), "type": "function",
                          "function": {"name": str(block.get("name") or ""),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    text = "".join(texts)
    reply: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    _add_thinking(reply, "".join(thinking))
    if calls:
        reply["tool_calls"] = calls
    choice: dict[str, Any] = {"index": 0, "message": reply, "logprobs": None,
                              "finish_reason": finish_reason(message.get("stop_reason"), bool(calls))}
    if isinstance(message.get("stop_sequence"), str):
        choice["stop_reason"] = message["stop_sequence"]
    return {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": chat_usage(message.get("usage"))}


def _add_thinking(target: dict[str, Any], thinking: str) -> None:
    # reasoning_content is what DeepSeek-style clients read, reasoning what Ollama's /v1 sends.
    if thinking:
        target["reasoning_content"] = thinking
        target["reasoning"] = thinking


def finish_reason(stop_reason: Any, called_tools: bool) -> str:
    finish = _FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"
    return "tool_calls" if called_tools and finish != "length" else finish


def chat_usage(usage: Any) -> dict[str, Any]:
    """Anthropic usage as chat usage: prompt tokens are input plus cache reads plus cache writes."""
    usage = usage if isinstance(usage, dict) else {}
    fresh, read, written, output = (_count(usage.get(name)) for name in (
        "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens"))
    prompt = fresh + read + written
    details: dict[str, int] = {"cached_tokens": read}
    if written:
        details["cache_write_tokens"] = written
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
            "prompt_tokens_details": details}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# ------------------------------------------------------------------------------------------ streams


class ChatStream:
    """Anthropic stream events in, OpenAI chat.completion.chunk SSE events out; the caller adds ``[DONE]``.

    The first chunk carries the role, text and thinking deltas follow as they come, each tool_use block
    becomes a tool call (index in call order, id and name in its first delta, then argument fragments),
    and message_stop yields the finish chunk and, when asked for, the usage chunk. An ``error`` event
    raises the GatewayError it describes.
    """

    __slots__ = ("_blocks", "_head", "_include_usage", "_started", "_stop_reason", "_stop_sequence", "done",
                 "usage")

    def __init__(self, model: str, *, include_usage: bool = True) -> None:
        self._include_usage = include_usage
        self._head = {"id": new_id("chatcmpl-"), "object": "chat.completion.chunk", "created": int(time.time()),
                      "model": model}
        self._started = False
        self._blocks: dict[int, int] = {}  # Anthropic block index -> chat tool-call index
        self._stop_reason: str | None = None
        self._stop_sequence: str | None = None
        self.usage: dict[str, Any] = {}  # Anthropic usage, merged as events report it
        self.done = False

    @property
    def finish_reason(self) -> str | None:
        return finish_reason(self._stop_reason, bool(self._blocks)) if self.done else None

    def feed(self, event: str | None, data: dict[str, Any]) -> bytes:
        kind = data.get("type") if isinstance(data, dict) else None
        kind = kind if isinstance(kind, str) else event
        if kind == "error":
            error = data.get("error") if isinstance(data, dict) else None
            raise stream_error(error if isinstance(error, dict) else {})
        if self.done or not isinstance(data, dict):
            return b""
        out = []
        if not self._started:
            self._started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        if kind == "message_start":
            message = data.get("message")
            if isinstance(message, dict) and isinstance(message.get("usage"), dict):
                self.usage.update(message["usage"])
        elif kind == "content_block_start":
            out += self._block_start(data)
        elif kind == "content_block_delta":
            out += self._block_delta(data)
        elif kind == "message_delta":
            self._message_delta(data)
        elif kind == "message_stop":
            out += self._final()
        return b"".join(out)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
        return b"data: " + orjson.dumps({**self._head, "choices": [choice]}) + b"\n\n"

    def _block_start(self, data: dict[str, Any]) -> list[bytes]:
        block = data.get("content_block")
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if kind != "tool_use" or not isinstance(data.get("index"), int):
            return []  # thinking opens empty; server tool blocks have no chat equivalent
        index = self._blocks[data["index"]] = len(self._blocks)
        arguments = orjson.dumps(block["input"]).decode() if block.get("input") else ""
        return [self._chunk({"tool_calls": [{"index": index, "id": str(block.get("id") or new_id("call_")),
                                             "type": "function",
                                             "function": {"name": str(block.get("name") or ""),
                                                          "arguments": arguments}}]})]

    def _block_delta(self, data: dict[str, Any]) -> list[bytes]:
        delta = data.get("delta")
        kind = delta.get("type") if isinstance(delta, dict) else None
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "thinking_delta" and delta.get("thinking"):
            thinking: dict[str, Any] = {}
            _add_thinking(thinking, delta["thinking"])
            return [self._chunk(thinking)]
        index = data.get("index")
        tool = self._blocks.get(index) if isinstance(index, int) else None
        if kind == "input_json_delta" and delta.get("partial_json") and tool is not None:
            call = {"index": tool, "function": {"arguments": delta["partial_json"]}}
            return [self._chunk({"tool_calls": [call]})]
        return []  # signatures and citations have no chat equivalent

    def _message_delta(self, data: dict[str, Any]) -> None:
        delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
        if isinstance(delta.get("stop_reason"), str):
            self._stop_reason = delta["stop_reason"]
        if isinstance(delta.get("stop_sequence"), str):
            self._stop_sequence = delta["stop_sequence"]
        usage = data.get("usage")
        if isinstance(usage, dict):  # cumulative counts; null ones leave what message_start said
            self.usage.update({name: value for name, value in usage.items() if value is not None})

    def _final(self) -> list[bytes]:
        self.done = True
        extra = {"stop_reason": self._stop_sequence} if self._stop_sequence else {}
        out = [self._chunk({}, self.finish_reason, **extra)]
        if self._include_usage:
            out.append(b"data: " + orjson.dumps({**self._head, "choices": [], "usage": chat_usage(self.usage)})
                       + b"\n\n")
        return out


# ------------------------------------------------------------------------------------------ errors


def chat_error(status: int, body: bytes, *, headers: dict[str, str] | None = None) -> GatewayError:
    """An Anthropic error answer (``{"type":"error","error":{"type","message"}}``) in the gateway's vocabulary."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        message = body[:500].decode("utf-8", "replace").strip() or f"Anthropic answered HTTP {status}"
        error = {"type": _type_of(status), "message": message}
    return _gateway_error(error, status, headers or {})


def stream_error(error: dict[str, Any]) -> GatewayError:
    """An ``event: error`` received mid-stream (its type stands in for the status)."""
    return _gateway_error(error, 500, {})


def _type_of(status: int) -> str:
    by_status = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
                 529: "overloaded_error"}
    return by_status.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def _gateway_error(error: dict[str, Any], status: int, headers: dict[str, str]) -> GatewayError:
    kind = error.get("type") if isinstance(error.get("type"), str) else _type_of(status)
    message = error.get("message") if isinstance(error.get("message"), str) and error["message"] else None
    message = message or f"Anthropic answered {kind}"
    retry = _retry_after(headers)
    if kind == "invalid_request_error":
        code = "context_length_exceeded" if "prompt is too long" in message else "invalid_value"
        return GatewayError(code, message, status=status if 400 <= status < 500 else 400)
    if kind == "not_found_error" and message.startswith("model:"):
        return GatewayError("model_not_found", message, param="model")
    code, mapped = _ERRORS.get(kind, ("backend_error", None))
    if mapped is None:
        mapped = status if status >= 500 else 502
    if mapped == 503 and retry is None:
        retry = OVERLOADED_RETRY_S
    if mapped in (429, 503) and retry is not None:
        return GatewayError(code, message, status=mapped, headers=retry_after_headers(retry))
    if kind in _CREDENTIAL_ERRORS:
        message = f"the Anthropic backend refused the gateway's credentials: {message}"
    return GatewayError(code, message, status=mapped)


def _retry_after(headers: dict[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None
