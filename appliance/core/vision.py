"""Images for models without vision: each image part becomes a text part that a describer model wrote.

A chat body's ``image_url`` parts (Messages ``image`` blocks and Responses ``input_image`` parts arrive as such)
sent to a target whose vision is known to be False are replaced by ``[Image: <description>]``. ``[vision]
describer`` is resolved like a client's model name and called straight through the provider of its route, as
the embedder is (core/embeddings.py): no HTTP request to ourselves. Descriptions are keyed by the SHA-256 of
the image (a data: URL's bytes; an http(s) URL as sent: the gateway never fetches one) and the describer,
kept in a per-worker LRU in front of a SQLite table every worker and restart shares.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

import orjson
from cachetools import LRUCache

from appliance.accounts.usage import Tokens
from appliance.common.chat import content_text, token_count
from appliance.common.config import VisionSettings
from appliance.common.errors import GatewayError
from appliance.core import side_calls
from appliance.core.catalog import Route
from appliance.core.embeddings import Backends
from appliance.observe import metrics
from appliance.providers.base import CHAT, Reply
from appliance.storage import vision_repo
from appliance.storage.db import Database
from appliance.storage.writer import BufferedWriter

log = logging.getLogger("appliance.core.vision")

IMAGE_PART = "image_url"


class Spent(NamedTuple):
    """A describer call that reached a backend: where, and what it used (for the ledger)."""

    route: Route
    tokens: Tokens
    seconds: float


# ------------------------------------------------------------------------------------------ reading bodies


def has_images(messages: Any) -> bool:
    """Does any message carry an image part? (A plain-text conversation: one isinstance test per message.)"""
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == IMAGE_PART for p in content):
            return True
    return False


def image_urls(messages: list[Any]) -> Iterator[tuple[int, str]]:
    """(message index, URL) of every image part, in order; a part without a URL string is a 400 naming it."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == IMAGE_PART:
                yield i, url_of(part, i)


def url_of(part: dict[str, Any], i: int) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value  # a bare string, as some clients send
    if not isinstance(url, str) or not url:
        raise GatewayError("invalid_value", f"messages[{i}]: an image_url part needs a 'url'.",
                           param=f"messages.[{i}].content")
    return url


def image_key(url: str, i: int = 0) -> str:
    """The SHA-256 (hex) an image is known by: a data: URL's decoded bytes (however it was written), else the
    URL string itself (the gateway never fetches a URL)."""
    if not url.startswith("data:"):
        return hashlib.sha256(url.encode()).hexdigest()
    header, comma, data = url.partition(",")
    if not comma:
        raise GatewayError("invalid_value", f"messages[{i}]: an image data: URL needs a ',' before its data.",
                           param=f"messages.[{i}].content")
    if header.endswith(";base64"):
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)  # line breaks forgiven, not garbage
        except (binascii.Error, ValueError):
            raise GatewayError("invalid_value", f"messages[{i}]: an image data: URL is not valid base64.",
                               param=f"messages.[{i}].content") from None
    else:
        raw = unquote_to_bytes(data)
    return hashlib.sha256(raw).hexdigest()


def described(messages: list[Any], texts: dict[str, str]) -> list[Any]:
    """``messages`` with each image part replaced by ``[Image: <its description>]`` (``texts``: URL ->
    description). A message left with text parts only is sent as one string (parts a line apart): text-only
    chat templates often take nothing else. Changed messages are copies."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == IMAGE_PART
                                                    for p in content):
            out.append(message)
            continue
        parts = [{"type": "text", "text": f"[Image: {texts[url_of(p, i)]}]"}
                 if isinstance(p, dict) and p.get("type") == IMAGE_PART else p for p in content]
        if all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            out.append({**message, "content": "\n".join(p.get("text") or "" for p in parts)})
        else:
            out.append({**message, "content": parts})
    return out


def no_describer(route: Route) -> GatewayError:
    return GatewayError("unsupported", f"The model {route.upstream_model!r} on backend {route.backend!r} takes no "
                        "images, and no describer model is set ([vision] describer) to describe them for it.",
                        param="messages")


# ------------------------------------------------------------------------------------------ describing


class Describer:
    """Describes images for one worker: memory first, then the shared table, then the describer model."""

    def __init__(self, settings: VisionSettings, backends: Backends, db: Database, writer: BufferedWriter) -> None:
        self.settings = settings
        self._backends = backends
        self._db = db
        self._writer = writer
        # Descriptions depend on the model and its instruction: another pair describes the image anew.
        self._made_by = hashlib.sha256(f"{settings.describer}\n{settings.prompt}".encode()).hexdigest()[:16]
        self._memory: LRUCache[str, str] | None = (
            LRUCache(settings.memory_entries) if settings.memory_entries else None)

    @property
    def model(self) -> str | None:
        return self.settings.describer

    async def describe(self, urls: dict[str, str], request_id: str) -> tuple[dict[str, str], list[Spent]]:
        """Descriptions of the images ``urls`` names (URL -> its image key), as URL -> text, and the describer
        calls made; each distinct image is described once. A GatewayError (a 5xx code) when the describer fails."""
        by_key: dict[str, str] = {}
        for url, key in urls.items():
            by_key.setdefault(key, url)
        found: dict[str, str] = {}
        missing = []
        for key in by_key:
            text, source = await self._stored(key)
            if text is None:
                missing.append(key)
            else:
                found[key] = text
                metrics.described_images(source, 1)
        spent: list[Spent] = []
        if missing:
            made = await asyncio.gather(*(self._call(by_key[key], request_id) for key in missing))
            metrics.described_images("describer", len(missing))
            now = time.time()
            for key, (text, call) in zip(missing, made, strict=True):
                found[key] = text
                spent.append(call)
                if self._memory is not None:
                    self._memory[key] = text
                vision_repo.put(self._writer, key, self._made_by, text, now)
        return {url: found[key] for url, key in urls.items()}, spent

    async def _stored(self, key: str) -> tuple[str | None, str]:
        """A description made before, and where it was found (memory or table)."""
        if self._memory is not None:
            text = self._memory.get(key)
            if text is not None:
                return text, "memory"
        try:
            text = await vision_repo.get(self._db, key, self._made_by)
        except (sqlite3.Error, ValueError) as exc:  # the table is a cache: a failing one means describing again
            log.warning("image description lookup failed, describing again: %s", exc)
            return None, "table"
        if text is not None and self._memory is not None:
            self._memory[key] = text
        return text, "table"

    async def _call(self, url: str, request_id: str) -> tuple[str, Spent]:
        model = self.settings.describer
        assert model is not None
        catalog, providers = self._backends()

        def body(route: Route) -> dict[str, Any]:
            return {"model": route.upstream_model, "max_tokens": self.settings.max_tokens, "stream": False,
                    "messages": [{"role": "user", "content": [
                        {"type": "text", "text": self.settings.prompt},
                        {"type": IMAGE_PART, "image_url": {"url": url}}]}]}

        return await side_calls.ask(catalog, providers, model, CHAT, body=body, read=_answer, request_id=request_id,
                                    timeout_s=self.settings.timeout_s, what="the describer model")


def _answer(route: Route, reply: Reply) -> tuple[str, Spent]:
    """The description in a chat answer, and the tokens it took."""
    data = reply.data if reply.data is not None else orjson.loads(reply.body)
    choices = data.get("choices") if isinstance(data, dict) else None
    message = choices[0].get("message") if isinstance(choices, list) and choices and isinstance(
        choices[0], dict) else None
    text = content_text(message.get("content")).strip() if isinstance(message, dict) else ""
    if not text:
        raise ValueError("no description in it")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return text, Spent(route, Tokens(token_count(usage.get("prompt_tokens")),
                                     token_count(usage.get("completion_tokens"))), reply.upstream_s)


