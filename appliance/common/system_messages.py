"""How a backend receives a chat request's system text: the one rule, for every backend and model.

Chat carries instructions as ``system`` (or OpenAI's newer ``developer``) messages. Most backends take them
as they are; Anthropic wants them in a top-level ``system`` field; a model marked ``system_role = false``
in ``[[models]]`` (its chat template rejects the system role) gets them merged into the first user message.
``placement`` decides which; ``split`` and ``merged`` do it.
"""

from __future__ import annotations

from typing import Any, Literal

from appliance.common.errors import GatewayError

ROLES = ("system", "developer")
# Several system messages become one text, in order; the system text and the user's are a blank line apart.
JOINER = "\n"
BEFORE_USER = "\n\n"

Placement = Literal["messages", "top_level", "merged"]


def placement(kind: str, system_role: bool | None) -> Placement:
    """Where system text goes for a backend of ``kind`` serving a model whose ``system_role`` is configured
    so (None: not said). Anthropic's API has a field for it whatever the model; a model that rejects the role
    gets it in the first user message; everyone else gets the messages as sent."""
    if kind == "anthropic":
        return "top_level"
    if system_role is False:
        return "merged"
    return "messages"


def text_of(content: Any, i: int) -> str:
    """The text of messages[i], a system (or developer, or tool) message: a string or text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise GatewayError("invalid_value", f"messages[{i}]: only text parts can be sent here.",
                                   param=f"messages.[{i}].content")
            texts.append(part["text"])
        return JOINER.join(texts)
    raise GatewayError("invalid_value", f"messages[{i}].content must be a string or an array of parts.",
                       param=f"messages.[{i}].content")


def split(messages: list[Any]) -> tuple[str, list[tuple[int, Any]]]:
    """The system text of ``messages`` (every system and developer message, in order) and the other messages,
    each with its index in ``messages`` (for errors that name it). Malformed entries are left to the caller."""
    system: list[str] = []
    rest: list[tuple[int, Any]] = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") in ROLES:
            text = text_of(message.get("content"), i)
            if text:
                system.append(text)
        else:
            rest.append((i, message))
    return JOINER.join(system), rest


def merged(messages: list[Any]) -> list[Any]:
    """``messages`` without system messages, their text leading the first user message (a new user message
    at the start when there is none). Messages are copied where changed, never modified."""
    system, rest = split(messages)
    out = [message for _, message in rest]
    if not system:
        return out
    for j, message in enumerate(out):
        if isinstance(message, dict) and message.get("role") == "user":
            out[j] = {**message, "content": _prefixed(system, message.get("content"))}
            return out
    return [{"role": "user", "content": system}, *out]


def _prefixed(system: str, content: Any) -> Any:
    """A user message's content with ``system`` in front: strings joined, parts led by a text part."""
    if isinstance(content, list):
        first = content[0] if content else None
        if isinstance(first, dict) and first.get("type") == "text" and isinstance(first.get("text"), str):
            return [{**first, "text": system + BEFORE_USER + first["text"]}, *content[1:]]
        return [{"type": "text", "text": system + BEFORE_USER}, *content]
    if isinstance(content, str) and content:
        return system + BEFORE_USER + content
    return system


def has_system(messages: list[Any]) -> bool:
    return any(isinstance(m, dict) and m.get("role") in ROLES for m in messages)
