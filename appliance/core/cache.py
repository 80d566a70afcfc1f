"""The response cache: what is cacheable, its key, and the two levels that hold answers.

A worker looks in its own LRU first, then in the SQLite table every worker shares; an answer stored on a
miss is written through the writer connection at once, so the other workers see it on their next lookup.
Staleness is bounded by the TTL: an entry a worker holds in memory is served until it expires, even if
another worker's sweep evicted its row for size meanwhile.

The semantic level (chat only, where a route turns it on) is asked only after the exact key missed: an entry
stored for a chat request also holds its context (the key of the request without its last user message:
route, parameters, tools, the conversation before, the key's scope, the embedding model) and that message's
vector. A request whose context matches is answered by the most similar of the newest entries of its
context (read from SQLite, compared with SimSIMD), if that one is similar enough.

The hit path is kept cheap (one sha256, orjson only, no pydantic): see tests/perf/cache_hit.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import sqlite3
import time
from array import array
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson
from cachetools import LRUCache

from appliance.accounts.usage import Tokens
from appliance.common.chat import content_text
from appliance.common.config import CacheSettings, RouteCacheSettings
from appliance.common.errors import GatewayError
from appliance.common.sse import DONE
from appliance.core.shared_cache import Entry, SharedCache
from appliance.storage import cache_repo
from appliance.storage.db import Database
from appliance.storage.writer import BufferedWriter

log = logging.getLogger("appliance.core.cache")

# The endpoints, as providers.base names them (not imported: the cache needs no transport).
CHAT, COMPLETIONS, EMBEDDINGS = "chat/completions", "completions", "embeddings"

_ENDPOINTS = frozenset((CHAT, COMPLETIONS, EMBEDDINGS))

# Body fields that do not change the answer: who asks, how it is delivered, what the gateway does with it
# (the last six are pipeline.GATEWAY_FIELDS; its `template` is gone by then, its rendered messages in the body
# instead). `safety_identifier` succeeds `user`; `prompt_cache_key`
# only steers the backend's prompt cache.
_NOT_ANSWER = frozenset(("user", "safety_identifier", "stream", "stream_options", "metadata", "store",
                         "service_tier", "prompt_cache_key",
                         "fallbacks", "fallback", "provider", "timeout", "retries", "guardrails"))
_TRUE = ("1", "true", "yes")
_INTEGRAL = 2.0**53  # floats below this that are whole numbers key like ints: temperature 0.0 == 0

# Answers larger than this stay in SQLite only, so memory_entries bounds a worker's memory (1024 x 128 KiB).
MEMORY_MAX_BODY = 128 * 1024


class Decision(NamedTuple):
    cacheable: bool  # look the request up (or report BYPASS) and store its answer
    bypass: bool  # the client asked not to be answered from the cache
    ttl_s: float  # how long a stored answer lives


class Hit(NamedTuple):
    body: bytes  # the answer as the backend sent it
    age_s: float
    tokens: Tokens


class Store(NamedTuple):
    """Where a request's answer goes once it came: its key and, for the semantic cache, context and vector."""

    key: str
    ttl_s: float
    context: str | None = None
    vector: array | None = None


class Policy(NamedTuple):
    """How a route's answers are cached: [cache], as the route's own ``cache`` overrides it."""

    shared: bool  # entries are found by every key
    semantic: bool
    threshold: float  # the similarity a semantic hit needs


def policy(settings: CacheSettings, own: RouteCacheSettings | None) -> Policy:
    def pick(name: str) -> Any:
        value = getattr(own, name) if own is not None else None
        return getattr(settings, name) if value is None else value

    return Policy(pick("shared"), pick("semantic"), pick("semantic_threshold"))


class Similar(NamedTuple):
    hit: Hit
    similarity: float


_NOT_CACHEABLE = Decision(False, False, 0.0)


def decide(endpoint: str, body: dict[str, Any], headers: Mapping[str, str], settings: CacheSettings) -> Decision:
    """Whether this request may be answered from (and stored in) the cache; header names are lower-case.

    Cacheable: embeddings always; chat and completions at temperature 0 (absent counts as 1), at any
    temperature with ``nonzero_temperature`` or an X-Cache-TTL header. Streams only with ``settings.stream``.
    A bypass header on a cacheable request gives BYPASS; on one that is not, it changes nothing.
    """
    if not settings.enabled or endpoint not in _ENDPOINTS:
        return _NOT_CACHEABLE
    ttl_s = settings.ttl_s
    asked = headers.get("x-cache-ttl")
    if asked is not None:
        ttl_s = _ttl(asked, settings.max_ttl_s)
    if body.get("stream") is True and not settings.stream:
        return _NOT_CACHEABLE
    if not (asked is not None or endpoint == EMBEDDINGS or settings.nonzero_temperature
            or _zero_temperature(body.get("temperature"))):
        return _NOT_CACHEABLE
    bypass = (headers.get("x-appliance-no-cache", "").strip().lower() in _TRUE
              or headers.get("x-cache", "").strip().lower() == "no-cache")
    return Decision(True, bypass, ttl_s)


def _zero_temperature(value: Any) -> bool:
    return type(value) in (int, float) and value == 0


def _ttl(text: str, max_ttl_s: float) -> float:
    try:
        ttl_s = float(text)
    except ValueError:
        ttl_s = math.nan
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise GatewayError("invalid_value", f"X-Cache-TTL must be a positive number of seconds, not {text!r}.",
                           param="X-Cache-TTL")
    return min(ttl_s, max_ttl_s)


def cache_key(endpoint: str, body: dict[str, Any], served: str, scope: str | None) -> str:
    """sha256 hex of the canonical request: the fields that change the answer, ``model`` replaced by ``served``
    (the backend/model after routing), the endpoint and the scope (a key id; None when entries are shared).
    """
    fields = {name: int(value) if type(value) is float and value.is_integer() and abs(value) < _INTEGRAL else value
              for name, value in body.items() if name not in _NOT_ANSWER}
    fields["model"] = served
    return hashlib.sha256(orjson.dumps((endpoint, scope, fields), option=orjson.OPT_SORT_KEYS)).hexdigest()


def semantic_prompt(body: dict[str, Any], max_chars: int) -> str | None:
    """The text the semantic cache compares: the last message, when it is the user's and only text (an image
    or audio part could differ where the words agree), and not longer than ``max_chars``; else None."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, list) and not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return None
    text = content_text(content).strip()
    return text if text and len(text) <= max_chars else None


def context_key(body: dict[str, Any], served: str, scope: str | None, embedding_model: str) -> str:
    """The semantic cache's key: the chat request without its last message (see cache_key), the embedding
    model included (vectors of two models never compare)."""
    return cache_key(f"semantic:{embedding_model}", {**body, "messages": body["messages"][:-1]}, served, scope)


# ------------------------------------------------------------------------------------------ the two levels


class ResponseCache:
    """A per-worker LRU in front of the SQLite table shared by all workers.

    With ``shared`` (``[state] url``), exact-match entries live in Redis instead, for every node (see
    shared_cache.py); the table keeps only the semantic cache's entries (they are found by their vectors there).
    Failures of either store are logged and read as a miss: the cache never fails a request.
    """

    def __init__(self, db: Database, writer: BufferedWriter, settings: CacheSettings,
                 clock: Callable[[], float] = time.time, shared: SharedCache | None = None) -> None:
        self._db = db
        self._shared = shared
        self._writer = writer
        self._settings = settings
        self._clock = clock
        # key -> (body, created_at, expires_at, prompt_tokens, completion_tokens, estimated)
        self._memory: LRUCache[str, tuple[bytes, float, float, int | None, int | None, bool]] | None = (
            LRUCache(settings.memory_entries) if settings.memory_entries else None)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def reconfigure(self, settings: CacheSettings) -> None:
        """A reload's cache settings (the memory LRU keeps its size: cache.memory_entries needs a restart)."""
        self._settings = settings

    async def get(self, key: str) -> Hit | None:
        now = self._clock()
        memory = self._memory
        if memory is not None:
            entry = memory.get(key)
            if entry is not None:
                if entry[2] > now:
                    if self._shared is None:
                        cache_repo.touch(self._writer, key, now)
                    return Hit(entry[0], now - entry[1], Tokens(entry[3], entry[4], entry[5]))
                memory.pop(key, None)
        if self._shared is not None:
            return self._remember(key, await self._shared.get(key), now)
        try:
            row = await cache_repo.get(self._db, key, now)
        except (sqlite3.Error, ValueError) as exc:
            log.warning("cache lookup failed, answering as a miss: %s", exc)
            return None
        if row is None:
            return None
        body, created_at, expires_at, prompt, completion, estimated = row
        body = bytes(body)
        if memory is not None and len(body) <= MEMORY_MAX_BODY:
            memory[key] = (body, created_at, expires_at, prompt, completion, bool(estimated))
        cache_repo.touch(self._writer, key, now)
        return Hit(body, now - created_at, Tokens(prompt, completion, bool(estimated)))

    def _remember(self, key: str, entry: Entry | None, now: float) -> Hit | None:
        """A shared entry as a hit, kept in this worker's LRU too."""
        if entry is None or entry.expires_at <= now:
            return None
        if self._memory is not None and len(entry.body) <= MEMORY_MAX_BODY:
            self._memory[key] = entry
        return Hit(entry.body, now - entry.created_at, Tokens(entry.prompt, entry.completion, entry.estimated))

    async def similar(self, context: str, vector: array, threshold: float) -> Similar | None:
        """The live entry of ``context`` whose vector is nearest ``vector``, when at least ``threshold`` similar."""
        from appliance.core import vectors  # on first use: see vectors.py

        try:
            rows = await cache_repo.similar(self._db, context, self._clock(), self._settings.semantic_candidates)
        except (sqlite3.Error, ValueError) as exc:
            log.warning("semantic cache lookup failed, answering as a miss: %s", exc)
            return None
        found = vectors.nearest(vector, [blob for _, blob in rows])
        if found is None or found[1] < threshold:
            return None
        hit = await self.get(rows[found[0]][0])
        return Similar(hit, found[1]) if hit is not None else None

    async def put(self, key: str, *, endpoint: str, scope: str | None, served: str, body: bytes, tokens: Tokens,
                  ttl_s: float, context: str | None = None, vector: array | None = None) -> None:
        """Store an answer in this worker's LRU and, at once, in the shared table (with the semantic cache's
        ``context`` and ``vector`` when it has them)."""
        now = self._clock()
        body = bytes(body)
        expires_at = now + ttl_s
        blob = None
        if vector is not None:
            from appliance.core import vectors  # on first use: see vectors.py

            blob = vectors.to_bytes(vector)
        if self._memory is not None and len(body) <= MEMORY_MAX_BODY:
            self._memory[key] = (body, now, expires_at, tokens.prompt, tokens.completion, tokens.estimated)
        if self._shared is not None:
            shared = Entry(body, now, expires_at, tokens.prompt, tokens.completion, tokens.estimated)
            if not await self._shared.put(key, shared, int(self._settings.max_mb * 1024 * 1024)):
                log.debug("cache store in the shared state failed: the answer is not shared")
            if blob is None:
                return  # exact-match only: Redis holds it (the table keeps what the semantic cache searches)
        entry = cache_repo.CacheEntry(key, scope, endpoint, served, body, tokens.prompt, tokens.completion,
                                      tokens.estimated, cache_repo.size_of(body, blob), now, expires_at,
                                      context, blob)
        try:
            await cache_repo.put(self._db, entry)
        except (sqlite3.Error, ValueError) as exc:  # the answer went out already; only sharing it failed
            log.warning("cache store failed: %s", exc)

    async def sweep(self) -> tuple[int, int]:
        """Remove expired entries, then the least recently used beyond ``max_mb``: (expired, evicted)."""
        return await cache_repo.sweep(self._db, self._clock(), int(self._settings.max_mb * 1024 * 1024))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cache-sweep")

    async def _run(self) -> None:
        # Every worker sweeps on its own timer: deleting what another worker just deleted is harmless.
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self._settings.sweep_interval_s)
            except TimeoutError:
                pass
            else:
                return
            try:
                expired, evicted = await self.sweep()
            except Exception:
                log.exception("cache sweep failed")
            else:
                if expired or evicted:
                    log.debug("cache sweep: %d expired, %d evicted", expired, evicted)

    async def stop(self) -> None:
        """Stop the background sweep (never cancelled mid-transaction: it ends at its next wait)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None


# ------------------------------------------------------------------------------------------ streams


def synthesized_stream(body: bytes, *, include_usage: bool, usage: dict[str, Any] | None = None) -> bytes:
    """A stored chat.completion (or text_completion) as the OpenAI SSE stream that would have produced it.

    Chat: a role chunk, then per choice its reasoning, content, refusal and one chunk per tool call (with
    its index), a finish_reason chunk; the usage chunk (``usage`` if given, else the answer's) when
    ``include_usage``; ``data: [DONE]``. Text completions stream as text_completion chunks (one per choice).
    """
    data = orjson.loads(body)
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise ValueError("not a chat or text completion: no choices")
    base: dict[str, Any] = {"id": data.get("id"), "object": "chat.completion.chunk", "created": data.get("created"),
                            "model": data.get("model")}
    for name in ("system_fingerprint", "service_tier"):
        if data.get(name) is not None:
            base[name] = data[name]
    chat = data.get("object") == "chat.completion" or any(isinstance(c, dict) and "message" in c for c in choices)
    if chat:
        chunks = [{**base, "choices": [choice]} for choice in _chat_choices(choices)]
    else:
        base["object"] = "text_completion"
        chunks = [{**base, "choices": [choice]} for choice in _text_choices(choices)]
    if include_usage:
        usage = usage if usage is not None else data.get("usage")
        if isinstance(usage, dict):
            chunks.append({**base, "choices": [], "usage": usage})
    return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks) + DONE


def _delta(index: int, fields: dict[str, Any], logprobs: Any = None) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": None}


def _chat_choices(choices: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for position, choice in enumerate(choices):
        index = choice.get("index", position)
        message = choice.get("message") or {}
        content = message.get("content")
        out.append(_delta(index, {"role": message.get("role") or "assistant",
                                  "content": "" if isinstance(content, str) else None}))
        for name in ("reasoning_content", "reasoning"):  # llama.cpp, vLLM, DeepSeek; Ollama, OpenRouter
            if isinstance(message.get(name), str) and message[name]:
                out.append(_delta(index, {name: message[name]}))
        if isinstance(content, str) and content:
            out.append(_delta(index, {"content": content}, choice.get("logprobs")))
        if isinstance(message.get("refusal"), str) and message["refusal"]:
            out.append(_delta(index, {"refusal": message["refusal"]}))
        if isinstance(message.get("function_call"), dict):
            out.append(_delta(index, {"function_call": message["function_call"]}))
        for i, call in enumerate(message.get("tool_calls") or ()):
            out.append(_delta(index, {"tool_calls": [{"index": i, "id": call.get("id"),
                                                      "type": call.get("type", "function"),
                                                      "function": call.get("function")}]}))
        out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")})
    return out


def _text_choices(choices: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for position, choice in enumerate(choices):
        index = choice.get("index", position)
        # One chunk with the text and its finish_reason: the SDK's Completion type has no null finish_reason.
        out.append({"index": index, "text": choice.get("text") or "", "logprobs": choice.get("logprobs"),
                    "finish_reason": choice.get("finish_reason")})
    return out
