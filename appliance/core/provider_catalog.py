"""GET /v1/providers: the backends, how healthy, busy, fast and dear each is now, and which one a model's
route would try first.

The live half (probes, breakers, in flight, load) is the memory every worker shares; latency and time to
first token come from the ledger (core/timings.py); prices from the config; the try order from the route's
strategy, peeked at without moving it on (round_robin, weighted and least_latency keep per-worker state,
so their pick is the answering worker's next one). ``listing`` and ``for_model`` assemble the answer from
those ingredients; ``build`` gathers them from one worker's gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from appliance.accounts.auth import model_not_allowed
from appliance.accounts.usage import Price
from appliance.core.catalog import PROBE_STATES, MayUse, Plan
from appliance.core.gateway import Gateway
from appliance.core.routing import Target
from appliance.core.timings import WINDOW_S, Timing, Timings

Live = Mapping[str, Any]  # a backend as every worker sees it: resilience.Breakers.state


def health(live: Live) -> dict[str, Any]:
    """The latest probe (by any worker) and the circuit breaker; /statsz shows the same."""
    up = live["up"]
    return {"up": up, "state": PROBE_STATES[up],
            "breaker": {"state": live["state"], "consecutive_failures": live["consecutive_failures"],
                        "retry_after_s": live["retry_after_s"]}}


def entry(backend: str, kind: str, live: Live, timing: Timing, **own: Any) -> dict[str, Any]:
    """What every entry says of its backend (``own``: the entry's own fields, after the name).
    ``available``: its breaker lets a request through now (closed, or a trial is due)."""
    return {"object": "provider", "backend": backend, **own, "kind": kind, **health(live),
            "available": live["retry_after_s"] == 0, "in_flight": live["in_flight"], "load": live["load"],
            **timing.as_fields()}


def listing(backends: Iterable[tuple[str, str, list[str]]], live: Mapping[str, Live],
            timings: Timings) -> list[dict[str, Any]]:
    """Every backend given as (name, kind, its models) with its health, load and latency."""
    return [{**entry(name, kind, live[name], timings.of(name)), "models": models} for name, kind, models in backends]


def for_model(targets: Sequence[Target], order: Sequence[Target], kinds: Mapping[str, str],
              live: Mapping[str, Live], model_in_flight: Mapping[Target, int], price_of: Callable[[str, str], Price],
              timings: Timings) -> list[dict[str, Any]]:
    """One entry per target of a model's route, in config order. ``rank``: its place in ``order`` (the order
    the strategy would try them now); ``first_choice``: the first in that order whose breaker lets a request
    through, where the next request goes (none when every breaker is open: that request gets a 503)."""
    ranks = {target: rank for rank, target in enumerate(order, 1)}
    first = next((t for t in order if live[t.backend]["retry_after_s"] == 0), None)
    return [{**entry(t.backend, kinds[t.backend], live[t.backend], timings.of(t.backend, t.model), model=t.model,
                     first_choice=t == first, rank=ranks[t]),
             "model_in_flight": model_in_flight[t], "price": price_fields(price_of(t.backend, t.model))}
            for t in targets]


def price_fields(price: Price) -> dict[str, float] | None:
    """USD per million tokens; None for a model no [[models]] entry prices."""
    if price.free:
        return None
    cached = price.input if price.cached_input is None else price.cached_input
    return {"input_per_mtok": price.input, "output_per_mtok": price.output, "cached_input_per_mtok": cached}


def build(gw: Gateway, model: str | None, may_use: MayUse, timings: Timings) -> dict[str, Any]:
    """The answer for one key (``may_use``: its model patterns): every backend it may reach, or with
    ``model`` the backends that model's route may take for it (404 unknown, 403 not the key's)."""
    catalog, breakers = gw.catalog, gw.breakers
    answer: dict[str, Any] = {"object": "list", "model": model, "route": None, "strategy": None,
                              "window_s": WINDOW_S}
    if model is None:
        served = catalog.served(may_use)
        live = {name: breakers.state(name) for name in served}
        answer["data"] = listing(((name, catalog.backends[name].kind, models) for name, models in served.items()),
                                 live, timings)
        return answer
    plan = catalog.plan(model, may_use)
    routes = catalog.allowed(plan.routes, may_use)  # as the pipeline narrows a request's plan
    if not routes:
        raise model_not_allowed(model)
    plan = Plan(plan.model, routes, plan.alias)
    targets = list(dict.fromkeys(Target(r.backend, r.upstream_model) for r in routes))
    names = {t.backend for t in targets}
    kinds = {name: catalog.backends[name].kind for name in names}
    live = {name: breakers.state(name) for name in names}
    in_flight = {t: breakers.in_flight(t.backend, t.model) for t in targets}
    order = gw.order(plan, targets, peek=True)
    answer["route"] = plan.name
    answer["strategy"] = plan.alias.strategy if plan.alias else "fallback"
    answer["data"] = for_model(targets, order, kinds, live, in_flight, gw.prices.of, timings)
    return answer
