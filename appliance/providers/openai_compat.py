"""Any OpenAI-compatible server: vLLM, llama.cpp, llama-cpp-python, LM Studio, SGLang, TGI, OpenAI.

The body goes upstream as the client sent it (model renamed); answers come back byte for byte.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from appliance.common import capabilities
from appliance.common.config import BackendSettings
from appliance.common.errors import GatewayError, upstream_error
from appliance.common.sse import EventSplitter, first_unreadable, readable
from appliance.providers.base import (
    CHAT,
    COMPLETIONS,
    LISTING_TIMEOUT_S,
    Call,
    ModelInfo,
    Reply,
    answer_headers,
    serves,
    transport_failure,
    unsupported,
)
from appliance.providers.load import Load, parse_llamacpp_slots, parse_vllm_metrics
from appliance.providers.transport import Limits, StreamResponse, Transport, TransportError

log = logging.getLogger("appliance.providers.openai")

_SHOWN_BYTES = 80  # of an unreadable event, in the log


def api_base(url: str) -> str:
    """Base URL for /chat/completions etc.: a URL without a path means the server's /v1."""
    rest = url.partition("://")[2]
    return url if "/" in rest else url + "/v1"


class OpenAIStream:
    def __init__(self, response: StreamResponse, backend: str, limits: Limits) -> None:
        self._response = response
        self._backend = backend
        self._limits = limits
        self.headers_after_s = response.headers_after_s
        self.headers = answer_headers(response.headers)

    async def __aiter__(self) -> AsyncIterator[list[bytes]]:
        """Whole events as they arrive; a backend_error at the first event a client could not read.

        The events before it still go out; it and everything after are dropped, since they are not for a
        client to see (a binary body, an HTML page, a JSON answer where a stream was asked for, a cut event).
        """
        splitter = EventSplitter()
        try:
            async for chunk in self._response.chunks():
                events = splitter.feed(chunk)
                if events:
                    bad = first_unreadable(events)
                    if bad is not None:
                        if bad:
                            yield events[:bad]
                        raise self._unreadable(events[bad])
                    yield events
        except TransportError as exc:
            raise transport_failure(exc, self._backend, self._limits) from exc
        tail = splitter.close()
        if tail:
            if not readable(tail):
                raise self._unreadable(tail)
            yield [tail]

    def _unreadable(self, event: bytes) -> GatewayError:
        log.warning("backend %r sent a stream event no client could read, dropped with the rest of the stream: "
                    "%r", self._backend, event[:_SHOWN_BYTES])
        return GatewayError("backend_error", f"backend {self._backend!r} sent a stream that is not server-sent "
                            "events of JSON")


class OpenAICompatProvider:
    def __init__(self, settings: BackendSettings, transport: Transport, kind: str = "openai") -> None:
        self.name = settings.name
        self.kind = kind
        self._base = api_base(settings.url)
        self.root = self._base.removesuffix("/v1")
        self._transport = transport
        self._limits = Limits(settings.timeout_s, settings.connect_timeout_s)
        # Listing runs in the refresh loop: a hung backend must not hold it for a generation timeout.
        self._listing_limits = Limits(min(settings.timeout_s, LISTING_TIMEOUT_S), settings.connect_timeout_s)
        self.credentials = ({"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key
                            else {})
        # Expanded once: supports() runs for every target of every request.
        self._configured = (capabilities.of(settings.capabilities, self.kind)
                            if settings.capabilities is not None else None)

    @property
    def capabilities(self) -> frozenset[str]:
        """As configured, else by kind (which the model list may tell only after start)."""
        return self._configured if self._configured is not None else capabilities.of(None, self.kind)

    def supports(self, endpoint: str) -> bool:
        return serves(self.capabilities, endpoint)  # a route the server lacks still answers 404: see _error

    def credentials_for(self, api_key: str | None) -> dict[str, str]:
        """The header carrying a key's own secret for this backend (BYOK), or the backend's own key."""
        return self.credentials if api_key is None else {"Authorization": f"Bearer {api_key}"}

    def _headers(self, call: Call) -> dict[str, str]:
        if call.upload is not None:
            length = call.upload.length(call.body["model"])
            sized = {"Content-Length": str(length)} if length is not None else {}
            return {**call.headers, "Content-Type": call.upload.content_type, **sized,
                    "X-Request-ID": call.request_id, **self.credentials_for(call.api_key)}
        return {**call.headers, "Content-Type": "application/json", "X-Request-ID": call.request_id,
                **self.credentials_for(call.api_key)}

    async def send(self, call: Call) -> Reply:
        limits = call.limits or self._limits
        try:
            response = await self._transport.request(
                "POST", f"{self._base}/{call.endpoint}", limits=limits, headers=self._headers(call),
                body=orjson.dumps(call.body),
            )
        except TransportError as exc:
            raise transport_failure(exc, self.name, limits) from exc
        if response.status >= 400:
            raise self._error(call, response.status, response.body, response.headers)
        try:
            data = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise GatewayError("backend_error", f"backend {self.name!r} sent a body that is not JSON") from None
        return Reply(response.body, data, response.elapsed_s, answer_headers(response.headers))

    @asynccontextmanager
    async def stream(self, call: Call) -> AsyncIterator[OpenAIStream]:
        limits = call.limits or self._limits
        try:
            async with self._transport.stream(
                "POST", f"{self._base}/{call.endpoint}", limits=limits, headers=self._headers(call),
                body=orjson.dumps(call.body),
            ) as response:
                if response.status >= 400:
                    raise self._error(call, response.status, await response.read(), response.headers)
                yield OpenAIStream(response, self.name, limits)
        except TransportError as exc:
            raise transport_failure(exc, self.name, limits) from exc

    @asynccontextmanager
    async def exchange(self, call: Call) -> AsyncIterator[StreamResponse]:
        """The request as it is (a multipart upload streams through), the answer as it comes."""
        limits = call.limits or self._limits
        body = call.upload.chunks(call.body["model"]) if call.upload is not None else orjson.dumps(call.body)
        try:
            async with self._transport.stream("POST", f"{self._base}/{call.endpoint}", limits=limits,
                                              headers=self._headers(call), body=body) as response:
                if response.status >= 400:
                    raise self._error(call, response.status, await response.read(), response.headers)
                yield response
        except TransportError as exc:
            raise transport_failure(exc, self.name, limits) from exc

    def _error(self, call: Call, status: int, body: bytes, headers: Any = None) -> GatewayError:
        error = upstream_error(status, body, self.name, headers)
        if call.endpoint not in (CHAT, COMPLETIONS) and status in (404, 405, 501) and error.body is None:
            # The server has no such route (a bare 404 page), as opposed to an unknown model.
            return unsupported(self.name, call.endpoint)
        return error

    async def list_models(self) -> list[ModelInfo]:
        """GET /models, enriched with what llama.cpp and vLLM put there."""
        try:
            response = await self._transport.request("GET", f"{self._base}/models", limits=self._listing_limits,
                                                     headers=self.credentials)
        except TransportError as exc:
            raise transport_failure(exc, self.name, self._listing_limits) from exc
        if response.status >= 400:
            raise upstream_error(response.status, response.body, self.name)
        try:
            entries = orjson.loads(response.body)["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise GatewayError("backend_error", f"backend {self.name!r} sent an unreadable model list") from None
        entries = [entry for entry in entries if isinstance(entry, dict) and entry.get("id")]
        if self.kind == "openai" and entries:
            self.kind = kind_from_owner(entries[0].get("owned_by"))
        models = [model_info(entry) for entry in entries]
        if self.kind == "llamacpp" and len(models) == 1:
            await self._add_props(models[0])
        return models

    async def load(self) -> Load | None:
        """The server's own queue, where it reports one: vLLM's /metrics, llama.cpp's /slots."""
        path = {"vllm": "/metrics", "llamacpp": "/slots"}.get(self.kind)
        if path is None:
            return None
        try:
            response = await self._transport.request("GET", self.root + path, limits=self._listing_limits,
                                                     headers=self.credentials)
        except TransportError as exc:
            raise transport_failure(exc, self.name, self._listing_limits) from exc
        if response.status != 200:
            return None  # e.g. llama.cpp started without --slots
        if self.kind == "vllm":
            return parse_vllm_metrics(response.body.decode("utf-8", "replace"))
        try:
            return parse_llamacpp_slots(orjson.loads(response.body))
        except orjson.JSONDecodeError:
            return None

    async def _add_props(self, info: ModelInfo) -> None:
        """llama.cpp's /props: the runtime window per slot and what the chat template can do."""
        try:
            response = await self._transport.request("GET", f"{self.root}/props", limits=self._listing_limits,
                                                     headers=self.credentials)
            props = orjson.loads(response.body) if response.status == 200 else {}
        except (TransportError, orjson.JSONDecodeError):
            return
        if not isinstance(props, dict):
            return
        settings = props.get("default_generation_settings")
        if isinstance(settings, dict):
            info.context_window = _int(settings.get("n_ctx")) or info.context_window
        caps = props.get("chat_template_caps")
        if isinstance(caps, dict) and isinstance(caps.get("supports_tools"), bool):
            info.capabilities["tools"] = caps["supports_tools"]
        modalities = props.get("modalities")
        if isinstance(modalities, dict) and isinstance(modalities.get("vision"), bool):
            info.capabilities["vision"] = modalities["vision"]


# owned_by in /v1/models tells the servers apart.
_OWNERS = {"vllm": "vllm", "llamacpp": "llamacpp", "me": "llama-cpp-python", "sglang": "sglang",
           "organization_owner": "lmstudio"}


def kind_from_owner(owned_by: Any) -> str:
    return _OWNERS.get(owned_by, "openai") if isinstance(owned_by, str) else "openai"


def model_info(entry: dict[str, Any]) -> ModelInfo:
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    created = entry.get("created")
    return ModelInfo(
        id=str(entry["id"]),
        created=created if isinstance(created, int) else None,
        context_window=_int(entry.get("max_model_len")) or _int(entry.get("context_length")),
        context_window_trained=_int(meta.get("n_ctx_train")),
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None
