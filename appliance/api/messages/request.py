"""Anthropic Messages requests as chat completions requests, without I/O (spec-responses-messages.md §5.1).

Validation answers the way Anthropic does: a 400 whose message leads with the dotted path of the field at
fault. The decisions this mapping takes are listed in translate.py.
"""

from __future__ import annotations

from typing import Any

import orjson

from appliance.accounts.usage import estimate_prompt
from appliance.common.errors import GatewayError

# Anthropic tool_choice types with a chat equivalent that is a plain string.
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}

def _invalid(param: str, message: str) -> GatewayError:
    # Anthropic's messages lead with the dotted path ("messages.0.content: ..."); clients show them as they are.
    return GatewayError("invalid_value", f"{param}: {message}", param=param)


def _missing(param: str) -> GatewayError:
    return GatewayError("missing_field", f"{param}: Field required", param=param)


# ------------------------------------------------------------------------------------------ requests


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A MessageCreateParams body as a chat completions body; a GatewayError (400) names any bad field."""
    out = count_request(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _missing("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 0:
        raise _invalid("max_tokens", "Input should be a non-negative integer")
    out["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if not _is_number(value):
                raise _invalid(name, "Input should be a valid number")
            out[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k):
            raise _invalid("top_k", "Input should be a valid integer")
        out["top_k"] = top_k
    stop = _stop_sequences(body.get("stop_sequences"))
    if stop:
        out["stop"] = stop
    user = _user_id(body.get("metadata"))
    if user is not None:
        out["user"] = user
    response_format = _response_format(body.get("output_config"))
    if response_format is not None:
        out["response_format"] = response_format
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise _invalid("stream", "Input should be a valid boolean")
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def count_request(body: dict[str, Any]) -> dict[str, Any]:
    """The prompt part of a Messages body (model, messages, tools) as chat fields; what count_tokens measures."""
    if not isinstance(body, dict):
        raise GatewayError("invalid_value", "The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "Input should be a non-empty string")
    out: dict[str, Any] = {"model": model, "messages": chat_messages(body.get("messages"), body.get("system"))}
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    _add_tool_choice(out, body.get("tool_choice"))
    return out


def count_tokens(body: dict[str, Any]) -> dict[str, int]:
    """``MessageTokensCount`` for a count_tokens body, estimated on the chat request the backend would see."""
    return {"input_tokens": estimate_prompt(count_request(body))}


def dropped_tools(body: dict[str, Any]) -> list[str]:
    """Types of the server tools ``chat_request`` left out, for a warning header."""
    tools = body.get("tools") if isinstance(body, dict) else None
    return [t["type"] for t in tools if isinstance(t, dict) and isinstance(t.get("type"), str)
            and t["type"] != "custom"] if isinstance(tools, list) else []


def wants_thinking(body: dict[str, Any]) -> bool:
    """True when the client enabled extended thinking, so backend reasoning may come back as thinking blocks."""
    thinking = body.get("thinking") if isinstance(body, dict) else None
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def chat_messages(messages: Any, system: Any = None) -> list[dict[str, Any]]:
    """Anthropic turns as chat messages: system first, same-role turns merged, tool results as tool messages."""
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "Input should be a non-empty list of messages")
    out = []
    system_text = _system(system, "system")
    if system_text:
        out.append({"role": "system", "content": system_text})
    for role, blocks in _turns(messages):
        if role == "system":
            out.append({"role": "system", "content": blocks})
        elif role == "user":
            out += _user_messages(blocks)
        else:
            out.append(_assistant_message(blocks))
    return out


def _system(system: Any, param: str) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if not isinstance(system, list):
        raise _invalid(param, "Input should be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _invalid(f"{param}.{j}", "Input should be a text block")
        texts.append(block["text"])
    return "\n".join(text for text in texts if text)


def _turns(messages: list[Any]) -> list[tuple[str, Any]]:
    """(role, [(param, block)]) per turn, consecutive user or assistant turns combined as Anthropic does.

    Turns left empty once thinking and unknown blocks are dropped disappear before combining, so their
    neighbours still merge and the chat roles alternate.
    """
    turns: list[tuple[str, Any]] = []
    for i, message in enumerate(messages):
        param = f"messages.{i}"
        if not isinstance(message, dict):
            raise _invalid(param, "Input should be an object with role and content")
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise _invalid(f"{param}.role", "Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise _missing(f"{param}.content")
        if role == "system":  # the newest SDKs allow a system message mid-conversation
            text = _system(message["content"], f"{param}.content")
            if text:
                turns.append(("system", text))
            continue
        blocks = _blocks(message["content"], f"{param}.content")
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    return turns


def _blocks(content: Any, param: str) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(content, str):
        return [(param, {"type": "text", "text": content})] if content else []
    if not isinstance(content, list):
        raise _invalid(param, "Input should be a string or a list of content blocks")
    blocks = []
    for j, block in enumerate(content):
        path = f"{param}.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(kind, str):
            raise _invalid(path, "Input should be a content block with a type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise _invalid(f"{path}.text", "Input should be a valid string")
            if block["text"]:
                blocks.append((path, block))
        elif kind in ("image", "document", "tool_use", "tool_result"):
            blocks.append((path, block))
        # thinking blocks and types this gateway does not know are ignored: Claude Code adds new ones often.
    return blocks


def _user_messages(blocks: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One user turn: its tool messages first, in block order, then one user message with everything else.

    Chat wants tool messages right after the assistant's tool calls; text written beside a tool result
    must not come between them (spec §5.4 pitfall 5).
    """
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for param, block in blocks:
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_part(block, param))
        elif kind == "document":
            parts.append({"type": "text", "text": _document_text(block, param)})
        elif kind == "tool_result":
            text, images = _tool_result(block, param)
            tools.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            parts += images  # chat tool messages carry text only
        else:
            raise _invalid(f"{param}.type", "tool_use blocks belong in assistant messages")
    if parts:
        return [*tools, {"role": "user", "content": _collapse(parts)}]
    return tools


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # Some chat templates accept string content only; keep a list only when it carries images.
    if all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return parts


def _assistant_message(blocks: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    texts, calls = [], []
    for param, block in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(_tool_call(block, param))
        else:
            raise _invalid(f"{param}.type", f"{kind} blocks cannot appear in assistant messages")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_call(block: dict[str, Any], param: str) -> dict[str, Any]:
    for name in ("id", "name"):
        if name not in block:
            raise _missing(f"{param}.{name}")
        if not isinstance(block[name], str) or not block[name]:
            raise _invalid(f"{param}.{name}", "Input should be a non-empty string")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise _invalid(f"{param}.input", "Input should be an object")
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": orjson.dumps(arguments).decode()}}


def _tool_result(block: dict[str, Any], param: str) -> tuple[str, list[dict[str, Any]]]:
    """The text of a tool result and the images it carried."""
    if "tool_use_id" not in block:
        raise _missing(f"{param}.tool_use_id")
    if not isinstance(block["tool_use_id"], str) or not block["tool_use_id"]:
        raise _invalid(f"{param}.tool_use_id", "Input should be a non-empty string")
    content = block.get("content")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, item in enumerate(content):
            path = f"{param}.content.{j}"
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif kind == "image":
                images.append(_image_part(item, path))
            elif kind == "document":
                texts.append(_document_text(item, path))
            elif not isinstance(kind, str):
                raise _invalid(path, "Input should be a content block with a type")
    elif content is not None:
        raise _invalid(f"{param}.content", "Input should be a string or a list of content blocks")
    text = "\n".join(text for text in texts if text)
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise _invalid(f"{param}.is_error", "Input should be a valid boolean")
    if is_error:
        text = f"Error: {text}" if text else "Error"
    return text, images


def _image_part(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not media_type:
            raise _invalid(f"{param}.source.media_type", "Input should be an image media type")
        if not isinstance(data, str) or not data:
            raise _invalid(f"{param}.source.data", "Input should be base64 data")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        if not isinstance(source.get("url"), str) or not source["url"]:
            raise _invalid(f"{param}.source.url", "Input should be a URL")
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise _invalid(f"{param}.source", "Image sources of type 'base64' or 'url' are supported")


def _document_text(block: dict[str, Any], param: str) -> str:
    """A plain-text document as text; PDFs and files need a backend that reads them, which chat ones do not."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "text" and isinstance(source.get("data"), str):
        text = source["data"]
    elif kind == "content" and isinstance(source.get("content"), str | list):
        inner = source["content"]
        text = inner if isinstance(inner, str) else "\n".join(
            item["text"] for item in inner if isinstance(item, dict) and isinstance(item.get("text"), str))
    else:
        raise _invalid(f"{param}.source", f"document sources of type {kind!r} are not supported by this "
                       "backend; send the text instead")
    title = block.get("title")
    return f"{title}\n\n{text}" if isinstance(title, str) and title else text


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools", "Input should be a list of tools")
    out = []
    for i, tool in enumerate(tools):
        param = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _invalid(param, "Input should be a tool object")
        if tool.get("type") not in (None, "custom"):
            continue  # a server tool: see dropped_tools
        name, schema = tool.get("name"), tool.get("input_schema")
        if name is None:
            raise _missing(f"{param}.name")
        if not isinstance(name, str) or not name:
            raise _invalid(f"{param}.name", "Input should be a non-empty string")
        if schema is None:
            raise _missing(f"{param}.input_schema")
        if not isinstance(schema, dict):
            raise _invalid(f"{param}.input_schema", "Input should be a JSON Schema object")
        function: dict[str, Any] = {"name": name}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = schema
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _add_tool_choice(out: dict[str, Any], choice: Any) -> None:
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid("tool_choice.name", "Input should be the name of a tool")
        mapped: Any = {"type": "function", "function": {"name": name}}
    elif isinstance(kind, str) and kind in _TOOL_CHOICES:
        mapped = _TOOL_CHOICES[kind]
    else:
        raise _invalid("tool_choice.type", "Input should be 'auto', 'any', 'tool' or 'none'")
    if "tools" not in out:
        return  # chat servers reject tool_choice without tools; Anthropic lets it pass
    out["tool_choice"] = mapped
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def _stop_sequences(stop: Any) -> list[str]:
    if stop is None:
        return []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid("stop_sequences", "Input should be a list of strings")
    return stop


def _user_id(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise _invalid("metadata", "Input should be an object")
    user = metadata.get("user_id")
    if user is not None and not isinstance(user, str):
        raise _invalid("metadata.user_id", "Input should be a valid string")
    return user or None


def _response_format(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _invalid("output_config", "Input should be an object")
    fmt = config.get("format")
    if fmt is None:
        return None  # effort alone: nothing a chat backend understands
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _invalid("output_config.format", "Input should be {'type': 'json_schema', 'schema': {...}}")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
