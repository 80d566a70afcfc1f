"""Zero-config: no backends configured, the appliance finds local model servers and keeps looking."""

from __future__ import annotations

import time

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.threaded import free_port

# The frozen subset runs this module again against the built binary (tests/run).
pytestmark = pytest.mark.frozen


def poll_models(app, want: set[str], timeout: float = 15) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    entries: dict[str, dict] = {}
    while time.monotonic() < deadline:
        status, body, _ = app.get("/v1/models")
        entries = {m["id"]: m for m in body["data"]} if status == 200 else {}
        if want <= set(entries):
            return entries
        time.sleep(0.1)
    raise AssertionError(f"wanted {want}, listed {sorted(entries)}")


def test_finds_servers_tells_kinds_apart_and_keeps_probing(start_appliance, fake_openai, fake_ollama):
    late_port = free_port()
    config = {"discovery": {"ports": [fake_openai.server.port, fake_ollama.server.port, late_port],
                            "interval_s": 0.5}}
    app = start_appliance(config, workers=1)
    entries = poll_models(app, {"fake-chat", "llama3.2:latest"})
    assert entries["fake-chat"]["owned_by"] == "openai"
    assert entries["llama3.2:latest"]["backends"][0]["kind"] == "ollama"
    ready = app.wait_ready()
    assert set(ready["backends"]) == {"openai", "ollama"}
    assert "found ollama" in app.log()

    late = FakeOpenAI()
    late.server.port = late_port
    late.start()
    try:
        poll_models(app, {"fake-chat"})
        body = app.get("/ready")[1]
        deadline = time.monotonic() + 10
        while "openai-" + str(late_port) not in body["backends"]:
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
            body = app.get("/ready")[1]
    finally:
        late.stop()


def test_not_ready_until_a_backend_answers(start_appliance):
    app = start_appliance({"discovery": {"ports": [free_port()], "interval_s": 0.5}}, workers=1)
    status, body, _ = app.get("/ready")
    assert status == 503
    assert body["reason"] == "no backend configured or discovered"
    assert app.get("/health")[0] == 200
    assert app.get("/v1/models")[1] == {"object": "list", "data": []}


def test_discovery_can_be_switched_off(start_appliance, fake_openai):
    app = start_appliance({"discovery": {"enabled": False, "ports": [fake_openai.server.port]}}, workers=1)
    # /v1/models waits for the worker's first refresh, so this is the settled answer.
    assert app.get("/v1/models")[1]["data"] == []
