"""Fair admission on a real appliance (2 workers): a backend at capacity holds the excess in the appliance's queue,
let in by weighted fair queuing between keys; a deadline gives 429 backend_overloaded with Retry-After.

"slow" is the fake behind ``max_concurrency = 1``; each request asks it to wait ``fake_delay_ms`` first, so one
answer occupies the backend as a generation would. The tests compare completion orders and counts, never times.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.ledger import rows_where
from tests.support.polling import eventually

pytestmark = pytest.mark.frozen  # also run against the one-file binary (tests/run)

MESSAGES = [{"role": "user", "content": "hi"}]


def config(fake_openai: Any, *, queue_timeout_ms: int = 60_000, delay_backend: str = "slow") -> dict[str, Any]:
    return {
        "discovery": {"enabled": False, "interval_s": 2},
        "admission": {"queue_timeout_ms": queue_timeout_ms},
        "backends": [
            {"name": delay_backend, "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"],
             "max_concurrency": 1},
            {"name": "roomy", "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]},
        ],
        "models": [{"name": "either", "targets": [f"{delay_backend}/fake-chat", "roomy/fake-chat"],
                    "strategy": "fallback"}],
    }


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any) -> Iterator[Appliance]:
    app = Appliance(tmp_path_factory.mktemp("admission"), config(fake_openai))
    app.start()
    yield app
    app.stop()


def new_key(app: Appliance, name: str, **fields: Any) -> tuple[str, str]:
    status, body, _ = app.post("/admin/keys", {"name": name, **fields})
    assert status == 201, body
    return body["id"], body["key"]


def sdk(app: Appliance, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0, timeout=120)


def queue_depth(app: Appliance, backend: str = "slow") -> float:
    text = app.get("/metrics")[1]
    found = re.search(rf'^appliance_admission_queue_depth\{{backend="{backend}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


class Traffic:
    """Requests sent from threads; the order their answers came back in (a list append under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: list[tuple[str, int, str | None]] = []  # (label, status, request id)
        self.threads: list[threading.Thread] = []

    def send(self, client: openai.OpenAI, label: str, model_override: str = "slow/fake-chat", max_tokens: int = 16,
             **extra: Any) -> None:
        def run() -> None:
            try:
                raw = client.chat.completions.with_raw_response.create(model=model_override, messages=MESSAGES,
                                                                       max_tokens=max_tokens, extra_body=extra)
                outcome = (label, raw.status_code, raw.headers.get("x-request-id"))
            except openai.APIStatusError as exc:
                outcome = (label, exc.status_code, exc.response.headers.get("x-request-id"))
            with self.lock:
                self.done.append(outcome)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def wait(self) -> list[tuple[str, int, str | None]]:
        for thread in self.threads:
            thread.join(180)
        return self.done


def test_a_quiet_key_is_served_between_a_flooding_keys_requests(app: Appliance) -> None:
    a_id, a_key = new_key(app, "flood")
    b_id, b_key = new_key(app, "quiet")
    traffic = Traffic()
    flood, quiet = sdk(app, a_key), sdk(app, b_key)
    # 500 ms each: eight or more stay queued for about a second, which a poll of /metrics (every 0.2 s) sees
    # even when the flood's threads start slowly.
    for i in range(10):
        traffic.send(flood, f"A{i}", fake_delay_ms=500)
    eventually(lambda: _at_least(queue_depth(app), 8), timeout=30)
    for i in range(2):
        traffic.send(quiet, f"B{i}", fake_delay_ms=500)
    done = traffic.wait()
    order = [label for label, _, _ in done]
    assert len(done) == 12 and all(status == 200 for _, status, _ in done), done
    b_places = [i for i, label in enumerate(order) if label.startswith("B")]
    # A: 1 running + 9 queued when B came; each of B's waits for at most one more of A's (places 2 and 4),
    # never for the 9 queued before it.
    assert max(b_places) <= 5, order
    # Nothing lost: a request log row for each, under its own key.
    rows = rows_where(app, "key_id IN (?, ?)", (a_id, b_id), count=12)
    assert len(rows) == 12 and {row["status"] for row in rows} == {200}
    metrics = app.get("/metrics")[1]
    assert re.search(r'^appliance_admission_wait_seconds_count\{backend="slow"\} (\d+)', metrics, re.M)
    assert re.search(r'^appliance_admission_admitted_total\{backend="slow"\} ([1-9]\d*)', metrics, re.M)


def _at_least(value: float, wanted: float) -> None:
    assert value >= wanted, value


def test_the_statsz_document_shows_the_queue_per_backend(app: Appliance) -> None:
    _, key = new_key(app, "statsz")
    traffic = Traffic()
    client = sdk(app, key)
    # Five 800 ms answers keep two or more waiting for 2.4 s: longer than each worker's 1 s /statsz cache
    # plus a slow build, so a poll sees the queue however the turns fall.
    for i in range(5):
        traffic.send(client, f"S{i}", fake_delay_ms=800)

    def queued() -> dict[str, Any]:
        backends = {b["name"]: b for b in app.get("/statsz")[1]["backends"]}
        slow = backends["slow"]
        assert slow["queued"] >= 2 and slow["capacity"] == 1 and sum(slow["waiting_keys"].values()) >= 2, slow
        return backends

    backends = eventually(queued, timeout=30)
    assert backends["roomy"]["capacity"] is None and backends["roomy"]["queued"] == 0
    assert all(status == 200 for _, status, _ in traffic.wait())


def test_a_route_with_another_target_takes_the_one_with_room(app: Appliance) -> None:
    _, key = new_key(app, "either")
    busy = Traffic()
    # Held for 3 s: /statsz (each worker's copy lives 1 s) shows it in flight, with time left for the request.
    busy.send(sdk(app, key), "hold", fake_delay_ms=3000)
    eventually(lambda: _busy(app), timeout=30)
    raw = sdk(app, key).chat.completions.with_raw_response.create(model="either", messages=MESSAGES)
    assert raw.headers["x-appliance-backend"] == "roomy" and "x-fallback-from" not in raw.headers
    busy.wait()


def _busy(app: Appliance) -> None:
    backends = {b["name"]: b for b in app.get("/statsz")[1]["backends"]}
    assert backends["slow"]["inflight"] >= 1


def test_the_queue_deadline_gives_429_with_retry_after_and_a_gone_client_leaves(tmp_path: Any,
                                                                                 fake_openai: Any) -> None:
    app = Appliance(tmp_path / "deadline", config(fake_openai, queue_timeout_ms=300))
    app.start()
    try:
        key_id, key = new_key(app, "late")
        holder = Traffic()
        holder.send(sdk(app, key), "hold", fake_delay_ms=4000)
        eventually(lambda: _busy(app), timeout=30)
        with pytest.raises(openai.RateLimitError) as caught:
            sdk(app, key).chat.completions.create(model="slow/fake-chat", messages=MESSAGES)
        error = caught.value
        assert error.body["code"] == "backend_overloaded" and "'slow'" in error.body["message"]
        assert int(error.response.headers["retry-after"]) >= 1
        assert error.response.headers["x-request-id"] == error.body["request_id"]
        # A client that gives up while queued leaves the queue at once (the depth goes back to 0).
        with pytest.raises(httpx.TimeoutException):
            httpx.post(app.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "slow/fake-chat", "messages": MESSAGES, "timeout": 60_000}, timeout=0.2)
        eventually(lambda: _at_most(queue_depth(app), 0), timeout=10)
        assert [s for _, s, _ in holder.wait()] == [200]
        rows = rows_where(app, "key_id = ?", (key_id,), count=3)
        assert sorted(row["error_code"] or "" for row in rows) == ["", "backend_overloaded", "client_closed"]
        assert {row["status"] for row in rows} == {200, 429, 499}
    finally:
        app.stop()


def _at_most(value: float, wanted: float) -> None:
    assert value <= wanted, value


def test_key_weight_in_the_admin_api_and_cli(app: Appliance) -> None:
    key_id, _ = new_key(app, "heavy", weight=2)
    assert app.get(f"/admin/keys/{key_id}")[1]["weight"] == 2
    status, body, _ = app.post("/admin/keys", {"name": "bad", "weight": 0})
    assert status == 400 and body["error"]["param"] == "weight"
    made = app.cli("keys", "create", "--name", "cli-heavy", "--weight", "3")
    assert made.returncode == 0, made.stderr
    listed = app.cli("keys", "list", "--json")
    assert any(k["name"] == "cli-heavy" and k["weight"] == 3 for k in _json_list(listed.stdout))


def _json_list(text: str) -> list[dict[str, Any]]:
    import json

    data = json.loads(text)
    return data["data"] if isinstance(data, dict) else data


def test_an_admin_key_with_no_weight_shares_the_default(app: Appliance) -> None:
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
    assert client.chat.completions.create(model="slow/fake-chat", messages=MESSAGES).choices


@pytest.mark.llamacpp
def test_the_real_single_slot_server_serves_a_quiet_key_between_a_floods_requests(tmp_path: Any,
                                                                                  llamacpp_url: str) -> None:
    """llama-cpp-python answers one request at a time: its capacity (1) is learned from its kind, no config."""
    app = Appliance(tmp_path / "real", {"discovery": {"enabled": False, "interval_s": 2},
                                        "backends": [{"name": "llamacpp", "url": llamacpp_url, "timeout_s": 120}]})
    app.start()
    try:
        eventually(lambda: _capacity(app, "llamacpp", 1), timeout=60)
        a_id, a_key = new_key(app, "flood")
        b_id, b_key = new_key(app, "quiet")
        traffic = Traffic()
        flood, quiet = sdk(app, a_key), sdk(app, b_key)
        for i in range(20):
            traffic.send(flood, f"A{i}", max_tokens=24, model_override="llamacpp/tiny")
        eventually(lambda: _at_least(queue_depth(app, "llamacpp"), 15), timeout=60)
        with traffic.lock:
            finished = len(traffic.done)  # A's answered before B's were sent (a count, not a time)
        for i in range(2):
            traffic.send(quiet, f"B{i}", max_tokens=24, model_override="llamacpp/tiny")
        done = traffic.wait()
        assert len(done) == 22 and all(status == 200 for _, status, _ in done), done
        rows = rows_where(app, "key_id IN (?, ?)", (a_id, b_id), count=22)
        assert {row["status"] for row in rows} == {200} and {row["backend"] for row in rows} == {"llamacpp"}
        # Each of B's waits for the A running when it came (one more may have begun while B's request travelled)
        # and at most one of A's queued ones, never for the 15 or more queued before it.
        order = [label for label, _, _ in done]
        a_before = sorted(sum(1 for label in order[:order.index(b)] if label.startswith("A")) for b in ("B0", "B1"))
        assert a_before[0] <= finished + 2 and a_before[1] <= finished + 3, (finished, order)
    finally:
        app.stop()


def _capacity(app: Appliance, backend: str, wanted: int) -> None:
    backends = {b["name"]: b for b in app.get("/statsz")[1]["backends"]}
    assert backends[backend]["capacity"] == wanted, backends[backend]
