"""What a local model costs, on a real appliance (2 workers): cost_per_hour turns busy time into compute_cost_usd.

One private appliance serves the module: "gpu" is the fake behind a $3600/hour price ($1 a busy second),
"free" the same fake with no price, "llamacpp" the real server (tiny random weights) at gpu's price. The fake
waits ``fake_delay_ms`` before answering, so a request takes measurable time; the tests assert relations
(above zero, at most the request's own time, sums), never wall-clock amounts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.polling import eventually

pytestmark = pytest.mark.frozen

PER_SECOND = 1.0  # USD: cost_per_hour 3600
MESSAGES = [{"role": "user", "content": "hi"}]
SLOW = {"fake_delay_ms": 150}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any, llamacpp_port: int) -> Iterator[Appliance]:
    config = {
        "discovery": {"enabled": False, "interval_s": 2},
        "backends": [
            {"name": "gpu", "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"],
             "cost_per_hour": 3600 * PER_SECOND},
            {"name": "free", "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]},
            {"name": "llamacpp", "url": f"http://127.0.0.1:{llamacpp_port}/v1", "timeout_s": 120,
             "discover": False, "models": ["tiny"], "cost_per_hour": 3600 * PER_SECOND},
        ],
    }
    app = Appliance(tmp_path_factory.mktemp("compute"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def new_key(app: Appliance, **fields: Any) -> tuple[str, str]:
    status, body, _ = app.post("/admin/keys", {"name": "compute", **fields})
    assert status == 201, body
    return body["id"], body["key"]


def sdk(app: Appliance, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0, timeout=30)


def samples(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.M)}


def test_usage_whole_and_streamed_carries_the_compute_cost_of_a_priced_backend(app: Appliance) -> None:
    client = sdk(app)
    whole = client.chat.completions.create(model="gpu/fake-chat", messages=MESSAGES, extra_body=SLOW)
    usage = whole.usage.model_dump()
    # Its share of the busy time is above zero and never more than the time it took.
    assert 0 < usage["compute_cost_usd"] <= usage["latency_ms"] / 1000 * PER_SECOND
    assert usage["total_cost_usd"] == 0  # no token prices: the two costs are apart

    stream = client.chat.completions.create(model="gpu/fake-chat", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, extra_body=SLOW)
    last = list(stream)[-1].usage.model_dump()
    assert 0 < last["compute_cost_usd"] <= last["latency_ms"] / 1000 * PER_SECOND

    free = client.chat.completions.create(model="free/fake-chat", messages=MESSAGES, extra_body=SLOW)
    assert "compute_cost_usd" not in free.usage.model_dump()


def test_the_ledger_usage_report_and_metrics_show_what_the_answers_said(app: Appliance) -> None:
    key_id, key = new_key(app)
    client = sdk(app, key)
    charged = []
    for stream in (False, True, False):
        raw = client.chat.completions.with_raw_response.create(
            model="gpu/fake-chat", messages=MESSAGES, extra_body=SLOW, stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}))
        answer = raw.parse()
        usage = (list(answer)[-1] if stream else answer).usage.model_dump()
        charged.append((raw.headers["x-request-id"], usage["compute_cost_usd"]))
    client.chat.completions.create(model="free/fake-chat", messages=MESSAGES)

    def requests_logged() -> list[dict[str, Any]]:
        status, body, _ = app.get(f"/admin/requests?key={key_id}")
        assert status == 200 and len(body["data"]) == 4
        return body["data"]

    rows = {row["request_id"]: row for row in eventually(requests_logged)}
    for request_id, cost in charged:
        assert rows[request_id]["compute_cost_usd"] == pytest.approx(cost, abs=1e-9)
    assert [row["compute_cost_usd"] for row in rows.values() if row["backend"] == "free"] == [None]

    status, report, _ = app.get(f"/admin/usage?key={key_id}&group_by=key")
    assert status == 200
    (total,) = report["data"]
    assert total["requests"] == 4
    assert total["compute_cost_usd"] == pytest.approx(sum(cost for _, cost in charged), abs=1e-8)

    cli = app.cli("usage", "--key", key_id, "--group-by", "key", "--json")
    assert cli.returncode == 0, cli.stderr
    assert '"compute_cost_usd"' in cli.stdout

    text = httpx.get(app.url + "/metrics", timeout=10).text
    busy = samples(text, "appliance_backend_busy_seconds_total")
    compute = samples(text, "appliance_compute_cost_usd_total")
    assert busy['backend="gpu"'] > 0 and busy['backend="free"'] > 0
    # Every request on gpu was charged its share: the shares add up to at most the busy time (each attempt's
    # share is closed when its answer is accounted, a moment before it leaves the count in flight).
    assert sum(cost for _, cost in charged) <= compute['backend="gpu"'] <= busy['backend="gpu"'] * PER_SECOND
    assert 'backend="free"' not in compute


def test_a_key_whose_budget_counts_compute_is_refused_once_compute_spend_passes_it(app: Appliance) -> None:
    key_id, key = new_key(app, budget_usd=0.01, budget_period="day", budget_counts="compute")
    client = sdk(app, key)
    # A free backend costs this budget nothing, whatever it does.
    client.chat.completions.create(model="free/fake-chat", messages=MESSAGES, extra_body=SLOW)
    first = client.chat.completions.create(model="gpu/fake-chat", messages=MESSAGES, extra_body=SLOW)
    assert first.usage.model_dump()["compute_cost_usd"] > 0.01  # 150 ms at $1/s
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpu/fake-chat", messages=MESSAGES)
    assert refused.value.status_code == 429 and refused.value.code == "budget_exceeded"
    assert refused.value.response.headers["x-should-retry"] == "false"
    client.chat.completions.create(model="free/fake-chat", messages=MESSAGES)  # still served

    mine = httpx.get(app.url + "/v1/key", headers={"Authorization": f"Bearer {key}"}).json()
    assert mine["budget_counts"] == "compute"
    assert mine["state"]["spent_usd"] == pytest.approx(first.usage.model_dump()["compute_cost_usd"], abs=1e-9)
    assert mine["state"]["remaining_usd"] == 0

    # Counting token prices instead (none here): the key is served again, its spend recounted from the ledger.
    patched = httpx.patch(f"{app.url}/admin/keys/{key_id}", json={"budget_counts": "price"},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert patched.status_code == 200 and patched.json()["budget_counts"] == "price"
    eventually(lambda: _served(client))


def _served(client: openai.OpenAI) -> None:
    try:
        client.chat.completions.create(model="gpu/fake-chat", messages=MESSAGES)
    except openai.RateLimitError as exc:
        raise AssertionError("still refused") from exc


def test_budget_counts_is_validated_and_settable_from_the_cli(app: Appliance) -> None:
    bad = httpx.post(app.url + "/admin/keys", json={"name": "x", "budget_counts": "tokens"},
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["code"] == "invalid_value" and error["param"] == "budget_counts" and error["request_id"]

    made = app.cli("keys", "create", "--name", "gpu-team", "--budget-usd", "5", "--budget-period", "month",
                   "--budget-counts", "both")
    assert made.returncode == 0, made.stderr
    listed = app.cli("keys", "list", "--json")
    (row,) = [k for k in json.loads(listed.stdout) if k["name"] == "gpu-team"]
    assert row["budget_counts"] == "both"


@pytest.mark.llamacpp
def test_a_real_local_model_is_charged_its_busy_time(app: Appliance, llamacpp_url: str) -> None:
    def ready() -> None:
        assert app.get("/ready")[1]["backends"]["llamacpp"]["state"] == "ready"

    eventually(ready, timeout=30)
    raw = sdk(app).chat.completions.with_raw_response.create(
        model="llamacpp/tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    usage = raw.parse().usage.model_dump()
    assert usage["completion_tokens"] > 0
    assert 0 < usage["compute_cost_usd"] <= usage["latency_ms"] / 1000 * PER_SECOND
    text = httpx.get(app.url + "/metrics", timeout=10).text
    assert samples(text, "appliance_backend_busy_seconds_total")['backend="llamacpp"'] * PER_SECOND >= (
        usage["compute_cost_usd"])
