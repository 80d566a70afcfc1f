"""Reading OpenAI chat completion messages and deltas, the way every translation and estimate needs to."""

from __future__ import annotations

from typing import Any

import orjson

from appliance.common.errors import GatewayError


def content_text(content: Any) -> str:
    """A message's text: a string, or the text of its parts (a few servers answer with parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def reasoning_text(message: dict[str, Any]) -> str:
    """vLLM and llama.cpp say reasoning_content, Ollama reasoning; translators that set both repeat the text."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def token_count(value: Any) -> int:
    """A usage count as reported, or 0 for anything that is not a positive integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tool_call_function(call: Any, i: int, *, needs_id: bool = False) -> tuple[str, dict[str, Any]]:
    """The name and the arguments (as an object) of one of messages[i].tool_calls, for backends that want
    objects rather than JSON strings; a malformed call raises 400 naming it."""
    param = f"messages.[{i}].tool_calls"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or (needs_id and not call.get("id")):
        needs = "an id and a function name" if needs_id else "a function name"
        raise GatewayError("invalid_value", f"messages[{i}].tool_calls: each call needs {needs}.", param=param)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            raise GatewayError("invalid_value", f"messages[{i}].tool_calls: arguments are not valid JSON.",
                               param=param) from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise GatewayError("invalid_value", f"messages[{i}].tool_calls: arguments must be a JSON object.",
                           param=param)
    return function["name"], arguments
