"""Config hot reload on a real appliance (2 workers) under load: SIGHUP, `appliance reload` and
POST /admin/reload swap the config into every worker, no request fails, a bad file changes nothing.

One appliance serves the module; each test rewrites its config file and reloads. Sixteen clients keep
sending chats (each on a fresh connection, so both workers serve) through every reload of the module.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance, toml
from tests.support.threaded import free_port

pytestmark = pytest.mark.frozen

LOAD_CLIENTS = 16


def config(fake_openai: Any, models: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"discovery": {"enabled": False},
            "backends": [{"name": "fake", "url": fake_openai.url + "/v1"},
                         {"name": "spare", "url": fake_openai.url + "/v1", "discover": False,
                          "models": ["fake-slow-1500"]}],
            "models": models, **extra}


BASE = [{"name": "chat", "target": "fake/fake-chat"}]


class Load:
    """Chats on fresh connections from many threads until stopped; every outcome kept."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.outcomes: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(LOAD_CLIENTS)]

    def _run(self) -> None:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        while not self._stop.is_set():
            try:
                response = httpx.post(self.app.url + "/v1/chat/completions", json=body, timeout=30,
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}", "Connection": "close"})
                self.outcomes.append((response.status_code, response.text[:200]))
            except httpx.HTTPError as exc:
                self.outcomes.append((0, repr(exc)))

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def finish(self) -> None:
        """Stop, and check that every request of the load was answered 200."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        failed = [outcome for outcome in self.outcomes if outcome[0] != 200]
        assert len(self.outcomes) > 100 and failed == [], (len(self.outcomes), failed[:5])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any) -> Iterator[Appliance]:
    app = Appliance(tmp_path_factory.mktemp("reload"), config(fake_openai, BASE))
    app.start()
    app.wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def load(app: Appliance) -> Load:
    """Runs through every reload of the module; the last test stops it and checks it."""
    return Load(app).start()


def rewrite(app: Appliance, data: dict[str, Any]) -> None:
    server = app.config["server"]
    app.config = {**data, "server": {**server, **data.get("server", {})}}
    app.config_path.write_text(toml(app.config))


def fresh(app: Appliance, model: str, n: int = 8) -> list[httpx.Response]:
    """``n`` chats, each on a new connection (both workers answer some)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: httpx.post(
            app.url + "/v1/chat/completions", json=body, timeout=30,
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Connection": "close"}), range(n)))


def reload_via_api(app: Appliance) -> tuple[int, Any]:
    status, body, _ = app.post("/admin/reload", b"")
    return status, body


def eventually(check: Any, timeout: float = 20, app: Appliance | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        said = f"; the appliance said:\n{app.log()}" if app else ""
        assert time.monotonic() < deadline, "not within the deadline" + said
        time.sleep(0.1)


def test_sighup_swaps_the_config_into_every_worker(app: Appliance, load: Load, fake_openai: Any) -> None:
    rewrite(app, config(fake_openai, [*BASE, {"name": "chat2", "target": "fake/fake-slow-5"}]))
    assert {r.status_code for r in fresh(app, "chat2")} == {404}
    os.kill(app.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    eventually(lambda: {r.status_code for r in fresh(app, "chat2")} == {200}, app=app)
    assert {r.headers["x-appliance-model"] for r in fresh(app, "chat2")} == {"fake-slow-5"}


def test_admin_reload_answers_once_every_worker_runs_it(app: Appliance, load: Load, fake_openai: Any) -> None:
    rewrite(app, config(fake_openai, [*BASE, {"name": "chat3", "target": "fake/fake-chat"}]))
    status, body = reload_via_api(app)
    assert status == 200 and body["reloaded"] is True and body["workers_behind"] == [], body
    assert {r.status_code for r in fresh(app, "chat3", 12)} == {200}  # at once, on both workers
    assert {r.status_code for r in fresh(app, "chat2", 6)} == {404}  # gone with the new file
    status, again = reload_via_api(app)
    assert status == 200 and again["reloaded"] is False and again["generation"] == body["generation"]


def test_the_cli_reloads_and_reports(app: Appliance, load: Load, fake_openai: Any) -> None:
    priced = {"name": "chat", "target": "fake/fake-chat", "input_per_mtok": 1_000_000}
    rewrite(app, config(fake_openai, [priced]))
    done = app.cli("reload")
    assert done.returncode == 0 and "reloaded (generation" in done.stdout, done.stderr
    costs = {float(r.headers["x-appliance-cost-usd"]) for r in fresh(app, "chat")}
    assert all(cost > 0 for cost in costs), costs


def test_a_bad_file_is_refused_everywhere_and_the_running_config_stays(app: Appliance, load: Load,
                                                                       fake_openai: Any) -> None:
    good = config(fake_openai, BASE)
    rewrite(app, good)
    assert reload_via_api(app)[0] == 200
    bad = config(fake_openai, [*BASE, {"name": "bad", "target": "fake/fake-chat", "retries": 9}])
    rewrite(app, bad)
    line = next(n for n, text in enumerate(app.config_path.read_text().splitlines(), 1) if "retries = 9" in text)
    status, body = reload_via_api(app)
    assert status == 400 and body["error"]["code"] == "invalid_config", body
    assert f"{app.config_path}:{line}: models[1].retries" in body["error"]["message"]
    refused = app.cli("reload")
    assert refused.returncode == 2 and f"{app.config_path}:{line}: models[1].retries" in refused.stderr
    os.kill(app.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    eventually(lambda: "config not reloaded, the running one stays" in app.log())
    assert {r.status_code for r in fresh(app, "chat")} == {200}  # still the good config
    assert {r.status_code for r in fresh(app, "bad", 4)} == {404}
    rewrite(app, good)


def test_restart_only_settings_are_named_and_kept(app: Appliance, load: Load, fake_openai: Any) -> None:
    rewrite(app, config(fake_openai, BASE, server={"port": free_port()}, limits={"window_s": 30}))
    status, body = reload_via_api(app)
    assert status == 200 and body["restart_required"] == ["server.port", "limits.window_s"], body
    assert app.get("/health")[0] == 200  # still on the old port
    rewrite(app, config(fake_openai, BASE, server={"port": app.port}))
    assert reload_via_api(app)[1]["restart_required"] == []


def test_a_request_in_flight_finishes_on_the_backend_a_reload_removes(app: Appliance, load: Load,
                                                                      fake_openai: Any) -> None:
    with_spare = config(fake_openai, [*BASE, {"name": "slowpoke", "target": "spare/fake-slow-1500"}])
    rewrite(app, with_spare)
    assert reload_via_api(app)[0] == 200
    with ThreadPoolExecutor(1) as pool:
        seen = len(fake_openai.chats())
        slow = pool.submit(fresh, app, "slowpoke", 1)
        eventually(lambda: any(chat.body.get("model") == "fake-slow-1500" for chat in fake_openai.chats()[seen:]))
        without = config(fake_openai, BASE)
        without["backends"] = without["backends"][:1]
        rewrite(app, without)
        assert reload_via_api(app)[1]["reloaded"] is True
        (answer,) = slow.result(timeout=30)
    assert answer.status_code == 200 and answer.headers["x-appliance-backend"] == "spare"
    assert {r.status_code for r in fresh(app, "slowpoke", 4)} == {404}


def test_no_request_failed_through_the_reloads(load: Load) -> None:
    load.finish()


def test_a_replaced_worker_starts_from_the_reloaded_config(app: Appliance, fake_openai: Any) -> None:
    rewrite(app, config(fake_openai, [*BASE, {"name": "late", "target": "fake/fake-chat"}]))
    assert reload_via_api(app)[0] == 200
    victim = sorted(app.worker_pids(2))[0]
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: victim not in app.worker_pids(2, timeout=2) and len(app.worker_pids(2)) == 2, timeout=20)
    assert {r.status_code for r in fresh(app, "late", 12)} == {200}


def test_sighup_reloads_a_single_process_appliance(start_appliance: Any, fake_openai: Any) -> None:
    app = start_appliance(config(fake_openai, BASE), workers=1, extra_args=["--single-process"])
    rewrite(app, config(fake_openai, [*BASE, {"name": "solo", "target": "fake/fake-chat"}]))
    os.kill(app.proc.pid, signal.SIGHUP)
    eventually(lambda: {r.status_code for r in fresh(app, "solo", 2)} == {200}, app=app)
    assert app.stop() == 0
