"""Server-sent events, on the side of a byte stream: split into whole events, read their data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


class EventSplitter:
    """Cuts an SSE byte stream into whole events, keeping each event's bytes as received.

    Events end with a blank line (``\\n\\n``; ``\\r\\n\\r\\n`` from stricter servers). A partial event
    is held until its end arrives, so the client never sees half an event.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._tail + chunk if self._tail else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        events = data.split(b"\n\n")
        self._tail = events.pop()
        return [event + b"\n\n" for event in events if event]

    def close(self) -> bytes:
        """Whatever is left when the stream ends (an unterminated event), or b""."""
        tail, self._tail = self._tail.strip(), b""
        return tail + b"\n\n" if tail else b""


def event_data(event: bytes) -> bytes | None:
    """The data payload of one event (data lines joined), or None for comments and empty events."""
    if event.startswith(b"data:") and event.count(b"\n") <= 2:  # the common one-line event
        return event[5:].strip()
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def json_objects(events: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON objects the events carry, in order (``[DONE]``, comments and unreadable data skipped)."""
    for event in events:
        data = event_data(event)
        if not data or data == b"[DONE]":
            continue
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


_FIELDS = frozenset((b"data", b"event", b"id", b"retry"))


def readable(event: bytes) -> bool:
    """Can a client read this event (a whole one, as EventSplitter cuts them)?

    It must be UTF-8, made of SSE fields (data, event, id, retry) and comments, and its data a JSON object
    or ``[DONE]``. The JSON is checked by its shape, not parsed: most events are never parsed on the hot
    path, a cut or binary one fails the shape or the encoding, and Python servers write NaN and Infinity,
    which the SDKs read but a strict parser would refuse.
    """
    if event.startswith(b"data: {") and event.endswith(b"}\n\n") and event.find(b"\n") == len(event) - 2:
        return event.isascii() or _utf8(event)  # the usual one-line chunk
    if not (event.isascii() or _utf8(event)):
        return False
    for line in event[:-2].split(b"\n"):
        if not line.startswith(b":") and line.partition(b":")[0] not in _FIELDS:
            return False
    data = event_data(event)
    return data is None or data == b"[DONE]" or (data.startswith(b"{") and data.endswith(b"}"))


def first_unreadable(events: list[bytes]) -> int | None:
    """The index of the first event a client could not read, or None."""
    for i, event in enumerate(events):
        if not readable(event):
            return i
    return None


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def encode(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
