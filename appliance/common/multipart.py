"""A small incremental multipart/form-data parser: bytes in as they arrive, parts out, nothing buffered whole.

Uploads can be hundreds of MB, so the body is never held in memory: ``feed`` returns events and keeps at
most one delimiter's length of unparsed body between calls. Only what form-data uploads need (RFC 7578):
no nested multiparts, no transfer encodings. Written here rather than taken from python-multipart because
this much is small, and one dependency fewer keeps the one-file build simple.
"""

from __future__ import annotations

import email.message
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """The body is not valid multipart/form-data."""


@dataclass(frozen=True, slots=True)
class Part:
    """A part's start: its form field name, its filename when it is a file, its content type."""

    name: str
    filename: str | None
    content_type: str | None
    at: int = 0  # where its content starts, in bytes from the body's start


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    at: int = 0  # where its content ended (the delimiter's CRLF), in bytes from the body's start


Event = Part | Data | PartEnd

_PREAMBLE, _HEADERS, _BODY, _AFTER_DELIMITER, _DONE = range(5)


def boundary_of(content_type: str | None) -> bytes | None:
    """The boundary of a multipart/form-data Content-Type, or None when it is not one."""
    if not content_type:
        return None
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        return None
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        return None
    return boundary.encode("latin-1")


class MultipartParser:
    def __init__(self, boundary: bytes) -> None:
        self._first = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray()
        self._state = _PREAMBLE
        self._offset = 0  # of the buffer's first byte in the body

    def _consume(self, size: int) -> None:
        del self._buffer[:size]
        self._offset += size

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        events: list[Event] = []
        while True:
            if self._state == _PREAMBLE:
                if not self._preamble():
                    break
            elif self._state == _HEADERS:
                part = self._headers()
                if part is None:
                    break
                events.append(part)
            elif self._state == _BODY:
                chunk, ended = self._body()
                if chunk:
                    events.append(Data(chunk))
                if not ended:
                    break
                events.append(PartEnd(self._offset - len(self._delimiter)))
            elif self._state == _AFTER_DELIMITER:
                if not self._after_delimiter():
                    break
            else:
                self._consume(len(self._buffer))  # the epilogue is ignored
                break
        return events

    def close(self) -> None:
        if self._state != _DONE:
            raise MultipartError("the multipart body ended before its closing boundary")

    def _preamble(self) -> bool:
        at = self._buffer.find(self._first)
        if at < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise MultipartError("no multipart boundary found at the start of the body")
            return False
        self._consume(at + len(self._first))
        self._state = _AFTER_DELIMITER
        return True

    def _after_delimiter(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] == b"--":
            self._state = _DONE
            return True
        end = self._buffer.find(b"\r\n")  # transport padding may precede the line break
        if end < 0:
            if len(self._buffer) > 256:
                raise MultipartError("malformed multipart boundary line")
            return False
        if self._buffer[:end].strip(b" \t"):
            raise MultipartError("malformed multipart boundary line")
        self._consume(end + 2)
        self._state = _HEADERS
        return True

    def _headers(self) -> Part | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise MultipartError("a multipart part's headers are too long")
            return None
        raw = bytes(self._buffer[:end]).decode("utf-8", "replace")
        self._consume(end + 4)
        message = email.message.Message()
        for line in raw.split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                message[name.strip()] = value.strip()
        if message.get_content_disposition() != "form-data":
            raise MultipartError("every part needs 'Content-Disposition: form-data'")
        name = message.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise MultipartError("a multipart part has no field name")
        filename = message.get_filename()
        self._state = _BODY
        return Part(name, filename, message.get("content-type"), self._offset)

    def _body(self) -> tuple[bytes, bool]:
        at = self._buffer.find(self._delimiter)
        if at >= 0:
            chunk = bytes(self._buffer[:at])
            self._consume(at + len(self._delimiter))
            self._state = _AFTER_DELIMITER
            return chunk, True
        # Keep what could be the start of a delimiter split across two feeds.
        keep = len(self._delimiter) - 1
        if len(self._buffer) <= keep:
            return b"", False
        chunk = bytes(self._buffer[:-keep])
        self._consume(len(chunk))
        return chunk, False
