"""Responses input items, without I/O: a request's input as stored items, and stored items as chat messages.

``input_items`` validates and normalises the ``input`` of a CreateResponse body into the items that are
stored, listed by input_items and replayed by later turns (ids minted, content as lists of parts,
item_reference resolved); ``chat_messages`` renders a chain of such items as the chat messages a backend
sees. The id and 400-error helpers the rest of the Responses surface shares live here too, so that
translate.py can import them without a cycle.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import orjson

from appliance.common.errors import GatewayError

_ROLES = ("user", "assistant", "system", "developer")
_STATUSES = ("in_progress", "completed", "incomplete")
_IMAGE_DETAILS = ("low", "high", "auto")  # "original" is Responses-only: chat servers get no detail


def new_id(prefix: str) -> str:
    """An opaque id shaped like OpenAI's (``resp_``, ``msg_``, ``fc_``... and 48 hex digits)."""
    return prefix + secrets.token_hex(24)


def _invalid(param: str, message: str) -> GatewayError:
    return GatewayError("invalid_value", message, param=param)


def _missing(param: str) -> GatewayError:
    return GatewayError("missing_field", f"Missing required parameter: '{param}'.", param=param)


def _bad(param: str, value: Any, message: str) -> GatewayError:
    """missing_field when the value is absent, else invalid_value."""
    return _missing(param) if value is None else _invalid(param, message)

# ------------------------------------------------------------------------------------------ input items


def input_items(body: dict[str, Any], history: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """This request's input as stored items, each with an id: what input_items lists and later turns replay.

    The client's ids are kept and missing ones minted (``msg_``, ``fc_``...); message content becomes a list
    of parts. ``history`` resolves item_reference items.
    """
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "id": new_id("msg_"), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise _invalid("input", "'input' must be a string or an array of input items.")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _invalid(param, "each input item must be an object.")
        kind = item.get("type")
        if kind is None:  # EasyInputMessage, or an item reference without its type
            kind = "message" if "role" in item else "item_reference" if "id" in item else None
        if kind == "message":
            out.append(_message_item(item, param))
        elif kind in ("function_call", "custom_tool_call"):
            out.append(_call_item(item, kind, param))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out.append(_output_item(item, kind, param))
        elif kind == "reasoning":
            summary = item.get("summary")
            out.append({**item, "id": _id(item, "rs_"), "summary": summary if isinstance(summary, list) else []})
        elif kind == "item_reference":
            out.append(_referenced(item.get("id"), [*history, *out], param))
        elif kind is None:
            raise _missing(f"{param}.type")
        else:
            raise _invalid(f"{param}.type", f"input items of type {kind!r} are not supported by this gateway.")
    return out


def _id(item: dict[str, Any], prefix: str) -> str:
    item_id = item.get("id")
    return item_id if isinstance(item_id, str) and item_id else new_id(prefix)


def _status(item: dict[str, Any]) -> str:
    return item["status"] if item.get("status") in _STATUSES else "completed"


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _bad(f"{param}.{key}", value, f"'{key}' must be a string.")
    return value


def _message_item(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise _bad(f"{param}.role", role, "role must be one of 'user', 'assistant', 'system' or 'developer'.")
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    elif not isinstance(content, list):
        raise _bad(f"{param}.content", content, "content must be a string or an array of content parts.")
    parts = [_part(role, part, f"{param}.content[{j}]") for j, part in enumerate(content)]
    return {"type": "message", "id": _id(item, "msg_"), "role": role, "status": _status(item), "content": parts}


def _part(role: str, part: Any, param: str) -> dict[str, Any]:
    """One content part in its stored form: input_* parts for the caller's roles, output_text for assistant."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        text = _string(part, "text", param)
        if role != "assistant":
            return {"type": "input_text", "text": text}
        annotations = part.get("annotations")
        return {"type": "output_text", "text": text, "annotations": annotations if isinstance(annotations, list)
                else [], "logprobs": []}
    if kind == "refusal":
        text = _string(part, "refusal", param)
        return {"type": "refusal", "refusal": text} if role == "assistant" else {"type": "input_text", "text": text}
    if kind == "input_image" and role != "assistant":
        return _image_part(part, param)
    if kind == "input_file":
        raise _invalid(f"{param}.type", "input_file content is not supported by this gateway.")
    raise _invalid(f"{param}.type", f"content parts of type {kind!r} cannot be sent in a {role} message.")


def _image_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    if part.get("image_url") is None and part.get("file_id") is not None:
        raise _invalid(f"{param}.file_id", "images by file_id are not supported by this gateway; send image_url "
                       "as an https: or data: URL.")
    url = _string(part, "image_url", param)
    detail = part.get("detail")
    return {"type": "input_image", "image_url": url, "detail": detail if detail in (*_IMAGE_DETAILS, "original")
            else "auto"}


def _call_item(item: dict[str, Any], kind: str, param: str) -> dict[str, Any]:
    call_id, name = _string(item, "call_id", param), _string(item, "name", param)
    if kind == "custom_tool_call":
        return {"type": kind, "id": _id(item, "ctc_"), "call_id": call_id, "name": name,
                "input": _string(item, "input", param), "status": _status(item)}
    arguments = item.get("arguments")
    if isinstance(arguments, dict):  # lenient: an object instead of its JSON text
        arguments = orjson.dumps(arguments).decode()
    elif not isinstance(arguments, str):
        raise _bad(f"{param}.arguments", arguments, "'arguments' must be a JSON string.")
    return {"type": kind, "id": _id(item, "fc_"), "call_id": call_id, "name": name,
            "arguments": arguments or "{}", "status": _status(item)}


def _output_item(item: dict[str, Any], kind: str, param: str) -> dict[str, Any]:
    call_id = _string(item, "call_id", param)
    output = item.get("output")
    if isinstance(output, list):
        output = [_part("user", part, f"{param}.output[{j}]") for j, part in enumerate(output)]
    elif not isinstance(output, str):
        raise _bad(f"{param}.output", output, "'output' must be a string or an array of content parts.")
    prefix = "fco_" if kind == "function_call_output" else "ctco_"
    return {"type": kind, "id": _id(item, prefix), "call_id": call_id, "output": output, "status": "completed"}


def _referenced(item_id: Any, known: list[dict[str, Any]], param: str) -> dict[str, Any]:
    if not isinstance(item_id, str):
        raise _missing(f"{param}.id")
    for item in reversed(known):
        if item.get("id") == item_id:
            return dict(item)
    raise _invalid(f"{param}.id", f"Item with id '{item_id}' not found.")


def history_items(stored_input: Sequence[dict[str, Any]], output: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One stored response as the items its successor replays: its input, then its output.

    Walk the chain oldest first and concatenate; reasoning items stay (input_items may list them) and are
    dropped when rendered for the backend.
    """
    return [*stored_input, *output]


# ------------------------------------------------------------------------------------------ chat messages


def chat_messages(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored items as chat messages.

    Calls join the assistant message right before them: back-to-back assistant messages, or tool calls
    without their results right after, are what chat templates reject. Chat tool messages hold text only,
    so images of tool outputs follow as one user message after the run of tool messages.
    """
    out: list[dict[str, Any]] = []
    calls: set[str] = set()
    images: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "reasoning":
            continue  # reasoning is never replayed (Codex resends it every turn)
        if kind in ("function_call_output", "custom_tool_call_output"):
            if item["call_id"] not in calls:
                raise GatewayError("invalid_value", "No tool call found for function call output with call_id "
                                   f"{item['call_id']}.", param="input")
            text, item_images = _tool_output(item["output"])
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
            images += item_images
            continue
        if images:
            out.append({"role": "user", "content": images})
            images = []
        if kind in ("function_call", "custom_tool_call"):
            calls.add(item["call_id"])
            call = _chat_call(item)
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "message":
            out.append(_chat_message(item))
    if images:
        out.append({"role": "user", "content": images})
    return out


def _chat_message(item: dict[str, Any]) -> dict[str, Any]:
    role = item["role"]
    parts = [_chat_part(part) for part in item["content"]]
    if role == "assistant" or all(part["type"] == "text" for part in parts):
        # Several local chat templates take string content only.
        content: Any = "\n".join(part.get("text", "") for part in parts)
    else:
        content = parts
    return {"role": "system" if role == "developer" else role, "content": content}


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    if part["type"] == "input_image":
        image: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail") in _IMAGE_DETAILS:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    return {"type": "text", "text": part.get("text", part.get("refusal", ""))}


def _chat_call(item: dict[str, Any]) -> dict[str, Any]:
    if item["type"] == "custom_tool_call":
        arguments = orjson.dumps({"input": item["input"]}).decode()
    else:
        arguments = item["arguments"]
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": arguments}}


def _tool_output(output: str | list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(output, str):
        return output, []
    parts = [_chat_part(part) for part in output]
    text = "\n".join(part["text"] for part in parts if part["type"] == "text")
    return text, [part for part in parts if part["type"] == "image_url"]
