"""Session-wide test setup: the fakes, the real llama.cpp server, and one shared appliance (2 workers).

One appliance per session serves most tests; tests that need their own settings or must stop the
process start a private one with ``start_appliance``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.engines import Engine, create_database, start_postgres, start_redis
from tests.support.llamacpp import LlamaCpp
from tests.support.threaded import free_port

_llamacpp: LlamaCpp | None = None


def _wants_llamacpp(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    return "not llamacpp" not in markexpr


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start building/starting the real server at once: it runs while the fake-backed tests do."""
    global _llamacpp
    if _wants_llamacpp(session.config):
        log_dir = Path(session.config.rootpath) / "tests" / "artifacts"
        log_dir.mkdir(exist_ok=True)
        _llamacpp = LlamaCpp(log_dir)
        _llamacpp.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _llamacpp is not None:
        _llamacpp.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests on the real server run last, so its first build overlaps with everything else.
    items.sort(key=lambda item: item.get_closest_marker("llamacpp") is not None)
    # The long fuzz run only when asked for by marker (-m fuzz); the bounded one is always part of the run.
    if "fuzz" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="the long fuzz run: select it with -m fuzz (tests/perf/README.md)")
        for item in items:
            if item.get_closest_marker("fuzz") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def llamacpp_url() -> str:
    if _llamacpp is None:
        pytest.skip("llama.cpp server not started (deselected with -m 'not llamacpp')")
    return _llamacpp.wait()


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_ollama() -> Iterator[FakeOllama]:
    fake = FakeOllama().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_anthropic() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic()
    fake.start()
    yield fake
    fake.stop()


def _engine(start: Callable[[Path], Engine], workdir: Path) -> Iterator[Engine]:
    try:
        engine = start(workdir)
    except FileNotFoundError as missing:  # tests/run installs both from Debian's packages
        pytest.skip(f"{missing} is not installed (apt-get install redis-server postgresql)")
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def redis_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A real Redis server for the session (tests that kill it start their own)."""
    yield from _engine(start_redis, tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="session")
def postgres_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A real PostgreSQL server for the session; each test module makes its own database on it."""
    yield from _engine(start_postgres, tmp_path_factory.mktemp("postgres"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Storage tests run on both engines: None (SQLite in the test's data dir) or a new PostgreSQL database."""
    if request.param == "sqlite":
        return None
    engine = request.getfixturevalue("postgres_engine")
    return create_database(engine, f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def llamacpp_port() -> int:
    return _llamacpp.port if _llamacpp is not None else free_port()


def base_config(fake_openai: FakeOpenAI, fake_ollama: FakeOllama, llamacpp_port: int) -> dict[str, Any]:
    """The backends most tests share: the fakes, the real server, one down, one impatient, one to fail."""
    return {
        "discovery": {"enabled": False, "interval_s": 2},
        "backends": [
            {"name": "fake", "url": fake_openai.url + "/v1", "api_key": "sk-backend-secret"},
            {"name": "ollama", "type": "ollama", "url": fake_ollama.url},
            {"name": "llamacpp", "url": f"http://127.0.0.1:{llamacpp_port}/v1", "timeout_s": 120},
            {"name": "down", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False,
             "models": ["down-model"]},
            {"name": "impatient", "url": fake_openai.url + "/v1", "timeout_s": 1, "discover": False,
             "models": ["fake-hang"]},
            # The fake again, for tests that make it fail (faulty/fake-500...): the breaker they open is not fake's.
            {"name": "faulty", "url": fake_openai.url + "/v1", "discover": False},
        ],
        "models": [
            {"name": "chat", "target": "fake/fake-chat"},
            {"name": "tiny-chat", "target": "llamacpp/tiny"},
            {"name": "tiny-fallback", "targets": ["down/down-model", "llamacpp/tiny"]},
        ],
    }


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI, fake_ollama: FakeOllama,
            llamacpp_port: int) -> Iterator[Appliance]:
    """The shared appliance: 2 workers, every test backend."""
    app = Appliance(tmp_path_factory.mktemp("gateway"), base_config(fake_openai, fake_ollama, llamacpp_port))
    app.start()
    yield app
    app.stop()


@pytest.fixture(scope="session")
def client(gateway: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)


@pytest.fixture
def start_appliance(tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    """Start a private appliance with its own config; stopped (or killed) after the test."""
    started: list[Appliance] = []

    def start(config: dict[str, Any], **kwargs: Any) -> Appliance:
        app = Appliance(tmp_path / f"app{len(started)}", config, **kwargs)
        started.append(app)
        return app.start()

    yield start
    for app in started:
        if app.proc is not None and app.proc.poll() is None:
            app.stop()
