"""Helpers the batch tests share: input lines, uploads, polling a batch, reading its result files."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from typing import Any

import openai

CHAT_URL = "/v1/chat/completions"
TERMINAL = frozenset(("completed", "failed", "expired", "cancelled"))


def line(custom_id: str, body: dict[str, Any], url: str = CHAT_URL) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(client: openai.OpenAI, lines: list[Any] | bytes, name: str = "in.jsonl") -> str:
    raw = lines if isinstance(lines, bytes) else b"".join(json.dumps(item).encode() + b"\n" for item in lines)
    return client.files.create(file=(name, raw), purpose="batch").id


def poll(client: openai.OpenAI, batch_id: str, until: Collection[str] | Callable[[Any], bool] = TERMINAL,
         timeout: float = 60) -> Any:
    """The batch once it is in one of the statuses ``until`` names (or ``until(batch)`` holds)."""
    done = until if callable(until) else (lambda batch: batch.status in until)
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(raw) for raw in client.files.content(file_id).text.splitlines()]
