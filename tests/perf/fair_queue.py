"""A quiet key's latency while another key floods a backend at capacity: fair admission, measured.

Not a test (perf/ is not collected). One mock upstream (the shared bench's, with a per-request delay so a request
occupies the backend as a generation would), one appliance (2 workers, auth on) whose backend has
``max_concurrency`` places, two keys. Per round, key B sends one request at a time (closed loop) in three phases:

  alone    B only
  flood    key A keeps ``--flood`` requests in flight meanwhile: the backend is full, the excess queues
  fifo     the same flood, but B sends with A's key: what B would see in one first-come-first-served queue

Reports B's p50/p99 per phase, A's requests/s, and the 429s (none expected: the queue deadline is 60 s).

    .venv/bin/python tests/perf/fair_queue.py                             # ~1 min
    .venv/bin/python tests/perf/fair_queue.py --rounds 3 --flood 64 --capacity 4 --delay-ms 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from batch_latency import HARNESS, ROOT, free_port, percentile, save, wait_for

ADMIN_KEY = "sk-app-bench-fair-queue-0000000000000000"
MODEL = "mock/mock-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def config(port: int, mock_port: int, data_dir: Path, a: argparse.Namespace) -> str:
    return "\n".join([
        "[server]", f"port = {port}", f"workers = {a.workers}", f'data_dir = "{data_dir}"',
        "[discovery]", "enabled = false",
        "[log]", 'access = "off"',
        "[cache]", "enabled = false",
        "[admission]", "queue_timeout_ms = 60000",
        "[[backends]]", 'name = "mock"', f'url = "http://127.0.0.1:{mock_port}/v1"',
        f"max_concurrency = {a.capacity}", "",
    ])


class Flood:
    """``conc`` closed loops of key A until stopped."""

    def __init__(self, url: str, key: str, conc: int) -> None:
        self.url, self.key, self.conc = url, key, conc
        self.done = self.refused = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop) for _ in range(conc)]
        self._began = 0.0

    def _loop(self) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120) as client:
            while not self._stop.is_set():
                status = client.post("/v1/chat/completions", json=BODY).status_code
                with self._lock:
                    self.done += status == 200
                    self.refused += status == 429

    def __enter__(self) -> Flood:
        self._began = time.monotonic()
        for thread in self._threads:
            thread.start()
        time.sleep(1.0)  # the queue fills
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    @property
    def rps(self) -> float:
        return self.done / (time.monotonic() - self._began)


def quiet(url: str, key: str, seconds: float) -> dict[str, Any]:
    """One request at a time for ``seconds``: latencies in ms."""
    latencies: list[float] = []
    refused = 0
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        while time.monotonic() < stop:
            started = time.perf_counter()
            status = client.post("/v1/chat/completions", json=BODY).status_code
            if status == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                refused += 1
    latencies.sort()
    return {"n": len(latencies), "refused": refused, "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99)}


def new_key(url: str, name: str) -> str:
    answer = httpx.post(url + "/admin/keys", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    answer.raise_for_status()
    return answer.json()["key"]


def run(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fair-queue-"))
    mock_port, port = free_port(), free_port()
    mock = subprocess.Popen([a.client_python, str(HARNESS / "mock_upstream.py"), "--port", str(mock_port)],
                            env={**os.environ, "MOCK_DELAY_MS": str(a.delay_ms)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    (work / "appliance.toml").write_text(config(port, mock_port, work / "data", a))
    app = subprocess.Popen([a.python, "-m", "appliance", "serve", "--config", str(work / "appliance.toml")],
                           env={**os.environ, "APPLIANCE_ADMIN_KEY": ADMIN_KEY},
                           stdout=(work / "appliance.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"http://127.0.0.1:{mock_port}/health")
        wait_for(url + "/ready")
        flood_key, quiet_key = new_key(url, "flood"), new_key(url, "quiet")
        quiet(url, quiet_key, 1.0)  # warm-up
        rows = []
        for r in range(a.rounds):
            alone = quiet(url, quiet_key, a.duration)
            with Flood(url, flood_key, a.flood) as flood:
                fair = quiet(url, quiet_key, a.duration)
                fair["flood_rps"], fair["flood_refused"] = flood.rps, flood.refused
            with Flood(url, flood_key, a.flood) as flood:
                fifo = quiet(url, flood_key, a.duration)
                fifo["flood_rps"], fifo["flood_refused"] = flood.rps, flood.refused
            rows.append({"round": r, "alone": alone, "flood": fair, "fifo": fifo})
            log(f"r{r} B p99 alone {alone['p99']:.1f} flood {fair['p99']:.1f} fifo {fifo['p99']:.1f} ms")
        return {"params": vars(a), "rows": rows}
    finally:
        app.terminate()
        mock.terminate()
        app.wait(30)
        mock.wait(10)


def log(text: str) -> None:
    print(f"[fair-queue] {text}", file=sys.stderr, flush=True)


def render(result: dict[str, Any]) -> str:
    a = result["params"]
    when = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    lines = [f"# a quiet key beside a flooding one, fair admission ({when})", "",
             f"- mock delay {a['delay_ms']} ms per request; backend max_concurrency = {a['capacity']}; key A keeps "
             f"{a['flood']} requests in flight; key B sends one at a time; {a['workers']} workers; "
             f"{a['rounds']} round(s) x {a['duration']} s per phase; medians over rounds", "",
             "| phase | B requests | B p50 ms | B p99 ms | A req/s | 429s |", "|---|---|---|---|---|---|"]
    for phase in ("alone", "flood", "fifo"):
        rows = [row[phase] for row in result["rows"]]
        med = {field: statistics.median(row[field] for row in rows) for field in ("n", "p50", "p99")}
        rps = f"{statistics.median(row['flood_rps'] for row in rows):.1f}" if "flood_rps" in rows[0] else "-"
        refused = sum(row["refused"] + row.get("flood_refused", 0) for row in rows)
        lines.append(f"| {phase} | {med['n']:.0f} | {med['p50']:.1f} | {med['p99']:.1f} | {rps} | {refused} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=6.0, help="seconds measured per phase")
    p.add_argument("--delay-ms", type=int, default=50, help="the mock's time per request")
    p.add_argument("--capacity", type=int, default=4, help="the backend's max_concurrency")
    p.add_argument("--flood", type=int, default=32, help="key A's requests in flight")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--python", default=sys.executable, help="the Python that runs the appliance")
    p.add_argument("--client-python", default=sys.executable, help="the Python that runs the mock")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "perf" / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    result = run(a)
    save(a.out, "fair-queue", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
