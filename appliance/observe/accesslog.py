"""One access-log line per request on stdout, as JSON or text ([log] access).

Never a secret: no header values (Authorization and x-api-key least of all), no bodies; the key shows
as its id. A line is one ``write(2)`` on fd 1 (no Python buffering that would hold it back from a pipe
or the journal), built from what the request log records.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson

log = logging.getLogger("appliance.access")

_FIELDS = ("request_id", "method", "path", "status", "latency_ms", "model", "backend", "backend_model", "key_id",
           "prompt_tokens", "completion_tokens", "cost_usd", "cache", "error_code", "stream", "client")


def _timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class AccessLog:
    def __init__(self, fmt: str, fd: int = 1) -> None:
        if fmt not in ("json", "text"):
            raise ValueError(f"access log format {fmt!r}: json or text")
        self._json = fmt == "json"
        self._fd = fd
        self._broken = False

    def write(self, fields: dict[str, Any]) -> None:
        """``fields``: any of _FIELDS; ``time`` (unix seconds, the request's arrival) is required."""
        if self._broken:
            return
        line = self._json_line(fields) if self._json else self._text_line(fields)
        try:
            os.write(self._fd, line)
        except OSError as exc:  # stdout closed or gone: stop trying, say so once
            self._broken = True
            log.warning("access log disabled: cannot write to stdout (%s)", exc)

    @staticmethod
    def _json_line(fields: dict[str, Any]) -> bytes:
        out: dict[str, Any] = {"time": _timestamp(fields["time"])}
        for name in _FIELDS:
            value = fields.get(name)
            if value is not None:
                out[name] = value
        return orjson.dumps(out) + b"\n"

    @staticmethod
    def _text_line(fields: dict[str, Any]) -> bytes:
        get = fields.get
        parts = [_timestamp(fields["time"]), _plain(get("client") or "-"),
                 f'"{get("method") or "-"} {_plain(get("path"))}"', str(get("status")),
                 f"{get('latency_ms') or 0:.1f}ms"]
        for name in ("model", "backend", "key_id", "cache", "error_code"):
            value = get(name)
            if value is not None:
                parts.append(f"{name}={_plain(value)}")
        if get("prompt_tokens") is not None or get("completion_tokens") is not None:
            parts.append(f"tokens={get('prompt_tokens') or 0}/{get('completion_tokens') or 0}")
        parts.append(f"id={_plain(get('request_id'))}")
        return (" ".join(parts) + "\n").encode("utf-8", "replace")


def _plain(value: Any) -> str:
    """Client-chosen text (a model name, a path) on one line: control characters escaped, spaces too."""
    text = str(value)
    if text.isprintable() and " " not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")
