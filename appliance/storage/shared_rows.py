"""Rows of ctypes structures in memory every worker sees, and the lock that guards them.

Made by the main process before it forks the workers, which inherit the mapping and the lock. Fork's
kind of lock is unlinked at once, so no multiprocessing resource tracker process is started for it (a spawn
lock needs one: frozen, that is one more run of the bootloader at every start). ``shared=False`` gives
plain process memory and a thread lock, for single-process mode and tests.
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
        ctx = multiprocessing.get_context("fork")
        nbytes = ctypes.sizeof(row_type) * size
        self._raw = ctx.RawArray(ctypes.c_char, nbytes) if shared else ctypes.create_string_buffer(nbytes)
        self.lock = ctx.Lock() if shared else threading.Lock()
        self._rows: Any = None

    @property
    def slots(self) -> Any:
        """The rows, as a ctypes array over the buffer (made once per process)."""
        if self._rows is None:
            self._rows = (self.row_type * self.size).from_buffer(self._raw)
        return self._rows
