"""Rows of ctypes structures in memory every worker sees, and the lock that guards them.

Made by the main process before the workers start (Sanic spawns them): a table pickles, while a worker
is being spawned, as the shared buffer and lock themselves, never as a copy. ``shared=False`` gives plain
process memory and a thread lock, for single-process mode and tests (no multiprocessing resource
tracker is started then).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import threading
import zlib
from typing import Any


def tag_of(owner: str) -> int:
    """A stable, non-zero 64-bit tag for a row's owner (the same in every process)."""
    data = owner.encode()
    return (zlib.crc32(data) << 32 | zlib.adler32(data)) or 1


class SharedRows:
    def __init__(self, row_type: type[ctypes.Structure], size: int, *, shared: bool = True) -> None:
        self.row_type = row_type
        self.size = size
        ctx = multiprocessing.get_context("spawn")
        nbytes = ctypes.sizeof(row_type) * size
        self._raw = ctx.RawArray(ctypes.c_char, nbytes) if shared else ctypes.create_string_buffer(nbytes)
        self.lock = ctx.Lock() if shared else threading.Lock()
        self._rows: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}

    @property
    def slots(self) -> Any:
        """The rows, as a ctypes array over the buffer (made once per process)."""
        if self._rows is None:
            self._rows = (self.row_type * self.size).from_buffer(self._raw)
        return self._rows
