"""What a local model costs: each attempt charged its share of its backend's busy time, through the pipeline.

The pipeline runs with an injected wall clock (the Breakers' own) and a surface that moves it: no real time
passes that the test depends on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance.accounts.usage import NO_COST, ComputeRates, Tokens
from appliance.common.config import Settings
from appliance.common.errors import GatewayError
from appliance.core import pipeline
from appliance.core.catalog import Plan, Route
from appliance.core.exchange import Exchange, charge_from, compute_cost, record, usage_extras
from appliance.core.gateway import Gateway
from appliance.core.relay import Surface
from appliance.core.resilience import BackendTable, Breakers
from appliance.providers.base import CHAT, Call


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Writer:
    def __init__(self) -> None:
        self.entries: list[Any] = []

    def add_entry(self, entry: Any) -> None:
        self.entries.append(entry)


def gateway(clock: Clock) -> Gateway:
    settings = Settings.model_validate({
        "discovery": {"enabled": False},
        "routing": {"retry_base_s": 0, "retry_max_s": 0},
        "backends": [
            {"name": "gpu", "url": "http://127.0.0.1:9/v1", "discover": False, "models": ["m"], "cost_per_hour": 3600},
            {"name": "big", "url": "http://127.0.0.1:9/v1", "discover": False, "models": ["m"], "cost_per_hour": 7200},
            {"name": "free", "url": "http://127.0.0.1:9/v1", "discover": False, "models": ["m"]},
        ],
    })
    breakers = Breakers(BackendTable(16, shared=False), settings.routing, 0, clock)
    return Gateway(settings, None, None, Writer(), None, None, breakers, None)  # type: ignore[arg-type]


def exchange() -> Exchange:
    return Exchange("/v1/chat/completions", "req-1", "up-1", {}, body={"model": "m", "messages": []})


def test_rates_come_from_cost_per_hour_and_a_backend_without_one_costs_nothing() -> None:
    rates = ComputeRates(gateway(Clock()).settings.backends)
    assert rates.per_second("gpu") == 1.0 and rates.per_second("big") == 2.0
    assert rates.per_second("free") == 0.0 and rates.per_second("unknown") == 0.0
    assert ComputeRates([]).per_second("gpu") == 0.0


def test_a_failed_attempt_and_the_fallback_that_answers_are_both_charged() -> None:
    # gpu ($1/s) fails after 1 s; big ($2/s) answers after 2 s: 1 + 4 = $5, in the answer and the ledger.
    clock = Clock()
    gw = gateway(clock)
    x = exchange()
    seen: dict[str, Any] = {}

    async def answer(gw: Gateway, call: Call, x: Exchange, responder: Any) -> tuple[bytes, Tokens]:
        assert x.route is not None
        if x.route.backend == "gpu":
            clock.now += 1
            raise GatewayError("backend_unreachable", "gone")
        clock.now += 2
        compute_cost(gw, x)
        seen["usage"] = usage_extras(NO_COST, x, None)
        record(gw, x, 200, tokens=Tokens(3, 4))
        return b"{}", Tokens(3, 4)

    plan = Plan("m", (Route("m", "gpu", "m"), Route("m", "big", "m")), None)
    surface = Surface(answer, None)  # type: ignore[arg-type]
    asyncio.run(pipeline._dispatch(gw, CHAT, {"model": "m", "retries": 0}, plan, x, None, surface, None))  # type: ignore[arg-type]
    assert x.attempts == 2 and x.fallback_from is not None
    assert seen["usage"]["compute_cost_usd"] == pytest.approx(5.0)
    (entry,) = gw.writer.entries  # type: ignore[attr-defined]
    assert entry.row.compute_cost_usd == pytest.approx(5.0) and entry.row.backend == "big"
    assert gw.breakers.state("gpu")["busy_s"] == pytest.approx(1.0)
    assert gw.breakers.state("big")["busy_s"] == pytest.approx(2.0)


def test_two_overlapping_requests_each_pay_half_of_the_overlap() -> None:
    # A runs 0..2, B runs 1..3 on the $1/s backend: each pays 1 s alone + half of the 1 s they overlap.
    clock = Clock()
    gw = gateway(clock)
    a, b = exchange(), exchange()
    charge_from(gw, a, "gpu", gw.breakers.begin("gpu"))
    clock.now += 1
    charge_from(gw, b, "gpu", gw.breakers.begin("gpu"))
    clock.now += 1
    assert compute_cost(gw, a) == pytest.approx(1.5)
    gw.breakers.end("gpu")
    clock.now += 1
    assert compute_cost(gw, b) == pytest.approx(1.5)
    gw.breakers.end("gpu")
    assert compute_cost(gw, a) == pytest.approx(1.5)  # closed: nothing more accrues


def test_a_backend_without_cost_per_hour_reports_no_compute_cost() -> None:
    clock = Clock()
    gw = gateway(clock)
    x = exchange()
    charge_from(gw, x, "free", gw.breakers.begin("free"))
    clock.now += 5
    assert compute_cost(gw, x) is None and x.compute_open is None
    assert "compute_cost_usd" not in usage_extras(NO_COST, x, None)
    record(gw, x, 200, tokens=Tokens(1, 1))
    (entry,) = gw.writer.entries  # type: ignore[attr-defined]
    assert entry.row.compute_cost_usd is None
