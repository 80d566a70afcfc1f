"""OpenAI Responses <-> chat completions, without I/O: requests, tools, Response objects, errors.

The gateway serves /v1/responses in front of backends that only speak chat completions, so each
Responses request is rebuilt as a chat body and each chat answer as a Response
(spec-responses-messages.md §1 to §3). Storage and the previous_response_id chain walk stay with the
caller: this module only sees the chain's items. Input items (normalised, stored, rendered as chat
messages) are in items.py, the streaming state machine in stream.py.

Choices the spec leaves open, taken here: hosted tools (web_search, file_search, mcp, ...) are dropped,
not refused, so agents that always send them keep working (``dropped_tools`` names them for a warning
header); ``max_output_tokens`` goes out as ``max_tokens``, the one name every local server accepts, and
any positive value is taken (OpenAI's minimum of 16 would only refuse what local models handle fine).
A stream that fails after ``response.created`` ends with ``response.failed`` (``server_error``) and is stored
as failed, so GET shows what happened; only completed and incomplete responses can be continued (spec §1.7).
Hosted tools left out are named in the ``X-Appliance-Dropped-Tools`` header.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from appliance.api.responses.items import _bad, _invalid, _missing, chat_messages, input_items, new_id
from appliance.common.chat import content_text, reasoning_text, token_count
from appliance.common.errors import GatewayError

_TOOL_CHOICES = ("auto", "none", "required")
_TRUNCATIONS = ("auto", "disabled")

# finish_reason -> incomplete_details.reason; any other finish (stop, tool_calls) completes the response.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}

_CALL_ID_MAX = 64  # FunctionCallOutputItemParam.call_id maxLength: longer backend ids are replaced
_METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512



def new_response_id() -> str:
    return new_id("resp_")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ requests


def chat_request(body: dict[str, Any], history: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A CreateResponse body as a chat completions body.

    ``history`` holds the stored input and output items of the previous_response_id chain, oldest first
    (see ``history_items``). Messages go system (this request's instructions only, never an ancestor's)
    → history → this request's input; a system message in the middle is what many chat templates reject.
    """
    _check_fields(body)
    items = input_items(body, history)
    conversation = chat_messages([*history, *items])
    if not conversation and "template" not in body:  # a template's messages may be the whole prompt
        if body.get("input") is None:
            raise _missing("input")
        raise _invalid("input", "'input' must hold at least one message or tool item.")
    instructions = body.get("instructions")
    messages = [{"role": "system", "content": instructions}, *conversation] if instructions else conversation
    stream = bool(body.get("stream"))
    out: dict[str, Any] = {"model": body["model"], "messages": messages, "stream": stream}
    if "template" in body:
        out["template"] = body["template"]  # rendered by the pipeline, ahead of these messages
    if stream:
        out["stream_options"] = {"include_usage": True}  # the terminal event needs usage
    _add_tools(out, body)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        out["response_format"] = response_format
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        out["reasoning_effort"] = reasoning["effort"]
    include = body.get("include") or ()
    if body.get("top_logprobs") is not None or "message.output_text.logprobs" in include:
        out["logprobs"] = True
        if body.get("top_logprobs"):
            out["top_logprobs"] = body["top_logprobs"]
    return out


def _check_fields(body: Any) -> None:
    """Type and range checks of the top-level fields; input, tools and text are checked where they are read."""
    if not isinstance(body, dict):
        raise GatewayError("invalid_value", "The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "'model' must be a non-empty string.")
    for name in ("conversation", "prompt"):
        if body.get(name) is not None:
            raise _invalid(name, f"'{name}' is not supported by this gateway; send the conversation as 'input' "
                           "or chain it with 'previous_response_id'.")
    if body.get("background"):
        raise _invalid("background", "Background responses are not supported by this gateway.")
    for name in ("instructions", "previous_response_id", "user", "safety_identifier", "prompt_cache_key"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise _invalid(name, f"'{name}' must be a string.")
    for name in ("stream", "store", "parallel_tool_calls", "background"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise _invalid(name, f"'{name}' must be a boolean.")
    for name, high in (("temperature", 2), ("top_p", 1)):
        value = body.get(name)
        if value is not None and not (_number(value) and 0 <= value <= high):
            raise _invalid(name, f"'{name}' must be a number between 0 and {high}.")
    limit = body.get("max_output_tokens")
    if limit is not None and not (_integer(limit) and limit >= 1):
        raise _invalid("max_output_tokens", "'max_output_tokens' must be a positive integer.")
    top = body.get("top_logprobs")
    if top is not None and not (_integer(top) and 0 <= top <= 20):
        raise _invalid("top_logprobs", "'top_logprobs' must be an integer between 0 and 20.")
    if body.get("truncation") is not None and body["truncation"] not in _TRUNCATIONS:
        raise _invalid("truncation", "'truncation' must be 'auto' or 'disabled'.")
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(i, str) for i in include)):
        raise _invalid("include", "'include' must be an array of strings.")
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise _invalid("reasoning", "'reasoning' must be an object.")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None and not isinstance(reasoning["effort"], str):
        raise _invalid("reasoning.effort", "'reasoning.effort' must be a string such as 'low' or 'high'.")
    _check_metadata(body.get("metadata"))


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > _METADATA_PAIRS:
        raise _invalid("metadata", f"'metadata' must be an object of at most {_METADATA_PAIRS} pairs.")
    for key, value in metadata.items():
        if len(key) > _METADATA_KEY or not isinstance(value, str) or len(value) > _METADATA_VALUE:
            raise _invalid(f"metadata.{key}", f"metadata keys are at most {_METADATA_KEY} characters and values "
                           f"strings of at most {_METADATA_VALUE}.")


def _response_format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``: json_schema is flat here, nested under json_schema there."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _invalid("text", "'text' must be an object.")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        name, schema = fmt.get("name"), fmt.get("schema")
        if not isinstance(name, str) or not name:
            raise _bad("text.format.name", name, "text.format.name must be a string.")
        if not isinstance(schema, dict):
            raise _bad("text.format.schema", schema, "text.format.schema must be a JSON schema object.")
        spec = {"name": name, "schema": schema}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                spec[key] = fmt[key]
        return {"type": "json_schema", "json_schema": spec}
    raise _invalid("text.format.type", "text.format.type must be 'text', 'json_object' or 'json_schema'.")


# ------------------------------------------------------------------------------------------ tools


def offered_tools(tools: Any) -> list[dict[str, Any]]:
    """The request's function and custom tools, normalised as a Response echoes them; hosted tools dropped."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools", "'tools' must be an array.")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _invalid(f"tools[{i}]", "each tool must be an object.")
        kind = tool.get("type")
        if not isinstance(kind, str):
            raise _bad(f"tools[{i}].type", kind, "a tool's type must be a string.")
        if kind not in ("function", "custom"):
            continue  # hosted: a chat backend cannot run it (module docstring)
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name", name, "a tool's name must be a non-empty string.")
        if kind == "custom":
            out.append({k: v for k, v in tool.items() if k in ("type", "name", "description", "format")})
            continue
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _invalid(f"tools[{i}].parameters", "'parameters' must be a JSON schema object.")
        if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
            raise _invalid(f"tools[{i}].strict", "'strict' must be a boolean.")
        out.append({"type": "function", "name": name, "description": tool.get("description"),
                    "parameters": parameters, "strict": tool.get("strict")})
    return out


def dropped_tools(body: dict[str, Any]) -> list[str]:
    """Types of the hosted tools ``chat_request`` left out, for a warning header."""
    tools = body.get("tools")
    return [t["type"] for t in tools if isinstance(t, dict) and isinstance(t.get("type"), str)
            and t["type"] not in ("function", "custom")] if isinstance(tools, list) else []


def custom_tool_names(request: dict[str, Any]) -> frozenset[str]:
    """Names of the custom tools: their calls come back as custom_tool_call items."""
    tools = request.get("tools")
    return frozenset(t["name"] for t in tools if isinstance(t, dict) and t.get("type") == "custom"
                     and isinstance(t.get("name"), str)) if isinstance(tools, list) else frozenset()


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    if tool["type"] == "custom":
        # A free-text tool (Codex's apply_patch) becomes a function taking one string; calls are unwrapped.
        function["parameters"] = {"type": "object", "properties": {"input": {"type": "string"}},
                                  "required": ["input"]}
    else:
        for key in ("parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
    return {"type": "function", "function": function}


def _add_tools(out: dict[str, Any], body: dict[str, Any]) -> None:
    tools = offered_tools(body.get("tools"))
    choice, names = _tool_choice(body.get("tool_choice"))
    if names is not None:
        tools = [tool for tool in tools if tool["name"] in names]
    if not tools:
        return  # chat servers refuse tool_choice and parallel_tool_calls without tools
    out["tools"] = [_chat_tool(tool) for tool in tools]
    if choice is not None:
        out["tool_choice"] = choice
    if body.get("parallel_tool_calls") is not None:
        out["parallel_tool_calls"] = body["parallel_tool_calls"]


def _tool_choice(choice: Any) -> tuple[Any, set[str] | None]:
    """Chat's tool_choice, and the tool names allowed_tools keeps (None: all)."""
    if choice is None:
        return None, None
    if isinstance(choice, str):
        if choice in _TOOL_CHOICES:
            return choice, None
        raise _invalid("tool_choice", "tool_choice must be 'auto', 'none', 'required' or an object.")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("function", "custom"):
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _missing("tool_choice.name")
        return {"type": "function", "function": {"name": name}}, None
    if kind == "allowed_tools":
        mode, listed = choice.get("mode"), choice.get("tools")
        if mode not in ("auto", "required"):
            raise _invalid("tool_choice.mode", "allowed_tools mode must be 'auto' or 'required'.")
        if not isinstance(listed, list):
            raise _invalid("tool_choice.tools", "allowed_tools needs an array of tools.")
        return mode, {t["name"] for t in listed if isinstance(t, dict) and isinstance(t.get("name"), str)}
    if isinstance(kind, str):
        return None, None  # a hosted tool's choice: that tool was dropped
    raise _invalid("tool_choice", "tool_choice must be 'auto', 'none', 'required' or an object with a type.")


# ------------------------------------------------------------------------------------------ answers


def response_skeleton(request: dict[str, Any], *, response_id: str, created_at: int) -> dict[str, Any]:
    """The Response before any output (status in_progress), echoing the request with the API's defaults.

    ``usage`` and ``user`` are left out rather than null: the published schema allows neither as null.
    """
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else {}
    text = request.get("text") if isinstance(request.get("text"), dict) else {}
    choice = request.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") not in ("function", "custom", "allowed_tools"):
        choice = None  # a hosted tool's choice was dropped with its tool
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model"),
        "output": [],
        "parallel_tool_calls": _default(request.get("parallel_tool_calls"), True),
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": _default(request.get("store"), True),
        "temperature": _default(request.get("temperature"), 1.0),
        "text": {**text, "format": text.get("format") or {"type": "text"}},
        "tool_choice": _default(choice, "auto"),
        "tools": offered_tools(request.get("tools")),
        "top_p": _default(request.get("top_p"), 1.0),
        "truncation": _default(request.get("truncation"), "disabled"),
        "metadata": dict(request.get("metadata") or {}),
        "background": False,
    }
    for name in ("user", "safety_identifier", "prompt_cache_key", "top_logprobs"):
        if request.get(name) is not None:
            response[name] = request[name]
    return response


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def response_object(chat: dict[str, Any], *, request: dict[str, Any], response_id: str, created_at: int,
                    completed_at: int | None = None) -> dict[str, Any]:
    """A chat completion as the full Response: new ids, output items in order, status by spec §1.4."""
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    if choice is None:
        raise GatewayError("backend_error", "The backend answered without a choice.")
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    output = []
    thinking = reasoning_text(message)
    if thinking:
        output.append(reasoning_item(new_id("rs_"), thinking, "completed"))
    parts = []
    content = content_text(message.get("content"))
    if content:
        parts.append(output_text_part(content, logprob_entries(choice.get("logprobs"))))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts:
        output.append({"type": "message", "id": new_id("msg_"), "status": "completed", "role": "assistant",
                       "content": parts})
    custom = custom_tool_names(request)
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    if isinstance(message.get("function_call"), dict):  # the legacy single-call shape
        calls = [*calls, {"function": message["function_call"]}]
    for call in calls:
        call_id, name, arguments = tool_call_fields(call)
        output.append(call_item(call_id, name, arguments, custom=name in custom, status="completed"))
    reason = incomplete_reason(choice.get("finish_reason"))
    if reason and output:
        output[-1]["status"] = "incomplete"
    base = response_skeleton(request, response_id=response_id, created_at=created_at)
    return finished_response(base, output, reason, response_usage(chat.get("usage")), completed_at)


def finished_response(base: dict[str, Any], output: list[dict[str, Any]], reason: str | None,
                      usage: dict[str, Any] | None, completed_at: int | None = None) -> dict[str, Any]:
    """The terminal Response: completed, or incomplete with its reason."""
    response = {**base, "output": output, "status": "incomplete" if reason else "completed",
                "incomplete_details": {"reason": reason} if reason else None,
                "completed_at": None if reason else completed_at or int(time.time())}
    if usage is not None:
        response["usage"] = usage
    return response


def failed_response(base: dict[str, Any], output: list[dict[str, Any]], err: GatewayError,
                    usage: dict[str, Any] | None = None) -> dict[str, Any]:
    response = {**base, "output": output, "status": "failed", "error": response_error(err)}
    if usage is not None:
        response["usage"] = usage
    return response


def incomplete_reason(finish_reason: Any) -> str | None:
    """incomplete_details.reason for a chat finish_reason; None completes (tool calls complete whatever the
    backend says: OpenAI and Ollama finish them with "stop")."""
    return _INCOMPLETE.get(finish_reason) if isinstance(finish_reason, str) else None


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "encrypted_content": None, "status": status}


def output_text_part(text: str, logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [],
            "logprobs": [_logprob(entry, with_bytes=True) for entry in logprobs]}


def logprob_entries(logprobs: Any) -> list[dict[str, Any]]:
    """The usable token entries of a chat choice's ``logprobs`` (same fields as a Responses LogProb)."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return [e for e in content if isinstance(e, dict) and isinstance(e.get("token"), str)
            and _number(e.get("logprob"))] if isinstance(content, list) else []


def _logprob(entry: dict[str, Any], *, with_bytes: bool) -> dict[str, Any]:
    """A chat logprob entry as a Responses one: parts carry ``bytes``, stream events do not."""
    def one(e: dict[str, Any]) -> dict[str, Any]:
        out = {"token": e["token"], "logprob": e["logprob"]}
        if with_bytes:
            out["bytes"] = e["bytes"] if isinstance(e.get("bytes"), list) else list(e["token"].encode())
        return out

    top = entry.get("top_logprobs") if isinstance(entry.get("top_logprobs"), list) else []
    return {**one(entry), "top_logprobs": [one(t) for t in top if isinstance(t, dict) and isinstance(
        t.get("token"), str) and _number(t.get("logprob"))]}


def delta_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_logprob(entry, with_bytes=False) for entry in entries]


def tool_call_fields(call: Any) -> tuple[str, str, str]:
    """call_id, name and arguments of a chat tool call; arguments always a JSON string, never empty."""
    function = call.get("function") if isinstance(call, dict) else None
    function = function if isinstance(function, dict) else {}
    name = function.get("name") if isinstance(function.get("name"), str) else ""
    arguments = function.get("arguments")
    if not isinstance(arguments, str):  # Ollama-style objects
        arguments = orjson.dumps(arguments).decode() if arguments is not None else ""
    return valid_call_id(call.get("id") if isinstance(call, dict) else None), name, arguments or "{}"


def valid_call_id(call_id: Any) -> str:
    """The backend's call id, or a new one when it sent none or one too long to be echoed back."""
    return call_id if isinstance(call_id, str) and 0 < len(call_id) <= _CALL_ID_MAX else new_id("call_")


def call_item(call_id: str, name: str, arguments: str, *, custom: bool, status: str,
              item_id: str | None = None) -> dict[str, Any]:
    if custom:
        return {"type": "custom_tool_call", "id": item_id or new_id("ctc_"), "call_id": call_id, "name": name,
                "input": custom_input(arguments), "status": status}
    return {"type": "function_call", "id": item_id or new_id("fc_"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def custom_input(arguments: str) -> str:
    """The free text of a custom tool call, unwrapped from the {"input": ...} function arguments."""
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return value["input"]
    return "" if value == {} else arguments  # anything else is kept whole rather than lost


def response_usage(usage: Any) -> dict[str, Any] | None:
    """Chat usage as ResponseUsage, every detail present (Codex parses it strictly); None when there is none."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not _integer(prompt) and not _integer(completion):
        return None
    prompt = prompt if _integer(prompt) else 0
    completion = completion if _integer(completion) else 0
    total = usage.get("total_tokens")
    prompt_details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    completion_details = usage.get("completion_tokens_details")
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": token_count(prompt_details.get("cached_tokens")),
                                 "cache_write_tokens": token_count(prompt_details.get("cache_write_tokens"))},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": token_count(completion_details.get("reasoning_tokens"))},
        "total_tokens": total if _integer(total) else prompt + completion,
    }


# ------------------------------------------------------------------------------------------ errors


def error_body(err: GatewayError, request_id: str | None = None) -> bytes:
    """The HTTP error body of the Responses endpoints: OpenAI's envelope, all four keys present (spec §1.6)."""
    return err.json_body(request_id)


def ws_error_frame(err: GatewayError, *, stream_id: str | None = None) -> dict[str, Any]:
    """A WebSocket error frame (ResponseWsError); the socket stays open after it (spec §2.3)."""
    error: dict[str, Any] = {"type": err.type, "code": err.code, "message": err.message, "param": err.param}
    if err.headers:
        error["headers"] = dict(err.headers)  # Retry-After of a refused turn
    frame: dict[str, Any] = {"type": "error", "status": err.status, "error": error}
    if stream_id:
        frame["stream_id"] = stream_id
    return frame


def previous_not_found(response_id: str) -> GatewayError:
    """An unknown, deleted, unstored or unusable previous_response_id (the exact text OpenAI and peers use)."""
    return GatewayError("previous_response_not_found", f"Previous response with id '{response_id}' not found.",
                        param="previous_response_id", status=400, type="invalid_request_error")


def response_error(err: GatewayError) -> dict[str, str]:
    """``Response.error`` of a failed response; context_length_exceeded is kept for Codex, off the spec's enum."""
    if err.code in ("rate_limit_exceeded", "budget_exceeded"):
        code = "rate_limit_exceeded"
    elif err.code == "context_length_exceeded":
        code = "context_length_exceeded"
    else:
        code = "server_error"
    return {"code": code, "message": err.message}
