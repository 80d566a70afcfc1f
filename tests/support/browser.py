"""Load a page in headless Chromium over the DevTools protocol, for tests that look at what a person sees.

No playwright or selenium: Debian's ``chromium`` plus the ``websockets`` library. ``load_page`` starts a
private browser (its own profile in a temporary folder), opens the URL, waits for a selector, collects
console errors and uncaught exceptions, takes screenshots (desktop, and a 375 px phone beside it) and
always ends the browser it started.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    from websockets.asyncio.client import connect
except ImportError:  # websockets 12 (pyproject allows >=12): the legacy client has the same connect()
    from websockets.client import connect  # type: ignore[no-redef]

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DESKTOP = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True}
MAX_SHOT_HEIGHT = 6000


def chromium_path() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


def available() -> bool:
    """Whether a Chromium binary is installed (tests skip when not)."""
    return chromium_path() is not None


@dataclass
class PageResult:
    errors: list[str]  # console.error calls, uncaught exceptions, browser log errors (e.g. a failed fetch)
    text: str  # document.body.innerText
    screenshot: Path
    html: str = ""  # document.documentElement.outerHTML, for checks on structure
    phone_screenshot: Path | None = None
    phone_scroll_width: int | None = None  # document width at the phone viewport; > 375 means sideways scrolling
    timings: dict[str, float] = field(default_factory=dict)


class PageTimeout(AssertionError):
    """The selector never appeared; the message carries what the page said and showed."""


class _Cdp:
    """One DevTools session over a websocket: numbered calls, and events kept for whoever asks."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.handlers: dict[str, list[Any]] = {}
        self.reader = asyncio.create_task(self._read())

    def on(self, method: str, handler: Any) -> None:
        self.handlers.setdefault(method, []).append(handler)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        return await future

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"evaluate failed: {reply['exceptionDetails'].get('text')}")
        return reply["result"].get("value")

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    future = self.pending.pop(message["id"], None)
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(RuntimeError(f"CDP error: {message['error']}"))
                    else:
                        future.set_result(message.get("result", {}))
                for handler in self.handlers.get(message.get("method", ""), ()):
                    handler(message.get("params", {}))
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("DevTools connection closed"))

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


def _console_text(params: dict[str, Any]) -> str:
    parts = []
    for arg in params.get("args", []):
        parts.append(str(arg["value"]) if "value" in arg else arg.get("description", arg.get("type", "?")))
    return "console.error: " + " ".join(parts)


def _exception_text(params: dict[str, Any]) -> str:
    details = params.get("exceptionDetails", {})
    exception = details.get("exception", {})
    return "exception: " + (exception.get("description") or details.get("text", "?"))


def _start(binary: str, profile: Path, deadline: float) -> tuple[subprocess.Popen[bytes], str]:
    """Start Chromium; return it and the websocket URL of its first page."""
    log = (profile / "chromium.log").open("wb")
    args = [
        binary, "--headless=new", "--no-sandbox",  # tests run as root
        "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort (no race)
        f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-gpu",
        "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
        "--hide-scrollbars", f"--window-size={DESKTOP['width']},{DESKTOP['height']}", "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}: {_tail(profile)}")
        lines = port_file.read_text().splitlines() if port_file.exists() else []
        if len(lines) >= 2:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json/list", timeout=5) as response:
                    pages = [t for t in json.load(response) if t.get("type") == "page"]
            except OSError:
                pages = []
            if pages:
                return proc, pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.05)
    _stop(proc)
    raise RuntimeError(f"chromium did not open its DevTools port in time: {_tail(profile)}")


def _tail(profile: Path) -> str:
    log = profile / "chromium.log"
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the browser and every helper process it started (they share its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(3)
            return
        except subprocess.TimeoutExpired:
            continue


async def _screenshot(cdp: _Cdp, metrics: dict[str, Any], path: Path) -> int:
    """Screenshot the whole page at this viewport; returns the page's scroll width."""
    await cdp.call("Emulation.setDeviceMetricsOverride", **metrics)
    # Two frames, so layout and paint have caught up with the new viewport.
    await cdp.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    size = await cdp.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    height = min(max(size[1], metrics["height"]), MAX_SHOT_HEIGHT)
    await cdp.call("Emulation.setDeviceMetricsOverride", **{**metrics, "height": height})
    await cdp.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    shot = await cdp.call("Page.captureScreenshot", format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return int(size[0])


async def _drive(ws_url: str, url: str, screenshot: Path, wait_for_selector: str | None, timeout_s: float,
                 storage: dict[str, str] | None, dark: bool) -> PageResult:
    errors: list[str] = []
    timings: dict[str, float] = {}
    started = time.monotonic()
    async with connect(ws_url, max_size=None, open_timeout=timeout_s) as ws:
        cdp = _Cdp(ws)
        cdp.on("Runtime.consoleAPICalled",
               lambda p: errors.append(_console_text(p)) if p.get("type") in ("error", "assert") else None)
        cdp.on("Runtime.exceptionThrown", lambda p: errors.append(_exception_text(p)))
        cdp.on("Log.entryAdded", lambda p: errors.append(
            f"{p['entry'].get('source', 'log')}: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            if p["entry"].get("level") == "error" else None)
        loaded = asyncio.get_running_loop().create_future()
        cdp.on("Page.loadEventFired", lambda p: loaded.done() or loaded.set_result(None))
        for domain in ("Runtime", "Log", "Page"):
            await cdp.call(f"{domain}.enable")
        await cdp.call("Emulation.setDeviceMetricsOverride", **DESKTOP)
        scheme = "dark" if dark else "light"
        await cdp.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": scheme}])
        if storage:
            # Runs in every new document of this tab before the page's own scripts, for the target origin only.
            origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
            script = (f"if (location.origin === {json.dumps(origin)}) "
                      f"for (const [k, v] of Object.entries({json.dumps(storage)})) sessionStorage.setItem(k, v);")
            await cdp.call("Page.addScriptToEvaluateOnNewDocument", source=script)
        nav = await cdp.call("Page.navigate", url=url)
        if nav.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {nav['errorText']}")
        await asyncio.wait_for(loaded, timeout_s)
        timings["load_s"] = time.monotonic() - started
        found = wait_for_selector is None
        deadline = time.monotonic() + timeout_s
        while not found and time.monotonic() < deadline:
            found = await cdp.evaluate(f"document.querySelector({json.dumps(wait_for_selector)}) !== null")
            if not found:
                await asyncio.sleep(0.05)
        timings["ready_s"] = time.monotonic() - started
        text = await cdp.evaluate("document.body ? document.body.innerText : ''")
        html = await cdp.evaluate("document.documentElement.outerHTML")
        await _screenshot(cdp, DESKTOP, screenshot)
        phone_shot = screenshot.with_name(f"{screenshot.stem}-phone{screenshot.suffix}")
        phone_width = await _screenshot(cdp, PHONE, phone_shot)
        await asyncio.sleep(0.05)  # let late console events arrive
        await cdp.close()
    if not found:
        raise PageTimeout(f"{wait_for_selector!r} did not appear within {timeout_s}s on {url}\n"
                          f"errors: {errors}\ntext: {text[:2000]}\nscreenshot: {screenshot}")
    return PageResult(errors=errors, text=text, screenshot=screenshot, html=html, phone_screenshot=phone_shot,
                      phone_scroll_width=phone_width, timings=timings)


def load_page(url: str, *, screenshot: Path, wait_for_selector: str | None = None, timeout_s: float = 20,
              storage: dict[str, str] | None = None, dark: bool = False) -> PageResult:
    """Open ``url`` in a fresh headless Chromium and report what it showed and complained about.

    ``storage`` is put into the page's sessionStorage before any of its scripts run; ``dark`` emulates
    ``prefers-color-scheme: dark`` (light otherwise, whatever the machine says). Raises PageTimeout
    (with the page text and errors, after taking the screenshots) when ``wait_for_selector`` never matches.
    Call it from synchronous code: it runs its own event loop.
    """
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("no chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as tmp:
        profile = Path(tmp)
        proc, ws_url = _start(binary, profile, time.monotonic() + timeout_s)
        try:
            # An overall bound too, so a browser that stops answering fails the test instead of hanging it.
            drive = _drive(ws_url, url, screenshot, wait_for_selector, timeout_s, storage, dark)
            return asyncio.run(asyncio.wait_for(drive, 3 * timeout_s + 10))
        finally:
            _stop(proc)
