"""Target selection: distributions over many picks (seeded), failover order, latency learning and exploration."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from appliance.core.routing import EXPLORE_S, FAILURE_LATENCY_S, Selector, Target

A, B, C = Target("a", "m"), Target("b", "m"), Target("c", "m")
ABC = [A, B, C]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def firsts(selector: Selector, picks: int, *args: object, **kwargs: object) -> Counter[Target]:
    return Counter(selector.order("r", ABC, *args, **kwargs)[0] for _ in range(picks))  # type: ignore[arg-type]


def test_target_name() -> None:
    assert Target("vllm", "qwen").name == "vllm/qwen"


def test_fallback_is_config_order_and_one_target_is_itself() -> None:
    selector = Selector()
    assert selector.order("r", ABC, "fallback") == ABC
    for strategy in ("round_robin", "weighted", "least_latency", "least_busy"):
        assert selector.order("r", [B], strategy) == [B]
        assert selector.order("r", [], strategy) == []


def test_round_robin_rotates_exactly_and_fails_over_in_config_order() -> None:
    selector = Selector()
    orders = [selector.order("r", ABC, "round_robin") for _ in range(3000)]
    assert orders[:3] == [[A, B, C], [B, A, C], [C, A, B]]
    assert Counter(o[0] for o in orders) == {A: 1000, B: 1000, C: 1000}
    assert all(sorted(o, key=ABC.index) == ABC for o in orders)  # every target, each once


def test_round_robin_counts_per_route() -> None:
    selector = Selector()
    assert selector.order("one", ABC, "round_robin")[0] == A
    assert selector.order("two", ABC, "round_robin")[0] == A
    assert selector.order("one", ABC, "round_robin")[0] == B


def test_weighted_3_1_1_is_exact_and_smooth() -> None:
    selector = Selector()
    picks = [selector.order("r", ABC, "weighted", [3, 1, 1])[0] for _ in range(5000)]
    assert Counter(picks) == {A: 3000, B: 1000, C: 1000}  # exact, not approximately
    assert picks[:5] == [A, B, A, C, A]  # interleaved like nginx's smooth weighted round robin
    for start in range(0, 5000, 5):  # every cycle of sum(weights) picks holds the exact shares
        assert Counter(picks[start:start + 5]) == {A: 3, B: 1, C: 1}


def test_weighted_fractional_weights_and_zero_weight_only_on_failover() -> None:
    selector = Selector()
    picks = Counter(selector.order("r", ABC, "weighted", [0.5, 1.5, 0])[0] for _ in range(4000))
    assert picks == {A: 1000, B: 3000}
    assert selector.order("r", ABC, "weighted", [0.5, 1.5, 0])[2] == C


def test_weighted_extra_targets_past_the_weights_are_failover_only() -> None:
    selector = Selector()
    orders = [selector.order("r", ABC, "weighted", [1, 1]) for _ in range(100)]
    assert Counter(o[0] for o in orders) == {A: 50, B: 50}
    assert all(o[-1] == C for o in orders)


def test_weighted_without_weights_is_even_and_restarts_when_targets_change() -> None:
    selector = Selector()
    assert Counter(selector.order("r", ABC, "weighted")[0] for _ in range(300)) == {A: 100, B: 100, C: 100}
    assert Counter(selector.order("r", [A, B], "weighted", [1, 3])[0] for _ in range(400)) == {A: 100, B: 300}


def test_least_busy_orders_by_score_ties_in_config_order() -> None:
    selector = Selector()
    load = {A: 2.0, B: 0.5, C: 0.5}
    assert selector.order("r", ABC, "least_busy", busy=load.__getitem__) == [B, C, A]
    load = {A: 0.0, B: 0.0, C: 0.0}
    assert selector.order("r", ABC, "least_busy", busy=load.__getitem__) == ABC
    assert selector.order("r", ABC, "least_busy") == ABC  # no load source: config order


def test_unknown_strategy_is_a_bug() -> None:
    with pytest.raises(ValueError):
        Selector().order("r", ABC, "random")


def _trained(clock: Clock, seed: int = 7, explore_p: float = 0.05) -> Selector:
    selector = Selector(clock, random.Random(seed), explore_p=explore_p)
    for _ in range(5):
        selector.observe(A, 0.1, ok=True)
        selector.observe(B, 0.5, ok=True)
        selector.observe(C, 1.0, ok=True)
    return selector


def test_least_latency_prefers_the_fastest_and_explores_at_the_stated_rate() -> None:
    clock = Clock()
    selector = _trained(clock)
    orders = [selector.order("r", ABC, "least_latency") for _ in range(10_000)]
    share = {t: n / 10_000 for t, n in Counter(o[0] for o in orders).items()}
    # explore_p = 0.05 promotes a random other target: a 0.95, b and c 0.025 each.
    # Tolerances are over 4 binomial standard deviations (0.0022 for a, 0.0016 for b and c).
    assert share[A] == pytest.approx(0.95, abs=0.01)
    assert share[B] == pytest.approx(0.025, abs=0.008)
    assert share[C] == pytest.approx(0.025, abs=0.008)
    unexplored = [o for o in orders if o[0] == A]
    assert all(o == [A, B, C] for o in unexplored)  # the failover order is by latency too
    assert all(o in ([B, A, C], [C, A, B]) for o in orders if o[0] != A)


def test_least_latency_without_exploration_always_takes_the_fastest() -> None:
    selector = _trained(Clock(), explore_p=0)
    assert {tuple(selector.order("r", [C, B, A], "least_latency")) for _ in range(1000)} == {(A, B, C)}


def test_least_latency_converges_to_the_new_fastest() -> None:
    clock = Clock()
    selector = _trained(clock, explore_p=0)
    for _ in range(10):  # b gets faster, a slower
        selector.observe(A, 0.8, ok=True)
        selector.observe(B, 0.05, ok=True)
    assert selector.order("r", ABC, "least_latency")[0] == B
    assert selector.latency(B) == pytest.approx(0.05, abs=0.02)
    assert selector.latency(A) == pytest.approx(0.8, abs=0.05)


def test_every_unsampled_target_is_tried_first_once_then_by_latency() -> None:
    clock = Clock()
    selector = Selector(clock, random.Random(1), explore_p=0)
    assert [selector.order("r", ABC, "least_latency")[0] for _ in range(3)] == [A, B, C]
    # None has answered yet: none is due again for EXPLORE_S, so config order.
    assert selector.order("r", ABC, "least_latency") == ABC
    selector.observe(C, 0.1, ok=True)
    assert selector.order("r", ABC, "least_latency")[0] == C


def test_a_failing_target_is_avoided_then_retried_after_the_exploration_interval() -> None:
    clock = Clock()
    selector = _trained(clock, explore_p=0)
    for _ in range(7):
        selector.observe(A, 0.01, ok=False)  # a failure counts as 2x the EWMA: +30 % each (alpha 0.3)
    assert selector.latency(A) == pytest.approx(0.1 * 1.3 ** 7, rel=0.01)
    assert selector.order("r", ABC, "least_latency")[0] == B
    clock.now += EXPLORE_S - 1
    selector.observe(B, 0.5, ok=True)
    selector.observe(C, 1.0, ok=True)
    assert selector.order("r", ABC, "least_latency")[0] == B
    clock.now += 1  # a has had no sample for EXPLORE_S: one request goes to it...
    assert selector.order("r", ABC, "least_latency")[0] == A
    assert selector.order("r", ABC, "least_latency")[0] == B  # ...only one, until it answers or EXPLORE_S more
    selector.observe(A, 0.05, ok=True)
    selector.observe(A, 0.05, ok=True)
    selector.observe(A, 0.05, ok=True)
    assert selector.order("r", ABC, "least_latency")[0] == A  # recovered


def test_failure_penalty_without_a_sample() -> None:
    selector = Selector(Clock())
    selector.observe(A, 0.3, ok=False)
    assert selector.latency(A) == FAILURE_LATENCY_S
    selector.observe(B, 42.0, ok=False)  # a timeout that took longer than the penalty counts as what it took
    assert selector.latency(B) == 42.0
    assert selector.latency(C) is None
