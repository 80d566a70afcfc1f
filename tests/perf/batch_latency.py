"""Interactive latency with and without a running batch, on one appliance, measured side by side.

Not a test (perf/ is not collected). One mock upstream (the shared bench's, with a per-request delay so a
batch line occupies the backend as a real generation would), one appliance (2 workers, auth on), and per
round three phases of interactive non-streaming chat at each concurrency:

  idle     no batch
  batch    a large batch on the same backend and model, measured while its completed count rises
  after    the batch cancelled and finished, the baseline again

Reports p50/p99/RPS per phase, the batch's lines/s during the batch phase, and p50(batch)/p50(idle).

    .venv/bin/python tests/perf/batch_latency.py                      # ~2 min
    .venv/bin/python tests/perf/batch_latency.py --rounds 3 --conc 1,4,8 --delay-ms 50 --lines 5000
    .venv/bin/python tests/perf/batch_latency.py --batch-concurrency 4 --reserve 2   # the [batches] knobs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT.parent / "shared" / "bench"
ADMIN_KEY = "sk-app-bench-batch-latency-000000000000"
MODEL = "mock/mock-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def config(port: int, mock_port: int, data_dir: Path, a: argparse.Namespace) -> str:
    batches = [f"poll_interval_s = {a.poll_interval_s}", f"reserve = {a.reserve}"]
    if a.batch_concurrency:
        batches.append(f"max_concurrency = {a.batch_concurrency}")
    return "\n".join([
        "[server]", f"port = {port}", f"workers = {a.workers}", f'data_dir = "{data_dir}"',
        "[discovery]", "enabled = false",
        "[log]", 'access = "off"',
        "[cache]", "enabled = false",  # every interactive request must reach the backend
        "[[backends]]", 'name = "mock"', f'url = "http://127.0.0.1:{mock_port}/v1"',
        "[batches]", *batches, "",
    ])


def interactive(url: str, key: str, conc: int, seconds: float) -> dict[str, Any]:
    """Non-streaming chat at ``conc`` for ``seconds``: latencies in ms, and requests per second."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def loop() -> None:
        nonlocal errors
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            while time.monotonic() < stop:
                started = time.perf_counter()
                ok = client.post("/v1/chat/completions", json=body).status_code == 200
                took = (time.perf_counter() - started) * 1000
                with lock:
                    if ok:
                        latencies.append(took)
                    else:
                        errors += 1

    threads = [threading.Thread(target=loop) for _ in range(conc)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {"n": len(latencies), "errors": errors, "rps": len(latencies) / (time.monotonic() - began),
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)}


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_batch(client: openai.OpenAI, lines: int) -> str:
    raw = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": MODEL, "max_tokens": 16,
                                        "messages": [{"role": "user", "content": f"line {i}"}]}}).encode() + b"\n"
                   for i in range(lines))
    file_id = client.files.create(file=("in.jsonl", raw), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while (b := client.batches.retrieve(batch.id)).request_counts.completed == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the batch did not start: {b}")
        time.sleep(0.1)
    return batch.id


def finish_batch(client: openai.OpenAI, batch_id: str) -> None:
    if client.batches.retrieve(batch_id).status in ("validating", "in_progress"):
        client.batches.cancel(batch_id)
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch_id).status not in ("completed", "cancelled", "failed", "expired"):
        if time.monotonic() > deadline:
            raise TimeoutError("the batch did not end")
        time.sleep(0.2)


def run(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="batch-latency-"))
    mock_port, port = free_port(), free_port()
    env = {**os.environ, "MOCK_DELAY_MS": str(a.delay_ms)}
    mock = subprocess.Popen([a.client_python, str(HARNESS / "mock_upstream.py"), "--port", str(mock_port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    (work / "appliance.toml").write_text(config(port, mock_port, work / "data", a))
    app = subprocess.Popen([a.python, "-m", "appliance", "serve", "--config", str(work / "appliance.toml")],
                           env={**os.environ, "APPLIANCE_ADMIN_KEY": ADMIN_KEY},
                           stdout=(work / "appliance.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"http://127.0.0.1:{mock_port}/health")
        wait_for(url + "/ready")
        client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        interactive(url, ADMIN_KEY, 4, 1.0)  # warm-up: connections, discovery, caches
        rows = []
        for r in range(a.rounds):
            for conc in a.conc:
                idle = interactive(url, ADMIN_KEY, conc, a.duration)
                batch_id = start_batch(client, a.lines)
                before = client.batches.retrieve(batch_id).request_counts.completed
                began = time.monotonic()
                busy = interactive(url, ADMIN_KEY, conc, a.duration)
                done = client.batches.retrieve(batch_id).request_counts.completed - before
                busy["batch_lines_per_s"] = done / (time.monotonic() - began)
                finish_batch(client, batch_id)
                after = interactive(url, ADMIN_KEY, conc, a.duration)
                rows.append({"round": r, "conc": conc, "idle": idle, "batch": busy, "after": after})
                log(f"r{r} c={conc} p50 idle {idle['p50']:.2f} batch {busy['p50']:.2f} after {after['p50']:.2f} ms; "
                    f"batch {busy['batch_lines_per_s']:.1f} lines/s")
        return {"params": vars(a), "rows": rows}
    finally:
        app.terminate()
        mock.terminate()
        app.wait(30)
        mock.wait(10)


def log(text: str) -> None:
    print(f"[batch-latency] {text}", file=sys.stderr, flush=True)


def render(result: dict[str, Any]) -> str:
    a = result["params"]
    when = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    lines = [f"# interactive latency with and without a running batch ({when})", "",
             f"- mock delay {a['delay_ms']} ms per request; {a['workers']} workers; batch of {a['lines']} lines on "
             f"the same backend and model; [batches] reserve = {a['reserve']}, max_concurrency = "
             f"{a['batch_concurrency'] or 'by kind'}; {a['rounds']} round(s) x {a['duration']} s per phase; medians "
             "over rounds", "",
             "| c | phase | p50 ms | p99 ms | RPS | batch lines/s | p50 / p50 idle |", "|---|---|---|---|---|---|---|"]
    for conc in a["conc"]:
        rows = [row for row in result["rows"] if row["conc"] == conc]
        idle50 = statistics.median(row["idle"]["p50"] for row in rows)
        for phase in ("idle", "batch", "after"):
            med = {field: statistics.median(row[phase][field] for row in rows)
                   for field in ("p50", "p99", "rps", "batch_lines_per_s") if field in rows[0][phase]}
            lines_s = f"{med['batch_lines_per_s']:.1f}" if phase == "batch" else "-"
            lines.append(f"| {conc} | {phase} | {med['p50']:.2f} | {med['p99']:.2f} | {med['rps']:.0f} | {lines_s} | "
                         f"{med['p50'] / idle50:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--conc", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per phase")
    p.add_argument("--delay-ms", type=int, default=30, help="the mock's time per request")
    p.add_argument("--lines", type=int, default=2000, help="lines in each batch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reserve", type=int, default=1, help="[batches] reserve")
    p.add_argument("--batch-concurrency", type=int, default=None, help="[batches] max_concurrency")
    p.add_argument("--poll-interval-s", type=float, default=0.5, help="[batches] poll_interval_s")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the appliance")
    p.add_argument("--client-python", default=sys.executable, help="the Python that runs the mock")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "perf" / "results")
    return p.parse_args(argv)


def save(out: Path, tag: str, result: dict[str, Any], report: str) -> None:
    """``<UTC time>-<tag>.json`` (the figures) and ``.md`` (``report``) in ``out``; the report is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(report)
    print(report)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    result = run(a)
    save(a.out, "batch-latency", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
