"""Anthropic Messages clients on chat-completions backends, without I/O: answers and errors.

Claude Code and the anthropic SDKs speak /v1/messages; the local backends speak chat completions only.
This is the wire contract between the two (spec-responses-messages.md §4 and §5): validation that answers
the way Anthropic does (a 400 naming the field), the request and answer mappings, and the error bodies.
The request mapping is in request.py, the stream state machine, whose events the SDK's accumulator
accepts, in stream.py.

Decisions the spec leaves open, taken here (the stream's own are in stream.py):

* ``is_error`` tool results reach the model as text starting ``Error:`` (chat tool messages have no flag).
* Server tools (``web_search_*``, ``tool_search_*``, ``bash_*``, ...) are dropped, not refused, as the
  Responses surface drops hosted tools: a chat backend cannot run them, and Claude Code may send them in
  its main loop. ``dropped_tools`` names them for a warning header.
* ``thinking`` is not forwarded. Backend reasoning comes back as thinking blocks only when the client
  enabled thinking: a client that did not ask would find a block without ``text`` at ``content[0]``.
* A ``length`` finish stays ``max_tokens`` even when a tool call is present: its arguments were cut short.
* ``top_k`` is forwarded as an extension field (vLLM and llama.cpp honour it).
* Gateway failures in Anthropic's statuses: every backend down or unreachable, or busy, is 529
  ``overloaded_error``; a backend's broken answer is 500 ``api_error``; a timeout 504 ``timeout_error``.
* A backend of ``type = "anthropic"`` gets the client's body as sent (native.py): none of the
  above applies to it, and a body this translation refuses (a PDF document) still reaches it when every
  target of the model is such a backend.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import orjson

from appliance.accounts.usage import estimate_prompt, estimate_text
from appliance.api.messages.request import _is_int
from appliance.common.chat import content_text, reasoning_text, token_count
from appliance.common.errors import GatewayError

# Anthropic's tool-use id pattern; backends send ids such as "functions.Bash:0".
_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_NOT_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")

# Anthropic's error types by status (spec §4.4); other 4xx are invalid_request_error, other 5xx api_error.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (...)" (OpenAI, vLLM;
# newer vLLM: "your request has 5000 input tokens").
_CONTEXT_LIMIT = re.compile(r"maximum context length is (\d+)")
_CONTEXT_ASKED = re.compile(r"(?:requested|has) (\d+) (?:input )?tokens")

# Gateway statuses that Anthropic spells differently: "all backends busy" is its 529, a broken backend is a
# 500, and an unsupported feature is the client's problem, not one worth the SDK's retries.
_STATUSES = {501: 400, 502: 500, 503: 529}
# A backend that cannot be reached at all is "down", which spec §4.4 spells 529 too (a broken answer is 500).
_CODE_STATUSES = {"backend_unreachable": 529}



def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ------------------------------------------------------------------------------------------ answers


def message_response(chat: dict[str, Any], *, model: str, request: dict[str, Any] | None = None,
                     thinking: bool = False) -> dict[str, Any]:
    """A chat.completion as an Anthropic Message.

    ``request`` is the chat body sent (what chat_request returned): it tells which stop sequence can have
    matched, the max_tokens asked for, and the prompt to estimate when the backend reported no usage.
    ``thinking``: the client enabled thinking, so backend reasoning becomes a thinking block.
    """
    choice = _first_choice(chat)
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: list[dict[str, Any]] = []
    reasoning = reasoning_text(message)
    if thinking and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = content_text(message.get("content"))
    refusal = message.get("refusal")
    refused = not text and isinstance(refusal, str) and bool(refusal)
    if refused:
        text = refusal
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    arguments = ""
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments += function["arguments"] if isinstance(function.get("arguments"), str) else ""
            content.append({"type": "tool_use", "id": tool_use_id(call.get("id")),
                            "name": str(function.get("name") or ""), "input": tool_input(function.get("arguments"))})
    reported = chat.get("usage") if isinstance(chat, dict) else None
    usage = anthropic_usage(reported)
    if usage is None:
        output = estimate_text(text or "") + estimate_text(reasoning) + estimate_text(arguments)
        usage = _usage_dict(estimate_prompt(request or {}), output)
    completion = reported.get("completion_tokens") if isinstance(reported, dict) else None
    stop_reason, stop_sequence = _stop_reason(
        choice.get("finish_reason"), tools=any(block["type"] == "tool_use" for block in content), refused=refused,
        matched=choice.get("stop_reason"), completion=completion, request=request)
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}


def _first_choice(chat: Any) -> dict[str, Any]:
    choices = chat.get("choices") if isinstance(chat, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def tool_use_id(call_id: Any) -> str:
    """A backend's tool-call id as a valid tool_use id: kept, made valid deterministically, or minted."""
    if not isinstance(call_id, str) or not call_id:
        return new_id("toolu_")
    if _TOOL_ID.match(call_id):
        return call_id
    return _NOT_ID_CHARS.sub("_", call_id)  # the same id comes back in tool_result and is sent on as-is


def tool_input(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as the object Anthropic requires: parsed, repaired if cut short, else {}.

    Small local models emit invalid JSON now and then; one bad call must not lose the whole answer
    (spec §5.4 pitfall 6).
    """
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    value = _loads(arguments)
    if value is None:
        value = _loads(_repaired(arguments))
    if isinstance(value, str):  # JSON encoded twice
        value = _loads(value)
    return value if isinstance(value, dict) else {}


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _repaired(text: str) -> str:
    """Arguments without a markdown fence, a trailing comma or their missing closing quotes and brackets."""
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0].strip()
    closers, in_string, escaped = [], False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            closers.append("}" if char == "{" else "]")
        elif char in "}]" and closers:
            closers.pop()
    if in_string:
        text += '"'
    text = text.rstrip()
    if text.endswith(","):
        text = text[:-1]
    return text + "".join(reversed(closers))


def anthropic_usage(usage: Any) -> dict[str, int] | None:
    """Chat usage as Anthropic usage; None when the backend reported none.

    Anthropic's ``input_tokens`` excludes cache reads and writes; the three add up to ``prompt_tokens``
    (spec §5.4 pitfall 8).
    """
    if not isinstance(usage, dict) or not _is_int(usage.get("prompt_tokens")):
        return None
    prompt = max(usage["prompt_tokens"], 0)
    completion = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = min(token_count(details.get("cached_tokens")), prompt)
    written = min(token_count(details.get("cache_write_tokens")), prompt - cached)
    return _usage_dict(prompt - cached - written, token_count(completion), cached, written)


def _usage_dict(input_tokens: int, output_tokens: int, cached: int = 0, written: int = 0) -> dict[str, int]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached}


def _stop_reason(finish: Any, *, tools: bool, refused: bool, matched: Any, completion: Any,
                 request: dict[str, Any] | None) -> tuple[str, str | None]:
    if finish == "length":
        limit = request.get("max_tokens") if request else None
        if _is_int(limit) and _is_int(completion) and completion < limit:
            return "model_context_window_exceeded", None  # the context ran out before max_tokens did
        return "max_tokens", None
    if finish == "content_filter" or refused:
        return "refusal", None
    if tools:
        # Whatever the finish reason says: Ollama and others say "stop" after tool calls (spec §5.4 pitfall 4).
        # "tool_calls" with no call is an end_turn: a client must not look for a tool_use block that is not there.
        return "tool_use", None
    # vLLM reports the matched stop string in choices[].stop_reason (an int there is an EOS token id); only
    # the client's own sequences count, when the request is known.
    stop = request.get("stop") if request is not None else None
    if isinstance(matched, str) and matched and (request is None or (isinstance(stop, list) and matched in stop)):
        return "stop_sequence", matched
    return "end_turn", None


# ------------------------------------------------------------------------------------------ errors


def error_type(status: int) -> str:
    """Anthropic's ``error.type`` for an HTTP status."""
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_status(err: GatewayError, *, answered: bool = False) -> int:
    """The status a Messages client gets for a gateway error (its SDK picks the exception by status).

    ``answered``: the error ends a stream that began, so the backend was reached after all and a lost
    connection is a broken answer (500), not a backend that is down (529).
    """
    if not answered and err.code in _CODE_STATUSES:
        return _CODE_STATUSES[err.code]
    return _STATUSES.get(err.status, err.status)


def error_body(err: GatewayError, request_id: str | None = None) -> bytes:
    """The Anthropic error body: ``{"type":"error","error":{"type","message"},"request_id"}``."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(error_status(err)),
                                                       "message": error_message(err)}}
    if request_id:
        body["request_id"] = request_id
    return orjson.dumps(body)


def error_message(err: GatewayError) -> str:
    """The message, in Anthropic's words where clients match on them.

    A prompt over the context window reads ``prompt is too long: N tokens > M maximum``: Claude Code
    recognises it and compacts the conversation. N and M come from the backend's message when it has them
    (OpenAI and vLLM wording).
    """
    if err.code != "context_length_exceeded" or err.message.startswith("prompt is too long"):
        return err.message
    limit, asked = _CONTEXT_LIMIT.search(err.message), _CONTEXT_ASKED.search(err.message)
    if limit and asked:
        return f"prompt is too long: {asked[1]} tokens > {limit[1]} maximum"
    return f"prompt is too long: {err.message}"
