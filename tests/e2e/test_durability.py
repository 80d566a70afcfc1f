"""Nothing lost: every answered request reaches the ledger through a worker's kill -9 and a full disk.

Requests carry their own X-Request-ID, so the ledger is compared with what the client saw request by
request: every answer the client got is in the ledger exactly once, and a row whose client saw no
answer can only be one the worker journaled just before it was killed (billed, never the reverse).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.appliance import Appliance
from tests.support.ledger import rows_where

pytestmark = pytest.mark.frozen

REQUESTS, CONCURRENCY, KILL_AT = 200, 8, 80


def config(fake_openai: Any, **extra: Any) -> dict[str, Any]:
    return {"discovery": {"enabled": False},
            "backends": [{"name": "fake", "url": fake_openai.url + "/v1"}],
            "models": [{"name": "chat", "target": "fake/fake-slow-20"}], **extra}


def user_key(app: Appliance) -> str:
    status, body, _ = app.post("/admin/keys", {"name": "durability", "role": "user"})
    assert status == 201, body
    return body["key"]


def one_request(app: Appliance, key: str, request_id: str, stream: bool, content: str = "hi") -> bool:
    """One chat on a fresh connection (so the load spreads over both workers); True if fully answered."""
    body = {"model": "chat", "stream": stream, "messages": [{"role": "user", "content": content}]}
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": request_id}
    try:
        with httpx.stream("POST", app.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=30) as response:
            raw = response.read()
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    return raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw if stream else b'"choices"' in raw


def ledger(app: Appliance, prefix: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(app.data_dir / "appliance.db")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM requests WHERE request_id LIKE ? ORDER BY id", (prefix + "%",)).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any) -> Any:
    app = Appliance(tmp_path_factory.mktemp("durability"), config(fake_openai))
    app.start()
    app.wait_ready()
    yield app
    app.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_killed_worker_loses_no_answered_request(app: Appliance, stream: bool) -> None:
    key = user_key(app)
    prefix = f"kill9-{'s' if stream else 'w'}-"
    victim = sorted(app.worker_pids(2))[0]
    answered: dict[str, bool] = {}
    lock = threading.Lock()

    def send(i: int) -> None:
        if i == KILL_AT:
            os.kill(victim, signal.SIGKILL)
        ok = one_request(app, key, f"{prefix}{i:03d}", stream)
        with lock:
            answered[f"{prefix}{i:03d}"] = ok

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(send, range(REQUESTS)))
    ok = {rid for rid, fine in answered.items() if fine}
    assert len(ok) > REQUESTS // 2, "the burst should mostly succeed"

    deadline = time.monotonic() + 20  # the replacement worker (or the survivor) ingests the dead one's journal
    while True:
        rows = ledger(app, prefix)
        logged = [row["request_id"] for row in rows]
        if ok <= set(logged) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(ok - set(logged)) == [], "answered but not in the ledger"
    assert len(logged) == len(set(logged)), "a request counted twice"
    assert set(logged) - ok <= set(answered) - ok  # extra rows only for requests cut off by the kill
    assert all(row["status"] == 200 for row in rows if row["request_id"] in ok)
    assert len(set(logged) - ok) <= CONCURRENCY  # at most the ones in flight on the killed worker
    assert victim not in app.worker_pids(2)


def test_a_full_disk_degrades_the_appliance_and_loses_nothing(tmp_path: Path, fake_openai: Any) -> None:
    """The data dir on a small tmpfs, then filled: answers flow, /ready says degraded, and once space is back
    every request is in the ledger."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    app = Appliance(tmp_path / "app", config(fake_openai, server={"data_dir": str(disk / "data")},
                                                log={"store_bodies": True, "max_body_kb": 512}))
    app.data_dir = disk / "data"
    try:
        app.start()
        app.wait_ready()
        key = user_key(app)
        assert all(one_request(app, key, f"disk-before-{i}", False) for i in range(5))
        rows_where(app, "request_id LIKE 'disk-before-%'", (), count=5)

        filler = disk / "filler"
        with filler.open("wb") as out:  # until the tmpfs is full
            try:
                while True:
                    out.write(b"\0" * (1 << 20))
                    out.flush()
            except OSError:
                pass
        big = "x" * 200_000  # stored bodies: the database must grow, and cannot
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: one_request(app, key, f"disk-full-{i:02d}", i % 2 == 1, big), range(20)))
        assert all(results), "a full disk must not stop the answers"

        ready = _wait_for(lambda: app.get("/ready")[1], lambda body: body["status"] == "degraded")
        assert ready["reason"] == "degraded: database writes failing"
        assert app.get("/statsz")[1]["degraded"] == ["database writes failing"]
        metrics = app.get("/metrics")[1]
        failures = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("appliance_db_write_failures_total")]
        assert failures and failures[0] > 0

        filler.unlink()
        rows_where(app, "request_id LIKE 'disk-full-%'", (), count=20, timeout=20)
        _wait_for(lambda: app.get("/ready")[1], lambda body: body["status"] == "ready")
        bodies = _query(app, "SELECT count(*) FROM request_bodies WHERE request_id LIKE 'disk-full-%'")
        assert bodies == [(20,)]
    finally:
        app.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _query(app: Appliance, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(app.data_dir / "appliance.db")
    try:
        return [tuple(row) for row in conn.execute(sql)]
    finally:
        conn.close()


def _wait_for(read: Any, done: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            assert done(value), value
            return value
        time.sleep(0.1)

