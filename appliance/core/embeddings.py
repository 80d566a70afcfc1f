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
from appliance.common.errors import GatewayError
from appliance.core import side_calls
from appliance.core.catalog import Catalog
from appliance.observe import metrics
from appliance.providers.base import EMBEDDINGS, Provider

ROUTER, CACHE = "router", "cache"  # purposes, as the metrics label them

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
        return await side_calls.ask(
            catalog, providers, model, EMBEDDINGS, request_id=request_id, timeout_s=self.settings.timeout_s,
            what="the embedding model", body=lambda route: {"model": route.upstream_model, "input": texts},
            read=lambda _, reply: list(vectors.unit_rows(_rows(reply.data, len(texts)))))


def _rows(data: Any, count: int) -> list[Any]:
    """The embeddings of an OpenAI embeddings answer, in input order."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != count:
        raise ValueError(f"expected {count} embeddings")
    if not all(isinstance(item, dict) and isinstance(item.get("embedding"), list) for item in items):
        raise ValueError("an item has no embedding list")
    ordered = sorted(items, key=lambda item: item.get("index", 0) if isinstance(item.get("index"), int) else 0)
    return [item["embedding"] for item in ordered]
