"""Retries, backoff, Retry-After, circuit breakers across processes, in-flight counts and load signals."""

from __future__ import annotations

import email.utils
import multiprocessing
import random
import sys
from typing import Any

import pytest

from appliance.common.config import RoutingSettings
from appliance.common.errors import GatewayError, upstream_error
from appliance.core.resilience import (
    BackendTable,
    Breakers,
    backoff,
    breaker_failure,
    retry_after_of,
    retryable,
    retryable_status,
)
from appliance.providers.load import Load, parse_llamacpp_metrics, parse_llamacpp_slots, parse_vllm_metrics

NOW = 1_800_000_000.0
SETTINGS = RoutingSettings(breaker_failures=3, breaker_failure_rate=0.5, breaker_min_requests=10,
                           breaker_window_s=30, breaker_cooldown_s=15, probe_interval_s=1)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def breakers(clock: Clock, table: BackendTable | None = None, worker: int = 0,
             settings: RoutingSettings = SETTINGS) -> Breakers:
    return Breakers(table or BackendTable(16, shared=False), settings, worker, clock)


# ---------------------------------------------------------------------------------------- what to retry


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    assert retryable_status(status)
    assert retryable(upstream_error(status, b"oops", "vllm"))
    assert retryable(upstream_error(status, b'{"error": {"message": "x", "type": "server_error"}}', "vllm"))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 409, 413, 422, 501, 505])
def test_other_statuses_are_final(status: int) -> None:
    assert not retryable_status(status)
    assert not retryable(upstream_error(status, b'{"error": {"message": "no", "type": "invalid_request_error"}}',
                                        "vllm"))


@pytest.mark.parametrize("code", ["backend_unreachable", "backend_timeout", "backend_overloaded"])
def test_transport_failures_are_retryable(code: str) -> None:
    assert retryable(GatewayError(code, "down"))


def test_the_gateways_own_refusals_are_final() -> None:
    limiter_429 = GatewayError("rate_limit_exceeded", "slow down", status=429, extra={"limit": "requests"})
    assert not retryable(limiter_429)
    assert retryable(GatewayError("rate_limit_exceeded", "upstream says slow down", status=429))
    for code in ("budget_exceeded", "unsupported", "no_healthy_backend", "shutting_down", "client_closed",
                 "invalid_value", "context_length_exceeded", "state_unavailable"):
        assert not retryable(GatewayError(code, "no"))
        assert not breaker_failure(GatewayError(code, "no"))  # the shared state down is no backend's fault
    assert not retryable(GatewayError("backend_error", "no", status=503, headers={"X-Should-Retry": "false"}))
    assert retryable(GatewayError("backend_error", "non-JSON answer"))  # 502


def test_what_counts_against_the_breaker() -> None:
    assert breaker_failure(GatewayError("backend_unreachable", "down"))
    assert breaker_failure(upstream_error(503, b"busy", "vllm"))
    assert not breaker_failure(upstream_error(429, b"slow down", "vllm"))  # up, and said when to come back
    assert not breaker_failure(upstream_error(400, b"bad", "vllm"))  # the request's fault


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    rng = random.Random(3)
    for attempt, ceiling in ((0, 0.25), (1, 0.5), (2, 1.0), (3, 2.0), (6, 8.0), (200, 8.0)):
        delays = [backoff(attempt, base_s=0.25, max_s=8, retry_after_s=None, rng=rng) for _ in range(2000)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.95 * ceiling and min(delays) < 0.05 * ceiling  # spread over the whole range
        assert sum(delays) / len(delays) == pytest.approx(ceiling / 2, rel=0.1)


def test_backoff_waits_at_least_retry_after_up_to_the_cap() -> None:
    rng = random.Random(3)
    assert all(backoff(0, base_s=0.25, max_s=8, retry_after_s=2.0, rng=rng) == 2.0 for _ in range(100))
    assert backoff(0, base_s=0.25, max_s=8, retry_after_s=30.0, rng=rng) == 8.0
    assert backoff(5, base_s=1, max_s=60, retry_after_s=0.5, rng=random.Random(1)) >= 0.5
    assert backoff(0, base_s=0, max_s=8, retry_after_s=None, rng=rng) == 0.0


def test_retry_after_in_its_three_spellings() -> None:
    assert retry_after_of({"Retry-After": "3"}) == 3.0
    assert retry_after_of({"retry-after": "1.5"}) == 1.5
    assert retry_after_of({"Retry-After": "3", "retry-after-ms": "2500"}) == 2.5  # the precise one wins
    assert retry_after_of({"retry-after-ms": "junk", "Retry-After": "4"}) == 4.0
    date = email.utils.formatdate(NOW + 20, usegmt=True)
    assert retry_after_of({"Retry-After": date}, now=NOW) == pytest.approx(20, abs=1)
    past = email.utils.formatdate(NOW - 20, usegmt=True)
    assert retry_after_of({"Retry-After": past}, now=NOW) == 0.0
    assert retry_after_of({"Retry-After": "soon"}) is None
    assert retry_after_of({"Retry-After": "-1"}) is None
    assert retry_after_of({"Content-Type": "application/json"}) is None


# ---------------------------------------------------------------------------------------- breakers


def test_consecutive_failures_open_the_breaker() -> None:
    clock = Clock()
    br = breakers(clock)
    for _ in range(2):
        br.record("vllm", ok=False)
    br.record("vllm", ok=True)  # a success resets the run
    for _ in range(2):
        br.record("vllm", ok=False)
    assert br.allow("vllm") and br.state("vllm")["state"] == "closed"
    br.record("vllm", ok=False)
    state = br.state("vllm")
    assert state["state"] == "open" and state["consecutive_failures"] == 3 and state["opened_at"] == NOW
    assert state["retry_after_s"] == 15 and (state["window_ok"], state["window_fail"]) == (1, 5)
    assert not br.allow("vllm")
    assert br.allow("ollama")  # breakers are per backend


def test_failure_rate_opens_only_with_enough_requests_in_the_window() -> None:
    clock = Clock()
    br = breakers(clock)
    for i in range(8):  # alternate: never 3 in a row, 50 % failures
        br.record("b", ok=i % 2 == 1)
        clock.now += 1
    assert br.state("b")["state"] == "closed"  # 8 requests < breaker_min_requests
    br.record("b", ok=True)
    br.record("b", ok=False)  # 10 requests, 5 failed: 50 %
    assert br.state("b")["state"] == "open"


def test_the_failure_rate_window_slides() -> None:
    clock = Clock()
    br = breakers(clock)
    for _ in range(3):
        br.record("b", ok=False)
        br.record("b", ok=False)
        br.record("b", ok=True)
    clock.now += 31  # those left the window (with them it would be 8 failures in 16: open)
    for _ in range(5):
        br.record("b", ok=True)
    br.record("b", ok=False)
    br.record("b", ok=False)
    state = br.state("b")
    assert state["state"] == "closed" and (state["window_ok"], state["window_fail"]) == (5, 2)


def test_cooldown_then_one_trial_whose_success_closes() -> None:
    clock = Clock()
    br, other = breakers(clock), None
    for _ in range(3):
        br.record("b", ok=False)
    clock.now += 14.9
    assert not br.allow("b")
    clock.now += 0.2
    other = Breakers(br._table, SETTINGS, 1, clock)  # another worker on the same table
    assert br.allow("b")  # the trial
    assert br.state("b")["state"] == "half_open"
    assert not other.allow("b") and not br.allow("b")  # only one trial
    br.record("b", ok=True)
    state = other.state("b")
    assert state["state"] == "closed" and state["consecutive_failures"] == 0 and state["window_fail"] == 0
    assert other.allow("b") and br.allow("b")


def test_a_failed_trial_reopens_for_a_fresh_cooldown() -> None:
    clock = Clock()
    br = breakers(clock)
    for _ in range(3):
        br.record("b", ok=False)
    clock.now += 15
    assert br.allow("b")
    clock.now += 2
    br.record("b", ok=False)
    state = br.state("b")
    assert state["state"] == "open" and state["opened_at"] == NOW + 17 and state["retry_after_s"] == 15
    clock.now += 14
    assert not br.allow("b")
    clock.now += 1
    assert br.allow("b")


def test_a_trial_that_never_reports_expires_after_a_cooldown() -> None:
    clock = Clock()
    br = breakers(clock)
    for _ in range(3):
        br.record("b", ok=False)
    clock.now += 15
    assert br.allow("b")  # this trial's worker dies
    clock.now += 10
    assert not br.allow("b") and br.state("b")["retry_after_s"] == 5
    clock.now += 5
    assert br.allow("b")  # a new trial
    assert not br.allow("b")


def test_stragglers_while_open_do_not_change_the_state() -> None:
    clock = Clock()
    br = breakers(clock)
    for _ in range(3):
        br.record("b", ok=False)
    clock.now += 5
    br.record("b", ok=True)
    br.record("b", ok=False)
    state = br.state("b")
    assert state["state"] == "open" and state["opened_at"] == NOW and state["retry_after_s"] == 10


def test_retry_after_is_the_soonest_among_the_backends() -> None:
    clock = Clock()
    br = breakers(clock)
    for _ in range(3):
        br.record("a", ok=False)
    clock.now += 10
    for _ in range(3):
        br.record("b", ok=False)
    assert br.retry_after(["a", "b"]) == 5
    assert br.retry_after(["b"]) == 15
    assert br.retry_after([]) == SETTINGS.breaker_cooldown_s


def test_a_full_table_leaves_new_backends_without_a_breaker() -> None:
    clock = Clock()
    br = breakers(clock, BackendTable(2, shared=False))
    for name in ("a", "b", "c"):
        for _ in range(3):
            br.record(name, ok=False)
    assert not br.allow("a") and not br.allow("b")
    assert br.allow("c") and br.state("c")["state"] == "closed"
    br.begin("c")
    assert br.busy("c") == 0


def _fail_in_child(table: BackendTable, now: float) -> None:
    br = Breakers(table, SETTINGS, worker=1, clock=lambda: now)
    for _ in range(3):
        br.record("vllm", ok=False)
    br.begin("llamacpp")
    br.begin("llamacpp")


def _trial_in_child(table: BackendTable, now: float) -> None:
    sys.exit(0 if Breakers(table, SETTINGS, worker=1, clock=lambda: now).allow("vllm") else 3)


def _run(target: Any, *args: Any) -> int | None:
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(60)
    return child.exitcode


def test_breakers_and_in_flight_are_shared_with_a_forked_worker() -> None:
    clock, table = Clock(), BackendTable(32)
    br = breakers(clock, table)
    br.begin("llamacpp")
    assert _run(_fail_in_child, table, clock.now) == 0
    assert br.state("vllm")["state"] == "open" and not br.allow("vllm")
    assert br.in_flight("llamacpp") == 3 and br.busy("llamacpp") == 3
    # After the cooldown the other process takes the one trial; this one is refused.
    assert _run(_trial_in_child, table, clock.now + 15) == 0
    clock.now += 15
    assert br.state("vllm")["state"] == "half_open" and not br.allow("vllm")
    br.record("vllm", ok=True)  # the trial's outcome, reported from any process, closes it
    assert br.allow("vllm")


# ---------------------------------------------------------------------------------------- in flight and load


def test_in_flight_counts_across_workers_and_forget_worker() -> None:
    clock, table = Clock(), BackendTable(16, shared=False)
    one, two = breakers(clock, table, 0), breakers(clock, table, 1)
    one.begin("b")
    two.begin("b")
    two.begin("b")
    assert one.busy("b") == 3 and two.in_flight("b") == 3 and one.state("b")["in_flight"] == 3
    one.end("b")
    one.end("b")  # never below zero
    assert two.busy("b") == 2
    restarted = breakers(clock, table, 1)
    restarted.forget_worker()  # the worker in column 1 died with 2 in flight
    assert one.busy("b") == 0


def test_in_flight_per_model_ranks_targets_on_one_backend() -> None:
    clock = Clock()
    br = breakers(clock)
    br.begin("ollama", "llama3")
    br.begin("ollama", "llama3")
    br.begin("ollama", "qwen")
    assert br.busy("ollama", "llama3") == 2 and br.busy("ollama", "qwen") == 1 and br.busy("ollama") == 3
    assert br.busy("ollama", "phi") == 0 and br.in_flight("ollama", "qwen") == 1
    br.end("ollama", "llama3")
    assert br.busy("ollama", "llama3") == 1 and br.in_flight("ollama") == 2
    br.set_load("ollama", Load(running=5))  # a fresh sample is server-wide: it ranks the backend as a whole
    assert br.busy("ollama", "qwen") == br.busy("ollama") == 5


def test_busy_combines_in_flight_with_a_fresh_load_sample() -> None:
    clock = Clock()
    br = breakers(clock)  # load samples go stale after 3 probe intervals: 3 s here
    br.begin("vllm")
    br.set_load("vllm", Load(queue_waiting=4, running=6))
    assert br.busy("vllm") == 14  # max(6 + 4, 1) + 4: queued requests count twice
    br.set_load("vllm", Load(queue_waiting=0, running=0))
    assert br.busy("vllm") == 1  # the sample lags: never less than our own in flight
    br.set_load("llamacpp", Load(running=3, slots_idle=1, slots_total=4))
    assert br.busy("llamacpp") == 0.75  # busy slots fraction
    br.set_load("llamacpp", Load(queue_waiting=2, running=4, slots_idle=0, slots_total=4))
    assert br.busy("llamacpp") == 2.0  # (4 + 2 + 2) / 4: over 1 means queueing
    clock.now += 3.5
    assert br.busy("llamacpp") == 0 and br.busy("vllm") == 1  # stale: in flight only
    assert br.state("llamacpp")["load"] == {"queue_waiting": 2.0, "running": 4.0, "slots_idle": 0,
                                            "slots_total": 4, "age_s": 3.5}
    assert br.state("ollama")["load"] is None


def test_a_stamped_sample_keeps_its_time() -> None:
    clock = Clock()
    br = breakers(clock)
    br.set_load("b", Load(running=2, sampled_at=NOW - 10))
    assert br.busy("b") == 0


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen2.5-7B-Instruct"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 4.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen2.5-7B-Instruct"} 1.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct",reason="capacity"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 0.42
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 123456.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="Qwen/Qwen2.5-7B-Instruct"} 2.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 17.0
"""

LLAMACPP_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 5120
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 812.5
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 1.75
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 3
"""

LLAMACPP_SLOTS = [
    {"id": 0, "id_task": 412, "n_ctx": 4096, "speculative": False, "is_processing": True,
     "params": {"n_predict": -1, "temperature": 0.8, "stream": True},
     "next_token": {"has_next_token": True, "has_new_line": False, "n_remain": -1, "n_decoded": 37}},
    {"id": 1, "id_task": -1, "n_ctx": 4096, "speculative": False, "is_processing": False,
     "params": {"n_predict": -1, "temperature": 0.8, "stream": False},
     "next_token": {"has_next_token": True, "has_new_line": False, "n_remain": -1, "n_decoded": 0}},
    {"id": 2, "id_task": 415, "n_ctx": 4096, "speculative": False, "is_processing": True,
     "params": {"n_predict": 256, "temperature": 0.0, "stream": True},
     "next_token": {"has_next_token": True, "has_new_line": True, "n_remain": 219, "n_decoded": 37}},
    {"id": 3, "id_task": -1, "n_ctx": 4096, "speculative": False, "is_processing": False,
     "params": {}, "next_token": {"has_next_token": True, "has_new_line": False, "n_remain": -1, "n_decoded": 0}},
]


def test_vllm_metrics_sum_over_engines_and_ignore_other_series() -> None:
    assert parse_vllm_metrics(VLLM_METRICS) == Load(queue_waiting=5.0, running=5.0)
    assert parse_vllm_metrics("# HELP up\nup 1\n") is None
    assert parse_vllm_metrics(LLAMACPP_METRICS) is None
    odd = 'vllm:num_requests_waiting{model_name="a b} c",engine="0"} 2 1712345678000\nvllm:num_requests_running NaN\n'
    assert parse_vllm_metrics(odd) == Load(queue_waiting=2.0, running=0.0)


def test_llamacpp_metrics() -> None:
    assert parse_llamacpp_metrics(LLAMACPP_METRICS) == Load(queue_waiting=3.0, running=2.0)
    assert parse_llamacpp_metrics(VLLM_METRICS) is None


def test_llamacpp_slots() -> None:
    assert parse_llamacpp_slots(LLAMACPP_SLOTS) == Load(running=2.0, slots_idle=2, slots_total=4)
    older = [{"id": 0, "state": 1}, {"id": 1, "state": 0}]  # builds before is_processing
    assert parse_llamacpp_slots(older) == Load(running=1.0, slots_idle=1, slots_total=2)
    assert parse_llamacpp_slots([]) is None
    assert parse_llamacpp_slots({"error": {"code": 501, "message": "This server does not support slots endpoint."}}) \
        is None


# ---------------------------------------------------------------------------------------- busy time shared out


def test_a_request_alone_pays_all_of_its_time() -> None:
    clock = Clock()
    br = breakers(clock)
    mark = br.begin("gpu", "m")
    clock.now += 2
    assert br.share_since("gpu", mark) == pytest.approx(2.0)
    br.end("gpu", "m")
    assert br.state("gpu")["busy_s"] == pytest.approx(2.0)


def test_two_overlapping_requests_each_pay_half_of_the_overlap() -> None:
    # A runs 0..3, B runs 1..2 (on another worker): A pays 1 + 0.5 + 1, B pays 0.5; the backend was busy 3 s.
    clock, table = Clock(), BackendTable(16, shared=False)
    one, two = breakers(clock, table, 0), breakers(clock, table, 1)
    a = one.begin("gpu")
    clock.now += 1
    b = two.begin("gpu")
    clock.now += 1
    b_share = two.share_since("gpu", b)
    two.end("gpu")
    clock.now += 1
    a_share = one.share_since("gpu", a)
    one.end("gpu")
    assert b_share == pytest.approx(0.5)
    assert a_share == pytest.approx(2.5)
    assert a_share + b_share == pytest.approx(one.state("gpu")["busy_s"]) == pytest.approx(3.0)


def test_three_staggered_requests_share_what_they_overlap() -> None:
    # A 0..4, B 1..3, C 2..5: [0,1) A alone; [1,2) A+B; [2,3) A+B+C; [3,4) A+C; [4,5) C alone.
    clock = Clock()
    br = breakers(clock)
    a = br.begin("gpu")
    clock.now += 1
    b = br.begin("gpu")
    clock.now += 1
    c = br.begin("gpu")
    clock.now += 1
    shares = {"b": br.share_since("gpu", b)}
    br.end("gpu")
    clock.now += 1
    shares["a"] = br.share_since("gpu", a)
    br.end("gpu")
    clock.now += 1
    shares["c"] = br.share_since("gpu", c)
    br.end("gpu")
    assert shares["a"] == pytest.approx(1 + 1 / 2 + 1 / 3 + 1 / 2)
    assert shares["b"] == pytest.approx(1 / 2 + 1 / 3)
    assert shares["c"] == pytest.approx(1 / 3 + 1 / 2 + 1)
    assert sum(shares.values()) == pytest.approx(5.0) == pytest.approx(br.state("gpu")["busy_s"])


def test_idle_gaps_cost_nothing_and_are_not_busy() -> None:
    clock = Clock()
    br = breakers(clock)
    first = br.begin("gpu")
    clock.now += 1
    assert br.share_since("gpu", first) == pytest.approx(1.0)
    br.end("gpu")
    clock.now += 100  # idle
    second = br.begin("gpu")
    clock.now += 0.5
    assert br.share_since("gpu", second) == pytest.approx(0.5)
    br.end("gpu")
    clock.now += 10
    assert br.state("gpu")["busy_s"] == pytest.approx(1.5)
    assert br.share_since("gpu", second) == pytest.approx(0.5)  # nothing accrues once it ended


def test_a_worker_forgotten_mid_flight_stops_sharing_from_then_on() -> None:
    # A (worker 0) and B (worker 1) from 0; worker 1 dies; at 2 its replacement forgets B; A runs alone to 3.
    clock, table = Clock(), BackendTable(16, shared=False)
    one, two = breakers(clock, table, 0), breakers(clock, table, 1)
    a = one.begin("gpu")
    two.begin("gpu")
    clock.now += 2
    breakers(clock, table, 1).forget_worker()
    clock.now += 1
    assert one.share_since("gpu", a) == pytest.approx(1 + 1)
    one.end("gpu")
    assert one.state("gpu")["busy_s"] == pytest.approx(3.0)


def test_a_clock_behind_the_last_advance_adds_nothing() -> None:
    clock = Clock()
    br = breakers(clock)
    mark = br.begin("gpu")
    clock.now += 1
    assert br.share_since("gpu", mark) == pytest.approx(1.0)
    clock.now -= 0.5  # another process's reading, a moment older
    assert br.share_since("gpu", mark) == pytest.approx(1.0)
    assert br.state("gpu")["busy_s"] == pytest.approx(1.0)


def test_share_of_an_unknown_backend_is_zero() -> None:
    assert breakers(Clock()).share_since("nowhere", 0.0) == 0.0
