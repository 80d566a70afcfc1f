"""The Provider protocol: what the pipeline asks of a backend, whatever wire format it speaks.

Providers translate wire formats and do I/O through the transport. They never touch storage or the
web server. Every failure leaves a provider as a GatewayError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.common.errors import GatewayError
from appliance.providers.transport import ConnectError, Limits, ReadError, StreamResponse, Timeout, TransportError

# The OpenAI endpoints a provider can serve, as the path after /v1/.
CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
# Anthropic's own endpoints, which only an Anthropic backend serves: Messages bodies pass through to it.
MESSAGES = "messages"
COUNT_TOKENS = "messages/count_tokens"
# The extension endpoints: JSON in, JSON out (rerank, score, moderations, image generations), multipart in
# (image edits, transcriptions, translations: streamed through), JSON in and audio out (speech).
RERANK = "rerank"
SCORE = "score"
MODERATIONS = "moderations"
IMAGES = "images/generations"
IMAGE_EDITS = "images/edits"
TRANSCRIPTIONS = "audio/transcriptions"
TRANSLATIONS = "audio/translations"
SPEECH = "audio/speech"
UPLOADS = frozenset((IMAGE_EDITS, TRANSCRIPTIONS, TRANSLATIONS))  # multipart bodies, never read whole

# The capability each endpoint needs (common/capabilities.py names them and gives each kind's default).
CAPABILITY_OF = {CHAT: "chat", COMPLETIONS: "completions", EMBEDDINGS: "embeddings", RERANK: "rerank",
                 SCORE: "rerank", MODERATIONS: "moderations", IMAGES: "images", IMAGE_EDITS: "images",
                 TRANSCRIPTIONS: "transcriptions", TRANSLATIONS: "transcriptions", SPEECH: "speech"}


def serves(capabilities: frozenset[str], endpoint: str) -> bool:
    """Does a backend with ``capabilities`` serve ``endpoint``? (An endpoint that needs none: no.)"""
    needed = CAPABILITY_OF.get(endpoint)
    return needed is not None and needed in capabilities

# Model listing runs in the refresh loop: a hung backend must not hold it for a generation timeout.
LISTING_TIMEOUT_S = 10.0


@dataclass(slots=True)
class ModelInfo:
    """What a backend tells about one of its models (None: not known)."""

    id: str
    created: int | None = None
    context_window: int | None = None  # the window the server runs with
    context_window_trained: int | None = None  # the model's trained maximum
    capabilities: dict[str, bool] = field(default_factory=dict)
    loaded: bool | None = None
    aliases: tuple[str, ...] = ()  # other names that reach it (Ollama: 'llama3.2' for 'llama3.2:latest')


class Upload(Protocol):
    """A multipart body on its way through (core/uploads.py): its bytes as they come, the model field renamed."""

    content_type: str  # multipart/form-data with the client's boundary

    def length(self, model: str) -> int | None: ...  # None: not known (sent chunked)

    def chunks(self, model: str) -> AsyncIterator[bytes]: ...


@dataclass(slots=True)
class Call:
    """One upstream request in OpenAI terms: the body is already addressed to the backend's model."""

    endpoint: str
    body: dict[str, Any]
    request_id: str
    headers: dict[str, str] = field(default_factory=dict)  # client headers that may travel upstream
    limits: Limits | None = None  # None: the backend's configured timeouts
    # The request's key's own secret for this backend (BYOK), sent instead of the backend's api_key.
    api_key: str | None = field(default=None, repr=False)
    upload: Upload | None = None  # a multipart body, sent instead of ``body`` (which names the model)


@dataclass(slots=True)
class Reply:
    """A successful non-streaming answer, as OpenAI JSON."""

    body: bytes
    data: dict[str, Any] | None  # the parsed body, when the provider had to parse it anyway
    upstream_s: float
    headers: dict[str, str] = field(default_factory=dict)


class EventStream(Protocol):
    """A streaming answer: OpenAI chat/completions SSE events, whole, in the order received."""

    headers_after_s: float  # time the backend took to start answering
    headers: dict[str, str]

    def __aiter__(self) -> AsyncIterator[list[bytes]]: ...


class Provider(Protocol):
    name: str
    kind: str  # what the backend is: ollama, vllm, llamacpp, llama-cpp-python, lmstudio, sglang, openai
    root: str  # the server's root URL (no /v1): where /proxy/{backend}/{path} calls go
    credentials: dict[str, str]  # the backend's own key, in the header it expects ({} without one)

    def credentials_for(self, api_key: str | None) -> dict[str, str]: ...  # a key's own (BYOK), else ours

    async def send(self, call: Call) -> Reply: ...

    def stream(self, call: Call) -> AbstractAsyncContextManager[EventStream]: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def load(self) -> Any: ...  # resilience.Load | None: the backend's own queue, where it has one

    def supports(self, endpoint: str) -> bool: ...

    # The request as it is (JSON or a multipart upload), the answer as it comes: for answers that are not
    # OpenAI JSON (audio, events) or bodies that must not be read whole. GatewayError for a 4xx/5xx.
    def exchange(self, call: Call) -> AbstractAsyncContextManager[StreamResponse]: ...


def unsupported(backend: str, endpoint: str) -> GatewayError:
    return GatewayError("unsupported", f"backend {backend!r} does not serve /v1/{endpoint}", param="model")


def transport_failure(exc: TransportError, backend: str, limits: Limits) -> GatewayError:
    """A transport failure in the gateway's vocabulary."""
    if isinstance(exc, Timeout):
        return GatewayError("backend_timeout", f"backend {backend!r} did not answer within {limits.total_s:g} s")
    if isinstance(exc, ConnectError):
        return GatewayError("backend_unreachable", f"backend {backend!r} is unreachable: {exc}")
    assert isinstance(exc, ReadError | TransportError)
    return GatewayError("backend_unreachable", f"connection to backend {backend!r} failed: {exc}")


# Upstream response headers that describe the hop, not the answer.
HOP_HEADERS = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "content-length", "content-encoding", "date", "server", "x-request-id")
)


def answer_headers(headers: Any) -> dict[str, str]:
    """Upstream response headers worth passing to the client."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS and k.lower() != "content-type"}
