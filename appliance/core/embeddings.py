"""Text to vectors for the router and the semantic cache, through the gateway's own backends.

``[embeddings] model`` is resolved like a client's model name (an alias with several targets is tried in
order) and sent straight to the provider of its route: no HTTP request to ourselves, no key, no ledger row
(the metrics count the texts embedded). A per-worker LRU keeps the vectors of texts already seen, so profile
examples and repeated prompts are embedded once per worker.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cachetools import LRUCache

from appliance.common.config import EmbeddingsSettings
from appliance.common.errors import CODES, GatewayError
from appliance.core.catalog import Catalog
from appliance.observe import metrics
from appliance.providers.base import EMBEDDINGS, Call, Provider
from appliance.providers.transport import Limits

ROUTER, CACHE = "router", "cache"  # purposes, as the metrics label them
_CONNECT_TIMEOUT_S = 3.0
_BACKEND_FAILURES = frozenset(code for code, (status, _) in CODES.items() if status >= 500) - {"internal_error"}

# The current catalog and providers (a reload replaces both).
Backends = Callable[[], tuple[Catalog, Mapping[str, Provider]]]


class Embedder:
    def __init__(self, settings: EmbeddingsSettings, backends: Backends) -> None:
        self.settings = settings
        self._backends = backends
        self._memory: LRUCache[str, array] | None = (
            LRUCache(settings.memory_entries) if settings.memory_entries else None)

    @property
    def model(self) -> str | None:
        return self.settings.model

    async def embed(self, texts: Sequence[str], *, purpose: str, request_id: str) -> list[array]:
        """Unit vectors of ``texts``, in order; a GatewayError (a 5xx code) when the model cannot answer."""
        found: dict[str, array] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            vector = self._memory.get(text) if self._memory is not None else None
            if vector is None:
                missing.append(text)
            else:
                found[text] = vector
        if missing:
            try:
                fetched = await self._fetch(missing, request_id)
            except GatewayError:
                metrics.embedding_failed(purpose)
                raise
            for text, vector in zip(missing, fetched, strict=True):
                found[text] = vector
                if self._memory is not None:
                    self._memory[text] = vector
        metrics.embedded(purpose, from_memory=len(found) - len(missing), from_backend=len(missing))
        return [found[text] for text in texts]

    async def _fetch(self, texts: list[str], request_id: str) -> list[array]:
        from appliance.core import vectors  # on first use: see vectors.py

        model = self.settings.model
        if model is None:
            raise GatewayError("no_healthy_backend", "No embedding model is configured ([embeddings] model).")
        catalog, providers = self._backends()
        try:
            routes = catalog.plan(model).routes
        except GatewayError:
            raise GatewayError("no_healthy_backend", f"The embedding model {model!r} is not served by any backend "
                               "right now.") from None
        limits = Limits(self.settings.timeout_s, min(self.settings.timeout_s, _CONNECT_TIMEOUT_S))
        failure: GatewayError | None = None
        for route in routes:
            provider = providers.get(route.backend)
            if provider is None or not provider.supports(EMBEDDINGS):
                continue
            call = Call(EMBEDDINGS, {"model": route.upstream_model, "input": texts}, request_id, limits=limits)
            try:
                reply = await provider.send(call)
                return list(vectors.unit_rows(_rows(reply.data, len(texts))))
            except GatewayError as exc:
                failure = exc
            except ValueError as exc:
                failure = GatewayError("backend_error", f"backend {route.backend!r} sent unusable embeddings: {exc}")
        if failure is None:
            failure = GatewayError("no_healthy_backend", "no backend of it serves embeddings")
        raise _as_backend_failure(model, failure)


def _rows(data: Any, count: int) -> list[Any]:
    """The embeddings of an OpenAI embeddings answer, in input order."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != count:
        raise ValueError(f"expected {count} embeddings")
    if not all(isinstance(item, dict) and isinstance(item.get("embedding"), list) for item in items):
        raise ValueError("an item has no embedding list")
    ordered = sorted(items, key=lambda item: item.get("index", 0) if isinstance(item.get("index"), int) else 0)
    return [item["embedding"] for item in ordered]


def _as_backend_failure(model: str, exc: GatewayError) -> GatewayError:
    """Whatever went wrong, a failure of the gateway's own embedding backend: never the client's 4xx, and never
    an upstream body passed through as if it answered the client's request."""
    code = exc.code if exc.code in _BACKEND_FAILURES else "backend_error"
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("retry-after", "retry-after-ms")}
    return GatewayError(code, f"The embedding model {model!r} failed: {exc.message}", headers=headers)
