"""Config reload, without a server: where an error is in the file, what a reload may change, the board, and a
gateway swapping generations under a request in flight."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.common.config import ConfigError, Settings
from appliance.common.config_file import keep_restart_only, line_of, load_settings, restart_only_changes
from appliance.core import reload
from appliance.core.cache import ResponseCache
from appliance.core.exchange import Exchange, upstreams
from appliance.core.gateway import Gateway
from appliance.core.resilience import BackendTable, Breakers
from appliance.providers.transport import Transport
from tests.support.threaded import free_port

CONFIG = """\
# a comment
[server]
port = 8100

[[backends]]
name = "one"
url = "http://127.0.0.1:9/v1"

[[backends]]
name = "two"
url = "http://127.0.0.1:10/v1"
timeout_s = 30

[[models]]
name = "chat"
target = "one/m"

[[models]]
name = "fast"
target = "two/m"
retries = 2

[routing]
retries = 1
"""


def test_line_of_finds_keys_in_tables_and_arrays_of_tables() -> None:
    assert line_of(CONFIG, "server.port") == 3
    assert line_of(CONFIG, "backends[1].timeout_s") == 12
    assert line_of(CONFIG, "models[1].retries") == 21
    assert line_of(CONFIG, "models[1].weights") == 18  # not written: its table's header
    assert line_of(CONFIG, "routing.retries") == 24
    assert line_of(CONFIG, "cache.ttl_s") is None


def test_a_bad_file_is_refused_with_its_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(CONFIG.replace("retries = 2", "retries = 9"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:21: models[1].retries: ")
    path.write_text(CONFIG.replace('url = "http://127.0.0.1:10/v1"', 'url = "${NOT_SET_ANYWHERE}"'))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(caught.value).startswith(f"{path}:11: backends[1].url: environment variable NOT_SET_ANYWHERE")
    path.write_text(CONFIG + "[routing]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:25: not valid TOML: ")


def test_restart_only_settings_keep_their_running_values(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(CONFIG)
    running = load_settings(path)
    path.write_text(CONFIG.replace("port = 8100", "port = 8200\nworkers = 7")
                    .replace("[routing]\n", "[routing]\nbreaker_window_s = 5\nprobe_interval_s = 3\n"))
    new = load_settings(path)
    assert restart_only_changes(running, new) == ["server.port", "server.workers", "routing.breaker_window_s"]
    kept = keep_restart_only(running, new)
    assert kept.server == running.server and kept.routing.breaker_window_s == running.routing.breaker_window_s
    assert kept.routing.probe_interval_s == 3  # the rest of the section is the new file's


def test_the_board_tells_who_is_behind() -> None:
    board = reload.Board(3, shared=False)
    assert board.published == 0 and board.lagging(0) == []
    generation = board.publish()
    board.applied(0, generation)
    assert board.lagging(generation) == [1, 2]
    board.applied(1, generation)
    board.applied(2, generation)
    assert board.lagging(generation) == []


def test_a_request_publishes_once_and_says_what_needs_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(CONFIG.replace("port = 8100", f'port = 8100\ndata_dir = "{tmp_path}"'))
    running = load_settings(path)
    board = reload.Board(1, shared=False)
    assert reload.request(running, board) == reload.Outcome(0, [], changed=False)  # the same file: nothing to do
    path.write_text(path.read_text().replace("port = 8100", "port = 8300").replace('target = "one/m"',
                                                                                   'target = "two/m"'))
    outcome = reload.request(running, board)
    assert outcome == reload.Outcome(1, ["server.port"], changed=True) and board.published == 1
    latest = reload.latest(running, board)
    assert latest.models[0].target == "two/m" and latest.server.port == 8100
    status = reload.read_snapshot(tmp_path, reload.STATUS)
    assert status is not None and status["generation"] == 1 and status["restart_required"] == ["server.port"]
    path.write_text("[models\n")
    with pytest.raises(ConfigError):
        reload.request(running, board)
    assert board.published == 1 and reload.read_snapshot(tmp_path, reload.STATUS)["error"]  # type: ignore[index]


def _settings(backends: list[dict[str, object]], models: list[dict[str, object]]) -> Settings:
    return Settings.model_validate({"discovery": {"enabled": False}, "backends": backends, "models": models})


def test_a_reload_swaps_backends_and_routes_while_a_request_keeps_its_own() -> None:
    async def run() -> None:
        transport = await Transport.open()
        try:
            one = {"name": "one", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False, "models": ["m"]}
            two = {"name": "two", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False, "models": ["m"]}
            first = _settings([one, two], [{"name": "chat", "target": "two/m"}])
            breakers = Breakers(BackendTable(shared=False), first.routing)
            gateway = Gateway(first, transport, None, None, None, None, breakers,  # type: ignore[arg-type]
                              ResponseCache(None, None, first.cache))  # type: ignore[arg-type]
            kept, removed = gateway.providers["one"], gateway.providers["two"]
            gateway.catalog.backends["one"].up = True
            x = Exchange("/v1/chat/completions", "r1", "u1", {})
            in_flight = upstreams(gateway, x)

            three = {"name": "three", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False, "models": ["m"]}
            gateway.reconfigure(_settings([one, three], [{"name": "chat", "target": "three/m", "input_per_mtok": 2}]))
            assert gateway.providers["one"] is kept and gateway.catalog.backends["one"].up is True
            assert "two" not in gateway.providers and gateway.catalog.plan("chat").routes[0].backend == "three"
            assert gateway.prices.of("three", "m").input == 2
            assert upstreams(gateway, x) is in_flight and in_flight.providers["two"] is removed  # the old generation
            assert in_flight.limits_for("two", 1.0) is not None
            await asyncio.sleep(0)  # the new backend's probe runs (connection refused: unreachable)
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                await task
            assert gateway.catalog.backends["three"].up is False
        finally:
            await transport.close()

    asyncio.run(run())


def test_a_reload_of_cost_per_hour_reprices_busy_time_and_keeps_the_provider() -> None:
    async def run() -> None:
        transport = await Transport.open()
        try:
            gpu = {"name": "gpu", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False, "models": ["m"]}
            first = _settings([gpu], [])
            breakers = Breakers(BackendTable(shared=False), first.routing)
            gateway = Gateway(first, transport, None, None, None, None, breakers,  # type: ignore[arg-type]
                              ResponseCache(None, None, first.cache))  # type: ignore[arg-type]
            provider = gateway.providers["gpu"]
            assert gateway.compute.per_second("gpu") == 0
            gateway.reconfigure(_settings([{**gpu, "cost_per_hour": 7.2}], []))
            assert gateway.compute.per_second("gpu") == 7.2 / 3600
            assert gateway.providers["gpu"] is provider and gateway.upstreams.backends["gpu"].cost_per_hour == 7.2
            gateway.reconfigure(_settings([{**gpu, "cost_per_hour": 7.2, "timeout_s": 5}], []))
            assert gateway.providers["gpu"] is not provider  # what the provider reads changed: a new one
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                await task
        finally:
            await transport.close()

    asyncio.run(run())
