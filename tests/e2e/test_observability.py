"""/metrics, /statsz, /admin/requests, the access log and the status page, on a real appliance (2 workers).

One private appliance serves the module (its own data dir, so every counter is ours): a mixed burst on
fresh connections (both workers answer) of chat, streams, a model that does not exist, a cache miss and
its hit, requests over a key's rpm, embeddings; then the Prometheus counters and the /statsz totals must
equal what was sent (polled for a flush interval), promtool must accept the exposition, and the status
page, loaded from the appliance in Chromium, must show the backends and the traffic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.observe import metricsdir
from tests.support import browser
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.polling import eventually
from tests.support.threaded import free_port

pytestmark = pytest.mark.frozen

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PROMPT = "a prompt nobody may log"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": PROMPT}]}
CACHED = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": "cache me"}]}
RPM = 2


def config(fake_openai: Any) -> dict[str, Any]:
    return {
        "discovery": {"enabled": False, "interval_s": 2},
        "backends": [
            {"name": "fake", "url": fake_openai.url + "/v1"},
            {"name": "down", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False, "models": ["gone"]},
        ],
        "models": [{"name": "chat", "target": "fake/fake-chat", "input_per_mtok": 2, "output_per_mtok": 4}],
    }


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any) -> Iterator[Appliance]:
    app = Appliance(tmp_path_factory.mktemp("observability"), config(fake_openai))
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def sdk(app: Appliance, key: str = ADMIN_KEY) -> openai.OpenAI:
    """A client on its own connection: a burst of them spreads over both workers."""
    return openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0, timeout=30)


def chat_once(app: Appliance, key: str, body: dict[str, Any]) -> tuple[int, str]:
    """(status, X-Request-ID) of one chat completion through the SDK, errors included."""
    try:
        raw = sdk(app, key).chat.completions.with_raw_response.create(**body)
        return raw.http_response.status_code, raw.headers["x-request-id"]
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.headers["x-request-id"]


def stream_once(app: Appliance) -> tuple[int, str]:
    with sdk(app).chat.completions.with_streaming_response.create(**CHAT, stream=True) as response:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text == "Hello from the fake."
    return response.status_code, response.headers["x-request-id"]


def embed_once(app: Appliance, text: str) -> tuple[int, str]:
    raw = sdk(app).embeddings.with_raw_response.create(model="fake/fake-embed", input=text)
    return raw.http_response.status_code, raw.headers["x-request-id"]


def new_key(app: Appliance, **fields: Any) -> tuple[str, str]:
    status, body, _ = app.post("/admin/keys", {"name": "observed", **fields})
    assert status == 201, body
    return body["id"], body["key"]


@pytest.fixture(scope="module")
def burst(app: Appliance) -> dict[str, Any]:
    """The mixed burst, sent once for the module: what was sent, by kind."""
    limited_id, limited = new_key(app, role="user", rpm=RPM)
    first = chat_once(app, ADMIN_KEY, CACHED)  # the miss; its hit comes once the entry is in the database
    eventually(lambda: _assert_cached(app))
    jobs: list[tuple[str, Callable[[], tuple[int, str]]]] = [("cache_miss", lambda: first)]
    jobs += [("chat", lambda: chat_once(app, ADMIN_KEY, CHAT))] * 12
    jobs += [("stream", lambda: stream_once(app))] * 6
    jobs += [("embed", lambda n=n: embed_once(app, f"text {n}")) for n in range(3)]  # distinct: 3 cache misses
    jobs += [("missing", lambda: chat_once(app, ADMIN_KEY, {**CHAT, "model": "no-such-model"}))]
    jobs += [("cache_hit", lambda: chat_once(app, ADMIN_KEY, CACHED))]
    jobs += [("limited", lambda: chat_once(app, limited, CHAT))] * (RPM + 3)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda job: (job[0], *job[1]()), jobs))
    statuses = Counter((kind, status) for kind, status, _ in results)
    assert statuses[("limited", 200)] == RPM and statuses[("limited", 429)] == 3, statuses
    assert statuses[("missing", 404)] == 1 and statuses[("cache_hit", 200)] == 1, statuses
    workers = {rid.rsplit("-", 2)[0] for _, _, rid in results}  # request ids carry a per-process prefix
    return {"results": results, "statuses": statuses, "workers": workers, "limited_key": limited_id,
            "limited_secret": limited, "sent": len(results)}


def _assert_cached(app: Appliance) -> None:
    with sqlite3.connect(app.data_dir / "appliance.db") as db:
        assert db.execute("SELECT count(*) FROM response_cache").fetchone()[0] == 1


def scrape(app: Appliance) -> str:
    response = httpx.get(app.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def samples(text: str, name: str) -> dict[str, float]:
    """{label text: value} of one sample name in an exposition."""
    out = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(\{{.*\}})? (\S+)", line)
        if match:
            out[match.group(1) or ""] = float(match.group(2))
    return out


def total(text: str, name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples(text, name).items() if all(w in k for w in wanted))


def test_the_burst_reached_both_workers(burst: dict[str, Any]) -> None:
    assert len(burst["workers"]) == 2, burst["workers"]


def test_metrics_count_every_request_across_workers(app: Appliance, burst: dict[str, Any]) -> None:
    sent, statuses = burst["sent"], burst["statuses"]
    chats = sum(n for (kind, status), n in statuses.items()
                if kind in ("chat", "stream", "cache_miss", "cache_hit", "limited") and status == 200)

    def counted() -> str:
        text = scrape(app)
        assert total(text, "appliance_requests_total") == sent
        assert total(text, "appliance_requests_total", endpoint="/v1/chat/completions", model="chat",
                     status_class="2xx") == chats
        assert total(text, "appliance_requests_total", endpoint="/v1/embeddings", status_class="2xx") == 3
        assert total(text, "appliance_requests_total", model="other", status_class="4xx") == 1  # no-such-model
        assert total(text, "appliance_requests_total", status_class="4xx") == 1 + 3
        assert total(text, "appliance_requests_total", cache="hit") == 1
        assert total(text, "appliance_requests_total", cache="miss") == 1 + 3  # embeddings are always cacheable
        assert total(text, "appliance_ratelimit_rejections_total", limit="requests") == 3
        return text

    text = eventually(counted)
    # The fake reports 11 prompt and 5 completion tokens per chat answer (streams too); a cache hit counts
    # the tokens of the answer it replays (as its ledger row does) but costs nothing.
    assert total(text, "appliance_tokens_total", model="chat", type="completion") == 5 * chats
    assert total(text, "appliance_cost_usd_total", model="chat") == pytest.approx(
        (chats - 1) * (11 * 2 + 5 * 4) / 1e6)
    assert total(text, "appliance_request_duration_seconds_count") == sent
    assert total(text, "appliance_time_to_first_token_seconds_count", model="chat") >= 6
    assert total(text, "appliance_inflight_requests") == 0
    assert total(text, "appliance_workers") == 2
    assert samples(text, "appliance_build_info") == {'{version="0.1.0"}': 1.0}
    assert samples(text, "appliance_backend_up") == {'{backend="fake"}': 1.0, '{backend="down"}': 0.0}
    assert samples(text, "appliance_circuit_state") == {'{backend="fake"}': 0.0, '{backend="down"}': 0.0}
    assert "appliance_db_write_queue_depth" in text
    assert "no-such-model" not in text and ADMIN_KEY not in text  # bounded labels, no secrets
    # Every worker answers the same (both merge the same files): scrape on fresh connections.
    assert len({json.dumps(samples(scrape(app), "appliance_requests_total")) for _ in range(6)}) == 1


def test_promtool_accepts_the_exposition(app: Appliance, burst: dict[str, Any]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; tests/run installs it as root)")
    checked = subprocess.run([promtool, "check", "metrics"], input=scrape(app), capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_statsz_totals_equal_what_was_sent(app: Appliance, burst: dict[str, Any]) -> None:
    sent, statuses = burst["sent"], burst["statuses"]

    def complete() -> dict[str, Any]:
        status, doc, _ = app.get("/statsz")  # from loopback: no key needed, but the admin key is fine too
        assert status == 200
        assert doc["totals"]["requests"] == sent
        assert doc["totals"]["errors"] == 1 + 3
        assert doc["totals"]["cache_hits"] == 1
        assert doc["limits"]["rejections"] == 3 and doc["limits"]["by_limit"] == {"requests": 3}
        return doc

    doc = eventually(complete)
    by_model = {m["model"]: m for m in doc["models"]}
    chat_sent = sum(n for (kind, _), n in statuses.items() if kind not in ("embed", "missing"))
    assert by_model["chat"]["requests"] == chat_sent and by_model["chat"]["errors"] == 3
    assert by_model["fake/fake-embed"]["requests"] == 3
    assert by_model["chat"]["cache_hit_rate"] == pytest.approx(1 / chat_sent, abs=1e-4)
    assert doc["workers"] == {"configured": 2, "alive": 2}
    assert doc["version"] == "0.1.0" and doc["uptime_s"] > 0
    backends = {b["name"]: b for b in doc["backends"]}
    assert backends["fake"]["up"] is True and backends["fake"]["state"] == "ready"
    assert backends["down"]["up"] is False and backends["down"]["last_error"]
    assert backends["fake"]["breaker"]["state"] == "closed"
    assert backends["fake"]["requests"] == sent - 1 - 3 - 1  # not the 404 (no backend), the 429s, the hit
    assert 0 < backends["fake"]["latency_ms"]["p50"] <= backends["fake"]["latency_ms"]["p95"]
    assert len(doc["traffic"]) == 60 and sum(p["requests"] for p in doc["traffic"]) == sent
    assert doc["totals"]["requests_per_s"] > 0
    assert {e["status"] for e in doc["recent_errors"]} == {404, 429}
    assert doc["db"]["size_bytes"] > 0
    # Any worker: the same numbers (fresh connections, so both answer), once each worker's document is newer
    # than the last flush (a worker rebuilds its own at most once a second: StatszCache).
    def agreed() -> None:
        views = {json.dumps([d["totals"], d["models"]], sort_keys=True)
                 for d in (app.get("/statsz")[1] for _ in range(6))}
        assert len(views) == 1, views

    eventually(agreed)


def test_admin_requests_filters_and_validates(app: Appliance, burst: dict[str, Any]) -> None:
    eventually(lambda: _assert_logged(app, burst["sent"]))
    status, body, _ = app.get("/admin/requests?status=429")
    assert status == 200 and len(body["data"]) == 3
    assert {row["key_id"] for row in body["data"]} == {burst["limited_key"]}
    assert {row["error_code"] for row in body["data"]} == {"rate_limit_exceeded"}
    assert len(app.get("/admin/requests?status=4xx")[1]["data"]) == 4
    assert len(app.get(f"/admin/requests?key={burst['limited_key']}")[1]["data"]) == RPM + 3
    embeds = app.get("/admin/requests?model=fake/fake-embed&limit=2")[1]["data"]
    assert len(embeds) == 2 and {row["endpoint"] for row in embeds} == {"/v1/embeddings"}
    newest = app.get("/admin/requests?limit=1")[1]["data"][0]
    older = app.get(f"/admin/requests?limit=1&before={newest['id']}")[1]["data"][0]
    assert older["id"] < newest["id"]
    # No bodies unless [log] store_bodies: nothing in the rows, nothing in the database.
    assert all(row["request_body"] is None and row["response_body"] is None for row in embeds)
    with sqlite3.connect(app.data_dir / "appliance.db") as db:
        assert db.execute("SELECT count(*) FROM request_bodies").fetchone()[0] == 0
    for query, param in (("limit=0", "limit"), ("limit=abc", "limit"), ("status=6xx", "status"),
                         ("status=20", "status"), ("before=-1", "before"), ("colour=red", "colour")):
        status, body, _ = app.get(f"/admin/requests?{query}")
        assert status == 400, query
        assert body["error"]["param"] == param and body["error"]["code"] == "invalid_value"
    status, body, _ = app.get("/admin/requests", headers={"Authorization": f"Bearer {burst['limited_secret']}"})
    assert status == 403 and body["error"]["code"] == "endpoint_not_allowed"


def _assert_logged(app: Appliance, sent: int) -> None:
    assert len(app.get(f"/admin/requests?limit={sent + 10}")[1]["data"]) >= sent


def test_access_log_has_one_json_line_per_request_and_no_secrets(app: Appliance, burst: dict[str, Any]) -> None:
    lines = [json.loads(line) for line in app.log().splitlines() if line.startswith('{"time"')]
    proxied = [line for line in lines if line["path"].startswith("/v1/")]
    ids = {rid for _, _, rid in burst["results"]}
    assert ids <= {line["request_id"] for line in proxied}
    assert {line["status"] for line in proxied if line["request_id"] in ids} == {200, 404, 429}
    limited = [line for line in proxied if line.get("key_id") == burst["limited_key"]]
    assert len(limited) == RPM + 3 and all(line["method"] == "POST" for line in limited)
    assert any(line["path"] == "/health" for line in lines)  # not only the proxied requests
    log = app.log()
    assert ADMIN_KEY not in log and burst["limited_secret"] not in log and PROMPT not in log


def test_status_page_shows_the_real_appliance(app: Appliance, burst: dict[str, Any]) -> None:
    if not browser.available():
        pytest.skip("needs chromium (apt-get install chromium)")
    eventually(lambda: _assert_logged(app, burst["sent"]))
    time.sleep(1.1)  # past the per-worker /statsz cache
    result = browser.load_page(f"{app.url}/", screenshot=ARTIFACTS / "status-page-live.png",
                               wait_for_selector='body[data-state="loaded"] #sparkline polyline.requests')
    assert result.errors == []
    assert "fake" in result.text and "down" in result.text and "1/2 backends up" in result.text
    assert "rate_limit_exceeded" in result.text and "model_not_found" in result.text
    assert '<svg id="sparkline"' in result.html
    requests_shown = re.search(r"requests\n([\d,]+)", result.text)
    assert requests_shown and int(requests_shown.group(1).replace(",", "")) == burst["sent"]
    assert result.phone_scroll_width is not None and result.phone_scroll_width <= 375


def _outside_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, the kernel only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_bodies_when_asked_text_access_log_and_statsz_key_off_loopback(
        start_appliance: Callable[..., Appliance], fake_openai: Any) -> None:
    cfg = config(fake_openai)
    cfg["server"] = {"host": "0.0.0.0"}
    cfg["log"] = {"store_bodies": True, "max_body_kb": 1, "access": "text"}
    app = start_appliance(cfg, workers=1)
    client = sdk(app)
    client.chat.completions.create(**CHAT)
    with client.chat.completions.create(**CHAT, stream=True) as stream:
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the fake."
    long = {**CHAT, "messages": [{"role": "user", "content": "x" * 3000}]}
    client.chat.completions.create(**long)

    def rows() -> list[dict[str, Any]]:
        data = app.get("/admin/requests")[1]["data"]
        assert len(data) == 3
        return data

    cut, streamed, whole = eventually(rows)
    assert whole["request_body"] == CHAT and whole["response_body"]["choices"][0]["message"]["content"] == (
        "Hello from the fake.")
    assert whole["response_body"]["usage"]["prompt_tokens"] == 11 and not whole["body_truncated"]
    assert streamed["request_body"]["stream"] is True and streamed["response_body"] is None  # streams: request only
    assert cut["body_truncated"] and isinstance(cut["request_body"], str) and len(cut["request_body"]) == 1024
    lines = [line for line in app.log().splitlines() if '"POST /v1/chat/completions"' in line]
    assert len(lines) == 3 and all(" 200 " in line and "model=chat" in line for line in lines)
    assert ADMIN_KEY not in app.log() and PROMPT not in app.log()
    outside = _outside_address()
    if outside is None:
        return  # no non-loopback interface here: the loopback rule is all that can be seen
    url = f"http://{outside}:{app.port}/statsz"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).status_code == 200
    assert httpx.get(f"http://{outside}:{app.port}/status", timeout=10).status_code == 200  # the page itself
    if not browser.available():
        return
    asked = browser.load_page(f"http://{outside}:{app.port}/", screenshot=ARTIFACTS / "status-page-live-key.png",
                              wait_for_selector='body[data-state="need-key"] #key-form:not([hidden])')
    assert "needs an API key" in asked.text and "fake" not in asked.text
    assert [e for e in asked.errors if not (e.startswith("network:") and "/statsz" in e)] == []
    shown = browser.load_page(f"http://{outside}:{app.port}/", screenshot=ARTIFACTS / "status-page-live-keyed.png",
                              wait_for_selector='body[data-state="loaded"]', storage={"appliance-key": ADMIN_KEY})
    assert shown.errors == [] and "fake" in shown.text


def test_a_second_appliance_on_the_data_dir_leaves_the_metrics_alone(app: Appliance, burst: dict[str, Any]) -> None:
    before = eventually(lambda: _requests_counted(app, burst["sent"]))
    refused = app.cli("serve")
    assert refused.returncode == 1 and "already running" in refused.stderr
    assert len(list(metricsdir.base(app.data_dir).iterdir())) == 1  # the running one's folder, nothing else
    assert total(scrape(app), "appliance_requests_total") == before


def test_counters_survive_a_killed_worker_and_its_live_gauges_go(app: Appliance, burst: dict[str, Any]) -> None:
    """Last in the module: it kills a worker of the shared appliance (the watchdog replaces it)."""
    before = eventually(lambda: _requests_counted(app, burst["sent"]))
    pids = app.worker_pids(2)
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)

    def replaced() -> None:
        fresh = app.worker_pids(2, timeout=2)
        assert len(fresh) == 2 and victim not in fresh
        text = scrape(app)
        assert total(text, "appliance_workers") == 2  # not 3: the dead worker was marked dead
        assert total(text, "appliance_requests_total") == before  # its counts stay

    eventually(replaced, timeout=20)
    eventually(lambda: _assert_alive(app, 2))  # /statsz too, once its per-worker copy is renewed


def _assert_alive(app: Appliance, workers: int) -> None:
    assert app.get("/statsz")[1]["workers"]["alive"] == workers


def _requests_counted(app: Appliance, sent: int) -> float:
    counted = total(scrape(app), "appliance_requests_total")
    assert counted == sent
    return counted
