"""The OpenAI <-> Ollama mapping, without a network (spec §3.9 and §5)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import orjson
import pytest

from appliance.common.config import BackendSettings
from appliance.common.errors import GatewayError
from appliance.providers.base import CHAT, COMPLETIONS
from appliance.providers.ollama import OllamaProvider, ollama_root
from appliance.providers.ollama_translate import (
    ChunkTranslator,
    LineSplitter,
    capabilities,
    chat_completion,
    chat_request,
    embed_request,
    embedding_list,
    finish_reason,
    generate_request,
    model_entry,
    ollama_error,
    shown_model,
    text_completion,
    trained_window,
    unix_time,
)
from appliance.providers.transport import ConnectError, Response

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return chat_request({"model": "llama3.2:latest", "messages": USER, **fields}, stream=False)


def sse(events: list[bytes]) -> list[Any]:
    out = []
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        data = event[6:-2]
        out.append(data.decode() if data == b"[DONE]" else orjson.loads(data))
    return out


# ------------------------------------------------------------------------------------------ requests


def test_chat_request_minimal() -> None:
    assert chat() == {"model": "llama3.2:latest", "messages": USER, "stream": False}
    assert chat_request({"model": "m", "messages": USER}, stream=True)["stream"] is True


@pytest.mark.parametrize(("fields", "options"), [
    ({"max_completion_tokens": 7}, {"num_predict": 7}),
    ({"max_tokens": 5}, {"num_predict": 5}),
    ({"max_tokens": 5, "max_completion_tokens": 9}, {"num_predict": 9}),
    ({"stop": "END"}, {"stop": ["END"]}),
    ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
    ({"seed": 1, "temperature": 0.2}, {"seed": 1, "temperature": 0.2}),
    ({"temperature": 0}, {"temperature": 0}),
    ({"top_p": 0.5, "frequency_penalty": 0.1, "presence_penalty": 0.2},
     {"top_p": 0.5, "frequency_penalty": 0.1, "presence_penalty": 0.2}),
    ({"options": {"num_ctx": 8192}, "temperature": 0.3}, {"num_ctx": 8192, "temperature": 0.3}),
    ({"temperature": None, "top_p": None}, None),
])
def test_options(fields: dict[str, Any], options: dict[str, Any] | None) -> None:
    assert chat(**fields).get("options") == options


@pytest.mark.parametrize(("response_format", "expected"), [
    ({"type": "json_object"}, "json"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json"),
    ({"type": "text"}, None),
])
def test_response_format(response_format: dict[str, Any], expected: Any) -> None:
    assert chat(response_format=response_format).get("format") == expected


def test_unknown_response_format_is_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        chat(response_format={"type": "xml"})
    assert (caught.value.status, caught.value.param) == (400, "response_format")


@pytest.mark.parametrize(("fields", "think"), [
    ({"reasoning_effort": "none"}, False),
    ({"reasoning_effort": "high"}, "high"),
    ({"reasoning_effort": "minimal"}, "low"),
    ({"reasoning": {"effort": "medium"}}, "medium"),
    ({"think": True}, True),
    ({}, None),
])
def test_think(fields: dict[str, Any], think: Any) -> None:
    assert chat(**fields).get("think") == think


def test_more_than_one_choice_is_refused() -> None:
    assert "n" not in chat(n=1)
    with pytest.raises(GatewayError) as caught:
        chat(n=2)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_value", "n")


def test_fields_without_equivalent_are_dropped_and_extensions_pass() -> None:
    body = chat(tool_choice="auto", logit_bias={"1": 2}, user="u", parallel_tool_calls=False, keep_alive="10m")
    assert set(body) == {"model", "messages", "stream", "keep_alive"}


def test_content_parts_and_images() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "this?"},
            {"type": "image_url", "image_url": {"url": "data:;base64,BBBB", "detail": "low"}},
        ]},
    ]
    out = chat_request({"model": "llava", "messages": messages}, stream=False)["messages"]
    assert out == [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "What is\nthis?", "images": ["AAAA", "BBBB"]}]


@pytest.mark.parametrize(("url", "message"), [
    ("https://example.com/cat.png", "image URLs are not currently supported, please use base64 encoded data "
                                    "instead"),
    ("http://example.com/cat.png", "image URLs are not currently supported"),
    ("data:image/gif;base64,AAAA", "invalid image input"),
])
def test_images_ollama_cannot_take(url: str, message: str) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(GatewayError) as caught:
        chat_request({"model": "llava", "messages": messages}, stream=False)
    assert caught.value.status == 400 and message in caught.value.message
    assert caught.value.param == "messages.[0].content"


def test_tool_round_trip() -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_unknown", "content": "?"},
    ]
    out = chat_request({"model": "m", "messages": messages, "tools": [{"type": "function"}]}, stream=False)
    assert out["tools"] == [{"type": "function"}]
    assistant = out["messages"][1]
    assert assistant == {"role": "assistant", "content": "", "thinking": "Need the tool.", "tool_calls": [
        {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
        {"id": "call_2", "function": {"name": "get_time", "arguments": {}}},
    ]}
    assert out["messages"][2] == {"role": "tool", "content": "noon", "tool_name": "get_time", "tool_call_id": "call_2"}
    assert out["messages"][3]["tool_name"] == "get_weather"
    assert "tool_name" not in out["messages"][4]


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_bad_tool_arguments(arguments: str) -> None:
    messages = [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": arguments}}]}]
    with pytest.raises(GatewayError) as caught:
        chat_request({"model": "m", "messages": messages}, stream=False)
    assert caught.value.param == "messages.[0].tool_calls"


def test_generate_request_is_raw() -> None:
    body = generate_request({"model": "m", "prompt": ["Once"], "max_tokens": 3, "suffix": "end"}, stream=True)
    assert body == {"model": "m", "prompt": "Once", "raw": True, "stream": True, "suffix": "end",
                    "options": {"num_predict": 3}}


@pytest.mark.parametrize("prompt", [["a", "b"], [1, 2, 3], [[1, 2]], None, 5])
def test_generate_request_takes_one_text_prompt(prompt: Any) -> None:
    with pytest.raises(GatewayError) as caught:
        generate_request({"model": "m", "prompt": prompt}, stream=False)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_value", "prompt")


def test_embed_request() -> None:
    assert embed_request({"model": "e", "input": "a", "encoding_format": "base64"}) == {"model": "e", "input": "a"}
    assert embed_request({"model": "e", "input": ["a", "b"], "dimensions": 8}) == {
        "model": "e", "input": ["a", "b"], "dimensions": 8}


@pytest.mark.parametrize("inputs", [[1, 2], [[1, 2]], [], None, ["a", 1]])
def test_embed_request_refuses_token_arrays(inputs: Any) -> None:
    with pytest.raises(GatewayError) as caught:
        embed_request({"model": "e", "input": inputs})
    assert (caught.value.status, caught.value.param) == (400, "input")


def test_embed_request_checks_encoding_format() -> None:
    with pytest.raises(GatewayError) as caught:
        embed_request({"model": "e", "input": "a", "encoding_format": "int8"})
    assert caught.value.param == "encoding_format"


# ------------------------------------------------------------------------------------------ answers

FINAL = {"model": "llama3.2:latest", "created_at": "2023-08-04T19:22:45.499127Z", "done": True,
         "done_reason": "stop", "total_duration": 4883583458, "prompt_eval_count": 26, "eval_count": 3}


def test_chat_completion() -> None:
    out = chat_completion({**FINAL, "message": {"role": "assistant", "content": "Hello!"}}, "fallback")
    assert out["id"].startswith("chatcmpl-") and len(out["id"]) > len("chatcmpl-") + 16
    assert out["object"] == "chat.completion"
    assert out["created"] == 1691176965
    assert out["model"] == "llama3.2:latest"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                               "logprobs": None, "finish_reason": "stop"}]
    assert out["usage"] == {"prompt_tokens": 26, "completion_tokens": 3, "total_tokens": 29}


def test_chat_completion_tool_calls_and_thinking() -> None:
    message = {"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
        {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}},
        {"id": "call_ab12cd34", "function": {"index": 1, "name": "noop", "arguments": {}}},
    ]}
    out = chat_completion({**FINAL, "message": message, "prompt_eval_count": None, "eval_count": 0}, "m")
    reply = out["choices"][0]["message"]
    assert reply["content"] is None
    assert reply["reasoning_content"] == reply["reasoning"] == "hmm"
    first, second = reply["tool_calls"]
    assert first["id"].startswith("call_") and first["type"] == "function" and first["index"] == 0
    assert json.loads(first["function"]["arguments"]) == {"city": "Tokyo"}
    assert second["id"] == "call_ab12cd34" and second["function"] == {"name": "noop", "arguments": "{}"}
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize(("done_reason", "tools", "expected"), [
    ("stop", False, "stop"), ("stop", True, "tool_calls"), ("length", True, "length"), ("length", False, "length"),
    ("load", False, "stop"), (None, False, "stop"),
])
def test_finish_reason(done_reason: Any, tools: bool, expected: str) -> None:
    assert finish_reason(done_reason, tools) == expected


def test_text_completion() -> None:
    out = text_completion({**FINAL, "response": "there was", "done_reason": "length"}, "m")
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert out["choices"] == [{"index": 0, "text": "there was", "logprobs": None, "finish_reason": "length"}]
    assert out["usage"]["total_tokens"] == 29


def test_embedding_list() -> None:
    data = {"model": "all-minilm", "embeddings": [[0.5, -0.25], [1.0, 0.0]], "prompt_eval_count": 8}
    out = embedding_list(data, "m", "float")
    assert out == {"object": "list", "model": "all-minilm", "usage": {"prompt_tokens": 8, "total_tokens": 8},
                   "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]},
                            {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]}]}
    packed = embedding_list(data, "m", "base64")["data"][0]["embedding"]
    assert base64.b64decode(packed) == struct.pack("<2f", 0.5, -0.25)
    with pytest.raises(GatewayError):
        embedding_list({"embedding": [0.1]}, "m", "float")


@pytest.mark.parametrize(("value", "expected"), [
    ("2023-08-04T19:22:45.499127Z", 1691176965),
    ("2025-05-04T17:37:44.706015396-07:00", 1746405464),
])
def test_unix_time(value: str, expected: int) -> None:
    assert unix_time(value) == expected


def test_unix_time_falls_back_to_now() -> None:
    assert abs(unix_time("yesterday") - unix_time(None)) <= 1


# ------------------------------------------------------------------------------------------ streams


def _chunk(content: str = "", **message: Any) -> dict[str, Any]:
    return {"model": "m", "created_at": "2023-08-04T19:22:45.499127Z",
            "message": {"role": "assistant", "content": content, **message}, "done": False}


def _feed(translator: ChunkTranslator, items: list[dict[str, Any]]) -> list[Any]:
    return sse([event for item in items for event in translator.feed(item)])


def test_chat_stream() -> None:
    translator = ChunkTranslator(CHAT, "m", include_usage=True)
    events = _feed(translator, [_chunk("The"), _chunk(""), _chunk(" end"), {**FINAL, "message": {"content": ""}}])
    *chunks, usage, done = events
    assert done == "[DONE]" and translator.done
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "The"}, {"content": " end"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 26, "completion_tokens": 3,
                                                         "total_tokens": 29}
    assert {e["id"] for e in [*chunks, usage]} == {chunks[0]["id"]}
    assert {e["object"] for e in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["created"] == 1691176965 and chunks[0]["model"] == "m"


def test_chat_stream_without_usage() -> None:
    events = _feed(ChunkTranslator(CHAT, "m", include_usage=False), [_chunk("a"), FINAL])
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])


def test_chat_stream_tool_calls_and_thinking() -> None:
    call = {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}}
    translator = ChunkTranslator(CHAT, "m", include_usage=False)
    events = _feed(translator, [_chunk(thinking="Let me see"), _chunk(tool_calls=[call]),
                                _chunk(tool_calls=[{**call, "id": "call_x"}]), FINAL])
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": "", "reasoning_content": "Let me see",
                         "reasoning": "Let me see"}
    first, second = deltas[1]["tool_calls"][0], deltas[2]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert json.loads(first["function"]["arguments"]) == {"city": "Tokyo"}
    assert second["index"] == 1 and second["id"] == "call_x"
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_stream_first_chunk_carries_the_role_even_when_empty() -> None:
    events = _feed(ChunkTranslator(CHAT, "m", include_usage=False), [FINAL])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["finish_reason"] == "stop"


def test_text_stream() -> None:
    items = [{"model": "m", "created_at": "x", "response": r, "done": False} for r in ("Once", "", " upon")]
    translator = ChunkTranslator(COMPLETIONS, "m", include_usage=True)
    *chunks, usage, done = _feed(translator, [*items, {**FINAL, "response": "", "done_reason": "length"}])
    assert [c["choices"][0]["text"] for c in chunks] == ["Once", " upon", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["object"] for c in chunks} == {"text_completion"} and chunks[0]["id"].startswith("cmpl-")
    assert usage["choices"] == [] and done == "[DONE]"


def test_stream_error_line_raises() -> None:
    translator = ChunkTranslator(CHAT, "m", include_usage=True)
    translator.feed(_chunk("Hel"))
    with pytest.raises(GatewayError) as caught:
        translator.feed({"error": "an error was encountered while running the model"})
    assert (caught.value.code, caught.value.status) == ("backend_error", 502)
    assert caught.value.message == "an error was encountered while running the model"


def test_line_splitter_buffers_partial_lines() -> None:
    lines = LineSplitter()
    assert lines.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
    assert lines.feed(b': 2}\n\n{"c": 3}') == [{"b": 2}]
    assert lines.close() == [{"c": 3}]
    assert lines.close() == []
    with pytest.raises(GatewayError):
        LineSplitter().feed(b"not json\n")


# ------------------------------------------------------------------------------------------ errors


def test_error_mapping() -> None:
    missing = ollama_error(404, b'{"error": "model \'x\' not found"}', "ollama", "/api/chat")
    assert (missing.status, missing.type, missing.code, missing.param) == (
        404, "invalid_request_error", "model_not_found", "model")
    assert missing.message == "model 'x' not found"
    refused = ollama_error(400, b'{"error": "\\"m\\" does not support tools"}', "ollama", "/api/chat")
    assert (refused.status, refused.code) == (400, "invalid_value") and "does not support tools" in refused.message
    busy = ollama_error(503, b'{"error": "server busy"}', "ollama", "/api/chat")
    assert (busy.status, busy.code, busy.type) == (503, "backend_overloaded", "server_error")
    assert 1 <= int(busy.headers["Retry-After"]) <= 120 and int(busy.headers["retry-after-ms"]) >= 1000
    for status in (500, 499, 502):
        other = ollama_error(status, b'{"error": "boom"}', "ollama", "/api/chat")
        assert (other.status, other.code, other.message) == (502, "backend_error", "boom")
    page = ollama_error(404, b"404 page not found", "ollama", "/api/embed")
    assert page.code == "backend_error" and "/api/embed" in page.message


# ------------------------------------------------------------------------------------------ models


def test_capabilities() -> None:
    assert capabilities(["completion", "tools", "thinking"]) == {
        "chat": True, "completions": True, "embeddings": False, "tools": True, "vision": False, "reasoning": True}
    assert capabilities(["embedding"])["embeddings"] is True
    assert capabilities(["completion", "vision"])["vision"] is True
    assert capabilities(None) == {}


def test_trained_window() -> None:
    assert trained_window({"general.architecture": "llama", "llama.context_length": 8192}) == 8192
    assert trained_window({"general.architecture": "bert"}) is None
    assert trained_window(None) is None


TAG = {"name": "llama3.2:latest", "model": "llama3.2:latest", "modified_at": "2025-05-04T17:37:44.706015396-07:00",
       "digest": "a80c", "details": {"family": "llama"}}
SHOW = {"capabilities": ["completion", "tools"], "model_info": {"general.architecture": "llama",
                                                               "llama.context_length": 8192}}


def test_model_entry_not_loaded() -> None:
    info = model_entry(TAG, shown_model(SHOW), {})
    assert info.id == "llama3.2:latest" and info.aliases == ("llama3.2",)
    assert (info.context_window, info.context_window_trained, info.loaded) == (None, 8192, False)
    assert info.capabilities["tools"] is True and info.capabilities["embeddings"] is False
    assert info.created == 1746405464


def test_model_entry_loaded_and_unknowns() -> None:
    loaded = model_entry(TAG, shown_model(SHOW), {"llama3.2:latest": 4096})
    assert (loaded.context_window, loaded.context_window_trained, loaded.loaded) == (4096, 8192, True)
    bare = model_entry({"name": "qwen3:8b", "capabilities": ["completion"], "details": {"context_length": 40960}},
                       None, None)
    assert bare.aliases == () and bare.loaded is None and bare.created is None
    assert bare.context_window_trained == 40960 and bare.capabilities["chat"] is True


# ------------------------------------------------------------------------------------------ the provider's listing


class StubTransport:
    """Answers GET /api/tags, GET /api/ps and POST /api/show from dicts; counts the calls."""

    def __init__(self, tags: dict[str, Any], show: dict[str, Any] | None, ps: dict[str, Any] | None) -> None:
        self.answers = {"/api/tags": tags, "/api/show": show, "/api/ps": ps}
        self.calls: list[str] = []

    async def request(self, method: str, url: str, **kwargs: Any) -> Response:
        path = url.removeprefix("http://ollama:11434")
        self.calls.append(path)
        answer = self.answers[path]
        if answer is None:
            raise ConnectError("refused")
        return Response(200, {}, orjson.dumps(answer), 0.001)


def _provider(transport: StubTransport) -> OllamaProvider:
    settings = BackendSettings(name="ollama", type="ollama", url="http://ollama:11434")
    return OllamaProvider(settings, transport)  # type: ignore[arg-type]


def test_list_models_asks_show_once_per_digest() -> None:
    transport = StubTransport({"models": [TAG]}, SHOW, {"models": []})
    provider = _provider(transport)
    first = asyncio.run(provider.list_models())
    second = asyncio.run(provider.list_models())
    assert first == second and first[0].context_window_trained == 8192
    assert transport.calls.count("/api/show") == 1 and transport.calls.count("/api/tags") == 2


def test_list_models_survives_show_and_ps_failures() -> None:
    models = asyncio.run(_provider(StubTransport({"models": [TAG]}, None, None)).list_models())
    assert [m.id for m in models] == ["llama3.2:latest"]
    assert models[0].capabilities == {} and models[0].loaded is None


def test_list_models_fails_when_tags_fail() -> None:
    with pytest.raises(GatewayError) as caught:
        asyncio.run(_provider(StubTransport(None, SHOW, {"models": []})).list_models())  # type: ignore[arg-type]
    assert caught.value.code == "backend_unreachable"


@pytest.mark.parametrize("url", ["http://h:11434", "http://h:11434/", "http://h:11434/v1", "http://h:11434/api"])
def test_ollama_root(url: str) -> None:
    assert ollama_root(url) == "http://h:11434"
