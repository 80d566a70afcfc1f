"""The buffered writer: the request path never waits on the disk.

Rows go into an in-memory buffer that one task per worker flushes every ``flush_interval`` in a single
``BEGIN IMMEDIATE`` transaction, and a final time when the worker stops. Ledger entries are also
journaled as they come (journal.py), so neither a killed worker nor a database that refuses writes
(full disk, read-only folder) loses them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from appliance.storage import ledger
from appliance.storage.db import Database
from appliance.storage.journal import Journal, read_segment
from appliance.storage.journal import orphan as orphan_segments
from appliance.storage.journal import owners as journal_owners

log = logging.getLogger("appliance.storage")


class BufferedWriter:
    """Collects rows on the hot path (no await, no disk wait) and writes them in batches.

    Ledger entries (``add_entry``) also go to the worker's journal as they come, so a worker killed
    before its next flush loses none: a live worker, or the next start, ingests a dead one's journal.
    Other rows (cache hit counts) are only worth a flush interval's risk.
    """

    def __init__(self, db: Database, interval_s: float, journal: Journal | None = None, *,
                 on_flush: Callable[[int], None] | None = None, on_error: Callable[[], None] | None = None,
                 orphan_scan_s: float = 1.0) -> None:
        self._db = db
        self._interval_s = interval_s
        self._journal = journal
        self._on_flush = on_flush  # told the rows waiting at each periodic flush (the queue depth metric)
        self._on_error = on_error  # told of each failed write (the write failures metric)
        self._orphan_scan_s = orphan_scan_s
        self._pending: dict[str, list[tuple[Any, ...]]] = {}
        self._entries: list[tuple[int, ledger.Entry]] = []
        self._seq = 0  # entry numbers without a journal
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.failing_since: float | None = None  # when writes began to fail (None: the last one worked)

    @property
    def depth(self) -> int:
        return sum(len(rows) for rows in self._pending.values()) + len(self._entries)

    def add(self, sql: str, row: tuple[Any, ...]) -> None:
        rows = self._pending.get(sql)
        if rows is None:
            self._pending[sql] = [row]
        else:
            rows.append(row)

    def add_entry(self, entry: ledger.Entry) -> None:
        """A ledger entry: journaled now (one write), in the database at the next flush."""
        if self._journal is None:
            self._seq += 1
            seq = self._seq
        else:
            seq = self._journal.next_seq()
            self._journal.write(ledger.encode(seq, entry))
        self._entries.append((seq, entry))

    async def flush(self) -> int:
        if not self._pending and not self._entries:
            return 0
        # Swap before the first await; entries from here on go to a new journal segment.
        batch, self._pending = self._pending, {}
        entries, self._entries = self._entries, []
        journal = self._journal
        if journal is not None:
            journal.rotate()

        async def work(conn: aiosqlite.Connection) -> None:
            for sql, rows in batch.items():
                await conn.executemany(sql, rows)
            if entries:
                await ledger.apply(conn, [entry for _, entry in entries])
                if journal is not None:
                    await ledger.set_progress(conn, journal.owner, entries[-1][0])

        try:
            await self._db.write(work)
        except (sqlite3.Error, ValueError) as exc:
            self._failed(exc)
            for sql, rows in batch.items():  # keep them for the next attempt, oldest first
                self._pending[sql] = rows + self._pending.get(sql, [])
            self._entries = entries + self._entries
            return 0
        self.failing_since = None
        if journal is not None:
            journal.committed()
        return sum(len(rows) for rows in batch.values()) + len(entries)

    def _failed(self, exc: Exception) -> None:
        if self.failing_since is None:
            log.error("database writes failing, rows wait in memory and the journal: %s", exc)
            self.failing_since = time.time()
        if self._on_error is not None:
            self._on_error()

    async def ingest_orphans(self) -> int:
        """Ingest the journals of workers that died (or of an earlier run); returns the entries added."""
        if self._journal is None:
            return 0
        added = 0
        for owner in journal_owners(self._journal.folder, exclude=self._journal.owner):
            try:
                added += await self._ingest_owner(owner)
            except (sqlite3.Error, ValueError, OSError) as exc:
                self._failed(exc)
                break
        if added:
            log.warning("ingested %d ledger entries from journals of workers that stopped without flushing", added)
        return added

    async def _ingest_owner(self, owner: str) -> int:
        assert self._journal is not None
        added = 0
        with orphan_segments(self._journal.folder, owner) as segments:
            if segments is None:
                return 0  # alive, or another worker is on it
            for segment in segments:  # a transaction each: a long outage's journal is never held whole
                added += await self._db.write(lambda conn, segment=segment: _ingest(conn, owner, segment))
                segment.unlink()
            await self._db.write(lambda conn: ledger.forget(conn, owner))
        return added

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="buffered-writer")

    async def _run(self) -> None:
        # Never cancelled mid-flush (that would roll back a swapped-out batch): stop() sets an event.
        await self.ingest_orphans()
        next_scan = time.monotonic() + self._orphan_scan_s
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            except TimeoutError:
                pass
            if self._on_flush is not None:
                self._on_flush(self.depth)
            await self.flush()
            if time.monotonic() >= next_scan:
                await self.ingest_orphans()
                next_scan = time.monotonic() + self._orphan_scan_s

    async def stop(self) -> None:
        """Stop the periodic task and write what is left; what cannot be written stays in the journal."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        for _ in range(3):
            await self.flush()
            if not self.depth:
                break
            await asyncio.sleep(0.2)
        left = self.depth
        if self._journal is not None:
            self._journal.close(remove=not self._entries)
            left -= len(self._entries)
        if left:
            log.error("dropping %d unwritten rows at shutdown", left)


async def _ingest(conn: aiosqlite.Connection, owner: str, segment: Path) -> int:
    """One segment of a dead worker's journal, minus what its worker had committed already."""
    done = await ledger.progress(conn, owner)
    entries: list[ledger.Entry] = []
    last = done
    for line in read_segment(segment):
        try:
            seq, entry = ledger.decode(line)
        except ValueError as exc:
            log.warning("journal %s: skipped a line: %s", segment.name, exc)
            continue
        if seq > done:
            entries.append(entry)
            last = max(last, seq)
    if entries:
        await ledger.apply(conn, entries)
        await ledger.set_progress(conn, owner, last)
    return len(entries)
