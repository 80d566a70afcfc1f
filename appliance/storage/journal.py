"""A worker's journal: the ledger entries it has answered, on disk before the database has them.

The request path appends one line per entry with a single ``write(2)`` on an ``O_APPEND`` file. A
process killed with -9 cannot tear such a write, and what was written survives its death without an
fsync (the page cache belongs to the kernel); only a power cut can lose the newest lines.

Each flush of the buffered writer starts a new segment and deletes the older ones once their entries
are committed. A worker holds an flock on ``<owner>.lock`` for its whole life, so segments whose
owner's lock can be taken belong to a worker that died (or to an earlier run): any worker ingests
them. Entries carry a sequence number per owner, and the database keeps the highest one committed
(``journal_progress``, written in the same transaction as the entries), so an entry is never counted
twice, even when a worker dies between a commit and the deletion of the segment it came from.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("appliance.storage")


def journal_dir(data_dir: Path) -> Path:
    return data_dir / "journal"


class Journal:
    """One worker's append-only segments, and the lock that says it is alive."""

    def __init__(self, folder: Path, owner: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.owner = owner or secrets.token_hex(8)
        self.seq = 0  # the last sequence number handed out (entries are committed in this order)
        self._lock_fd = os.open(folder / f"{self.owner}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._segment = 0
        self._fd: int | None = None
        self._closed: list[Path] = []  # rotated segments whose entries are not committed yet
        self.failing = False  # the last append failed (full disk, read-only folder): entries live in memory only

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def write(self, line: bytes) -> None:
        """Append one entry (``line`` ends with a newline), in one write(2)."""
        try:
            if self._fd is None:
                self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(self._fd, line)
            self.failing = False
        except OSError as exc:
            if not self.failing:
                log.error("journal write failed, entries wait in memory only: %s", exc)
            self.failing = True

    def rotate(self) -> None:
        """Later entries go to a new segment; the current one waits for ``committed``."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        self._closed.append(self._path(self._segment))
        self._segment += 1

    def committed(self) -> None:
        """Every entry of the rotated segments is in the database: delete them."""
        for path in self._closed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._closed = []

    def close(self, *, remove: bool) -> None:
        """At a clean stop: ``remove`` once every entry is committed, else the segments wait for the next start."""
        self.rotate()
        if remove:
            self.committed()
            with contextlib.suppress(FileNotFoundError):
                (self.folder / f"{self.owner}.lock").unlink()
        os.close(self._lock_fd)

    def _path(self, segment: int) -> Path:
        return self.folder / f"{self.owner}.{segment:08d}.log"


@contextlib.contextmanager
def orphan(folder: Path, owner: str) -> Iterator[list[Path] | None]:
    """The segments of ``owner``, oldest first, while we hold its lock; None while it is alive (or another
    worker is ingesting them). Leaving the block after a success removes the lock file."""
    lock = folder / f"{owner}.lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield sorted(folder.glob(f"{owner}.*.log"))
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # still holding it: a worker that opened it meanwhile fails its LOCK_NB and moves on
    finally:
        os.close(fd)


def owners(folder: Path, exclude: str) -> list[str]:
    """Every owner with a lock file in ``folder`` but ``exclude``."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(name[:-5] for name in names if name.endswith(".lock") and name[:-5] != exclude)


def read_segment(path: Path) -> Iterator[bytes]:
    """The whole lines of a segment (a line without its newline was cut by a power loss: skipped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    if lines[-1]:
        log.warning("journal %s ends in a partial line; skipped", path.name)
    yield from (line for line in lines[:-1] if line)
