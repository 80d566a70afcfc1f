"""Against the real llama-cpp-python server (tiny random-weight model): real framing, real usage, real cancel."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

from tests.support.appliance import ADMIN_KEY

pytestmark = pytest.mark.llamacpp

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def real(gateway, llamacpp_url, client):
    """Wait until the shared gateway's periodic probe has seen the real server."""
    deadline = time.monotonic() + 30
    while True:
        body = gateway.get("/ready")[1]
        if body["backends"]["llamacpp"]["state"] == "ready":
            return client
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def logged(gateway, request_id: str) -> sqlite3.Row:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        conn = sqlite3.connect(gateway.data_dir / "appliance.db")
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        conn.close()
        if row is not None:
            return row
        time.sleep(0.05)
    raise AssertionError(f"no log row for {request_id}")


def test_models_discovered(real):
    ids = {m.id: m for m in real.models.list().data}
    assert {"tiny", "all-minilm-l6-v2"} <= set(ids)
    assert ids["tiny"].model_extra["backends"][0]["kind"] == "llama-cpp-python"


def test_real_chat_with_real_usage(real, gateway):
    raw = real.chat.completions.with_raw_response.create(model="tiny-chat", messages=HELLO, max_tokens=8)
    completion = raw.parse()
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens > 0
    assert completion.usage.prompt_tokens > 5
    row = logged(gateway, raw.headers["x-request-id"])
    assert (row["backend"], row["prompt_tokens"], row["estimated"]) == ("llamacpp", completion.usage.prompt_tokens,
                                                                       0)


def test_real_stream_gets_an_estimated_usage_chunk(real, gateway):
    raw = real.chat.completions.with_raw_response.create(
        model="llamacpp/tiny", messages=HELLO, max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.model_extra["estimated"] is True
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 0
    row = logged(gateway, raw.headers["x-request-id"])
    assert row["estimated"] == 1 and row["completion_tokens"] == usage.completion_tokens
    assert row["ttft_ms"] > 0


def test_real_stream_without_usage_request(real):
    chunks = list(real.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)


def test_real_completions_and_embeddings(real):
    completion = real.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4)
    assert completion.usage.completion_tokens > 0
    result = real.embeddings.create(model="all-minilm-l6-v2", input=["hello world", "goodbye"])
    assert [len(d.embedding) for d in result.data] == [384, 384]
    assert result.usage.prompt_tokens > 0


def test_real_context_overflow_keeps_the_backend_status(real):
    import openai

    with pytest.raises(openai.BadRequestError):
        real.completions.create(model="tiny", prompt="word " * 6000, max_tokens=1)


def test_disconnect_frees_the_single_slot(real, gateway):
    """A long stream abandoned by its client must not keep llama.cpp busy for the next request."""
    body = {"model": "tiny", "stream": True, "max_tokens": 3900, "logit_bias": {"2": -100},
            "messages": HELLO}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
        lines = response.iter_lines()
        for _ in range(10):
            next(lines)
    started = time.monotonic()
    quick = real.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    waited = time.monotonic() - started
    assert quick.choices
    # 3900 tokens at 400-800 tokens/s would block the slot for seconds; a freed slot answers at once.
    assert waited < 3, f"the next request waited {waited:.1f} s behind an abandoned generation"


def test_a_route_whose_first_target_is_down_falls_back_to_the_real_server(real):
    raw = real.chat.completions.with_raw_response.create(model="tiny-fallback", messages=HELLO, max_tokens=8)
    assert raw.headers["x-fallback-from"] == "down/down-model"
    assert raw.headers["x-appliance-backend"] == "llamacpp"
    assert raw.parse().choices[0].message.content is not None
