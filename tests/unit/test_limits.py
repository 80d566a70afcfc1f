"""Limit math with a fake clock: sliding windows, concurrency, budgets and their periods."""

from __future__ import annotations

import datetime as dt
import multiprocessing

import pytest

from appliance.accounts.limits import (
    Limiter,
    ModelScopes,
    Scope,
    SharedTable,
    duration,
    period_end,
    period_of,
    period_start_day,
)
from appliance.common.config import ModelSettings
from appliance.common.errors import GatewayError


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, worker: int = 0, table: SharedTable | None = None, window_s: float = 60) -> Limiter:
    return Limiter(table or SharedTable(8, shared=False), window_s, worker, clock)


def refused(call: object) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call()  # type: ignore[operator]
    return info.value


def test_rpm_slides_over_the_window_and_says_when_to_retry() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_a", 0, rpm=3)
    for _ in range(3):
        lim.admit((scope,), tokens=0, cost=0)
        clock.now += 10
    error = refused(lambda: lim.admit((scope,), tokens=0, cost=0))
    assert error.status == 429 and error.code == "rate_limit_exceeded"
    # The first request leaves the window 60 s after it came, 30 s from now.
    assert 29 <= error.extra["retry_after"] <= 31 and error.headers["Retry-After"] == str(error.extra["retry_after"])
    clock.now += 31
    lim.admit((scope,), tokens=0, cost=0)


def test_windows_are_shared_by_every_limiter_on_the_table() -> None:
    clock, table = Clock(), SharedTable(4, shared=False)
    one, two = limiter(clock, 0, table), limiter(clock, 1, table)
    scope = Scope("key_a", 1, rpm=2)
    one.admit((scope,), tokens=0, cost=0)
    two.admit((scope,), tokens=0, cost=0)
    refused(lambda: one.admit((scope,), tokens=0, cost=0))


def test_a_refusal_counts_nothing_in_any_scope() -> None:
    clock = Clock()
    lim = limiter(clock)
    key, model = Scope("key_a", 0, rpm=10), Scope("model:m", 1, rpm=1)
    lim.admit((key, model), tokens=0, cost=0)
    refused(lambda: lim.admit((key, model), tokens=0, cost=0))
    assert lim.budget_state(key)["requests_in_window"] == 1


def test_tpm_takes_the_estimate_then_settles_to_real_usage() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_a", 0, tpm=100)
    admission = lim.admit((scope,), tokens=10, cost=0)
    assert lim.budget_state(scope)["tokens_in_window"] == 10
    lim.settle(admission, tokens=70, cost=0)
    assert lim.budget_state(scope)["tokens_in_window"] == 70
    error = refused(lambda: lim.admit((scope,), tokens=40, cost=0))
    assert error.extra["limit"] == "tokens"
    too_big = refused(lambda: lim.admit((scope,), tokens=101, cost=0))
    assert too_big.headers["x-should-retry"] == "false"  # no wait makes it fit


def test_cache_hits_count_requests_but_not_tokens() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_a", 0, rpm=5, tpm=10, budget_tokens=10, budget_period="day")
    admission = lim.admit((scope,), tokens=50, cost=0, counts_tokens=False)
    lim.settle(admission, tokens=50, cost=0)
    state = lim.budget_state(scope)
    assert state["requests_in_window"] == 1 and state["tokens_in_window"] == 0 and state["spent_tokens"] == 0


def test_concurrency_is_summed_over_workers_and_released_on_settle() -> None:
    clock, table = Clock(), SharedTable(2, shared=False)
    one, two = limiter(clock, 0, table), limiter(clock, 1, table)
    scope = Scope("key_a", 0, max_concurrent=2)
    a = one.admit((scope,), tokens=0, cost=0)
    two.admit((scope,), tokens=0, cost=0)
    assert refused(lambda: one.admit((scope,), tokens=0, cost=0)).extra["limit"] == "concurrency"
    one.settle(a, tokens=0, cost=0)
    one.settle(a, tokens=0, cost=0)  # settling twice releases once
    one.admit((scope,), tokens=0, cost=0)
    refused(lambda: two.admit((scope,), tokens=0, cost=0))
    two.forget_worker()  # a restarted worker drops its dead predecessor's count
    two.admit((scope,), tokens=0, cost=0)


def test_usd_budget_reserves_then_settles_and_free_requests_always_pass() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_a", 0, budget_usd=1.0, budget_period="day")
    admission = lim.admit((scope,), tokens=10, cost=0.6)
    error = refused(lambda: lim.admit((scope,), tokens=10, cost=0.6))  # 0.6 reserved + 0.6 > 1
    assert error.code == "budget_exceeded" and error.headers["x-should-retry"] == "false"
    lim.settle(admission, tokens=10, cost=0.9)
    refused(lambda: lim.admit((scope,), tokens=1, cost=0.2))
    lim.admit((scope,), tokens=1000, cost=0.0)  # a $0 model is never blocked by a USD budget
    state = lim.budget_state(scope)
    assert state["spent_usd"] == 0.9 and state["remaining_usd"] == pytest.approx(0.1)


def test_a_compute_budget_counts_compute_cost_not_token_prices() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_c", 0, budget_usd=1.0, budget_period="day", budget_counts="compute")
    # The token-price estimate is neither reserved nor checked: $5 of tokens passes a $1 compute budget.
    first = lim.admit((scope,), tokens=10, cost=5.0, compute=True)
    lim.settle(first, tokens=10, cost=5.0, compute_cost=0.4)
    assert lim.budget_state(scope)["spent_usd"] == pytest.approx(0.4)
    second = lim.admit((scope,), tokens=10, cost=5.0, compute=True)  # $0.6 left: compute is unknown, admitted
    lim.settle(second, tokens=10, cost=5.0, compute_cost=0.7)  # it ran over: what it used is spent all the same
    error = refused(lambda: lim.admit((scope,), tokens=10, cost=0.0, compute=True))
    assert error.code == "budget_exceeded" and error.status == 429
    # A backend without a cost_per_hour costs this budget nothing: never blocked by it.
    lim.admit((scope,), tokens=10, cost=5.0, compute=False)
    assert lim.budget_state(scope)["remaining_usd"] == 0


def test_a_budget_that_counts_both_adds_prices_and_compute() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_b", 0, budget_usd=1.0, budget_period="day", budget_counts="both")
    admission = lim.admit((scope,), tokens=10, cost=0.3, compute=True)
    refused(lambda: lim.admit((scope,), tokens=10, cost=0.8, compute=False))  # 0.3 reserved + 0.8 > 1
    lim.settle(admission, tokens=10, cost=0.3, compute_cost=0.2)
    assert lim.budget_state(scope)["spent_usd"] == pytest.approx(0.5)
    refused(lambda: lim.admit((scope,), tokens=10, cost=0.6, compute=False))
    third = lim.admit((scope,), tokens=10, cost=0.4, compute=True)  # its price fits, $0.1 left for compute
    lim.admit((scope,), tokens=10, cost=0.0, compute=True)  # something is left: a compute-only request passes
    lim.settle(third, tokens=10, cost=0.4, compute_cost=0.2)
    refused(lambda: lim.admit((scope,), tokens=10, cost=0.0, compute=True))  # $1.1 spent


def test_a_price_budget_ignores_compute_cost() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_p", 0, budget_usd=1.0, budget_period="day")
    admission = lim.admit((scope,), tokens=10, cost=0.5, compute=True)
    lim.settle(admission, tokens=10, cost=0.5, compute_cost=100.0)
    assert lim.budget_state(scope)["spent_usd"] == pytest.approx(0.5)
    lim.admit((scope,), tokens=10, cost=0.0, compute=True)  # free tokens: a price budget never blocks


def test_budgets_reset_with_the_calendar_period() -> None:
    clock = Clock(dt.datetime(2026, 3, 31, 23, 59, tzinfo=dt.UTC).timestamp())
    lim = limiter(clock)
    scope = Scope("key_a", 0, budget_tokens=100, budget_period="month")
    lim.settle(lim.admit((scope,), tokens=100, cost=0), tokens=100, cost=0)
    refused(lambda: lim.admit((scope,), tokens=1, cost=0))
    clock.now += 120  # April
    lim.admit((scope,), tokens=1, cost=0)


def test_preloaded_spend_counts_toward_the_budget() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_a", 0, budget_usd=5, budget_period="week")
    lim.preload(scope, spent_usd=4.5, spent_tokens=0)
    refused(lambda: lim.admit((scope,), tokens=1, cost=1))


def test_a_slot_taken_by_a_new_owner_starts_from_zero() -> None:
    clock = Clock()
    lim = limiter(clock)
    old = Scope("key_old", 0, rpm=1, max_concurrent=1)
    admission = lim.admit((old,), tokens=0, cost=0)
    new = Scope("key_new", 0, rpm=1, max_concurrent=1)
    lim.admit((new,), tokens=0, cost=0)
    lim.settle(admission, tokens=0, cost=0)  # the old owner's late settle leaves the new one alone
    assert lim.budget_state(new)["requests_in_window"] == 1
    refused(lambda: lim.admit((new,), tokens=0, cost=0))


def test_ratelimit_headers_follow_openai() -> None:
    clock = Clock()
    lim = limiter(clock)
    scope = Scope("key_a", 0, rpm=60, tpm=1000)
    admission = lim.admit((scope,), tokens=100, cost=0, headers_for=scope)
    assert admission.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1m0s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "1m0s",
    }


def test_short_windows_for_tests() -> None:
    clock = Clock()
    lim = limiter(clock, window_s=2)
    scope = Scope("key_a", 0, rpm=1)
    lim.admit((scope,), tokens=0, cost=0)
    assert "per 2 s" in refused(lambda: lim.admit((scope,), tokens=0, cost=0)).message
    clock.now += 2.1
    lim.admit((scope,), tokens=0, cost=0)


def test_duration_strings() -> None:
    assert [duration(s) for s in (0.25, 1.5, 59, 360, 61.4)] == ["250ms", "1.5s", "59s", "6m0s", "1m1s"]


def test_calendar_periods() -> None:
    sunday = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC).timestamp()
    assert period_start_day("day", sunday) == "2026-11-22"
    assert period_start_day("week", sunday) == "2026-11-16"  # weeks start on Monday
    assert period_start_day("month", sunday) == "2026-11-01"
    assert period_end("month", dt.datetime(2026, 12, 5, tzinfo=dt.UTC).timestamp()) == \
        dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()
    monday = dt.datetime(2026, 11, 23, tzinfo=dt.UTC).timestamp()
    assert period_of("week", monday) == period_of("week", sunday) + 1
    assert period_of("week", monday - 1) == period_of("week", sunday)


def test_model_scopes_match_the_served_model() -> None:
    scopes = ModelScopes([ModelSettings(name="chat", target="vllm/qwen", rpm=5), ModelSettings(name="llama3", rpm=2),
                          ModelSettings(name="free")], first_slot=100)
    assert len(scopes) == 2
    assert scopes.of("vllm", "qwen").slot == 100 and scopes.of("vllm", "qwen").rpm == 5
    assert scopes.of("ollama", "llama3").slot == 101
    assert scopes.of("ollama", "free") is None


def _admit_in_child(table: SharedTable, scope: Scope, now: float) -> None:
    Limiter(table, 60, worker=1, clock=lambda: now).admit((scope,), tokens=5, cost=0)


def test_a_forked_worker_counts_in_the_same_memory() -> None:
    clock, table = Clock(), SharedTable(2)
    scope = Scope("key_a", 1, rpm=2, max_concurrent=5)
    child = multiprocessing.get_context("fork").Process(target=_admit_in_child, args=(table, scope, clock.now))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    lim = limiter(clock, 0, table)
    lim.admit((scope,), tokens=0, cost=0)
    assert refused(lambda: lim.admit((scope,), tokens=0, cost=0)).extra["limit"] == "requests"
