"""Files: their bytes on disk under data_dir/files/, their OpenAI File objects, and the upload rules.

Bytes are written to a temporary file, fsynced and renamed before the metadata row is inserted, so a row
always has its content. One content file per id (not shared by hash): deleting a file can then remove
its bytes without counting who else uses them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import string
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from appliance.common.config import Settings
from appliance.common.errors import GatewayError

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_OUTPUT = "batch_output"
DEFAULT_BATCH_EXPIRY_S = 30 * 86400
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 2_592_000
MAX_LIST_LIMIT = 10_000
_ALPHABET = string.ascii_letters + string.digits
_WRITE_CHUNK = 1024 * 1024
READ_CHUNK = 256 * 1024


def new_file_id() -> str:
    return "file-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def not_found(file_id: str, param: str = "id") -> GatewayError:
    return GatewayError("not_found", f"No such File object: {file_id}", param=param)


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "expires_at": row["expires_at"], "filename": row["filename"], "purpose": row["purpose"],
            "status": row["status"], "status_details": None}


def check_purpose(purpose: str | None) -> str:
    if purpose is None:
        raise GatewayError("missing_field", "Missing required parameter: 'purpose'.", param="purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise GatewayError("invalid_value", f"'{purpose}' is not a valid purpose; use one of "
                           f"{', '.join(UPLOAD_PURPOSES)}.", param="purpose")
    return purpose


def check_filename(purpose: str, filename: str) -> None:
    if purpose == "batch" and not filename.lower().endswith(".jsonl"):
        raise GatewayError("invalid_file_format", "Files with purpose 'batch' must be .jsonl files "
                           f"(got '{filename}').", param="file")


def expiry_fields(fields: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(anchor, seconds) of an upload's expires_after, in either form a client sends it: two fields, as the
    SDKs do (``expires_after[anchor]``, ``expires_after[seconds]``), or one JSON part ``expires_after``, an
    object field's encoding in a multipart body by OpenAPI's rules (what /openapi.json's clients send)."""
    raw = fields.get("expires_after")
    if raw is None:
        return fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not {"anchor", "seconds"} <= value.keys():
        raise GatewayError("invalid_value", "expires_after must be a JSON object with 'anchor' and 'seconds'.",
                           param="expires_after")
    anchor, seconds = value["anchor"], value["seconds"]
    # Anything but a string anchor or an integer count of seconds fails expires_at()'s checks.
    return (anchor if isinstance(anchor, str) else "",
            str(seconds) if isinstance(seconds, int) and not isinstance(seconds, bool) else "")


def expires_at(purpose: str, created_at: int, anchor: str | None, seconds: str | None) -> int | None:
    """When an upload expires: as asked (expires_after), else 30 days for batch files, else never."""
    if anchor is None and seconds is None:
        return created_at + DEFAULT_BATCH_EXPIRY_S if purpose == "batch" else None
    if anchor != "created_at":
        raise GatewayError("invalid_value", "expires_after[anchor] must be 'created_at'.", param="expires_after")
    try:
        value = int(seconds) if seconds is not None else None
    except ValueError:
        value = None
    if value is None or not MIN_EXPIRY_S <= value <= MAX_EXPIRY_S:
        raise GatewayError("invalid_value", f"expires_after[seconds] must be an integer from {MIN_EXPIRY_S} "
                           f"to {MAX_EXPIRY_S}.", param="expires_after")
    return created_at + value


def too_large(limit: int) -> GatewayError:
    return GatewayError("file_too_large", f"The file is larger than this appliance accepts ({limit} bytes).",
                        param="file")


class FileStore:
    """The content files: ``[files] dir``, by default <data_dir>/files (with several nodes, a directory they
    all mount). Uploads are written under its tmp/ and renamed in place, so tmp/ is on the same file system."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = self.root / "tmp"

    @classmethod
    def of(cls, settings: Settings) -> FileStore:
        return cls(settings.files.dir or settings.data_dir / "files")

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def writer(self) -> ContentWriter:
        self.ensure()
        return ContentWriter(self.tmp / f"{secrets.token_hex(12)}.part")

    async def write_lines(self, file_id: str, lines: list[bytes]) -> tuple[int, str]:
        """Write a whole (small) file, e.g. a batch's output; returns (bytes, sha256)."""
        writer = self.writer()
        try:
            for i in range(0, len(lines), 1024):
                await writer.write(b"".join(lines[i:i + 1024]))
            await writer.commit(self.path(file_id))
        finally:
            writer.discard()
        return writer.size, writer.sha256

    def remove(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)

    async def open(self, file_id: str) -> BinaryIO:
        """The content, opened for reading (FileNotFoundError once deleted); read it with ``chunks``."""
        return await asyncio.to_thread(open, self.path(file_id), "rb")

    def sweep_tmp(self, older_than: float | None = None) -> None:
        """Partial uploads of a process that died mid-upload (only run while no upload is in progress, or,
        in a directory other nodes share, ``older_than`` a unix time no upload in progress can be)."""
        if self.tmp.is_dir():
            for leftover in self.tmp.glob("*.part"):
                if older_than is None or _mtime(leftover) < older_than:
                    leftover.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


async def chunks(handle: BinaryIO, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
    """Read an open content file off the event loop, then close it."""
    try:
        while True:
            data = await asyncio.to_thread(handle.read, size)
            if not data:
                return
            yield data
    finally:
        handle.close()


class ContentWriter:
    """One upload on its way to disk: counted and hashed as it goes, fsynced and renamed at the end."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._handle = open(path, "wb")  # noqa: SIM115 - closed in commit or discard
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self.size = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        self._hash.update(data)
        self._pending += data
        if len(self._pending) >= _WRITE_CHUNK:
            await self._drain()

    async def _drain(self) -> None:
        if self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            await asyncio.to_thread(self._handle.write, pending)

    async def commit(self, target: Path) -> None:
        await self._drain()

        def finish() -> None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self._path, target)

        await asyncio.to_thread(finish)

    def discard(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self._path.unlink(missing_ok=True)
