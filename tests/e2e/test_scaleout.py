"""Two appliances (2 workers each) on one Redis and one PostgreSQL behave as one gateway (issue 18).

Clients alternate between node A and node B. Each test uses its own key (so limits, budgets and ledger counts
are its own); the module's Redis is its own too, because the last tests kill it and the kill -9 test kills a
node (both run last, on nodes of their own).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.appliance import Appliance
from tests.support.batches import CHAT_URL, line, lines_of, poll, upload
from tests.support.engines import Engine, create_database, start_redis
from tests.support.polling import eventually

pytestmark = pytest.mark.frozen  # the one-file binary carries asyncpg and hiredis too


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    try:
        engine = start_redis(tmp_path_factory.mktemp("scaleout-redis"))
    except FileNotFoundError:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def shared(redis: Engine, postgres_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sections every node of the module shares: state, database, files dir."""
    files = tmp_path_factory.mktemp("scaleout-files")
    return {"state": {"url": redis.url, "prefix": f"scaleout-{uuid.uuid4().hex[:8]}:", "retry_s": 0.2},
            "database": {"url": create_database(postgres_engine, f"scaleout_{uuid.uuid4().hex[:8]}")},
            "files": {"dir": str(files)}}


def node_config(fake: FakeOpenAI, shared: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "discovery": {"enabled": False},
        "backends": [{"name": "fake", "url": fake.url + "/v1"},
                     {"name": "faulty", "url": fake.url + "/v1", "discover": False, "models": ["fake-500"]}],
        "models": [{"name": "priced", "target": "fake/fake-chat", "input_per_mtok": 1000, "output_per_mtok": 1000}],
        "routing": {"breaker_failures": 3, "breaker_cooldown_s": 600, "retries": 0},
        "batches": {"poll_interval_s": 0.1, "lease_s": 2, "cancel_grace_s": 1},
        **shared, **sections,
    }


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI,
          shared: dict[str, Any]) -> Iterator[tuple[Appliance, Appliance]]:
    root = tmp_path_factory.mktemp("scaleout")
    a = Appliance(root / "a", node_config(fake, shared)).start()
    b = Appliance(root / "b", node_config(fake, shared)).start()
    yield a, b
    for node in (a, b):
        node.stop()


def make_key(node: Appliance, **fields: Any) -> str:
    status, body, _ = node.post("/admin/keys", {"name": f"scaleout-{uuid.uuid4().hex[:6]}", "role": "user", **fields})
    assert status == 201, body
    return str(body["key"])


def chat(node: Appliance, key: str, model: str = "fake/fake-chat", text: str = "hi",
         **extra: Any) -> httpx.Response:
    return httpx.post(node.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": text}], **extra})


def alternate(nodes: tuple[Appliance, Appliance], count: int, send: Callable[[Appliance], httpx.Response],
              concurrency: int = 8) -> list[httpx.Response]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda i: send(nodes[i % 2]), range(count)))


def test_a_key_made_on_a_answers_on_b(nodes: tuple[Appliance, Appliance]) -> None:
    a, b = nodes
    key = make_key(a)
    reply = chat(b, key)
    assert reply.status_code == 200, reply.text


def test_an_rpm_10_key_gets_exactly_10_answers_across_both(nodes: tuple[Appliance, Appliance]) -> None:
    key = make_key(nodes[0], rpm=10)
    replies = alternate(nodes, 30, lambda node: chat(node, key))
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
    refused = next(r for r in replies if r.status_code == 429).json()["error"]
    assert refused["code"] == "rate_limit_exceeded" and refused["request_id"]


def test_a_budget_stops_at_the_same_spend_on_both(nodes: tuple[Appliance, Appliance]) -> None:
    a = nodes[0]
    key = make_key(a, budget_usd=0.1, budget_period="day")  # 16 tokens at $1000/Mtok: $0.016 a request
    replies = alternate(nodes, 20, lambda node: chat(node, key, model="priced"), concurrency=1)
    codes = [r.status_code if r.status_code == 200 else r.json()["error"]["code"] for r in replies]
    first_refusal = codes.index("budget_exceeded")
    assert set(codes[first_refusal:]) == {"budget_exceeded"}, codes
    states = [httpx.get(node.url + "/v1/key", headers={"Authorization": f"Bearer {key}"}).json()["state"]
              for node in nodes]
    assert states[0]["spent_usd"] == states[1]["spent_usd"] == pytest.approx(0.016 * first_refusal)


def test_a_cache_entry_written_via_a_is_a_hit_on_b(nodes: tuple[Appliance, Appliance], fake: FakeOpenAI) -> None:
    a, b = nodes
    key = make_key(a)
    text = f"cache me {uuid.uuid4()}"
    first = chat(a, key, text=text, temperature=0)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    again = eventually(lambda: _hit(chat(b, key, text=text, temperature=0)))
    assert again.json()["choices"] == first.json()["choices"]
    assert sum(text in str(seen.body) for seen in fake.chats()) == 1


def _hit(reply: httpx.Response) -> httpx.Response:
    assert reply.status_code == 200 and reply.headers["x-cache"] == "HIT", reply.headers
    return reply


def test_a_breaker_opened_by_a_is_open_on_b(nodes: tuple[Appliance, Appliance], fake: FakeOpenAI) -> None:
    a, b = nodes
    key = make_key(a)
    for _ in range(3):
        assert chat(a, key, model="faulty/fake-500").status_code == 500
    seen = len([s for s in fake.chats() if s.body.get("model") == "fake-500"])

    def refused_on_b() -> None:
        reply = chat(b, key, model="faulty/fake-500")
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "no_healthy_backend", reply.text

    eventually(refused_on_b)
    refused_on_b()
    # B's refusals never reached the backend beyond what it took to see the breaker open
    assert len([s for s in fake.chats() if s.body.get("model") == "fake-500"]) <= seen + 1


def test_a_responses_conversation_started_on_a_continues_on_b(nodes: tuple[Appliance, Appliance],
                                                              fake: FakeOpenAI) -> None:
    a, b = nodes
    key = make_key(a)
    on_a = openai.OpenAI(base_url=a.url + "/v1", api_key=key, max_retries=0)
    on_b = openai.OpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0)
    first = on_a.responses.create(model="fake/fake-chat", input="My name is Ada.")
    second = on_b.responses.create(model="fake/fake-chat", input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    sent = fake.last_chat()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"] and "Ada" in str(sent[0])
    assert on_b.responses.retrieve(first.id).id == first.id


def test_the_ledger_equals_the_clients_count_of_200s(nodes: tuple[Appliance, Appliance]) -> None:
    a, _ = nodes
    key = make_key(a)
    replies = alternate(nodes, 40, lambda node: chat(node, key))
    answered = sum(r.status_code == 200 for r in replies)
    key_id = httpx.get(a.url + "/v1/key", headers={"Authorization": f"Bearer {key}"}).json()["id"]

    def ledger() -> None:
        status, body, _ = a.get(f"/admin/usage?key={key_id}&group_by=key")
        assert status == 200, body
        assert sum(row["requests"] for row in body["data"]) == answered == 40, body

    eventually(ledger, timeout=20)


def test_a_file_uploaded_on_a_is_read_on_b(nodes: tuple[Appliance, Appliance]) -> None:
    a, b = nodes
    key = make_key(a)
    on_a = openai.OpenAI(base_url=a.url + "/v1", api_key=key, max_retries=0)
    on_b = openai.OpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0)
    file_id = upload(on_a, [line("x", {"model": "fake/fake-chat", "messages": []})])
    assert on_b.files.content(file_id).text.startswith('{"custom_id": "x"')


# ------------------------------------------------------------------------------ nodes that die (run last)


def test_a_batch_runs_once_and_finishes_after_its_node_is_killed(tmp_path: Path, fake: FakeOpenAI,
                                                                 shared: dict[str, Any]) -> None:
    """Node A runs the batch (it starts alone); B joins and must not run it too; A is killed -9: B finishes it."""
    a = Appliance(tmp_path / "a", node_config(fake, shared)).start()
    b = Appliance(tmp_path / "b", node_config(fake, shared))
    try:
        key = make_key(a)
        on_a = openai.OpenAI(base_url=a.url + "/v1", api_key=key, max_retries=0, timeout=30)
        tag = uuid.uuid4().hex[:8]
        lines = [line(f"{tag}-{i}", {"model": "fake/fake-slow-100",
                                     "messages": [{"role": "user", "content": f"{tag}-{i}."}]}) for i in range(60)]
        batch = on_a.batches.create(input_file_id=upload(on_a, lines), endpoint=CHAT_URL, completion_window="24h")
        poll(on_a, batch.id, until=lambda got: got.request_counts.completed >= 3, timeout=60)
        b.start()
        on_b = openai.OpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0, timeout=30)
        poll(on_b, batch.id, until=lambda got: got.request_counts.completed >= 20, timeout=60)
        assert _times_sent(fake, tag, 60) == {1, 0}, "a line ran twice while both nodes ran"
        a.kill_tree()
        done = poll(on_b, batch.id, timeout=90)
        assert done.status == "completed" and done.request_counts.completed == 60, done
        assert sorted(r["custom_id"] for r in lines_of(on_b, done.output_file_id)) == sorted(
            item["custom_id"] for item in lines)
    finally:
        for node in (a, b):
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


def _times_sent(fake: FakeOpenAI, tag: str, count: int) -> set[int]:
    sent = [str(s.body) for s in fake.chats()]
    return {sum(f"{tag}-{i}." in body for body in sent) for i in range(count)}


def test_redis_killed_mid_run_requests_keep_flowing_and_limits_return(nodes: tuple[Appliance, Appliance],
                                                                       redis: Engine) -> None:
    a = nodes[0]
    key = make_key(a, rpm=1000)
    assert chat(a, key).status_code == 200
    redis.kill()
    try:
        replies = alternate(nodes, 20, lambda node: chat(node, key))
        assert [r.status_code for r in replies] == [200] * 20  # on_state_error = "open"
        assert "shared state unreachable" in str(a.get("/ready")[1])
    finally:
        redis.start()
    limited = make_key(a, rpm=3)

    def limits_hold() -> None:
        statuses = [r.status_code for r in alternate(nodes, 6, lambda node: chat(node, limited))]
        assert statuses.count(200) <= 3 and 429 in statuses, statuses

    eventually(limits_hold, timeout=20)

