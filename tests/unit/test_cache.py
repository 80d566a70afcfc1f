import asyncio
import sqlite3

import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from appliance.accounts.usage import Tokens
from appliance.common.config import CacheSettings
from appliance.common.errors import GatewayError
from appliance.common.resources import migrations_dir
from appliance.core.cache import MEMORY_MAX_BODY, Decision, ResponseCache, cache_key, decide, synthesized_stream
from appliance.storage import cache_repo
from appliance.storage.db import Database
from appliance.storage.migrate import migrate
from appliance.storage.writer import BufferedWriter

CHAT, COMPLETIONS, EMBEDDINGS = "chat/completions", "completions", "embeddings"
MESSAGES = [{"role": "user", "content": "Say hi"}]
T0 = {"model": "m", "messages": MESSAGES, "temperature": 0}
ANSWER = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}})


# ------------------------------------------------------------------------------------------ decide


@pytest.mark.parametrize(("endpoint", "body", "headers", "settings", "expected"), [
    (CHAT, T0, {}, {}, Decision(True, False, 3600)),
    (CHAT, {**T0, "temperature": 0.0}, {}, {}, Decision(True, False, 3600)),
    (COMPLETIONS, {"model": "m", "prompt": "x", "temperature": 0}, {}, {}, Decision(True, False, 3600)),
    (CHAT, {"model": "m", "messages": MESSAGES}, {}, {}, Decision(False, False, 0)),  # absent counts as 1
    (CHAT, {**T0, "temperature": None}, {}, {}, Decision(False, False, 0)),
    (CHAT, {**T0, "temperature": 0.7}, {}, {}, Decision(False, False, 0)),
    (CHAT, {**T0, "temperature": 0.7}, {}, {"nonzero_temperature": True}, Decision(True, False, 3600)),
    (CHAT, {"model": "m", "messages": MESSAGES}, {}, {"nonzero_temperature": True}, Decision(True, False, 3600)),
    (CHAT, {**T0, "temperature": "0"}, {}, {}, Decision(False, False, 0)),
    (CHAT, {**T0, "temperature": False}, {}, {}, Decision(False, False, 0)),
    # X-Cache-TTL makes a request cacheable and sets its TTL, up to max_ttl_s
    (CHAT, {**T0, "temperature": 0.7}, {"x-cache-ttl": "600"}, {}, Decision(True, False, 600)),
    (CHAT, T0, {"x-cache-ttl": "1.5"}, {}, Decision(True, False, 1.5)),
    (CHAT, T0, {"x-cache-ttl": "999999"}, {}, Decision(True, False, 86400)),
    (CHAT, T0, {"x-cache-ttl": "999999"}, {"max_ttl_s": 60}, Decision(True, False, 60)),
    (CHAT, T0, {}, {"ttl_s": 5}, Decision(True, False, 5)),
    # bypass: BYPASS on a cacheable request, nothing on one that is not
    (CHAT, T0, {"x-appliance-no-cache": "true"}, {}, Decision(True, True, 3600)),
    (CHAT, T0, {"x-appliance-no-cache": "1"}, {}, Decision(True, True, 3600)),
    (CHAT, T0, {"x-appliance-no-cache": "false"}, {}, Decision(True, False, 3600)),
    (CHAT, T0, {"x-cache": "no-cache"}, {}, Decision(True, True, 3600)),
    (CHAT, T0, {"x-cache": "No-Cache"}, {}, Decision(True, True, 3600)),
    (CHAT, {**T0, "temperature": 1}, {"x-cache": "no-cache"}, {}, Decision(False, False, 0)),
    # streams only with [cache] stream
    (CHAT, {**T0, "stream": True}, {}, {}, Decision(False, False, 0)),
    (CHAT, {**T0, "stream": True}, {"x-cache-ttl": "60"}, {}, Decision(False, False, 0)),
    (CHAT, {**T0, "stream": True}, {}, {"stream": True}, Decision(True, False, 3600)),
    (CHAT, {**T0, "stream": False}, {}, {}, Decision(True, False, 3600)),
    # embeddings are deterministic
    (EMBEDDINGS, {"model": "e", "input": "x"}, {}, {}, Decision(True, False, 3600)),
    (EMBEDDINGS, {"model": "e", "input": "x"}, {"x-appliance-no-cache": "yes"}, {}, Decision(True, True, 3600)),
    # off, or an endpoint the cache does not know
    (CHAT, T0, {}, {"enabled": False}, Decision(False, False, 0)),
    ("responses", T0, {}, {}, Decision(False, False, 0)),
])
def test_decide(endpoint, body, headers, settings, expected):
    assert decide(endpoint, body, headers, CacheSettings(**settings)) == expected


@pytest.mark.parametrize("value", ["", "soon", "0", "-5", "nan", "inf"])
def test_an_invalid_cache_ttl_is_refused(value):
    with pytest.raises(GatewayError) as caught:
        decide(CHAT, T0, {"x-cache-ttl": value}, CacheSettings())
    assert (caught.value.code, caught.value.status, caught.value.param) == ("invalid_value", 400, "X-Cache-TTL")


def test_a_disabled_cache_ignores_its_headers():
    assert decide(CHAT, T0, {"x-cache-ttl": "soon"}, CacheSettings(enabled=False)) == Decision(False, False, 0)


# ------------------------------------------------------------------------------------------ keys


def key(body, served="b/m", scope="key_1", endpoint=CHAT):
    return cache_key(endpoint, body, served, scope)


def test_key_is_stable_and_ignores_what_does_not_change_the_answer():
    base = key(T0)
    assert len(base) == 64 and int(base, 16) >= 0
    assert key({"temperature": 0, "messages": MESSAGES, "model": "m"}) == base  # field order
    assert key({**T0, "temperature": 0.0}) == base  # 0 and 0.0 are the same number
    assert key({"model": "m", "messages": [{"content": "Say hi", "role": "user"}], "temperature": 0}) == base
    for extra in ({"user": "u1"}, {"stream": True}, {"stream": False},
                  {"stream_options": {"include_usage": True}}, {"metadata": {"a": "b"}}, {"store": True},
                  {"service_tier": "auto"}, {"safety_identifier": "s"}, {"prompt_cache_key": "p"},
                  {"fallbacks": ["x"]}, {"fallback": ["x"]}, {"provider": "b"}, {"timeout": 5}, {"retries": 2}):
        assert key({**T0, **extra}) == base, extra
    assert key({**T0, "model": "alias-of-m"}) == base  # what counts is the model that serves


def test_key_changes_with_the_answer():
    base = key(T0)
    different = [
        key(T0, served="b/other"),
        key(T0, served="other/m"),
        key(T0, scope="key_2"),
        key(T0, scope=None),
        key(T0, endpoint=COMPLETIONS),
        key({**T0, "seed": 1}),
        key({**T0, "seed": 2}),
        key({**T0, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        key({**T0, "tool_choice": "none"}),
        key({**T0, "max_tokens": 5}),
        key({**T0, "temperature": 0.5}),
        key({**T0, "messages": [{"role": "user", "content": "Say hello"}]}),
        key({**T0, "response_format": {"type": "json_object"}}),
    ]
    assert len({base, *different}) == len(different) + 1


# ------------------------------------------------------------------------------------------ the two levels


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


async def open_worker(path, clock, **settings):
    db = await Database.open(path)
    writer = BufferedWriter(db, 60)
    return db, writer, ResponseCache(db, writer, CacheSettings(**settings), clock=clock)


def migrated(tmp_path):
    path = tmp_path / "appliance.db"
    migrate(path, migrations_dir())
    return path


def test_migration_adds_the_cache_table_and_the_ledger_column(tmp_path):
    conn = sqlite3.connect(migrated(tmp_path))
    assert "cache" in {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    columns = {row[1] for row in conn.execute("PRAGMA table_info(response_cache)")}
    assert {"key", "scope", "endpoint", "model", "body", "prompt_tokens", "completion_tokens", "size",
            "created_at", "expires_at", "hits", "last_hit_at"} <= columns
    assert "response_cache_expires_at" in {row[1] for row in conn.execute("PRAGMA index_list(response_cache)")}


def test_an_answer_stored_by_one_worker_is_served_by_another(tmp_path):
    path = migrated(tmp_path)
    clock = Clock()

    async def run():
        db_a, writer_a, a = await open_worker(path, clock)
        db_b, writer_b, b = await open_worker(path, clock)
        try:
            k = key(T0)
            assert await b.get(k) is None
            await a.put(k, endpoint=CHAT, scope="key_1", served="b/m", body=ANSWER,
                        tokens=Tokens(9, 1, estimated=True), ttl_s=60)
            clock.now += 2
            hit = await b.get(k)  # from SQLite: no flush needed, the write was immediate
            assert hit is not None
            assert (hit.body, hit.age_s) == (ANSWER, 2)
            assert (hit.tokens.prompt, hit.tokens.completion, hit.tokens.estimated) == (9, 1, True)
            await db_a.write(lambda conn: conn.execute("DELETE FROM response_cache"))
            again = await b.get(k)  # now from b's memory
            assert again is not None and again.body == ANSWER
            assert (await a.get(k)).body == ANSWER  # a kept it in memory when storing it
            assert await writer_b.flush() == 2  # b's two hits, buffered (the row is gone: no-ops)
        finally:
            for db, writer in ((db_a, writer_a), (db_b, writer_b)):
                await writer.stop()
                await db.close()

    asyncio.run(run())


def test_hits_are_counted_in_the_table(tmp_path):
    path = migrated(tmp_path)
    clock = Clock()

    async def run():
        db, writer, cache = await open_worker(path, clock)
        try:
            await cache.put("k", endpoint=CHAT, scope=None, served="b/m", body=ANSWER, tokens=Tokens(9, 1),
                            ttl_s=60)
            for _ in range(3):
                clock.now += 1
                assert await cache.get("k") is not None
            await writer.flush()
            row = (await db.fetchall("SELECT hits, last_hit_at, model, scope, size FROM response_cache"))[0]
            assert tuple(row) == (3, clock.now, "b/m", None, len(ANSWER) + cache_repo.ROW_OVERHEAD)
            assert await cache_repo.stats(db) == {"entries": 1, "bytes": row["size"], "hits": 3}
        finally:
            await writer.stop()
            await db.close()

    asyncio.run(run())


@pytest.mark.parametrize("memory_entries", [0, 16])
def test_entries_expire(tmp_path, memory_entries):
    path = migrated(tmp_path)
    clock = Clock()

    async def run():
        db_a, writer_a, a = await open_worker(path, clock, memory_entries=memory_entries)
        db_b, writer_b, b = await open_worker(path, clock, memory_entries=memory_entries)
        try:
            await a.put("k", endpoint=CHAT, scope=None, served="b/m", body=ANSWER, tokens=Tokens(9, 1), ttl_s=10)
            clock.now += 9.9
            assert (await a.get("k")).age_s == pytest.approx(9.9)
            assert (await b.get("k")).age_s == pytest.approx(9.9)
            clock.now += 0.1
            assert await a.get("k") is None
            assert await b.get("k") is None
        finally:
            for db, writer in ((db_a, writer_a), (db_b, writer_b)):
                await writer.stop()
                await db.close()

    asyncio.run(run())


def test_large_answers_stay_out_of_memory(tmp_path):
    path = migrated(tmp_path)
    big = orjson.dumps({"object": "list", "data": [{"embedding": [0.5] * (MEMORY_MAX_BODY // 4)}]})
    assert len(big) > MEMORY_MAX_BODY

    async def run():
        db, writer, cache = await open_worker(path, Clock())
        try:
            await cache.put("k", endpoint=EMBEDDINGS, scope=None, served="b/e", body=big, tokens=Tokens(3, 0),
                            ttl_s=10)
            assert (await cache.get("k")).body == big
            await db.write(lambda conn: conn.execute("DELETE FROM response_cache"))
            assert await cache.get("k") is None
        finally:
            await writer.stop()
            await db.close()

    asyncio.run(run())


def test_a_failing_table_reads_as_a_miss_and_never_fails_the_request(tmp_path):
    path = migrated(tmp_path)

    async def run():
        db, _writer, cache = await open_worker(path, Clock(), memory_entries=0)
        await db.close()
        await cache.put("k", endpoint=CHAT, scope=None, served="b/m", body=ANSWER, tokens=Tokens(9, 1), ttl_s=10)
        assert await cache.get("k") is None

    asyncio.run(run())


def test_sweep_deletes_expired_then_least_recently_used(tmp_path):
    path = migrated(tmp_path)
    clock = Clock()
    body = b"x" * (1024 - cache_repo.ROW_OVERHEAD)  # 1 KiB per entry as counted

    async def run():
        # A cap of 3 entries' worth.
        db, writer, cache = await open_worker(path, clock, max_mb=3 / 1024)
        try:
            for i in range(6):  # e0 and e1 expire; e2..e5 live, oldest first
                clock.now += 1
                await cache.put(f"e{i}", endpoint=CHAT, scope=None, served="b/m", body=body,
                                tokens=Tokens(1, 1), ttl_s=5 if i < 2 else 1000)
            clock.now += 1
            assert await cache.get("e2") is not None  # e2 becomes the most recently used
            await writer.flush()
            clock.now += 3  # e0 (put at +1) and e1 (+2) are past their 5 s
            assert await cache.sweep() == (2, 1)  # e3, the least recently used, goes
            keys = {row[0] for row in await db.fetchall("SELECT key FROM response_cache")}
            assert keys == {"e2", "e4", "e5"}
            assert await cache.sweep() == (0, 0)
            assert (await cache_repo.stats(db))["bytes"] == 3 * 1024
        finally:
            await writer.stop()
            await db.close()

    asyncio.run(run())


def test_the_background_sweep_runs_and_stops(tmp_path):
    path = migrated(tmp_path)
    clock = Clock()

    async def run():
        db, writer, cache = await open_worker(path, clock, sweep_interval_s=0.01)
        try:
            await cache.put("k", endpoint=CHAT, scope=None, served="b/m", body=ANSWER, tokens=Tokens(9, 1), ttl_s=1)
            clock.now += 2
            cache.start()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if (await cache_repo.stats(db))["entries"] == 0:
                    break
            assert (await cache_repo.stats(db))["entries"] == 0
            await cache.stop()
        finally:
            await writer.stop()
            await db.close()

    asyncio.run(run())


# ------------------------------------------------------------------------------------------ streams


def parse_stream(data: bytes) -> list[dict]:
    events = data.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(event.startswith(b"data: ") for event in events[:-1])
    return [orjson.loads(event[6:]) for event in events[:-2]]


TOOL_ANSWER = {
    "id": "chatcmpl-7", "object": "chat.completion", "created": 1700000000, "model": "llama-3",
    "system_fingerprint": "fp_1",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me look.", "reasoning_content": "The user wants the weather.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
        ]}}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32},
}


def reassemble(chunks):
    """What a client accumulates from chat chunks, with the official SDK's types."""
    choices: dict[int, dict] = {}
    usage = None
    for data in chunks:
        chunk = ChatCompletionChunk.model_validate(data)
        assert (chunk.id, chunk.object, chunk.created, chunk.model) == ("chatcmpl-7", "chat.completion.chunk",
                                                                         1700000000, "llama-3")
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            out = choices.setdefault(choice.index, {"content": None, "tool_calls": {}, "reasoning": ""})
            delta = choice.delta
            if delta.role:
                out["role"] = delta.role
            if delta.content is not None:
                out["content"] = (out["content"] or "") + delta.content
            out["reasoning"] += (delta.model_extra or {}).get("reasoning_content") or ""
            for call in delta.tool_calls or ():
                slot = out["tool_calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                out["finish_reason"] = choice.finish_reason
    return choices, usage


def test_a_stored_chat_answer_streams_as_openai_would():
    chunks = parse_stream(synthesized_stream(orjson.dumps(TOOL_ANSWER), include_usage=True))
    assert all(chunk.get("system_fingerprint") == "fp_1" for chunk in chunks)
    choices, usage = reassemble(chunks)
    assert choices == {0: {"role": "assistant", "content": "Let me look.", "reasoning": "The user wants the weather.",
                           "finish_reason": "tool_calls", "tool_calls": {
                               0: {"id": "call_1", "name": "weather", "arguments": '{"city": "Oslo"}'},
                               1: {"id": "call_2", "name": "time", "arguments": "{}"}}}}
    assert usage.model_dump(exclude_none=True) == TOOL_ANSWER["usage"]
    assert chunks[-1]["choices"] == []


def test_usage_chunk_only_when_asked_and_may_be_replaced():
    body = orjson.dumps(TOOL_ANSWER)
    chunks = parse_stream(synthesized_stream(body, include_usage=False))
    assert all("usage" not in chunk for chunk in chunks)
    replaced = {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32, "total_cost_usd": 0.0}
    chunks = parse_stream(synthesized_stream(body, include_usage=True, usage=replaced))
    assert chunks[-1]["usage"] == replaced
    ChatCompletionChunk.model_validate(chunks[-1])


def test_several_choices_and_a_content_only_answer():
    answer = {"id": "chatcmpl-7", "object": "chat.completion", "created": 1700000000, "model": "llama-3",
              "choices": [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                          for i, text in enumerate(["one", "two"])]}
    choices, usage = reassemble(parse_stream(synthesized_stream(orjson.dumps(answer), include_usage=True)))
    assert usage is None  # nothing to report: no usage chunk
    assert {i: (c["content"], c["finish_reason"], c["tool_calls"]) for i, c in choices.items()} == {
        0: ("one", "stop", {}), 1: ("two", "stop", {})}


def test_a_tool_call_only_answer_keeps_content_null():
    answer = {**TOOL_ANSWER, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": TOOL_ANSWER["choices"][0]["message"]["tool_calls"]}}]}
    choices, _ = reassemble(parse_stream(synthesized_stream(orjson.dumps(answer), include_usage=False)))
    assert choices[0]["content"] is None
    assert [c["name"] for c in choices[0]["tool_calls"].values()] == ["weather", "time"]


def test_a_stored_text_completion_streams_as_text_completion_chunks():
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
              "choices": [{"index": 0, "text": "Once upon", "logprobs": None, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    chunks = [Completion.model_validate(c) for c in parse_stream(
        synthesized_stream(orjson.dumps(answer), include_usage=True))]
    assert all(c.object == "text_completion" and c.id == "cmpl-1" for c in chunks)
    assert "".join(choice.text for c in chunks for choice in c.choices) == "Once upon"
    assert [choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason] == ["length"]
    assert chunks[-1].usage.total_tokens == 5


def test_an_embedding_cannot_be_streamed():
    with pytest.raises(ValueError, match="choices"):
        synthesized_stream(b'{"object": "list", "data": []}', include_usage=False)
