"""The batch runner: validates input files, runs each line through the pipeline, writes the output files.

One runner for the whole appliance: every worker starts one, and only the holder of the lease (renewed every
lease_s / 3; in the database, or in Redis when nodes share ``[state]`` and ``[database]`` so one runner acts
across all nodes: see lease.py)
acts; if its worker dies another takes over when the lease runs out. HTTP
workers only insert ``validating`` batches and flip them to ``cancelling``; everything else is written
here. Every line's result is written once, with its batch's counters, in one transaction fenced by the
line's attempt number, so after a crash and restart each custom_id has exactly one output line
(execution is at least once: a line in flight at the crash runs again).

Batch lines yield to interactive traffic: a line is dispatched only while the backend has room (see
``Admission``), and a finished line wakes the loop at once so the next one follows without delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from appliance.accounts.auth import ANONYMOUS, ANONYMOUS_ID, Principal
from appliance.api import surfaces
from appliance.batches import batch as batches
from appliance.batches.admission import Admission
from appliance.batches.files import BATCH_OUTPUT, DEFAULT_BATCH_EXPIRY_S, FileStore, new_file_id
from appliance.batches.lease import lease_for
from appliance.common.config import Settings
from appliance.common.errors import GatewayError
from appliance.core import pipeline, resilience
from appliance.core.exchange import Exchange, allowed_routes, record
from appliance.core.gateway import Gateway
from appliance.providers.base import CHAT
from appliance.storage import batches_repo, files_repo, keys_repo
from appliance.storage.db import DatabaseUnavailable
from appliance.storage.engine import connect_sync
from appliance.storage.state import StateUnavailable

log = logging.getLogger("appliance.batches.batch")

# Failures with no HTTP answer: the error file gets {code, message} and no response.
_NO_ANSWER = frozenset(("backend_unreachable", "backend_timeout"))
_PAGE = 1000
_PRINCIPAL_TTL_S = 5.0
_SWEEP_S = 60.0
_RETRY_BASE_S = 1.0


class CapturedResponse:
    """The pipeline's Responder for a batch line: keeps the whole answer (lines are never streamed)."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body: bytes = b""

    async def complete(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.body = status, body

    async def start_stream(self, headers: dict[str, str]) -> None:
        raise GatewayError("internal_error", "a batch line was about to be streamed")

    async def send(self, data: bytes) -> None:
        raise GatewayError("internal_error", "a batch line was about to be streamed")

    async def end_stream(self, data: bytes) -> None:
        raise GatewayError("internal_error", "a batch line was about to be streamed")


@dataclass
class _Running:
    batch_id: str
    line: int
    attempts: int
    backend: str | None
    task: asyncio.Task[None] = field(init=False)


class BatchRunner:
    """One worker's runner; acts only while it holds the lease. ``clock`` is injectable (wall seconds)."""

    def __init__(self, gw: Gateway, store: FileStore, *, clock: Callable[[], float] = time.time,
                 owner: str | None = None) -> None:
        self.gw = gw
        self.settings = gw.settings.batches
        self.store = store
        self.clock = clock
        self.owner = owner or f"{os.getpid()}-{secrets.token_hex(4)}"
        self.admission = Admission(gw, self.settings, clock)
        self.lease = lease_for(gw.settings, gw.db, gw.state)
        self.holding = False
        self._running: dict[tuple[str, int], _Running] = {}
        self._principals: dict[str, tuple[float, Principal | None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._renewed_at = float("-inf")
        self._swept_at = float("-inf")
        self._turn = 0
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-runner")

    async def stop(self) -> None:
        """Stop claiming, give the lines in flight back (pending again), release the lease."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._give_back_all()
        if self.holding:
            with contextlib.suppress(Exception):
                await self.lease.release(self.owner)
            self.holding = False

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        unavailable = False  # the database server is down: one line when it goes, one when it is back
        while not self._stopping:
            try:
                if await self._hold():
                    await self.step()
                if unavailable:
                    log.info("batch runner: the database answers again")
                    unavailable = False
            except DatabaseUnavailable as exc:
                if not unavailable:
                    log.warning("batch runner waits for the database: %s", exc)
                    unavailable = True
            except Exception:  # a bad batch or a busy database must not end the runner
                log.exception("batch runner step failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _hold(self) -> bool:
        """Take or renew the lease when due; a runner that lost it stops its lines."""
        now = self.clock()
        if self.holding and now - self._renewed_at < self.settings.lease_s / 3:
            return True
        try:
            held = await self.lease.take(self.owner, now, self.settings.lease_s)
        except StateUnavailable:  # Redis cannot say: a holder keeps on until its lease would have run out
            held = self.holding and now - self._renewed_at < self.settings.lease_s
            if held:
                return True
        if held and not self.holding:
            requeued = await batches_repo.requeue_running(self.gw.db)
            log.info("batch runner started in pid %d%s", os.getpid(),
                     f" ({requeued} line(s) in flight before are pending again)" if requeued else "")
        elif self.holding and not held:
            log.warning("batch runner lost its lease; another worker runs batches now")
            await self._give_back_all()
        self.holding = held
        if held:
            self._renewed_at = now
        return held

    # ------------------------------------------------------------------ one pass

    async def step(self) -> None:
        """Move every unfinished batch one step on, then dispatch lines where backends have room."""
        now = self.clock()
        if now - self._swept_at >= _SWEEP_S:
            self._swept_at = now
            await self._housekeeping(int(now))
        dispatchable = []
        for batch in await batches_repo.active(self.gw.db):
            status = batch["status"]
            expired = now >= batch["expires_at"] and status in ("validating", "in_progress")
            if expired:
                await self._end(batch, "expired")
            elif status == "validating":
                await self._validate(batch)
            elif status == "cancelling":
                await self._cancel(batch, now)
            elif status == "finalizing":
                await self._end(batch, "completed")
            elif status == "in_progress":
                if await self._busy_or_pending(batch):
                    dispatchable.append(batch)
                else:
                    await self._end(batch, "completed")
        if dispatchable:
            await self._dispatch(dispatchable)

    async def _busy_or_pending(self, batch: dict[str, Any]) -> bool:
        if any(key[0] == batch["id"] for key in self._running):
            return True
        return await batches_repo.unfinished(self.gw.db, batch["id"]) > 0

    async def _housekeeping(self, now: int) -> None:
        for file_id in await files_repo.take_expired(self.gw.db, now):
            self.store.remove(file_id)
        await batches_repo.purge_lines(self.gw.db, now - DEFAULT_BATCH_EXPIRY_S)
        await self.admission.sample()

    # ------------------------------------------------------------------ validation

    async def _validate(self, batch: dict[str, Any]) -> None:
        """Check the input file line by line; copy its lines into batch_requests, or fail the batch."""
        db = self.gw.db
        await batches_repo.reset_requests(db, batch["id"])  # a validation cut short by a crash starts over
        path = self.store.path(batch["input_file_id"])
        found = batches.Validation()
        if await files_repo.get(db, batch["input_file_id"], int(self.clock())) is None or not path.exists():
            found.fail("invalid_request", f"The input file {batch['input_file_id']} no longer exists.",
                       param="input_file_id")
        else:
            principal = await self._principal(batch["owner_key_id"])
            check = self._model_check(principal)
            await asyncio.to_thread(_drain, _valid_lines(path, batch["endpoint"], self.settings, check, found))
        now = int(self.clock())
        if found.errors:
            await batches_repo.fail(db, batch["id"], orjson.dumps(found.errors).decode(), now)
            log.info("batch %s failed validation: %s", batch["id"], found.errors[0]["code"])
            return
        lines = _valid_lines(path, batch["endpoint"], self.settings, lambda _model: True, batches.Validation())
        while chunk := await asyncio.to_thread(_take, lines, _PAGE):
            await batches_repo.insert_requests(db, batch["id"], chunk)
        if await batches_repo.start(db, batch["id"], total=found.total, model=found.model, now=now):
            log.info("batch %s: %d line(s) for %s", batch["id"], found.total, found.model)
        self.wake()

    def _model_check(self, principal: Principal | None) -> Callable[[str], bool]:
        gw = self.gw

        def check(model: str) -> bool:
            if principal is None:
                return False
            try:
                plan = gw.catalog.plan(model)
                x = Exchange(path="", request_id="", upstream_id="", headers={}, principal=principal)
                allowed_routes(gw, x, plan.routes)
            except GatewayError:
                return False
            return True

        return check

    async def _principal(self, key_id: str) -> Principal | None:
        """The batch owner's key as it is now (cached briefly); None once deleted, disabled or expired."""
        now = self.clock()
        cached = self._principals.get(key_id)
        if cached is not None and now - cached[0] < _PRINCIPAL_TTL_S:
            return cached[1]
        principal: Principal | None
        if key_id == ANONYMOUS_ID:
            principal = ANONYMOUS
        else:
            row = await keys_repo.get(self.gw.db, key_id)
            usable = row is not None and row["enabled"] and (row["expires_at"] is None or row["expires_at"] > now)
            principal = self.gw.authenticator.principal_of(row) if usable else None  # type: ignore[arg-type]
        self._principals[key_id] = (now, principal)
        return principal

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, active: list[dict[str, Any]]) -> None:
        """Claim lines round-robin across batches (FIFO within one) while their backend has room."""
        self._turn = (self._turn + 1) % len(active)
        now = int(self.clock())
        for batch in active[self._turn:] + active[:self._turn]:
            backend = self.admission.backend_of(batch["model"])
            room = self.admission.room(backend)
            if room <= 0:
                continue
            lease_until = now + int(self.settings.cancel_grace_s + self.gw.settings.longest_timeout_s)
            for row in await batches_repo.claim(self.gw.db, batch["id"], room, now, lease_until):
                self._launch(batch, row, backend)

    def _launch(self, batch: dict[str, Any], row: dict[str, Any], backend: str | None) -> None:
        running = _Running(batch["id"], row["line"], row["attempts"], backend)
        running.task = asyncio.get_running_loop().create_task(self._execute(batch, row, running),
                                                              name=f"batch-line-{batch['id']}-{row['line']}")
        self._running[(batch["id"], row["line"])] = running
        self.admission.started(backend)

    async def _execute(self, batch: dict[str, Any], row: dict[str, Any], running: _Running) -> None:
        try:
            await self._serve_line(batch, row)
        except asyncio.CancelledError:
            pass  # the caller (cancel, expiry, shutdown) decides what becomes of the line
        except Exception:
            log.exception("batch %s line %d failed in the runner", batch["id"], row["line"])
        finally:
            self._running.pop((running.batch_id, running.line), None)
            self.admission.ended(running.backend)
            self.wake()

    async def _serve_line(self, batch: dict[str, Any], row: dict[str, Any]) -> None:
        gw = self.gw
        principal = await self._principal(batch["owner_key_id"])
        body = orjson.loads(row["body_json"])
        x = Exchange(path=batch["endpoint"], request_id="req_" + secrets.token_hex(16), upstream_id=str(uuid.uuid4()),
                     headers={"X-Appliance-Batch": batch["id"]}, principal=principal, batch_id=batch["id"])
        responder = CapturedResponse()
        status: int
        answer: bytes
        error: dict[str, Any] | None = None
        try:
            if principal is None:
                raise GatewayError("invalid_api_key", "The key that created this batch was deleted, disabled or "
                                   "has expired.")
            endpoint = batches.ENDPOINTS[batch["endpoint"]]
            x.body = body
            if endpoint == batches.RESPONSES:
                turn = await surfaces.responses_turn(gw, body, principal.key_id)
                await pipeline.serve(gw, CHAT, turn.chat, x, responder, surfaces.responses_surface(turn))
            else:
                pipeline.validate(endpoint, body)
                await pipeline.serve(gw, endpoint, body, x, responder)
            status, answer = responder.status or 200, responder.body
        except GatewayError as exc:
            record(gw, x, exc.status, error_code=exc.code)  # once per request: a no-op if the pipeline did
            if await self._retry(batch, row, exc):
                return
            status, answer = exc.status, exc.json_body(x.request_id)
            if exc.code in _NO_ANSWER:
                error = {"code": exc.code, "message": exc.message}
        ok = 200 <= status < 300 and error is None
        parsed = _json(answer)
        await batches_repo.finish(
            gw.db, batch["id"], row["line"], row["attempts"], ok=ok,
            status_code=None if error else status, request_id=x.request_id,
            backend=x.route.backend if x.route else None, response_json=None if error else answer.decode(),
            error_json=orjson.dumps(error).decode() if error else None,
            usage=batches.usage_of(batch["endpoint"], parsed) if ok else (0, 0, 0, 0), now=int(self.clock()))

    async def _retry(self, batch: dict[str, Any], row: dict[str, Any], exc: GatewayError) -> bool:
        """Put a line that may still succeed back in the queue, after a backoff; True if it was."""
        limited = exc.code == "rate_limit_exceeded" and "limit" in exc.extra  # the key's own rpm/tpm: wait
        if not limited and not (resilience.retryable(exc) and row["attempts"] < self.settings.max_attempts):
            return False
        wait = resilience.retry_after_of(exc.headers) or _RETRY_BASE_S * 2 ** (row["attempts"] - 1)
        await batches_repo.retry_later(self.gw.db, batch["id"], row["line"], row["attempts"],
                                       int(self.clock() + min(wait, 120)))
        return True

    # ------------------------------------------------------------------ cancel, expiry, the end

    async def _cancel(self, batch: dict[str, Any], now: float) -> None:
        mine = [r for key, r in self._running.items() if key[0] == batch["id"]]
        if mine and now - (batch["cancelling_at"] or now) < self.settings.cancel_grace_s:
            return  # the lines in flight may still finish within the grace period
        await self._end(batch, "cancelled")

    async def _stop_lines(self, batch_id: str) -> None:
        mine = [r for key, r in self._running.items() if key[0] == batch_id]
        for running in mine:
            running.task.cancel()
        for running in mine:
            with contextlib.suppress(asyncio.CancelledError):
                await running.task

    async def _end(self, batch: dict[str, Any], status: str) -> None:
        """Close the batch: lines without a result get the status's error, then the output files."""
        db = self.gw.db
        await self._stop_lines(batch["id"])
        now = int(self.clock())
        if status == "expired":
            await batches_repo.close_unfinished(db, batch["id"], "expired", orjson.dumps(batches.EXPIRED_ERROR)
                                                .decode(), now)
        elif status == "cancelled":
            await batches_repo.close_unfinished(db, batch["id"], "cancelled",
                                                orjson.dumps(batches.CANCELLED_ERROR).decode(), now)
        else:
            await batches_repo.set_finalizing(db, batch["id"], now)
        await self._finalize(batch, status)

    async def _finalize(self, batch: dict[str, Any], status: str) -> None:
        """Render the output and error files from the lines (deterministic, so a rerun after a crash
        writes the same), then register them and set the final status in one transaction."""
        db = self.gw.db
        expiry = batch["output_expires_s"] or DEFAULT_BATCH_EXPIRY_S
        outputs, errors = self.store.writer(), self.store.writer()
        written: list[str] = []
        try:
            after = 0
            while rows := await batches_repo.results(db, batch["id"], after, _PAGE):
                for row in rows:
                    line = _output_line(batch["id"], row)
                    await (outputs if row["state"] == "succeeded" else errors).write(line)
                after = rows[-1]["line"]
            now = int(self.clock())
            file_rows, ids = [], {}
            for kind, writer in (("output", outputs), ("error", errors)):
                if writer.size == 0:
                    ids[kind] = None
                    continue
                file_id = new_file_id()
                await writer.commit(self.store.path(file_id))
                written.append(file_id)
                ids[kind] = file_id
                file_rows.append({"id": file_id, "owner_key_id": batch["owner_key_id"],
                                  "filename": f"{batch['id']}_{kind}.jsonl", "purpose": BATCH_OUTPUT,
                                  "bytes": writer.size, "sha256": writer.sha256, "created_at": now,
                                  "expires_at": now + expiry})
            stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]
            sources = {"completed": ("finalizing",), "cancelled": ("cancelling",),
                       "expired": ("validating", "in_progress")}[status]
            done = await batches_repo.finalize(db, batch["id"], status=status, stamp=stamp, from_statuses=sources,
                                               file_rows=file_rows, output_file_id=ids["output"],
                                               error_file_id=ids["error"], now=now)
        except BaseException:
            for file_id in written:
                self.store.remove(file_id)
            raise
        finally:
            outputs.discard()
            errors.discard()
        if not done:  # it moved on meanwhile (e.g. cancelled while finalizing): its next step redoes this
            for file_id in written:
                self.store.remove(file_id)
            return
        log.info("batch %s %s", batch["id"], status)

    async def _give_back_all(self) -> None:
        running = list(self._running.values())
        for item in running:
            item.task.cancel()
        for item in running:
            with contextlib.suppress(asyncio.CancelledError):
                await item.task
        by_batch: dict[str, list[tuple[int, int]]] = {}
        for item in running:
            by_batch.setdefault(item.batch_id, []).append((item.line, item.attempts))
        for batch_id, lines in by_batch.items():
            with contextlib.suppress(Exception):
                await batches_repo.give_back(self.gw.db, batch_id, lines)


# With a shared database, other nodes may be uploading into the shared files dir while this one starts:
# only what is older than this is a leftover of a crash.
SHARED_LEFTOVER_AGE_S = 86400.0


def prepare_data_dir(settings: Settings) -> None:
    """In the main process, before any worker, under the data-dir lock: whoever held the runner lease is
    gone; partial uploads and content files without a row (a crash between rename and insert) go.

    With ``[database] url`` the lease and the files dir are shared with other nodes, which may be running:
    the lease is left to expire, and only leftovers older than SHARED_LEFTOVER_AGE_S go."""
    store = FileStore.of(settings)
    shared = settings.database.url is not None
    older_than = time.time() - SHARED_LEFTOVER_AGE_S if shared else None
    store.sweep_tmp(older_than)
    conn = connect_sync(settings.data_dir, settings.database.url)
    try:
        if not shared:
            batches_repo.clear_lease_sync(conn)
        known = files_repo.all_ids_sync(conn)
    finally:
        conn.close()
    if store.root.is_dir():
        for path in store.root.glob("file-*"):
            if path.name not in known and (older_than is None or _mtime(path) < older_than):
                path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


# ------------------------------------------------------------------------------------------ helpers


def _valid_lines(path: Path, endpoint: str, settings: Any, model_ok: Callable[[str], bool],
                 found: batches.Validation) -> Iterator[tuple[int, str, str]]:
    """(line, custom_id, body JSON) of each valid line, read from disk as it goes (run in a thread)."""

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as handle:
            while data := handle.read(1024 * 1024):
                yield data

    for line in batches.read_lines(batches.split_lines(chunks()), endpoint, max_requests=settings.max_requests,
                                   allow_mixed=settings.allow_mixed_models, model_ok=model_ok, found=found):
        yield line.number, line.custom_id, orjson.dumps(line.body).decode()


def _drain(lines: Iterator[Any]) -> None:
    for _ in lines:
        pass


def _take(lines: Iterator[tuple[int, str, str]], n: int) -> list[tuple[int, str, str]]:
    out = []
    for item in lines:
        out.append(item)
        if len(out) >= n:
            break
    return out


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _output_line(batch_id: str, row: dict[str, Any]) -> bytes:
    # The line id is derived from the batch and line, so a re-rendered file is the same file.
    line_id = "batch_req_" + hashlib.sha256(f"{batch_id}:{row['line']}".encode()).hexdigest()[:32]
    error = orjson.loads(row["error_json"]) if row["error_json"] else None
    if row["status_code"] is None:
        return batches.output_line(row["custom_id"], line_id, status_code=None, request_id=None, body=None,
                                   error=error)
    body = orjson.Fragment(row["response_json"].encode()) if row["response_json"] else None
    return batches.output_line(row["custom_id"], line_id, status_code=row["status_code"],
                               request_id=row["request_id"], body=body, error=error)
