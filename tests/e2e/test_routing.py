"""Routes, retries, failover, breakers and the response cache, through real HTTP, 2 workers.

The fakes fail on command (tests/fakes/openai_upstream.py: fake-fail-<n>-<status>-<tag> fails n times,
then answers); "down" backends are ports nobody listens on. Selection logic itself is unit-tested
(tests/unit/test_routing.py); here each strategy gets a short run through the real server.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import base_config
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.threaded import free_port

pytestmark = pytest.mark.frozen

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any, fake_ollama: Any,
        llamacpp_port: int) -> Iterator[Appliance]:
    config = base_config(fake_openai, fake_ollama, llamacpp_port)
    config["discovery"] = {"enabled": False, "interval_s": 300}  # no probe opens a breaker mid-test
    config["routing"] = {"retry_base_s": 0.01, "retry_max_s": 3, "breaker_failures": 3, "breaker_cooldown_s": 1.5,
                         "breaker_min_requests": 1000,
                         "probe_interval_s": 300}
    for name in ("down-a", "down-b", "down-c", "down-d"):
        config["backends"].append({"name": name, "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False,
                                   "models": ["m"]})
    config["models"] += [
        {"name": "with-fallback", "targets": ["down-a/m", "fake/fake-chat"]},
        {"name": "only-down", "targets": ["down-b/m"], "retries": 0},
        {"name": "flaky-then-fallback", "targets": ["down-c/m", "fake/fake-chat"], "retries": 0},
        {"name": "rr", "targets": ["fake/fake-chat", "fake/org/fake-slash"], "strategy": "round_robin"},
        {"name": "weighted", "targets": ["fake/fake-chat", "fake/org/fake-slash"], "strategy": "weighted",
         "weights": [3, 1]},
        {"name": "fastest", "targets": ["fake/fake-slow-150", "fake/fake-chat"], "strategy": "least_latency"},
        {"name": "idlest", "targets": ["fake/fake-slow-400", "fake/fake-chat"], "strategy": "least_busy"},
        {"name": "claude-*", "target": "fake/fake-chat"},
    ]
    config["cache"] = {"enabled": True, "stream": True}
    app = Appliance(tmp_path_factory.mktemp("routing"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def chat(app: Appliance, model: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return httpx.post(app.url + "/v1/chat/completions", json={"model": model, "messages": MESSAGES, **fields},
                      headers={**AUTH, **(headers or {})}, timeout=30)


# ------------------------------------------------------------------------------------------ failover


def test_a_route_whose_first_target_is_down_still_answers(app: Appliance) -> None:
    response = chat(app, "with-fallback")
    assert response.status_code == 200, response.text
    assert response.headers["x-fallback-from"] == "down-a/m"
    assert response.headers["x-appliance-backend"] == "fake"
    assert response.headers["x-appliance-route"] == "with-fallback"
    assert int(response.headers["x-appliance-attempts"]) >= 1


def test_retries_with_backoff_then_success(app: Appliance) -> None:
    model = f"fake/fake-fail-2-503-{uuid.uuid4().hex[:8]}"
    response = chat(app, model, retries=2)
    assert response.status_code == 200
    assert response.headers["x-retry-count"] == "2" and response.headers["x-appliance-attempts"] == "3"
    assert "x-fallback-from" not in response.headers  # the same target answered in the end
    exhausted = chat(app, f"fake/fake-fail-3-502-{uuid.uuid4().hex[:8]}", retries=1)
    assert exhausted.status_code == 502 and exhausted.headers["x-appliance-attempts"] == "2"


def test_retry_after_from_the_backend_is_honoured(app: Appliance, fake_openai: Any) -> None:
    model = f"fake/fake-fail-1-429-ra1-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    response = chat(app, model, retries=1)
    assert response.status_code == 200 and time.monotonic() - started >= 1.0


def test_client_errors_are_never_retried(app: Appliance, fake_openai: Any) -> None:
    before = len(fake_openai.requests)
    response = chat(app, "fake/fake-400", retries=3)
    assert response.status_code == 400 and response.headers["x-appliance-attempts"] == "1"
    assert len(fake_openai.requests) == before + 1


def test_no_retry_header_and_bad_overrides(app: Appliance) -> None:
    response = chat(app, f"fake/fake-fail-1-503-{uuid.uuid4().hex[:8]}", {"X-Appliance-No-Retry": "true"},
                    retries=3)
    assert response.status_code == 503 and response.headers["x-appliance-attempts"] == "1"
    for field, value in (("retries", 9), ("timeout", -1), ("fallbacks", "x"), ("provider", "nope")):
        bad = chat(app, "chat", **{field: value})
        assert bad.status_code == 400 and bad.json()["error"]["param"] in (field, "provider"), field


def test_request_fallbacks_provider_and_forced_route(app: Appliance) -> None:
    fell_back = chat(app, "down-d/m", fallbacks=["fake/org/fake-slash"], retries=0)
    assert fell_back.status_code == 200 and fell_back.json()["model"] == "org/fake-slash"
    forced = chat(app, "chat", {"X-Appliance-Backend": "ollama"})
    assert forced.headers.get("x-appliance-backend") == "ollama" or forced.status_code >= 400
    routed = chat(app, "anything-at-all", {"X-Appliance-Route": "rr"})
    assert routed.status_code == 200 and routed.headers["x-appliance-route"] == "rr"
    timed_out = chat(app, "fake/fake-slow-3000", timeout=300, retries=0)
    assert timed_out.status_code == 504


def test_vendor_names_reach_a_local_model_through_a_pattern(app: Appliance) -> None:
    response = chat(app, "claude-sonnet-4-5")
    assert response.status_code == 200 and response.headers["x-appliance-route"] == "claude-*"


def test_no_retry_after_the_first_streamed_byte(app: Appliance, fake_openai: Any) -> None:
    before = len(fake_openai.requests)
    with httpx.stream("POST", app.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                      json={"model": "fake/fake-reset", "messages": MESSAGES, "stream": True, "retries": 3}) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert '"error"' in text and text.endswith("data: [DONE]\n\n")
    assert len(fake_openai.requests) == before + 1


# ------------------------------------------------------------------------------------------ breakers


def test_breaker_opens_is_shared_by_both_workers_then_half_opens_and_closes(app: Appliance) -> None:
    for _ in range(3):  # breaker_failures = 3
        assert chat(app, "only-down").status_code == 502
    refused = [chat(app, "only-down") for _ in range(6)]  # fresh connections: both workers
    assert all(r.status_code == 503 for r in refused)
    error = refused[0].json()["error"]
    assert error["code"] == "no_healthy_backend" and int(refused[0].headers["retry-after"]) >= 1
    states = {httpx.get(app.url + "/ready").json()["backends"]["down-b"]["breaker"]["state"] for _ in range(6)}
    assert states == {"open"}
    time.sleep(1.6)  # the cool-down: one trial goes through (and fails again: still down)
    assert chat(app, "only-down").status_code == 502
    assert chat(app, "only-down").status_code == 503


def test_a_failing_primary_is_skipped_while_its_breaker_is_open(app: Appliance) -> None:
    for _ in range(3):
        assert chat(app, "flaky-then-fallback").status_code == 200
    response = chat(app, "flaky-then-fallback")
    assert response.headers["x-appliance-attempts"] == "1"  # down-c skipped, not tried
    assert response.headers["x-fallback-from"] == "down-c/m"


# ------------------------------------------------------------------------------------------ strategies


def backends_of(app: Appliance, model: str, n: int) -> Counter[str]:
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: chat(app, model), range(n)))
    assert all(r.status_code == 200 for r in responses)
    return Counter(r.json()["model"] for r in responses)


def test_round_robin_and_weighted_use_every_target(app: Appliance) -> None:
    spread = backends_of(app, "rr", 12)
    assert spread["fake-chat"] >= 4 and spread["org/fake-slash"] >= 4
    weighted = backends_of(app, "weighted", 16)
    assert weighted["fake-chat"] > weighted["org/fake-slash"] >= 2


def test_least_latency_prefers_the_fast_target(app: Appliance) -> None:
    spread = Counter(chat(app, "fastest").json()["model"] for _ in range(16))
    assert spread["fake-chat"] > spread["fake-slow-150"]


def test_least_busy_sends_work_away_from_the_busy_target(app: Appliance) -> None:
    spread = backends_of(app, "idlest", 12)
    assert spread["fake-chat"] > spread["fake-slow-400"]


# ------------------------------------------------------------------------------------------ cache


def test_cache_hit_on_the_other_worker_bypass_ttl_and_key_scope(app: Appliance) -> None:
    body = {"temperature": 0, "seed": uuid.uuid4().int % 10**6}
    first = chat(app, "chat", **body)
    assert first.headers["x-cache"] == "MISS"
    hits = [chat(app, "chat", **body) for _ in range(6)]  # fresh connections: both workers
    assert all(h.headers["x-cache"] == "HIT" for h in hits)
    assert hits[0].json()["choices"] == first.json()["choices"]
    assert hits[0].json()["usage"]["total_cost_usd"] == 0
    assert int(hits[0].headers["x-appliance-cache-age"]) >= 0
    assert chat(app, "chat", {"X-Appliance-No-Cache": "true"}, **body).headers["x-cache"] == "BYPASS"
    assert chat(app, "chat", {"X-Cache": "no-cache"}, **body).headers["x-cache"] == "BYPASS"
    assert "x-cache" not in chat(app, "chat").headers  # temperature absent counts as 1: not cacheable

    other = openai.OpenAI(base_url=app.url + "/v1", api_key=app.post("/admin/keys", {"name": "other"})[1]["key"])
    raw = other.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, **body)
    assert raw.headers["x-cache"] == "MISS"  # entries are per key by default

    short = {"temperature": 0.7, "seed": uuid.uuid4().int % 10**6}
    assert chat(app, "chat", {"X-Cache-TTL": "1"}, **short).headers["x-cache"] == "MISS"
    assert chat(app, "chat", {"X-Cache-TTL": "1"}, **short).headers["x-cache"] == "HIT"
    time.sleep(1.2)
    assert chat(app, "chat", {"X-Cache-TTL": "1"}, **short).headers["x-cache"] == "MISS"


def test_a_cached_answer_is_streamed_when_asked(app: Appliance) -> None:
    body = {"temperature": 0, "seed": uuid.uuid4().int % 10**6}
    assert chat(app, "chat", **body).headers["x-cache"] == "MISS"
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, stream=True,
                                                          stream_options={"include_usage": True}, **body)
    assert raw.headers["x-cache"] == "HIT"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake."
    assert chunks[-1].usage.total_tokens == 16 and chunks[-1].usage.model_dump()["total_cost_usd"] == 0
