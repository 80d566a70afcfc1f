"""The semantic router: which profile's model should answer a chat request, by meaning and by price.

Each profile (``[[router.profiles]]``) has a description and/or examples. The request's text (its last user
message) and every profile text are embedded with ``[embeddings] model``; a profile's similarity is the
highest cosine similarity to any of its texts (a request close to one example belongs there, and more
examples never dilute a profile). Price trades against it:

    score = (1 - cost_weight) * similarity - cost_weight * cost

where cost is the profile's price relative to the dearest candidate (0..1) and cost_weight (0..1) comes from
the request, else ``[router] cost_weight``. The highest score wins; ties go to the higher similarity, then to
config order. Profile vectors are embedded on first use (and again after a reload), never at start-up.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.accounts.usage import Prices
from appliance.common.chat import content_text
from appliance.common.config import RouterProfile, RouterSettings
from appliance.common.errors import GatewayError
from appliance.core.catalog import Catalog, MayUse, Route
from appliance.core.embeddings import ROUTER, Embedder

HEADER = "X-Appliance-Router-Profile"
# Body fields that steer the router: never sent to a backend.
FIELDS = ("models", "cost_weight", "execute")


@dataclass(frozen=True, slots=True)
class Candidate:
    profile: RouterProfile
    route: Route  # where the profile's model goes first (for its price and the key's rules)
    price: float  # USD per million tokens


@dataclass(frozen=True, slots=True)
class Score:
    profile: str
    model: str
    similarity: float
    cost: float
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "model": self.model, "similarity": round(self.similarity, 6),
                "cost": round(self.cost, 6), "score": round(self.score, 6)}


@dataclass(frozen=True, slots=True)
class Decision:
    profile: str
    model: str
    cost_weight: float
    scores: list[Score]  # best first

    def as_dict(self) -> dict[str, Any]:
        return {"object": "router.decision", "model": self.model, "profile": self.profile,
                "cost_weight": self.cost_weight, "scores": [s.as_dict() for s in self.scores]}


@dataclass(frozen=True, slots=True)
class Options:
    """What a request asks of the router."""

    models: frozenset[str] | None
    cost_weight: float
    execute: bool


# ------------------------------------------------------------------------------------------ the math


def relative_costs(prices: Sequence[float]) -> list[float]:
    """Each price as a share of the dearest (all 0 when every candidate is free)."""
    top = max(prices, default=0.0)
    return [price / top if top > 0 else 0.0 for price in prices]


def rank(names: Sequence[str], models: Sequence[str], similarities: Sequence[float], prices: Sequence[float],
         cost_weight: float) -> list[Score]:
    """Every candidate's score, best first (ties: higher similarity, then the given order)."""
    costs = relative_costs(prices)
    scores = [Score(name, model, similarity, cost, (1 - cost_weight) * similarity - cost_weight * cost)
              for name, model, similarity, cost in zip(names, models, similarities, costs, strict=True)]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].score, -scores[i].similarity, i))
    return [scores[i] for i in order]


def request_text(body: dict[str, Any]) -> str:
    """What the router compares: the last user message's text (else the last message with any text)."""
    messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
    for wanted in ("user", None):
        for message in reversed(messages):
            if wanted is None or message.get("role") == wanted:
                text = content_text(message.get("content")).strip()
                if text:
                    return text
    raise GatewayError("invalid_value", "The router needs a message with text to choose a model.",
                       param="messages")


def options(body: dict[str, Any], settings: RouterSettings) -> Options:
    """The request's ``models``, ``cost_weight`` and ``execute``, checked."""
    models = body.get("models")
    if models is not None:
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise GatewayError("invalid_value", "'models' must be a non-empty array of model names.", param="models")
        models = frozenset(models)
    weight = body.get("cost_weight", settings.cost_weight)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
        raise GatewayError("invalid_value", "'cost_weight' must be a number from 0 to 1.", param="cost_weight")
    execute = body.get("execute", True)
    if not isinstance(execute, bool):
        raise GatewayError("invalid_value", "'execute' must be a boolean.", param="execute")
    return Options(models, float(weight), execute)


def price(profile: RouterProfile, route: Route, prices: Prices) -> float:
    """The profile's own cost, else its model's input + output price per million tokens."""
    if profile.cost is not None:
        return profile.cost
    found = prices.of(route.backend, route.upstream_model)
    return found.input + found.output


def candidates(profiles: Sequence[RouterProfile], catalog: Catalog, prices: Prices, may_use: MayUse,
               models: frozenset[str] | None) -> list[Candidate]:
    """The profiles a request may be routed to: named in ``models`` (when given), served now, and allowed to
    the key. None left: 400 when ``models`` ruled them all out, 403 when the key did, else 404."""
    named = [p for p in profiles if models is None or p.model in models]
    if not named:
        raise GatewayError("invalid_value", "No router profile uses any of 'models' (profiles use: "
                           f"{', '.join(sorted({p.model for p in profiles}))}).", param="models")
    served: list[Candidate] = []
    refused = False
    for profile in named:
        try:
            routes = catalog.plan(profile.model).routes
        except GatewayError:
            continue  # not served right now: not a choice
        allowed = catalog.allowed(routes, may_use)
        if not allowed:
            refused = True
            continue
        served.append(Candidate(profile, allowed[0], price(profile, allowed[0], prices)))
    if served:
        return served
    if refused:
        raise GatewayError("model_not_allowed", "This key may use none of the models the router could choose.",
                           param="model")
    raise GatewayError("model_not_found", "No backend serves any of the router's models right now.", param="model")


def listing(profiles: Sequence[RouterProfile], catalog: Catalog, prices: Prices,
            may_use: MayUse) -> list[dict[str, Any]]:
    """GET /v1/router/profiles: the profiles whose model the key may use (served or not), no vectors."""
    out = []
    for profile in profiles:
        if not catalog.usable(profile.model, may_use):
            continue
        try:
            route: Route | None = catalog.plan(profile.model).routes[0]
        except GatewayError:
            route = None
        out.append({"object": "router.profile", "name": profile.name, "model": profile.model,
                    "description": profile.description, "examples": list(profile.examples),
                    "cost": price(profile, route, prices) if route is not None else profile.cost,
                    "served": route is not None})
    return out


def model_entry(settings: RouterSettings, catalog: Catalog, may_use: MayUse) -> dict[str, Any] | None:
    """The router's /v1/models entry, when it has profiles and the key may use one of their models."""
    usable = [p.name for p in settings.profiles if catalog.usable(p.model, may_use)]
    if not usable:
        return None
    return {"id": settings.name, "object": "model", "created": int(time.time()), "owned_by": "appliance",
            "router": {"profiles": usable}}


# ------------------------------------------------------------------------------------------ the router


class Router:
    """One worker's router: the profiles of the running config and, once first needed, their vectors."""

    def __init__(self, settings: RouterSettings, embedder: Embedder) -> None:
        self.settings = settings
        self._embedder = embedder
        self._matrix: array | None = None
        self._groups: list[int] = []  # per matrix row: its profile's index
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.settings.profiles)

    def serves(self, model: Any) -> bool:
        """Is ``model`` the router's name (and are there profiles to route to)?"""
        return model == self.settings.name and self.enabled

    async def decide(self, body: dict[str, Any], chosen_from: Sequence[Candidate], cost_weight: float,
                     request_id: str) -> Decision:
        """The best of ``chosen_from`` for this request (a GatewayError when the embedding model fails)."""
        from appliance.core import vectors  # on first use: see vectors.py

        text = request_text(body)[: self._embedder.settings.max_input_chars]
        matrix = await self._profile_matrix(request_id)
        (query,) = await self._embedder.embed([text], purpose=ROUTER, request_id=request_id)
        similarity = vectors.best_per_group(matrix, query, self._groups)
        index = {id(p): i for i, p in enumerate(self.settings.profiles)}
        ranked = rank([c.profile.name for c in chosen_from], [c.profile.model for c in chosen_from],
                      [similarity[index[id(c.profile)]] for c in chosen_from], [c.price for c in chosen_from],
                      cost_weight)
        return Decision(ranked[0].profile, ranked[0].model, cost_weight, ranked)

    async def _profile_matrix(self, request_id: str) -> array:
        """Every profile text's vector, embedded in one call the first time a request needs them."""
        if self._matrix is not None:
            return self._matrix
        async with self._lock:  # concurrent first requests: one of them embeds, the others wait for it
            if self._matrix is None:
                from appliance.core import vectors

                longest = self._embedder.settings.max_input_chars
                texts = [(i, text[:longest]) for i, profile in enumerate(self.settings.profiles)
                         for text in profile.texts]
                found = await self._embedder.embed([text for _, text in texts], purpose=ROUTER,
                                                   request_id=request_id)
                self._groups = [i for i, _ in texts]
                self._matrix = vectors.stack(found)
        return self._matrix
