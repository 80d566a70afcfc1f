"""Multipart uploads (image edits, transcriptions, translations) streamed through to a backend, never read whole.

The body is read only as far as its ``model`` field: that much is held (in memory up to PEEK_BYTES, past that
spooled to a temporary file in the data dir, so a client that sends the file before the model, as OpenAI's
own curl examples and its Node SDK do, costs disk, not memory). The backend then gets the held bytes and the
rest of the body as it arrives, boundary, parts and their order unchanged; only the model field's value is
renamed when an alias points elsewhere (Content-Length adjusted). Until bytes past the held prefix have gone
out, the upload can be sent again (another try, another target); after, it cannot.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any, Protocol

from appliance.common import multipart
from appliance.common.errors import GatewayError

PEEK_BYTES = 256 * 1024  # held in memory while looking for the model field; past it, spooled to disk
FIELD_MAX = 64 * 1024  # a form field other than a file
_READ_CHUNK = 1024 * 1024  # from the spool
_SPOOL_FLUSH = 1024 * 1024  # written to the spool in pieces this large, off the event loop
# Fields read from the form into the request's body as the ledger sees it (the model, and whether it streams).
_NOTED = ("model", "stream")


class Source(Protocol):
    """The client's body as it arrives (the web layer's request stream)."""

    async def read(self) -> bytes | None: ...  # None: the body ended


def mb(size: int) -> str:
    return f"{size / 1024 / 1024:g}"


def too_large(max_bytes: int) -> GatewayError:
    return GatewayError("body_too_large", f"The upload is larger than this gateway accepts (server.max_upload_mb "
                        f"= {mb(max_bytes)}).")


class Upload:
    """One multipart body on its way through: the prefix read to find ``model``, then the live rest."""

    def __init__(self, source: Source, content_type: str, boundary: bytes, *, declared: int | None,
                 max_bytes: int, spool_dir: Path) -> None:
        self.content_type = content_type
        self.fields: dict[str, str] = {}
        self.failure: GatewayError | None = None  # why the body stopped flowing (too large), for the caller
        self._source = source
        self._boundary = boundary
        self._declared = declared
        self._max_bytes = max_bytes
        self._spool_dir = spool_dir
        self._memory = bytearray()
        self._spool: IO[bytes] | None = None
        self._pending = bytearray()
        self._held = 0  # bytes of the prefix (memory or spool)
        self._model_span: tuple[int, int] | None = None
        self._received = 0
        self._live = False  # bytes past the prefix went to a backend: no second try
        self._ended = False  # the source said the body is over

    # ------------------------------------------------------------------ the prefix

    async def scan(self) -> dict[str, str]:
        """Read up to the end of the ``model`` field; the small fields seen by then (``model`` among them)."""
        if self._declared is not None and self._declared > self._max_bytes:
            raise too_large(self._max_bytes)
        parser = multipart.MultipartParser(self._boundary)
        field: tuple[str, int, bytearray] | None = None
        try:
            while self._model_span is None:
                chunk = await self._source.read()
                if chunk is None:
                    self._ended = True
                    parser.close()
                    break
                self._count(len(chunk))
                await self._hold(chunk)
                for event in parser.feed(chunk):
                    if isinstance(event, multipart.Part):
                        field = (event.name, event.at, bytearray()) if event.filename is None else None
                    elif isinstance(event, multipart.Data):
                        if field is not None:
                            field[2].extend(event.data)
                            if len(field[2]) > FIELD_MAX:
                                raise GatewayError("invalid_value", f"The form field '{field[0]}' is too long.",
                                                   param=field[0])
                    elif field is not None:
                        name, start, value = field
                        self.fields.setdefault(name, value.decode("utf-8", "replace"))
                        if name == "model" and self._model_span is None:
                            self._model_span = (start, event.at)
                        field = None
        except multipart.MultipartError as exc:
            raise GatewayError("invalid_value", f"The multipart body is malformed: {exc}.") from None
        if self._model_span is None:
            raise GatewayError("missing_field", "You must provide a model parameter (a 'model' form field).",
                               param="model")
        await self._flush()
        return self.fields

    def _count(self, size: int) -> None:
        self._received += size
        if self._received > self._max_bytes:
            raise too_large(self._max_bytes)

    async def _hold(self, chunk: bytes) -> None:
        self._held += len(chunk)
        if self._spool is None and self._held <= PEEK_BYTES:
            self._memory += chunk
            return
        if self._spool is None:
            # Unbuffered: the prefix is read back with pread, which sees only what reached the file.
            self._spool = tempfile.TemporaryFile(dir=self._spool_dir, prefix="upload-", buffering=0)  # noqa: SIM115 - closed in close()
            self._pending, self._memory = self._memory, bytearray()
        self._pending += chunk
        if len(self._pending) >= _SPOOL_FLUSH:
            await self._flush()

    async def _flush(self) -> None:
        if self._spool is not None and self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            await asyncio.to_thread(_write_all, self._spool, pending)

    # ------------------------------------------------------------------ what goes upstream

    @property
    def replayable(self) -> bool:
        """May it be sent again? (Only the held prefix has gone out so far.)"""
        return not self._live

    def _renamed(self, model: str) -> tuple[bytes, int, int]:
        start, end = self._model_span  # type: ignore[misc]
        return model.encode(), start, end

    def length(self, model: str) -> int | None:
        if self._declared is None:
            return None
        new, start, end = self._renamed(model)
        return self._declared + len(new) - (end - start)

    async def chunks(self, model: str) -> AsyncIterator[bytes]:
        """The body for a backend that knows the model as ``model``: the prefix, then the rest as it arrives."""
        new, start, end = self._renamed(model)
        async for piece in self._prefix(0, start):
            yield piece
        yield new
        async for piece in self._prefix(end, self._held):
            yield piece
        while not self._ended:
            chunk = await self._source.read()
            if chunk is None:
                self._ended = True
                break
            self._live = True
            try:
                self._count(len(chunk))
            except GatewayError as exc:
                self.failure = exc
                raise
            yield chunk

    async def _prefix(self, start: int, end: int) -> AsyncIterator[bytes]:
        if self._spool is None:
            if end > start:
                yield bytes(self._memory[start:end])
            return
        spool = self._spool
        at = start
        while at < end:
            size = min(_READ_CHUNK, end - at)
            piece = await asyncio.to_thread(_read_at, spool, at, size)
            if not piece:  # never sent short: the backend would wait for what Content-Length promised
                raise OSError(f"the upload's spool ended at {at} of {end} bytes")
            at += len(piece)
            yield piece

    async def drain(self, most: int) -> None:
        """Read what is left of the body (up to ``most`` bytes), so a client still sending sees the answer."""
        read = 0
        while not self._ended and read < most:
            chunk = await self._source.read()
            if chunk is None:
                self._ended = True
                return
            read += len(chunk)

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def _write_all(handle: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[handle.write(view):]


def _read_at(handle: IO[bytes], at: int, size: int) -> bytes:
    return os.pread(handle.fileno(), size, at)


def noted(fields: dict[str, str]) -> dict[str, Any]:
    """The form's fields as the request's body for the ledger and the pipeline (never the file)."""
    body: dict[str, Any] = {name: fields[name] for name in _NOTED if name in fields}
    if "stream" in body:
        body["stream"] = body["stream"].strip().lower() == "true"
    return body
