"""What the appliance builds itself (errors, model lists, Ollama translations, synthesized usage) against
OpenAI's published OpenAPI spec."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.appliance import ADMIN_KEY
from tests.support.openapi import validate

HELLO = [{"role": "user", "content": "Hi"}]
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def sse_chunks(gateway, body):
    with httpx.stream("POST", gateway.url + "/v1/" + body.pop("_path", "chat/completions"), json=body,
                      headers=AUTH, timeout=20) as response:
        assert response.status_code == 200
        text = response.read().decode()
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "no-such-model", "messages": HELLO}),
    ("/v1/chat/completions", {"model": "fake-chat"}),
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", {"model": "down-model", "messages": HELLO}),
    ("/v1/embeddings", {"model": "fake-404-bare", "input": "x"}),
])
def test_error_envelopes(gateway, path, body):
    status, data, _ = gateway.post(path, body)
    assert status >= 400
    validate(data, "ErrorResponse")


def test_model_list_and_model(gateway):
    data = gateway.get("/v1/models")[1]
    validate(data, "ListModelsResponse")
    for entry in data["data"]:
        validate(entry, "Model")
    validate(gateway.get("/v1/models/chat")[1], "Model")


def test_ollama_translations(gateway):
    status, data, _ = gateway.post("/v1/chat/completions", {"model": "llama3.2", "messages": HELLO})
    assert status == 200
    validate(data, "CreateChatCompletionResponse")
    for chunk in sse_chunks(gateway, {"model": "llama3.2", "messages": HELLO, "stream": True,
                                      "stream_options": {"include_usage": True}}):
        validate(chunk, "CreateChatCompletionStreamResponse")
    status, data, _ = gateway.post("/v1/completions", {"model": "llama3.2", "prompt": "Once"})
    assert status == 200
    validate(data, "CreateCompletionResponse")
    status, data, _ = gateway.post("/v1/embeddings", {"model": "all-minilm", "input": ["a", "b"]})
    assert status == 200
    validate(data, "CreateEmbeddingResponse")


def test_synthesized_usage_chunk(gateway):
    chunks = sse_chunks(gateway, {"model": "fake-nousage", "messages": HELLO, "stream": True,
                                  "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"]["estimated"] is True
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
