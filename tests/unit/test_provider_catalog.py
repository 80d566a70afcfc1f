"""The provider catalog (GET /v1/providers): its assembly from given states, prices and latencies, the ledger
sample behind the latencies, peeking at a strategy without moving it, and the key's view of the backends."""

from __future__ import annotations

import asyncio
import fnmatch
from pathlib import Path
from typing import Any

import pytest

from appliance.accounts.usage import FREE, Price, Prices
from appliance.common.config import ModelSettings, RoutingSettings, Settings
from appliance.common.errors import GatewayError
from appliance.common.resources import migrations_dir
from appliance.core import provider_catalog, timings
from appliance.core.catalog import Catalog
from appliance.core.gateway import Gateway
from appliance.core.resilience import BackendTable, Breakers
from appliance.core.routing import Selector, Target
from appliance.providers.base import ModelInfo
from appliance.storage import ledger, requests_repo, stats_repo
from appliance.storage.db import Database
from appliance.storage.migrate import migrate
from appliance.storage.writer import BufferedWriter

NOW = 1_800_000_000.0
A, B = Target("vllm", "qwen"), Target("ollama", "qwen2.5:7b")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def live(breaker: str = "closed", retry_after_s: float = 0.0, in_flight: int = 0, up: bool | None = True,
         load: dict[str, Any] | None = None) -> dict[str, Any]:
    """A backend as Breakers.state describes it."""
    return {"state": breaker, "consecutive_failures": 5 if breaker == "open" else 0, "opened_at": None,
            "retry_after_s": retry_after_s, "window_ok": 0, "window_fail": 0, "in_flight": in_flight, "load": load,
            "up": up, "probed_at": NOW}


def spread(p50: float, p95: float, samples: int) -> dict[str, float | int]:
    return {"p50": p50, "p95": p95, "samples": samples}


# ------------------------------------------------------------------------------------------ assembly


def test_every_target_with_its_price_latency_load_and_the_first_choice() -> None:
    prices = Prices([ModelSettings(name="vllm/qwen", input_per_mtok=0.5, output_per_mtok=1.5)])
    recent = timings.summarize([("vllm", "qwen", 100.0, 20.0), ("vllm", "qwen", 300.0, None),
                                ("vllm", "other", 900.0, None), ("ollama", "qwen2.5:7b", 50.0, 10.0)])
    load = {"queue_waiting": 2.0, "running": 1.0, "slots_idle": None, "slots_total": None, "age_s": 0.5}
    entries = provider_catalog.for_model(
        [A, B], [B, A], {"vllm": "vllm", "ollama": "ollama"},
        {"vllm": live(in_flight=3, load=load), "ollama": live()}, {A: 2, B: 0}, prices.of, recent)

    vllm, ollama = entries  # config order, whatever the try order
    assert vllm == {
        "object": "provider", "backend": "vllm", "model": "qwen", "first_choice": False, "rank": 2, "kind": "vllm",
        "up": True, "state": "ready", "breaker": {"state": "closed", "consecutive_failures": 0, "retry_after_s": 0.0},
        "available": True, "in_flight": 3, "load": load,
        "latency_ms": spread(100.0, 300.0, 2), "ttft_ms": spread(20.0, 20.0, 1),  # of this model, not "other"
        "model_in_flight": 2,
        "price": {"input_per_mtok": 0.5, "output_per_mtok": 1.5, "cached_input_per_mtok": 0.5},
    }
    assert ollama["first_choice"] is True and ollama["rank"] == 1
    assert ollama["price"] is None  # unpriced: null, not zeros
    assert ollama["latency_ms"] == spread(50.0, 50.0, 1) and ollama["ttft_ms"] == spread(10.0, 10.0, 1)


def test_the_first_choice_skips_a_target_whose_breaker_is_open() -> None:
    def first(states: dict[str, dict[str, Any]]) -> list[bool]:
        entries = provider_catalog.for_model([A, B], [A, B], {"vllm": "openai", "ollama": "ollama"}, states,
                                             {A: 0, B: 0}, lambda backend, model: FREE, timings.Timings())
        return [entry["first_choice"] for entry in entries]

    assert first({"vllm": live(), "ollama": live()}) == [True, False]
    opened = live("open", retry_after_s=12.5)
    assert first({"vllm": opened, "ollama": live()}) == [False, True]
    assert first({"vllm": live("open", retry_after_s=0.0), "ollama": live()}) == [True, False]  # a trial is due
    assert first({"vllm": opened, "ollama": live("half_open", retry_after_s=3.0)}) == [False, False]  # a 503 now


def test_no_samples_in_the_window_is_null_and_a_cached_price_of_its_own_is_shown() -> None:
    price = Price(input=3.0, output=15.0, cached_input=0.3)
    [entry] = provider_catalog.for_model([A], [A], {"vllm": "openai"}, {"vllm": live(up=None)}, {A: 0},
                                         lambda backend, model: price, timings.Timings())
    assert entry["latency_ms"] is None and entry["ttft_ms"] is None
    assert entry["up"] is None and entry["state"] == "starting"
    assert entry["price"] == {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cached_input_per_mtok": 0.3}


def test_the_listing_shows_every_backend_with_its_models_and_backend_wide_latency() -> None:
    recent = timings.summarize([("vllm", "a", 10.0, None), ("vllm", "b", 30.0, 5.0), ("vllm", None, 20.0, None)])
    entries = provider_catalog.listing([("vllm", "vllm", ["a", "b"]), ("down", "openai", [])],
                                       {"vllm": live(in_flight=1), "down": live(up=False)}, recent)
    assert [e["backend"] for e in entries] == ["vllm", "down"]
    assert entries[0]["models"] == ["a", "b"] and entries[0]["in_flight"] == 1
    assert entries[0]["latency_ms"] == spread(20.0, 30.0, 3) and entries[0]["ttft_ms"] == spread(5.0, 5.0, 1)
    assert entries[1]["state"] == "unreachable" and entries[1]["latency_ms"] is None
    assert "first_choice" not in entries[0] and "price" not in entries[0]


# ------------------------------------------------------------------------------------------ the ledger sample


def _row(request_id: str, created_at: float, **fields: Any) -> requests_repo.RequestRecord:
    values: dict[str, Any] = dict.fromkeys(requests_repo.RequestRecord._fields)
    values.update(request_id=request_id, created_at=created_at, endpoint="/v1/chat/completions", status=200,
                  stream=False, latency_ms=1.0, estimated=False, backend="vllm", backend_model="qwen")
    values.update(fields)
    return requests_repo.RequestRecord(**values)


def test_latency_and_ttft_come_from_a_bounded_sample_of_the_window(tmp_path: Path) -> None:
    rows = [
        _row("whole", NOW - 10, latency_ms=400.0, ttft_ms=400.0),  # a whole answer's ttft is its latency: left out
        _row("stream", NOW - 20, latency_ms=800.0, ttft_ms=90.0, stream=True),
        _row("failed", NOW - 30, latency_ms=5.0, status=502, error_code="backend_unreachable"),
        _row("hit", NOW - 5, latency_ms=1.0, cache="HIT"),  # the backend never saw it
        _row("limited", NOW - 5, latency_ms=2.0, status=429),
        _row("old", NOW - timings.WINDOW_S - 1, latency_ms=9999.0),
        _row("other", NOW - 40, latency_ms=50.0, backend="ollama", backend_model="llama3"),
        _row("refused", NOW - 1, latency_ms=3.0, backend=None, backend_model=None, status=401),
    ]

    async def run() -> None:
        path = tmp_path / "appliance.db"
        migrate(path, migrations_dir())
        db = await Database.open(path)
        try:
            writer = BufferedWriter(db, 60)
            for record in rows:
                writer.add_entry(ledger.Entry(record))
            await writer.flush()
            recent = await timings.recent(db, NOW)
            assert recent.of("vllm") == recent.of("vllm", "qwen")
            assert recent.of("vllm").latency_ms == spread(400.0, 800.0, 3)
            assert recent.of("vllm").ttft_ms == spread(90.0, 90.0, 1)
            assert recent.of("ollama", "llama3").latency_ms == spread(50.0, 50.0, 1)
            assert recent.of("ollama").ttft_ms is None and recent.of("nowhere") == timings.NONE
            newest = await timings.recent(db, NOW, sample=2)  # the newest two: "whole", then "stream"
            assert newest.of("vllm").latency_ms == spread(400.0, 800.0, 2)
            # Read newest first through the created_at index (no sort, no scan of the table): LIMIT rows at most.
            plan = [tuple(r) for r in await db.fetchall("EXPLAIN QUERY PLAN " + stats_repo.TIMINGS, (NOW, 5))]
            assert any("USING INDEX requests_created_at" in str(r) for r in plan), plan
            assert not any("TEMP B-TREE" in str(r) for r in plan), plan
        finally:
            await db.close()

    asyncio.run(run())


def test_the_summary_is_kept_for_its_ttl(tmp_path: Path) -> None:
    async def run() -> None:
        path = tmp_path / "appliance.db"
        migrate(path, migrations_dir())
        db = await Database.open(path)
        clock = Clock(NOW)
        try:
            cached = timings.RecentTimings(db, ttl_s=1.0, clock=clock)
            assert (await cached.get()).of("vllm") == timings.NONE
            writer = BufferedWriter(db, 60)
            writer.add_entry(ledger.Entry(_row("r1", NOW - 1, latency_ms=42.0)))
            await writer.flush()
            assert (await cached.get()).of("vllm") == timings.NONE  # within the ttl: the same summary
            clock.now += 1.0
            assert (await cached.get()).of("vllm").latency_ms == spread(42.0, 42.0, 1)
        finally:
            await db.close()

    asyncio.run(run())


# ------------------------------------------------------------------------------------------ peeking


@pytest.mark.parametrize("strategy", ["round_robin", "weighted", "least_latency"])
def test_a_peek_shows_the_next_order_without_moving_the_strategy(strategy: str) -> None:
    clock = Clock(1000.0)
    selector = Selector(clock=clock)
    targets = [A, B, Target("c", "m")]
    weights = [1.0, 3.0, 1.0] if strategy == "weighted" else None
    if strategy == "least_latency":
        for target, latency in zip(targets, (0.3, 0.1, 0.2), strict=True):
            selector.observe(target, latency, ok=True)
    for _ in range(7):
        peeked = [selector.order("r", targets, strategy, weights, peek=True) for _ in range(3)]
        assert peeked[0] == peeked[1] == peeked[2]
        if strategy == "least_latency":
            assert peeked[0] == [B, Target("c", "m"), A]  # the lowest EWMA first, no random exploration
            continue
        assert selector.order("r", targets, strategy, weights) == peeked[0]  # what the next request gets


def test_a_peek_at_least_latency_leaves_an_unsampled_target_due() -> None:
    clock = Clock(1000.0)
    selector = Selector(clock=clock)
    selector.observe(A, 0.1, ok=True)
    assert selector.order("r", [A, B], "least_latency", peek=True)[0] == B  # B has no sample: explored next
    assert selector.order("r", [A, B], "least_latency", peek=True)[0] == B
    assert selector.order("r", [A, B], "least_latency")[0] == B  # the real request explores it
    assert selector.order("r", [A, B], "least_latency", peek=True)[0] == A


def test_reading_in_flight_counts_claims_no_shared_row() -> None:
    table = BackendTable(4, shared=False)
    breakers = Breakers(table, RoutingSettings(), 0, Clock())
    for i in range(10):  # any name a client writes: none of them may use up the table
        assert breakers.in_flight("vllm", f"made-up-{i}") == 0
    assert not any(slot.tag for slot in table.slots)
    breakers.begin("vllm", "qwen")
    assert breakers.in_flight("vllm", "qwen") == 1 and breakers.in_flight("vllm") == 1


# ------------------------------------------------------------------------------------------ a key's view


def _patterns(*patterns: str) -> Any:
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _catalog() -> Catalog:
    catalog = Catalog([ModelSettings(name="chat", targets=["vllm/qwen", "ollama/qwen2.5:7b"])])
    catalog.add_backend("vllm", "vllm")
    catalog.add_backend("ollama", "ollama")
    catalog.add_backend("idle", "openai")
    catalog.update("vllm", models=[ModelInfo("qwen"), ModelInfo("embed")])
    catalog.update("ollama", models=[ModelInfo("qwen2.5:7b"), ModelInfo("llama3.2:latest", aliases=("llama3.2",))])
    return catalog


def test_a_key_sees_the_backends_of_the_models_it_may_use() -> None:
    catalog = _catalog()
    assert catalog.served(None) == {"vllm": ["qwen", "embed"], "ollama": ["qwen2.5:7b", "llama3.2:latest"],
                                    "idle": []}
    assert catalog.served(_patterns("chat")) == {"vllm": ["qwen"], "ollama": ["qwen2.5:7b"]}  # the alias's targets
    assert catalog.served(_patterns("llama3.2")) == {"ollama": ["llama3.2:latest"]}  # by an alias of the model
    assert catalog.served(_patterns("vllm/*")) == {"vllm": ["qwen", "embed"]}
    assert catalog.served(_patterns("nothing")) == {}


def _settings() -> Settings:
    return Settings.model_validate({
        "discovery": {"enabled": False},
        "backends": [{"name": "vllm", "url": "http://127.0.0.1:9/v1", "discover": False, "models": ["qwen"]},
                     {"name": "ollama", "url": "http://127.0.0.1:9/v1", "discover": False,
                      "models": ["qwen2.5:7b", "llama3"]}],
        "models": [{"name": "chat", "targets": ["vllm/qwen", "ollama/qwen2.5:7b"], "strategy": "round_robin"},
                   {"name": "ollama/qwen2.5:7b", "input_per_mtok": 0.2, "output_per_mtok": 0.6}],
    })


def test_built_from_a_gateway_for_a_model_a_key_and_every_backend() -> None:
    settings = _settings()
    breakers = Breakers(BackendTable(16, shared=False), settings.routing, 0, Clock())
    none = timings.Timings()

    gateway = Gateway(settings, None, None, None, None, None, breakers, None)  # type: ignore[arg-type]

    def firsts() -> list[bool]:
        return [e["first_choice"] for e in provider_catalog.build(gateway, "chat", None, none)["data"]]

    answer = provider_catalog.build(gateway, "chat", None, none)
    assert {k: answer[k] for k in ("object", "model", "route", "strategy", "window_s")} == {
        "object": "list", "model": "chat", "route": "chat", "strategy": "round_robin", "window_s": 300}
    assert [(e["backend"], e["model"], e["rank"], e["first_choice"]) for e in answer["data"]] == [
        ("vllm", "qwen", 1, True), ("ollama", "qwen2.5:7b", 2, False)]
    assert answer["data"][1]["price"]["input_per_mtok"] == 0.2 and answer["data"][0]["price"] is None
    # Asking moved nothing: the next request goes to the first choice, and the one after elsewhere.
    assert firsts() == [True, False]
    plan = gateway.catalog.plan("chat")
    targets = [Target(r.backend, r.upstream_model) for r in plan.routes]
    assert gateway.order(plan, targets)[0] == Target("vllm", "qwen")
    assert firsts() == [False, True]
    for _ in range(settings.routing.breaker_failures):
        breakers.record("ollama", ok=False)
    assert firsts() == [True, False]  # ollama's turn, but its breaker is open

    forced = provider_catalog.build(gateway, "ollama/llama3", None, none)
    assert forced["route"] == "ollama/llama3" and forced["strategy"] == "fallback"
    assert [(e["backend"], e["model"]) for e in forced["data"]] == [("ollama", "llama3")]

    everything = provider_catalog.build(gateway, None, None, none)
    assert everything["model"] is None and everything["route"] is None
    assert [(e["backend"], e["models"]) for e in everything["data"]] == [
        ("vllm", ["qwen"]), ("ollama", ["qwen2.5:7b", "llama3"])]

    only_llama = _patterns("llama3")
    listed = provider_catalog.build(gateway, None, only_llama, none)["data"]
    assert [(e["backend"], e["models"]) for e in listed] == [("ollama", ["llama3"])]
    with pytest.raises(GatewayError) as refused:
        provider_catalog.build(gateway, "chat", only_llama, none)
    assert refused.value.status == 403 and refused.value.code == "model_not_allowed"
    with pytest.raises(GatewayError) as unknown:
        provider_catalog.build(gateway, "no-such-model", only_llama, none)
    assert unknown.value.status == 404 and unknown.value.param == "model"
    assert "llama3" in unknown.value.message and "qwen" not in unknown.value.message
