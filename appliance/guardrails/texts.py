"""Where the text is in chat and completions bodies, answers and stream chunks, and how to rewrite it.

Requests: each message's string content and text parts, and the arguments of an assistant's tool calls
(JSON text: none of the patterns matches a quote or a backslash, so a redacted argument string stays valid
JSON); a completions ``prompt`` (a string or a list of strings). Answers: each choice's content (or
completions ``text``) and tool-call arguments. A body is copied only where something changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

CHAT, COMPLETIONS = "chat/completions", "completions"  # as providers.base names them

Rewrite = Callable[[str], str]


def request_texts(endpoint: str, body: dict[str, Any]) -> Iterator[str]:
    """Every text a guardrail reads in a request."""
    if endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            yield prompt
        elif isinstance(prompt, list):
            yield from (p for p in prompt if isinstance(p, str))
        return
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            yield from _message_texts(message)


def _message_texts(message: dict[str, Any]) -> Iterator[str]:
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            yield function["arguments"]


def rewrite_request(endpoint: str, body: dict[str, Any], rewrite: Rewrite) -> dict[str, Any]:
    """``body`` with every text passed through ``rewrite`` (the same object when nothing changed)."""
    if endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            new: Any = rewrite(prompt)
        elif isinstance(prompt, list):
            new = [rewrite(p) if isinstance(p, str) else p for p in prompt]
        else:
            return body
        return body if new == prompt else {**body, "prompt": new}
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    rewritten = [rewrite_message(m, rewrite) if isinstance(m, dict) else m for m in messages]
    if all(a is b for a, b in zip(rewritten, messages, strict=True)):
        return body
    return {**body, "messages": rewritten}


def rewrite_message(message: dict[str, Any], rewrite: Rewrite) -> dict[str, Any]:
    """A chat message (or an answer's message) with its texts rewritten; the same object when none changed."""
    out = message
    content = message.get("content")
    if isinstance(content, str):
        new = rewrite(content)
        if new != content:
            out = {**out, "content": new}
    elif isinstance(content, list):
        parts = [_rewrite_part(part, rewrite) for part in content]
        if any(a is not b for a, b in zip(parts, content, strict=True)):
            out = {**out, "content": parts}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        new_calls = [_rewrite_call(call, rewrite) for call in calls]
        if any(a is not b for a, b in zip(new_calls, calls, strict=True)):
            out = {**out, "tool_calls": new_calls}
    return out


def _rewrite_part(part: Any, rewrite: Rewrite) -> Any:
    if isinstance(part, dict) and isinstance(part.get("text"), str):
        new = rewrite(part["text"])
        if new != part["text"]:
            return {**part, "text": new}
    return part


def _rewrite_call(call: Any, rewrite: Rewrite) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        new = rewrite(function["arguments"])
        if new != function["arguments"]:
            return {**call, "function": {**function, "arguments": new}}
    return call


def rewrite_answer(data: dict[str, Any], rewrite: Rewrite) -> None:
    """Rewrite a whole chat or completions answer's texts in place (the answer is ours to change)."""
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            choice["text"] = rewrite(choice["text"])
        message = choice.get("message")
        if isinstance(message, dict):
            choice["message"] = rewrite_message(message, rewrite)


# The keys that hold text in stored Responses input items (message parts, tool calls and their outputs).
_ITEM_TEXTS = frozenset(("text", "content", "output", "arguments", "input"))


def rewrite_items(items: list[Any], rewrite: Rewrite) -> list[Any]:
    """Responses input items (as stored) with their texts rewritten, at any depth; copies only what changed."""
    return [_rewrite_json(item, rewrite) for item in items]


def _rewrite_json(value: Any, rewrite: Rewrite, key: str | None = None) -> Any:
    if isinstance(value, str):
        return rewrite(value) if key in _ITEM_TEXTS else value
    if isinstance(value, list):
        out = [_rewrite_json(v, rewrite, key) for v in value]
        return value if all(a is b for a, b in zip(out, value, strict=True)) else out
    if isinstance(value, dict):
        changed = {k: _rewrite_json(v, rewrite, k) for k, v in value.items()}
        return value if all(changed[k] is v for k, v in value.items()) else changed
    return value


def answer_text(data: dict[str, Any]) -> str | None:
    """The first choice's text: what schema_validation parses as JSON."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if isinstance(choice.get("text"), str):
        return choice["text"]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else None


def answer_texts(data: dict[str, Any]) -> Iterator[str]:
    """Every text of a whole answer (each choice's), for moderation."""
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            yield choice["text"]
        if isinstance(choice.get("message"), dict):
            yield from _message_texts(choice["message"])
