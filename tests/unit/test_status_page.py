"""The status page (static/) in headless Chromium, against a fake /statsz.

The fake serves static/ the way the appliance does (/ and /static/...) and answers /statsz with a fixed
document; tests switch it to demand a key or to fail. Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support import browser
from tests.support.threaded import ThreadedServer

pytestmark = pytest.mark.skipif(not browser.available(), reason="needs chromium (apt-get install chromium)")

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "static"
ARTIFACTS = ROOT / "tests" / "artifacts"
NOW = 1790000000.0
XSS = '<img src=x onerror="console.error(\'xss\')">'
LOADED = 'body[data-state="loaded"] #sparkline polyline.errors'


def statsz() -> dict[str, Any]:
    traffic = [{"t": NOW - 60 * (60 - i), "requests": round(6 + 5 * math.sin(i / 6) + (i % 7)),
                "errors": 3 if i in (20, 21, 45) else 0, "tokens": 300} for i in range(60)]
    breaker_closed = {"state": "closed", "consecutive_failures": 0, "retry_after_s": 0}
    return {
        "version": "0.1.0", "uptime_s": 7384.5, "now": NOW, "workers": {"configured": 2, "alive": 1},
        "totals": {"requests": 120, "errors": 3, "prompt_tokens": 5000, "completion_tokens": 1200, "cost_usd": 0.12,
                   "cache_hits": 10, "cache_hit_rate": 0.083, "requests_per_s": 0.4},
        "backends": [
            {"name": "ollama", "kind": "ollama", "state": "ready", "up": True, "last_probe_at": NOW - 4,
             "last_error": None, "models": 3, "inflight": 1, "breaker": breaker_closed,
             "latency_ms": {"p50": 210.0, "p95": 900.0}, "requests": 80, "error_rate": 0.0125},
            {"name": "vllm-gpu", "kind": "openai", "state": "unreachable", "up": False, "last_probe_at": NOW - 31,
             "last_error": "connect timeout after 5.0s", "models": 0, "inflight": 0,
             "breaker": {"state": "open", "consecutive_failures": 5, "retry_after_s": 25},
             "latency_ms": {"p50": 1830.0, "p95": 5000.0}, "requests": 30, "error_rate": 0.0667},
            {"name": "cloud-anthropic", "kind": "anthropic", "state": "ready", "up": True, "last_probe_at": None,
             "last_error": XSS, "models": 2, "inflight": None, "breaker": None, "latency_ms": None,
             "requests": 10, "error_rate": None},
            {"name": "llamacpp-local", "kind": "llamacpp"},  # almost everything missing
        ],
        "models": [
            {"model": "llama3.2", "requests": 80, "errors": 1, "prompt_tokens": 4000, "completion_tokens": 900,
             "cost_usd": 0.0, "cache_hit_rate": 0.1},
            {"model": "claude-sonnet", "requests": 40, "errors": 2, "prompt_tokens": 1000, "completion_tokens": 300,
             "cost_usd": 0.12, "cache_hit_rate": None},
        ],
        "traffic": traffic,
        "recent_errors": [
            {"time": NOW - 50, "request_id": "req-7f3a", "model": "claude-sonnet", "backend": "vllm-gpu",
             "status": 502, "error_code": "backend_unreachable"},
            {"time": NOW - 5, "request_id": None, "model": None, "backend": None, "status": 429,
             "error_code": "rate_limited"},
        ],
        "limits": {"rejections": 4},
        "db": {"size_bytes": 123456, "write_queue_depth": 0},
        "batches": {
            "by_status": {"completed": 3, "in_progress": 1, "validating": 1}, "pending_lines": 150,
            "active": [
                {"id": "batch_abc123", "owner_key_id": "key_1", "endpoint": "/v1/chat/completions",
                 "model": "llama3.2", "status": "in_progress", "created_at": NOW - 600, "expires_at": NOW + 85800,
                 "request_counts": {"total": 200, "completed": 48, "failed": 2}},
                {"id": "batch_new", "owner_key_id": "key_1", "endpoint": "/v1/embeddings", "model": None,
                 "status": "validating", "created_at": NOW - 1, "expires_at": NOW + 86399,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}},
            ],
        },
    }


@dataclass
class FakeAppliance:
    """Serves static/ and a fake /statsz; records the Authorization header of each /statsz call."""

    url: str = ""
    key: str | None = None  # when set, /statsz wants "Bearer <key>"
    fail: bool = False
    seen_auth: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        async def index(request: web.Request) -> web.FileResponse:
            return web.FileResponse(STATIC / "index.html")

        async def stats(request: web.Request) -> web.Response:
            auth = request.headers.get("Authorization")
            self.seen_auth.append(auth)
            if self.key is not None and auth != f"Bearer {self.key}":
                return web.json_response({"error": {"message": "key required"}}, status=401)
            if self.fail:
                return web.json_response({"error": {"message": "boom"}}, status=500)
            return web.json_response(statsz())

        app = web.Application()
        app.router.add_get("/", index)
        app.router.add_get("/status", index)
        app.router.add_get("/statsz", stats)
        app.router.add_static("/static", STATIC)
        return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeAppliance, ThreadedServer]]:
    fake = FakeAppliance()
    threaded = ThreadedServer(fake.app()).start()
    fake.url = threaded.url
    yield fake, threaded
    threaded.stop()


@pytest.fixture
def fake(server: tuple[FakeAppliance, ThreadedServer]) -> FakeAppliance:
    appliance, _ = server
    appliance.key, appliance.fail = None, False
    appliance.seen_auth.clear()
    return appliance


def page_errors(result: browser.PageResult) -> list[str]:
    """Console errors, less the browser's own note about a non-2xx fetch (which the test provoked)."""
    return [e for e in result.errors if not (e.startswith("network:") and "/statsz" in e)]


def test_status_page_shows_statsz(fake: FakeAppliance) -> None:
    result = browser.load_page(f"{fake.url}/", screenshot=ARTIFACTS / "status-page.png", wait_for_selector=LOADED)

    assert result.errors == []
    for name in ("ollama", "vllm-gpu", "cloud-anthropic", "llamacpp-local", "llama3.2", "claude-sonnet"):
        assert name in result.text
    assert "open · retry 25s" in result.text  # vllm-gpu's breaker
    assert "closed" in result.text
    assert "120" in result.text and "210 ms" in result.text and "backend_unreachable" in result.text
    assert "2/4 backends up" in result.text
    assert "1/2 workers" in result.text  # one worker is down (being replaced)
    assert '<svg id="sparkline"' in result.html
    # Batches: the running one with its progress bar (50 of 200 lines answered), the new one still counting.
    assert "batch_abc123" in result.text and "batch_new" in result.text and "in_progress 1" in result.text
    assert '<progress max="200" value="50" title="50 of 200 lines">25%</progress>' in result.html
    # Data is text, never markup: the would-be tag shows as written and no element was made from it.
    assert XSS in result.text and "<img" not in result.html
    assert result.phone_scroll_width is not None and result.phone_scroll_width <= 375  # no sideways scroll
    assert result.screenshot.stat().st_size > 10_000
    assert fake.seen_auth and fake.seen_auth[0] is None  # no key stored, none sent


def test_status_page_asks_for_a_key_then_uses_the_stored_one(fake: FakeAppliance) -> None:
    fake.key = "sk-app-status-test-key"
    asked = browser.load_page(f"{fake.url}/status", screenshot=ARTIFACTS / "status-page-key.png",
                              wait_for_selector='body[data-state="need-key"] #key-form:not([hidden])')
    assert "needs an API key" in asked.text
    assert "ollama" not in asked.text
    assert page_errors(asked) == []

    fake.seen_auth.clear()
    shown = browser.load_page(f"{fake.url}/", screenshot=ARTIFACTS / "status-page-with-key.png",
                              wait_for_selector=LOADED, storage={"appliance-key": fake.key})
    assert shown.errors == []
    assert "vllm-gpu" in shown.text and "needs an API key" not in shown.text
    assert fake.seen_auth[0] == f"Bearer {fake.key}"


def test_status_page_shows_a_banner_when_statsz_fails(fake: FakeAppliance) -> None:
    fake.fail = True
    result = browser.load_page(f"{fake.url}/", screenshot=ARTIFACTS / "status-page-error-dark.png", dark=True,
                               wait_for_selector='body[data-state="error"] #banner:not([hidden])')
    assert "/statsz answered HTTP 500" in result.text
    assert page_errors(result) == []
