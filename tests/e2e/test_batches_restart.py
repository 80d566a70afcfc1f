"""Batches across stops and crashes (B10), and expiry (B11): each test runs its own appliance, 2 workers.

Killing the appliance means its whole process tree, found from the pid file in the data dir (the main
process), as an OOM killer or a power cut would leave it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.conftest import base_config
from tests.support.appliance import ADMIN_KEY, Appliance, descendants
from tests.support.batches import CHAT_URL, TERMINAL, lines_of, poll

pytestmark = pytest.mark.frozen



def config(fake_openai: Any, fake_ollama: Any, llamacpp_port: int, **batches: Any) -> dict[str, Any]:
    data = base_config(fake_openai, fake_ollama, llamacpp_port)
    data["batches"] = {"poll_interval_s": 0.1, "backend_concurrency": {"fake": 2}, **batches}
    return data


def sdk(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)


def create(client: openai.OpenAI, bodies: list[dict[str, Any]]) -> tuple[str, list[str]]:
    ids = [f"r{i}" for i in range(len(bodies))]
    raw = b"".join(json.dumps({"custom_id": c, "method": "POST", "url": CHAT_URL, "body": b}).encode() + b"\n"
                   for c, b in zip(ids, bodies, strict=True))
    file_id = client.files.create(file=("in.jsonl", raw), purpose="batch").id
    return client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h").id, ids


def kill_tree_from_pid_file(app: Appliance) -> None:
    main = int((app.data_dir / "appliance.pid").read_text())
    for pid in [main, *descendants(main)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert app.proc is not None
    app.proc.wait(10)


def assert_exactly_once(client: openai.OpenAI, batch: Any, ids: list[str]) -> list[dict[str, Any]]:
    results = lines_of(client, batch.output_file_id) + lines_of(client, batch.error_file_id)
    seen = [r["custom_id"] for r in results]
    assert sorted(seen) == sorted(ids), "each custom_id exactly once"
    counts = batch.request_counts
    assert counts.total == len(ids) and counts.completed + counts.failed == len(ids)
    return results


def test_b10_kill_9_mid_batch_then_restart(start_appliance: Callable[..., Appliance], fake_openai: Any,
                                           fake_ollama: Any, llamacpp_port: int) -> None:
    app = start_appliance(config(fake_openai, fake_ollama, llamacpp_port))
    client = sdk(app)
    batch_id, ids = create(client, [{"model": "fake/fake-slow-300", "messages": [{"role": "user",
                                                                                   "content": "hi"}]}] * 30)
    poll(client, batch_id, lambda b: b.request_counts.completed >= 10)
    kill_tree_from_pid_file(app)
    app.start()
    done = poll(client := sdk(app), batch_id, lambda b: b.status in TERMINAL)
    assert done.status == "completed"
    results = assert_exactly_once(client, done, ids)
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert done.request_counts.completed == 30


def test_sigterm_mid_batch_gives_lines_back_and_the_next_start_finishes(
        start_appliance: Callable[..., Appliance], fake_openai: Any, fake_ollama: Any, llamacpp_port: int) -> None:
    app = start_appliance(config(fake_openai, fake_ollama, llamacpp_port))
    client = sdk(app)
    batch_id, ids = create(client, [{"model": "fake/fake-slow-300", "messages": [{"role": "user",
                                                                                   "content": "hi"}]}] * 12)
    poll(client, batch_id, lambda b: b.request_counts.completed >= 3)
    assert app.stop() == 0
    conn = sqlite3.connect(app.data_dir / "appliance.db")
    running = conn.execute("SELECT count(*) FROM batch_requests WHERE state = 'running'").fetchone()[0]
    conn.close()
    assert running == 0  # lines in flight at the stop went back to pending
    app.start()
    done = poll(client := sdk(app), batch_id, lambda b: b.status in TERMINAL)
    assert done.status == "completed"
    assert_exactly_once(client, done, ids)


def test_b11_expiry(start_appliance: Callable[..., Appliance], fake_openai: Any, fake_ollama: Any,
                    llamacpp_port: int) -> None:
    app = start_appliance(config(fake_openai, fake_ollama, llamacpp_port, window_seconds_override=3,
                                 backend_concurrency={"fake": 1}))
    client = sdk(app)
    quick = {"model": "fake/fake-chat", "messages": [{"role": "user", "content": "hi"}]}
    stalled = {**quick, "fake_delay_ms": 60_000}
    batch_id, ids = create(client, [quick] + [stalled] * 4)
    done = poll(client, batch_id, lambda b: b.status in TERMINAL, timeout=30)
    assert done.status == "expired" and done.expired_at is not None
    assert len(lines_of(client, done.output_file_id)) == 1
    errors = lines_of(client, done.error_file_id)
    assert len(errors) == 4
    assert all(r["error"] == {"code": "batch_expired", "message": "This request could not be executed before the "
                                                                  "completion window expired."} for r in errors)
    assert_exactly_once(client, done, ids)


def test_a_batch_whose_window_passed_while_down_expires_at_start(
        start_appliance: Callable[..., Appliance], fake_openai: Any, fake_ollama: Any, llamacpp_port: int) -> None:
    app = start_appliance(config(fake_openai, fake_ollama, llamacpp_port, window_seconds_override=2))
    client = sdk(app)
    stalled = {"model": "fake/fake-chat", "messages": [{"role": "user", "content": "hi"}], "fake_delay_ms": 60_000}
    batch_id, ids = create(client, [stalled] * 3)
    poll(client, batch_id, lambda b: b.status == "in_progress")
    kill_tree_from_pid_file(app)
    time.sleep(2)  # the window ends while nothing runs
    app.start()
    done = poll(client := sdk(app), batch_id, lambda b: b.status in TERMINAL)
    assert done.status == "expired" and done.output_file_id is None
    assert_exactly_once(client, done, ids)
