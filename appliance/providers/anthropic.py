"""A remote Anthropic Messages API (api.anthropic.com or a compatible proxy).

OpenAI chat calls are answered in OpenAI's shapes (the wire mapping lives in anthropic_translate; this
module does the I/O). Messages and count_tokens calls (endpoints MESSAGES, COUNT_TOKENS) carry an
Anthropic body already and pass through: the answer comes back as Anthropic sent it, a stream as its
whole SSE events. The gateway's own API key for the backend (or the request's key's own one for it, set by
an admin: ``Call.api_key``) travels as ``x-api-key``, with the gateway's ``anthropic-version``; the key the
client presented never leaves the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson

from appliance.common import capabilities
from appliance.common.config import BackendSettings
from appliance.common.errors import GatewayError
from appliance.common.sse import DONE, event_data
from appliance.providers.anthropic_translate import ChatStream, chat_error, chat_response, messages_request
from appliance.providers.base import (
    CHAT,
    COUNT_TOKENS,
    LISTING_TIMEOUT_S,
    MESSAGES,
    Call,
    ModelInfo,
    Reply,
    serves,
    transport_failure,
    unsupported,
)
from appliance.providers.openai_compat import OpenAIStream
from appliance.providers.transport import Limits, StreamResponse, Transport, TransportError

log = logging.getLogger("appliance.providers.anthropic")

API_VERSION = "2023-06-01"

# Client headers worth passing on: betas that need no body field (e.g. a longer context window).
_FORWARDED = ("anthropic-beta",)

# The model list is paged (1000 a page at most); a catalogue longer than this is not a model server's.
_PAGE_SIZE = 1000
_MAX_PAGES = 10


def anthropic_root(url: str) -> str:
    """The API root: ``https://api.anthropic.com`` and ``https://api.anthropic.com/v1`` both work."""
    return url.rstrip("/").removesuffix("/v1")


def event_parts(event: bytes) -> tuple[str | None, Any]:
    """The ``event:`` name and parsed ``data:`` of one SSE event (data None: a comment or empty event)."""
    name = None
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
            break
    data = event_data(event)
    if not data:
        return name, None
    try:
        return name, orjson.loads(data)
    except orjson.JSONDecodeError:
        raise GatewayError("backend_error", "Anthropic sent a stream event whose data is not JSON.") from None


class AnthropicStream:
    """Anthropic's named SSE events, relayed as OpenAI chat SSE events ending in ``[DONE]``."""

    def __init__(self, response: StreamResponse, translator: ChatStream, backend: str, limits: Limits) -> None:
        # Whole SSE events as they arrive, transport failures already in the gateway's vocabulary.
        self._upstream = OpenAIStream(response, backend, limits)
        self._translator = translator
        self._backend = backend
        self.headers_after_s = response.headers_after_s
        self.headers: dict[str, str] = {}

    async def __aiter__(self) -> AsyncIterator[list[bytes]]:
        async with aclosing(self._upstream.__aiter__()) as batches:
            async for batch in batches:
                out: list[bytes] = []
                for event in batch:
                    if self._translator.done:
                        break  # nothing may follow message_stop; the body is still read to its end
                    try:
                        out += self._feed(event)
                    except GatewayError:
                        if out:  # what came before a mid-stream error still reaches the client
                            yield out
                        raise
                if out:
                    yield out
        if not self._translator.done:
            raise GatewayError("backend_error", f"backend {self._backend!r} ended the stream before message_stop")

    def _feed(self, event: bytes) -> list[bytes]:
        """One upstream event as the chat events it makes (ChatStream joins them; the relay meters each)."""
        try:
            name, data = event_parts(event)
            joined = self._translator.feed(name, data) if data is not None else b""
        except GatewayError as exc:
            log.warning("backend %r failed mid-stream: %s", self._backend, exc.message)
            raise
        events = [chunk + b"\n\n" for chunk in joined.split(b"\n\n") if chunk]
        return [*events, DONE] if self._translator.done else events


class AnthropicProvider:
    def __init__(self, settings: BackendSettings, transport: Transport) -> None:
        self.name = settings.name
        self.kind = "anthropic"
        self.capabilities = capabilities.of(settings.capabilities, self.kind)
        # The backend's key, never the client's: Anthropic wants it as x-api-key, with the API version.
        self.credentials = {"x-api-key": settings.api_key.get_secret_value()} if settings.api_key else {}
        self._auth = {"anthropic-version": API_VERSION, **self.credentials}
        self.root = anthropic_root(settings.url)
        self._transport = transport
        self._limits = Limits(settings.timeout_s, settings.connect_timeout_s)
        self._listing_limits = Limits(min(settings.timeout_s, LISTING_TIMEOUT_S), settings.connect_timeout_s)

    def supports(self, endpoint: str) -> bool:
        return endpoint in (MESSAGES, COUNT_TOKENS) or (endpoint == CHAT and serves(self.capabilities, CHAT))

    def exchange(self, call: Call) -> AbstractAsyncContextManager[StreamResponse]:
        raise unsupported(self.name, call.endpoint)

    async def load(self) -> None:
        """Anthropic reports no queue; least_busy counts the gateway's own in-flight requests."""
        return None

    def credentials_for(self, api_key: str | None) -> dict[str, str]:
        """The header carrying a key's own secret for this backend (BYOK), or the backend's own key."""
        return self.credentials if api_key is None else {"x-api-key": api_key}

    def _headers(self, call: Call) -> dict[str, str]:
        forwarded = {name: call.headers[name] for name in _FORWARDED if call.headers.get(name)}
        return {**forwarded, "content-type": "application/json", "x-request-id": call.request_id, **self._auth,
                **self.credentials_for(call.api_key)}

    def _payload(self, call: Call, *, stream: bool) -> bytes:
        if call.endpoint in (MESSAGES, COUNT_TOKENS):
            return orjson.dumps(call.body)  # the client's own body, addressed to the upstream model
        if call.endpoint != CHAT:
            raise GatewayError("unsupported", f"backend {self.name!r} (Anthropic) does not serve "
                               f"/v1/{call.endpoint}", param="model")
        return orjson.dumps({**messages_request(call.body), "stream": stream})

    def _path(self, call: Call) -> str:
        return "/v1/messages/count_tokens" if call.endpoint == COUNT_TOKENS else "/v1/messages"

    async def send(self, call: Call) -> Reply:
        payload = self._payload(call, stream=False)
        limits = call.limits or self._limits
        if call.endpoint != CHAT:
            return await self._pass(call, payload, limits)
        message, elapsed_s = await self._fetch("POST", "/v1/messages", limits, self._headers(call), payload)
        answer = chat_response(message, model=call.body.get("model") or "")
        return Reply(orjson.dumps(answer), answer, elapsed_s, {})

    async def _pass(self, call: Call, payload: bytes, limits: Limits) -> Reply:
        """A Messages or count_tokens answer as Anthropic sent it (parsed beside, for its usage)."""
        raw, data, elapsed_s = await self._exchange("POST", self._path(call), limits, self._headers(call), payload)
        return Reply(raw, data, elapsed_s, {})  # its headers describe the gateway's account

    @asynccontextmanager
    async def stream(self, call: Call) -> AsyncIterator[AnthropicStream | OpenAIStream]:
        """Chat: Anthropic's events translated to chat chunks. Messages: Anthropic's events, whole, as they come."""
        payload = self._payload(call, stream=True)
        limits = call.limits or self._limits
        options = call.body.get("stream_options")
        try:
            async with self._transport.stream("POST", self.root + self._path(call), limits=limits,
                                              headers=self._headers(call), body=payload) as response:
                if not 200 <= response.status < 300:
                    raise chat_error(response.status, await response.read(), headers=dict(response.headers))
                if call.endpoint == MESSAGES:
                    upstream = OpenAIStream(response, self.name, limits)  # whole SSE events, whatever the API
                    upstream.headers = {}  # rate limits of the gateway's account are not the client's
                    yield upstream
                else:
                    translator = ChatStream(call.body.get("model") or "", include_usage=isinstance(
                        options, dict) and options.get("include_usage") is True)
                    yield AnthropicStream(response, translator, self.name, limits)
        except TransportError as exc:
            raise transport_failure(exc, self.name, limits) from exc

    async def list_models(self) -> list[ModelInfo]:
        """GET /v1/models, every page (newest models first, as Anthropic lists them)."""
        models: list[ModelInfo] = []
        query = f"?limit={_PAGE_SIZE}"
        for _ in range(_MAX_PAGES):
            page, _elapsed = await self._fetch("GET", "/v1/models" + query, self._listing_limits, self._auth)
            models += filter(None, map(model_info, page.get("data") or ()))
            last = page.get("last_id")
            if page.get("has_more") is not True or not isinstance(last, str) or not last:
                break
            query = f"?limit={_PAGE_SIZE}&after_id={quote(last, safe='')}"
        return models

    async def _fetch(self, method: str, path: str, limits: Limits, headers: dict[str, str],
                     body: bytes | None = None) -> tuple[dict[str, Any], float]:
        """A whole exchange: the answer as a JSON object and the time it took, or the error it makes."""
        _raw, data, elapsed_s = await self._exchange(method, path, limits, headers, body)
        return data, elapsed_s

    async def _exchange(self, method: str, path: str, limits: Limits, headers: dict[str, str],
                        body: bytes | None) -> tuple[bytes, dict[str, Any], float]:
        """The answer's bytes, the JSON object they hold and the time it took, or the error it makes."""
        try:
            response = await self._transport.request(method, self.root + path, limits=limits, headers=headers,
                                                     body=body)
        except TransportError as exc:
            raise transport_failure(exc, self.name, limits) from exc
        if not 200 <= response.status < 300:
            raise chat_error(response.status, response.body, headers=dict(response.headers))
        try:
            data = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            return response.body, data, response.elapsed_s
        raise GatewayError("backend_error", f"backend {self.name!r} answered {path.partition('?')[0]} with a "
                           "body that is not a JSON object")


def model_info(entry: Any) -> ModelInfo | None:
    """One /v1/models entry; None for an unreadable or retired one (requests naming it fail)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        return None
    if entry.get("lifecycle") == "retired":
        return None
    capabilities = {"chat": True, "completions": False, "embeddings": False, "tools": True}
    listed = entry.get("capabilities") if isinstance(entry.get("capabilities"), dict) else {}
    for ours, theirs in (("vision", "image_input"), ("reasoning", "thinking")):
        support = listed.get(theirs)
        if isinstance(support, dict) and isinstance(support.get("supported"), bool):
            capabilities[ours] = support["supported"]
    window = entry.get("max_input_tokens")
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    return ModelInfo(id=entry["id"], created=_unix(entry.get("created_at")), context_window=window,
                     context_window_trained=window, capabilities=capabilities)


def _unix(value: Any) -> int | None:
    """Unix seconds of an RFC 3339 time; None when missing, unreadable or the epoch (Anthropic: unknown)."""
    if not isinstance(value, str):
        return None
    try:
        seconds = int(datetime.fromisoformat(value).timestamp())
    except ValueError:
        return None
    return seconds if seconds > 0 else None
