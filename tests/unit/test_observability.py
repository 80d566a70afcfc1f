"""Observability pieces without a server: request-log retention, bounded metric labels, the access log,
who may read /statsz, and the exposition of one process's own metrics."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from appliance.common.config import Settings
from appliance.common.resources import migrations_dir
from appliance.core import timings
from appliance.core.gateway import Gateway
from appliance.observe import metrics
from appliance.observe.accesslog import AccessLog
from appliance.server.access import is_public
from appliance.storage import ledger, requests_repo
from appliance.storage.db import Database
from appliance.storage.migrate import migrate
from appliance.storage.writer import BufferedWriter

DAY = 86400.0
NOW = 1_800_000_000.0


def row(request_id: str, created_at: float, **fields: Any) -> requests_repo.RequestRecord:
    values: dict[str, Any] = dict.fromkeys(requests_repo.RequestRecord._fields)
    values.update(request_id=request_id, created_at=created_at, endpoint="/v1/chat/completions", status=200,
                  stream=False, latency_ms=1.0, estimated=False, **fields)
    return requests_repo.RequestRecord(**values)


async def _log_with(tmp_path: Path, ages_days: list[float]) -> tuple[Database, BufferedWriter]:
    path = tmp_path / "appliance.db"
    migrate(path, migrations_dir())
    db = await Database.open(path)
    writer = BufferedWriter(db, 60)
    for i, age in enumerate(ages_days):
        created = NOW - age * DAY
        writer.add_entry(ledger.Entry(row(f"req-{i}", created), ledger.bodies_of(b'{"a": 1}', None, 1024)))
    await writer.flush()
    return db, writer


async def _counts(db: Database) -> tuple[int, int]:
    requests = (await db.fetchall("SELECT count(*) FROM requests"))[0][0]
    bodies = (await db.fetchall("SELECT count(*) FROM request_bodies"))[0][0]
    return requests, bodies


async def _minutes(db: Database) -> int:
    return (await db.fetchall("SELECT count(*) FROM traffic_minute"))[0][0]


def test_sweep_drops_rows_and_bodies_older_than_the_cutoff_in_batches(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests_repo, "SWEEP_BATCH", 2)  # several rounds, each its own short transaction

    async def run() -> None:
        db, _ = await _log_with(tmp_path, [45, 40, 31, 29.9, 1, 0])
        try:
            removed = await requests_repo.sweep(db, NOW - 30 * DAY)
            assert removed == 3 * 2  # three requests rows, three bodies
            assert await _counts(db) == (3, 3)
            kept = [r["request_id"] for r in await requests_repo.search(db, limit=10)]
            assert kept == ["req-5", "req-4", "req-3"]
            assert await requests_repo.sweep(db, NOW - 30 * DAY) == 0  # a second sweep (another worker): harmless
        finally:
            await db.close()

    asyncio.run(run())


def test_the_gateway_sweeps_by_log_keep_days_with_an_injected_now(tmp_path: Path) -> None:
    settings = Settings.model_validate({"log": {"keep_days": 7}, "discovery": {"enabled": False}})

    async def run() -> None:
        db, _ = await _log_with(tmp_path, [10, 8, 6, 0.5])
        try:
            gateway = Gateway(settings, None, db, None, None, None, None, None)  # type: ignore[arg-type]
            await gateway.sweep(NOW)
            assert await _counts(db) == (2, 2) and await _minutes(db) == 2
            await gateway.sweep(NOW + 6 * DAY)  # a week after the newest but one
            assert await _counts(db) == (1, 1) and await _minutes(db) == 1
        finally:
            await db.close()

    asyncio.run(run())


def test_bodies_are_cut_to_the_limit_and_marked(tmp_path: Path) -> None:
    async def run() -> None:
        path = tmp_path / "appliance.db"
        migrate(path, migrations_dir())
        db = await Database.open(path)
        writer = BufferedWriter(db, 60)
        try:
            writer.add_entry(ledger.Entry(row("r1", NOW), ledger.bodies_of(b"x" * 5000, b'{"ok": true}', 100)))
            writer.add_entry(ledger.Entry(row("r2", NOW + 1)))  # no bodies stored for this one
            await writer.flush()
            r2, r1 = await requests_repo.search(db, limit=5, with_bodies=True)
            assert r1["request_body"] == b"x" * 100 and r1["response_body"] == b'{"ok": true}'
            assert r1["body_truncated"] is True
            assert r2["request_body"] is None and r2["body_truncated"] is False
        finally:
            await db.close()

    asyncio.run(run())


def test_model_labels_are_bounded_to_known_names() -> None:
    recorder = metrics.Recorder(per_key=False, known_model={"llama3", "fake/fake-chat"}.__contains__)
    assert recorder.model_label("llama3", None) == "llama3"
    assert recorder.model_label("fake/fake-chat", None) == "fake/fake-chat"
    assert recorder.model_label("claude-3-7-sonnet-20250219", "claude-*") == "claude-*"  # the alias pattern
    for sent in ("random-1", "random-2", "x" * 500, None):
        assert recorder.model_label(sent, None) == "other"


def test_endpoint_and_status_labels_are_bounded() -> None:
    assert metrics.endpoint_label("/v1/chat/completions") == "/v1/chat/completions"
    assert metrics.endpoint_label("/v1/responses/resp_123/input_items") == "/v1/responses/{id}"
    assert metrics.endpoint_label("/v1/whatever/" + "a" * 40) == "other"
    assert [metrics.status_class(s) for s in (200, 429, 499, 503, 0, 999)] == ["2xx", "4xx", "4xx", "5xx",
                                                                                 "other", "other"]


def test_catalog_knows_aliases_listed_models_and_backend_prefixed_names() -> None:
    from appliance.common.config import ModelSettings
    from appliance.core.catalog import Catalog
    from appliance.providers.base import ModelInfo

    catalog = Catalog([ModelSettings(name="chat", target="fake/fake-chat")])
    catalog.add_backend("fake", "openai")
    catalog.update("fake", models=[ModelInfo(id="fake-chat")])
    assert all(map(catalog.knows, ("chat", "fake-chat", "fake/fake-chat")))
    assert not any(map(catalog.knows, ("nope", "fake/nope", "other/fake-chat")))


def test_one_process_exposition_without_a_multiprocess_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.ENV, raising=False)
    recorder = metrics.Recorder(per_key=False, known_model=lambda name: name == "m")
    recorder.request_finished(endpoint="/v1/embeddings", model="m", backend="b", status=200, cache="MISS",
                              key=None, latency_s=0.01, overhead_s=0.001, ttft_s=None, prompt_tokens=3,
                              completion_tokens=0, cost_usd=0.5, retries=1, fell_back=True)
    live = metrics.LiveCollector(lambda: [("b", {"up": True, "state": "open"}), ("c", {"up": None,
                                                                                      "state": "closed"})])
    text = metrics.render(live, per_key=False).decode()
    assert ('appliance_requests_total{backend="b",cache="miss",endpoint="/v1/embeddings",model="m",'
            'status_class="2xx"}') in text
    assert 'appliance_backend_up{backend="b"} 1.0' in text and 'backend="c"} 1.0' not in text
    assert 'appliance_circuit_state{backend="b"} 1.0' in text and 'appliance_circuit_state{backend="c"} 0.0' in text
    assert "appliance_fallbacks_total" in text and "appliance_retries_total" in text


def _written(log: AccessLog, fields: dict[str, Any], read_fd: int) -> bytes:
    log.write(fields)
    return os.read(read_fd, 65536)


def test_access_log_lines_hold_no_secrets_and_stay_on_one_line() -> None:
    read_fd, write_fd = os.pipe()
    try:
        fields = {"time": NOW, "request_id": "r-1", "method": "POST", "path": "/v1/chat/completions",
                  "status": 200, "latency_ms": 12.5, "model": "evil\nmodel name", "key_id": "key_1",
                  "authorization": "Bearer sk-app-secret", "body": {"messages": "private"}}
        line = _written(AccessLog("json", write_fd), fields, read_fd)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        data = orjson.loads(line)
        assert data["time"] == "2027-01-15T08:00:00.000Z" and data["model"] == "evil\nmodel name"
        assert "authorization" not in data and "body" not in data
        text = _written(AccessLog("text", write_fd), fields, read_fd).decode()
        assert text.count("\n") == 1 and "sk-app-secret" not in text and "private" not in text
        assert text.startswith('2027-01-15T08:00:00.000Z - "POST /v1/chat/completions" 200 12.5ms')
        assert "model=evil\\nmodel\\x20name" in text and "key_id=key_1" in text and text.endswith("id=r-1\n")
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_closed_stdout_turns_the_access_log_off_instead_of_failing_requests() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    log = AccessLog("json", write_fd)
    try:
        log.write({"time": NOW, "path": "/health", "status": 200})  # EPIPE: noted once, then quiet
        log.write({"time": NOW, "path": "/health", "status": 200})
    finally:
        os.close(write_fd)


def _request(path: str, ip: str, public: bool) -> Any:
    settings = Settings.model_validate({"status": {"public": public}})
    return SimpleNamespace(path=path, ip=ip, app=SimpleNamespace(ctx=SimpleNamespace(settings=settings)))


def test_statsz_needs_a_key_off_loopback_unless_the_status_is_public() -> None:
    assert is_public(_request("/statsz", "127.0.0.1", public=False))
    assert is_public(_request("/statsz", "::1", public=False))
    assert not is_public(_request("/statsz", "192.168.1.20", public=False))
    assert is_public(_request("/statsz", "192.168.1.20", public=True))
    assert is_public(_request("/status", "192.168.1.20", public=False))  # the page itself: always
    assert not is_public(_request("/admin/requests", "127.0.0.1", public=True))


def test_percentiles_are_nearest_rank() -> None:
    ordered = [float(n) for n in range(1, 101)]
    assert timings.percentile(ordered, 0.5) == 50.0 and timings.percentile(ordered, 0.95) == 95.0
    assert timings.percentile([7.0], 0.95) == 7.0


def test_per_key_labels_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.ENV, raising=False)
    recorder = metrics.Recorder(per_key=True, known_model=lambda name: True)
    recorder.request_finished(endpoint="/v1/chat/completions", model="per-key-model", backend="b", status=429,
                              cache=None, key=("key_abc", "ci bot"), latency_s=0.001, overhead_s=None, ttft_s=None,
                              prompt_tokens=0, completion_tokens=0, cost_usd=0.0, retries=0, fell_back=False)
    with_keys = metrics.render(metrics.LiveCollector(list), per_key=True).decode()
    assert ('appliance_requests_total{backend="b",cache="none",endpoint="/v1/chat/completions",key_id="key_abc",'
            'key_name="ci bot",model="per-key-model",status_class="4xx"} 1.0') in with_keys
    assert "key_abc" not in metrics.render(metrics.LiveCollector(list), per_key=False).decode()


def test_the_admission_queue_depth_wait_and_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.ENV, raising=False)
    live = metrics.LiveCollector(lambda: [("slots", {"up": True, "state": "closed", "queued": 7})])
    metrics.Recorder(per_key=True, known_model=lambda name: True).admitted("slots", 0.25, ("key_fair", "fair"))
    metrics.Recorder(per_key=False, known_model=lambda name: True).admitted("slots", 0.5, None)
    with_keys = metrics.render(live, per_key=True).decode()
    assert 'appliance_admission_queue_depth{backend="slots"} 7.0' in with_keys
    assert 'appliance_admission_admitted_total{backend="slots",key_id="key_fair",key_name="fair"} 1.0' in with_keys
    assert 'appliance_admission_wait_seconds_count{backend="slots"} 2.0' in with_keys
    without = metrics.render(live, per_key=False).decode()
    assert 'appliance_admission_admitted_total{backend="slots"} 1.0' in without and "key_fair" not in without
