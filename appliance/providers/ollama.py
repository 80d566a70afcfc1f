"""Ollama through its native API (/api/chat, /api/generate, /api/embed), answering in OpenAI's shapes.

The native API rather than Ollama's own /v1: it honours max_completion_tokens, keeps the Modelfile's
sampling defaults, takes num_ctx, and tells context windows and capabilities (/api/show, /api/ps).
The wire mapping lives in ollama_translate; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any

import orjson

from appliance.common import capabilities
from appliance.common.config import BackendSettings
from appliance.common.errors import GatewayError
from appliance.providers.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    LISTING_TIMEOUT_S,
    Call,
    ModelInfo,
    Reply,
    serves,
    transport_failure,
    unsupported,
)
from appliance.providers.ollama_translate import (
    DROPPED_FIELDS,
    ChunkTranslator,
    LineSplitter,
    ShownModel,
    chat_completion,
    chat_request,
    embed_request,
    embedding_list,
    encoding_format,
    generate_request,
    model_entry,
    ollama_error,
    shown_model,
    text_completion,
)
from appliance.providers.transport import Limits, StreamResponse, Transport, TransportError

log = logging.getLogger("appliance.providers.ollama")

_PATHS = {CHAT: "/api/chat", COMPLETIONS: "/api/generate", EMBEDDINGS: "/api/embed"}



def ollama_root(url: str) -> str:
    """The server root: a configured URL may carry Ollama's /v1 or /api prefix."""
    return url.rstrip("/").removesuffix("/v1").removesuffix("/api")


class OllamaStream:
    """An NDJSON stream from Ollama, relayed as OpenAI SSE events."""

    def __init__(self, response: StreamResponse, translator: ChunkTranslator, backend: str,
                 limits: Limits) -> None:
        self._response = response
        self._translator = translator
        self._backend = backend
        self._limits = limits
        self.headers_after_s = response.headers_after_s
        self.headers: dict[str, str] = {}

    async def __aiter__(self) -> AsyncIterator[list[bytes]]:
        async with aclosing(self._items()) as batches:
            async for items in batches:
                events, failure = self._translate(items)
                if events:  # what came before a mid-stream error still reaches the client
                    yield events
                if failure is not None:
                    raise failure
        if not self._translator.done:
            raise GatewayError("backend_error", f"backend {self._backend!r} ended the stream before its "
                               "final chunk")

    async def _items(self) -> AsyncIterator[list[dict[str, Any]]]:
        lines = LineSplitter()
        try:
            async for chunk in self._response.chunks():
                yield lines.feed(chunk)
        except TransportError as exc:
            raise transport_failure(exc, self._backend, self._limits) from exc
        yield lines.close()

    def _translate(self, items: list[dict[str, Any]]) -> tuple[list[bytes], GatewayError | None]:
        events: list[bytes] = []
        for item in items:
            try:
                events += self._translator.feed(item)
            except GatewayError as exc:
                log.warning("backend %r failed mid-stream: %s", self._backend, exc.message)
                return events, exc
        return events, None


class OllamaProvider:
    def __init__(self, settings: BackendSettings, transport: Transport) -> None:
        self.name = settings.name
        self.kind = "ollama"
        self.capabilities = capabilities.of(settings.capabilities, self.kind)
        self.root = ollama_root(settings.url)
        self._transport = transport
        self._limits = Limits(settings.timeout_s, settings.connect_timeout_s)
        self._listing_limits = Limits(min(settings.timeout_s, LISTING_TIMEOUT_S), settings.connect_timeout_s)
        self.credentials = ({"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key
                            else {})
        self._shown: dict[str, ShownModel] = {}  # digest -> /api/show facts; a digest's blob never changes
        self._dropped_logged: set[str] = set()

    def supports(self, endpoint: str) -> bool:
        return endpoint in _PATHS and serves(self.capabilities, endpoint)

    def exchange(self, call: Call) -> AbstractAsyncContextManager[StreamResponse]:
        raise unsupported(self.name, call.endpoint)

    def credentials_for(self, api_key: str | None) -> dict[str, str]:
        """The header carrying a key's own secret for this backend (BYOK), or the backend's own key."""
        return self.credentials if api_key is None else {"Authorization": f"Bearer {api_key}"}

    def _headers(self, request_id: str | None = None, api_key: str | None = None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.credentials_for(api_key)}
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    def _upstream(self, call: Call, *, stream: bool) -> tuple[str, dict[str, Any]]:
        """The Ollama path and body for one call."""
        self._log_dropped(call.body)
        if call.endpoint == CHAT:
            return _PATHS[CHAT], chat_request(call.body, stream=stream)
        if call.endpoint == COMPLETIONS:
            return _PATHS[COMPLETIONS], generate_request(call.body, stream=stream)
        if call.endpoint == EMBEDDINGS and not stream:
            return _PATHS[EMBEDDINGS], embed_request(call.body)
        streamed = "streamed " if stream else ""
        raise GatewayError("unsupported", f"backend {self.name!r} (Ollama) does not serve {streamed}"
                           f"/v1/{call.endpoint}", param="model")

    def _log_dropped(self, body: dict[str, Any]) -> None:
        for field in DROPPED_FIELDS:
            if field in body and field not in self._dropped_logged:
                self._dropped_logged.add(field)
                log.info("backend %r: Ollama has no %r; the field is dropped (logged once)", self.name, field)

    async def send(self, call: Call) -> Reply:
        path, payload = self._upstream(call, stream=False)
        limits = call.limits or self._limits
        try:
            response = await self._transport.request("POST", self.root + path, limits=limits,
                                                     headers=self._headers(call.request_id, call.api_key),
                                                     body=orjson.dumps(payload))
        except TransportError as exc:
            raise transport_failure(exc, self.name, limits) from exc
        if response.status != 200:
            raise ollama_error(response.status, response.body, self.name, path)
        data = self._json(response.body, path)
        model = call.body["model"]
        if call.endpoint == CHAT:
            answer = chat_completion(data, model)
        elif call.endpoint == COMPLETIONS:
            answer = text_completion(data, model)
        else:
            answer = embedding_list(data, model, encoding_format(call.body))
        return Reply(orjson.dumps(answer), answer, response.elapsed_s, {})

    @asynccontextmanager
    async def stream(self, call: Call) -> AsyncIterator[OllamaStream]:
        path, payload = self._upstream(call, stream=True)
        limits = call.limits or self._limits
        stream_options = call.body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        translator = ChunkTranslator(call.endpoint, call.body["model"], include_usage=include_usage)
        try:
            async with self._transport.stream("POST", self.root + path, limits=limits,
                                              headers=self._headers(call.request_id, call.api_key),
                                              body=orjson.dumps(payload)) as response:
                if response.status != 200:
                    raise ollama_error(response.status, await response.read(), self.name, path)
                yield OllamaStream(response, translator, self.name, limits)
        except TransportError as exc:
            raise transport_failure(exc, self.name, limits) from exc

    def _json(self, body: bytes, path: str) -> dict[str, Any]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise GatewayError("backend_error", f"backend {self.name!r} answered {path} with a body that is "
                               "not a JSON object")
        return data

    # ------------------------------------------------------------------ models

    async def load(self) -> None:
        """Ollama reports no queue depth; least_busy counts its in-flight requests only."""
        return None

    async def list_models(self) -> list[ModelInfo]:
        """/api/tags, enriched by /api/show (once per digest) and /api/ps (what is loaded, and its window)."""
        tags = await self._get_json("/api/tags")
        entries = [m for m in tags.get("models") or () if isinstance(m, dict) and isinstance(m.get("name"), str)]
        running, *shown = await asyncio.gather(self._running(), *(self._show(entry) for entry in entries))
        digests = {entry.get("digest") for entry in entries}
        self._shown = {digest: facts for digest, facts in self._shown.items() if digest in digests}
        return [model_entry(entry, facts, running) for entry, facts in zip(entries, shown, strict=True)]

    async def _get_json(self, path: str) -> dict[str, Any]:
        try:
            response = await self._transport.request("GET", self.root + path, limits=self._listing_limits,
                                                     headers=self.credentials)
        except TransportError as exc:
            raise transport_failure(exc, self.name, self._listing_limits) from exc
        if response.status != 200:
            raise ollama_error(response.status, response.body, self.name, path)
        return self._json(response.body, path)

    async def _running(self) -> dict[str, int | None] | None:
        """Loaded model -> its runtime context window; None when /api/ps does not answer."""
        try:
            data = await self._get_json("/api/ps")
        except GatewayError:
            return None
        running: dict[str, int | None] = {}
        for entry in data.get("models") or ():
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                window = entry.get("context_length")
                running[entry["name"]] = window if isinstance(window, int) and window > 0 else None
        return running

    async def _show(self, entry: dict[str, Any]) -> ShownModel | None:
        digest = entry.get("digest")
        if isinstance(digest, str) and digest in self._shown:
            return self._shown[digest]
        try:
            response = await self._transport.request(
                "POST", self.root + "/api/show", limits=self._listing_limits, headers=self._headers(),
                body=orjson.dumps({"model": entry["name"]}),
            )
            data = orjson.loads(response.body) if response.status == 200 else None
        except (TransportError, orjson.JSONDecodeError):
            data = None
        if not isinstance(data, dict):
            return None  # the model is still listed, its capabilities unknown
        facts = shown_model(data)
        if isinstance(digest, str):
            self._shown[digest] = facts
        return facts
