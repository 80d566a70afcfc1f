"""Which models exist, where they live, and what a model name in a request resolves to.

Pure data, updated by discovery: resolution is a couple of dict lookups on the request path.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.common.config import ModelSettings
from appliance.common.errors import GatewayError
from appliance.providers.base import ModelInfo

CAPABILITIES = ("chat", "completions", "embeddings", "tools", "vision", "reasoning")
PROBE_STATES = {None: "starting", True: "ready", False: "unreachable"}  # a backend's latest probe: up?
_LISTED_IN_ERRORS = 10

# A key's model patterns as a test of one name (Principal.allows_model); None: the key may use any model.
MayUse = Callable[[str], bool] | None


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes."""

    model: str  # as the client named it
    backend: str
    upstream_model: str  # the name the backend knows


@dataclass(frozen=True, slots=True)
class Plan:
    """Every place a model name can go, in config order, and the alias that says how to choose."""

    model: str  # as the client named it
    routes: tuple[Route, ...]
    alias: ModelSettings | None = None

    @property
    def name(self) -> str:
        """The route's name for X-Appliance-Route: the alias (pattern) or the model itself."""
        return self.alias.name if self.alias is not None else self.model


@dataclass(slots=True)
class BackendState:
    name: str
    kind: str
    up: bool | None = None  # None until the first probe
    last_probe_at: float | None = None
    last_error: str | None = None
    models: list[ModelInfo] = field(default_factory=list)

    @property
    def state(self) -> str:
        return PROBE_STATES[self.up]


class Catalog:
    def __init__(self, models: list[ModelSettings]) -> None:
        self.backends: dict[str, BackendState] = {}  # in config order: the first listing a model owns it
        routed = [m for m in models if m.route_targets]
        self._aliases = {m.name: m for m in routed if not _is_pattern(m.name)}
        self._patterns = [m for m in routed if _is_pattern(m.name)]  # config order: the first match wins
        self._overrides = {m.name: m for m in models}
        self._said = _said_of(models)
        self._index: dict[str, tuple[str, str]] = {}  # model name -> (backend, upstream model)
        self._names: dict[tuple[str, str], tuple[str, ...]] = {}  # (backend, any name of a model) -> all its names
        self._first_seen: dict[str, int] = {}

    # ------------------------------------------------------------------ updates (from discovery)

    def add_backend(self, name: str, kind: str) -> BackendState:
        state = self.backends.get(name)
        if state is None:
            state = self.backends[name] = BackendState(name, kind)
        return state

    def adopt(self, state: BackendState) -> None:
        """A backend as another catalog knows it (a reload kept it): its health and models come along."""
        self.backends[state.name] = state
        self._reindex()

    def update(self, name: str, *, models: list[ModelInfo] | None, error: str | None = None,
               now: float | None = None) -> None:
        """Record a probe: its model list, or the error that kept it from answering."""
        state = self.backends[name]
        state.last_probe_at = now if now is not None else time.time()
        state.up = error is None
        state.last_error = error
        if models is not None:
            state.models = models
            self._reindex()

    def _reindex(self) -> None:
        index: dict[str, tuple[str, str]] = {}
        names: dict[tuple[str, str], tuple[str, ...]] = {}
        now = int(time.time())
        for state in self.backends.values():
            for info in state.models:
                for name in (info.id, *info.aliases):
                    index.setdefault(name, (state.name, info.id))
                    names[state.name, name] = (info.id, *info.aliases)
                self._first_seen.setdefault(info.id, now)
        self._index = index
        self._names = names

    # ------------------------------------------------------------------ resolution (request path)

    def resolve(self, model: str) -> Route:
        """The first place ``model`` goes (config order)."""
        return self.plan(model).routes[0]

    def plan(self, model: str, may_use: MayUse = None) -> Plan:
        """Where ``model`` can go: ``backend/model``, an exact alias, a listed model, then alias patterns.

        ``may_use``: the asking key's patterns; an unknown model's error lists only models it may use.
        """
        prefix, slash, rest = model.partition("/")
        if slash and rest and prefix in self.backends:
            return Plan(model, (Route(model, prefix, rest),))
        alias = self._aliases.get(model)
        if alias is None:
            found = self._index.get(model)
            if found is not None:
                return Plan(model, (Route(model, *found),))
            alias = next((m for m in self._patterns if fnmatch.fnmatchcase(model, m.name)), None)
        if alias is None:
            raise self.not_found(model, may_use)
        routes = tuple(Route(model, r.backend, r.upstream_model)
                       for r in (self._lookup(t) for t in alias.route_targets) if r is not None)
        if not routes:
            raise GatewayError("model_not_found", f"alias {alias.name!r} points to "
                               f"{', '.join(map(repr, alias.route_targets))}, which no backend serves right now",
                               param="model")
        return Plan(model, routes, alias)

    def configured(self, plan: Plan) -> ModelSettings | None:
        """The [[models]] entry that speaks for ``plan``: its alias, else an entry named as the request named the
        model (one that only describes it)."""
        return plan.alias if plan.alias is not None else self._overrides.get(plan.model)

    def _lookup(self, name: str) -> Route | None:
        prefix, slash, rest = name.partition("/")
        if slash and rest and prefix in self.backends:
            return Route(name, prefix, rest)
        found = self._index.get(name)
        return Route(name, *found) if found else None

    def not_found(self, model: str, may_use: MayUse = None) -> GatewayError:
        """404 for ``model``, naming up to ten models the asking key may use (never the others)."""
        known = [name for name in self.model_ids() if self.usable(name, may_use)]
        listed = ", ".join(known[:_LISTED_IN_ERRORS]) + (", ..." if len(known) > _LISTED_IN_ERRORS else "")
        if known:
            hint = f" Known models: {listed}."
        elif may_use is None:
            hint = " No backend has reported any model yet."
        else:
            hint = " This key may use none of the models known right now."
        return GatewayError("model_not_found", f"The model '{model}' does not exist.{hint}", param="model")

    # ------------------------------------------------------------------ which models a key may use

    def allowed(self, routes: tuple[Route, ...], may_use: MayUse) -> tuple[Route, ...]:
        """The routes a key may take: the one rule behind every endpoint, the model list and batches.

        A route is the key's when one of its patterns matches the name the client wrote, or any name of
        the backend model that serves it (its id or an alias such as Ollama's untagged name), bare or as
        ``backend/name``. So a key allowed ``vllm/qwen`` may also say ``qwen`` or an alias leading there.
        """
        if may_use is None:
            return routes
        return tuple(route for route in routes if self._may_take(route, may_use))

    def _may_take(self, route: Route, may_use: Callable[[str], bool]) -> bool:
        if may_use(route.model):
            return True
        names = self._names.get((route.backend, route.upstream_model), (route.upstream_model,))
        return any(may_use(name) or may_use(f"{route.backend}/{name}") for name in names)

    def usable(self, model: str, may_use: MayUse) -> bool:
        """Would a request for ``model`` pass the key's patterns? (What /v1/models lists and answers.)"""
        if may_use is None or may_use(model):
            return True
        try:
            routes = self.plan(model).routes
        except GatewayError:
            return False
        return bool(self.allowed(routes, may_use))

    def served(self, may_use: MayUse) -> dict[str, list[str]]:
        """Per backend (config order), the models on it a key may reach: every listed one for a key that
        may use any model; else those the key may name (``backend/model`` included) and the targets of the
        aliases it may use, and only backends with one."""
        listed = {name: [info.id for info in state.models] for name, state in self.backends.items()}
        if may_use is None:
            return listed
        found: dict[str, dict[str, None]] = {}  # ordered sets
        for name, models in listed.items():
            found[name] = {m: None for m in models if self._may_take(Route(f"{name}/{m}", name, m), may_use)}
        for alias in self._aliases:
            try:
                routes = self.allowed(self.plan(alias).routes, may_use)
            except GatewayError:  # its targets are served by no backend right now
                continue
            for route in routes:
                found[route.backend][route.upstream_model] = None
        return {name: list(models) for name, models in found.items() if models}

    def knows(self, name: str) -> bool:
        """Is ``name`` a configured alias, a listed model, or ``backend/model`` of a listed one? (Metrics
        label requests by such names only.)"""
        if name in self._aliases or name in self._index:
            return True
        prefix, slash, rest = name.partition("/")
        return bool(slash) and prefix in self.backends and rest in self._index

    def model_ids(self) -> list[str]:
        """Every listed id: aliases first, then discovered models (deduplicated)."""
        return [*self._aliases, *(m for m in self._by_model() if m not in self._aliases)]

    # ------------------------------------------------------------------ listing (/v1/models)

    def _by_model(self) -> dict[str, list[tuple[BackendState, ModelInfo]]]:
        out: dict[str, list[tuple[BackendState, ModelInfo]]] = {}
        for state in self.backends.values():
            for info in state.models:
                out.setdefault(info.id, []).append((state, info))
        return out

    def list_models(self) -> list[dict[str, Any]]:
        by_model = self._by_model()
        entries = [self._alias_entry(name, by_model) for name in self._aliases]
        entries += [self._entry(model_id, served) for model_id, served in by_model.items()
                    if model_id not in self._aliases]
        return entries

    def describe(self, model: str) -> dict[str, Any] | None:
        """The /v1/models entry for a listed id, an alias or ``backend/model`` of a listed model, else None."""
        by_model = self._by_model()
        prefix, slash, rest = model.partition("/")
        if slash and rest and prefix in self.backends:  # as plan() reads it: this backend's own entry
            return self._on_backend(model, self.backends[prefix], rest)
        if model in self._aliases:
            return self._alias_entry(model, by_model)
        if model in by_model:
            return self._entry(model, by_model[model])
        found = self._index.get(model)  # an Ollama name without its :latest tag
        return self._entry(found[1], by_model[found[1]]) if found else None

    def _on_backend(self, model: str, state: BackendState, name: str) -> dict[str, Any] | None:
        info = next((i for i in state.models if name == i.id or name in i.aliases), None)
        if info is None:
            return None
        return {**self._entry(info.id, [(state, info)]), "id": model}

    def _entry(self, model_id: str, served: list[tuple[BackendState, ModelInfo]]) -> dict[str, Any]:
        owner, first = served[0]
        override = self._overrides.get(model_id)
        capabilities: dict[str, bool | None] = dict.fromkeys(CAPABILITIES)
        for _, info in reversed(served):
            capabilities.update(info.capabilities)
        if override and override.capabilities:
            capabilities.update(override.capabilities)
        runtime = next((i.context_window for _, i in served if i.context_window), None)
        trained = next((i.context_window_trained for _, i in served if i.context_window_trained), None)
        return {
            "id": model_id,
            "object": "model",
            "created": first.created or self._first_seen.get(model_id, int(time.time())),
            "owned_by": owner.name,
            "context_window": (override and override.context_window) or runtime or trained,
            "context_window_trained": trained,
            "max_output_tokens": override.max_output_tokens if override else None,
            "capabilities": capabilities,
            "backends": [{"id": s.name, "kind": s.kind, "state": s.state, "loaded": i.loaded} for s, i in served],
        }

    def _alias_entry(self, name: str, by_model: dict[str, Any]) -> dict[str, Any]:
        targets = self._aliases[name].route_targets
        route = next((r for r in map(self._lookup, targets) if r is not None), None)
        served = by_model.get(route.upstream_model) if route else None
        if served and route:
            served = [(s, i) for s, i in served if s.name == route.backend] or served
            entry = self._entry(route.upstream_model, served)
        else:
            entry = {"created": int(time.time()), "context_window": None, "context_window_trained": None,
                     "max_output_tokens": None, "capabilities": dict.fromkeys(CAPABILITIES), "backends": []}
        override = self._overrides[name]
        entry.update(id=name, object="model", owned_by="appliance", target=targets[0])
        if len(targets) > 1:
            entry.update(targets=targets, strategy=override.strategy)
        if override.context_window:
            entry["context_window"] = override.context_window
        if override.max_output_tokens:
            entry["max_output_tokens"] = override.max_output_tokens
        if override.capabilities:
            entry["capabilities"] = {**entry["capabilities"], **override.capabilities}
        return entry

    def said(self, route: Route, flag: str) -> bool | None:
        """What ``[[models]]`` says of the model a route reaches (``system_role``, ``vision``; None: nothing).

        As for ``capabilities``: an entry speaks for the model of its name and for each of its targets, so the
        flag follows whichever target of a plan is being tried. A catalog where no entry sets ``flag`` answers
        after one dict lookup.
        """
        names = self._said.get(flag)
        if names is None:
            return None
        backend, model = route.backend, route.upstream_model
        for name in self._names.get((backend, model), (model,)):
            for key in (f"{backend}/{name}", name):
                value = names.get(key)
                if value is not None:
                    return value
        return None

    def vision(self, route: Route) -> bool | None:
        """Does the routed model take images: as configured, else as its backend says (None: unknown)."""
        said = self.said(route, "vision")
        return said if said is not None else self.capability(route, "vision")

    def capability(self, route: Route, name: str) -> bool | None:
        """A known capability of the routed model (None: unknown)."""
        for state_name, state in self.backends.items():
            if state_name == route.backend:
                for info in state.models:
                    if info.id == route.upstream_model:
                        return info.capabilities.get(name)
        return None


def _said_of(models: list[ModelSettings]) -> dict[str, dict[str, bool]]:
    """Per flag that some entry sets (system_role, vision): the names it speaks for (its own and its targets'),
    with the value of the first entry (config order) that names each."""
    out: dict[str, dict[str, bool]] = {}
    for m in models:
        for flag, value in (("system_role", m.system_role), ("vision", (m.capabilities or {}).get("vision"))):
            if value is not None:
                for name in (m.name, *m.route_targets):
                    out.setdefault(flag, {}).setdefault(name, value)
    return out


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")
