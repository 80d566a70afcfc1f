#!/usr/bin/env python3
"""Where the appliance's own CPU per request goes, function by function (issue 14, point 12).

    /tmp/bench-venv/bin/python tests/perf/breakdown.py [--seconds 6] [--conc 16]

py-spy samples by stopping the process, which lands disproportionately on system calls; this instead
wraps the request path's own functions with a thread-CPU clock (time.thread_time_ns, ~0.4 us a reading)
inside a real single-process `appliance serve` (accounting on, as bench.py's `appliance` target: a priced
model and a user key with every limit set) and holds wrk load on it. It prints, per function, the median
CPU of one call and its calls per request, beside the process's CPU per request from /proc. Nested
functions are inside their callers' figures (record holds observe, which holds the metrics and the
access log). Each reading adds ~1 us, so small functions read high.

The wrapped server runs this checkout's code with --python (default: the test venv) and PYTHONPATH.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# module, function: replaced wherever an appliance module holds it (call sites import names directly).
FUNCTIONS = [
    ("appliance.server.access", "authenticate"), ("appliance.server.responses", "exchange"),
    ("appliance.server.routes.observability", "note_arrival"), ("appliance.core.pipeline", "parse_body"),
    ("appliance.core.pipeline", "validate"), ("appliance.core.pipeline", "plan_for"),
    ("appliance.core.pipeline", "upstream_body"), ("appliance.core.cache", "decide"),
    ("appliance.core.exchange", "allowed_routes"), ("appliance.core.exchange", "begin"),
    ("appliance.core.exchange", "admit"), ("appliance.core.exchange", "price_of"),
    ("appliance.core.exchange", "record"), ("appliance.core.exchange", "observe"),
    ("appliance.core.relay", "_openai_body"), ("appliance.providers.base", "answer_headers"),
    # issues 16 and 17: what a request that uses none of them still passes through
    ("appliance.core.guarding", "begin"), ("appliance.core.vision", "has_images"),
    ("appliance.core.pipeline", "_for_target"), ("appliance.core.exchange", "charge_from"),
    ("appliance.core.exchange", "compute_cost"),
]
# module, class, method.
METHODS = [
    ("appliance.accounts.auth", "Authenticator", "authenticate"), ("appliance.accounts.limits", "Limiter", "admit"),
    ("appliance.accounts.limits", "Limiter", "settle"), ("appliance.core.routing", "Selector", "order"),
    ("appliance.core.routing", "Selector", "observe"), ("appliance.core.resilience", "Breakers", "allow"),
    ("appliance.core.resilience", "Breakers", "begin"), ("appliance.core.resilience", "Breakers", "end"),
    ("appliance.core.resilience", "Breakers", "record"), ("appliance.core.exchange", "Exchange", "response_headers"),
    ("appliance.providers.openai_compat", "OpenAICompatProvider", "_headers"),
    ("appliance.server.responses", "SanicResponder", "complete"),
    ("appliance.storage.writer", "BufferedWriter", "add_entry"),
    ("appliance.observe.metrics", "Recorder", "request_finished"),
    ("appliance.observe.accesslog", "AccessLog", "write"),
    ("appliance.core.admission", "FairQueue", "enter"), ("appliance.core.admission", "FairQueue", "released"),
    ("appliance.core.admission", "FairQueue", "has_room"),
]


# ------------------------------------------------------------------------------------------ in the server


def _timed(fn: Any, samples: list[int]) -> Any:
    clock = time.thread_time_ns
    if inspect.iscoroutinefunction(fn):  # only those that do not wait in steady state (else others' CPU counts)
        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            result = await fn(*args, **kwargs)
            samples.append(clock() - started)
            return result
        return timed_async

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        result = fn(*args, **kwargs)
        samples.append(clock() - started)
        return result
    return timed


def serve_instrumented(argv: list[str], out: Path) -> int:
    """`appliance` with the request path wrapped; SIGUSR1 writes the readings to ``out`` and starts anew."""
    from appliance.cli import main as cli
    from appliance.server import app as _app  # noqa: F401 - loads every module holding a wrapped name

    samples: dict[str, list[int]] = {}
    for module_name, name in FUNCTIONS:
        original = getattr(importlib.import_module(module_name), name)
        wrapped = _timed(original, samples.setdefault(f"{module_name.rsplit('.', 1)[1]}.{name}", []))
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("appliance") and getattr(module, name, None) is original:
                setattr(module, name, wrapped)
    for module_name, cls_name, name in METHODS:
        cls = getattr(importlib.import_module(module_name), cls_name)
        setattr(cls, name, _timed(getattr(cls, name), samples.setdefault(f"{cls_name}.{name}", [])))

    def dump(*_: Any) -> None:
        out.write_text(json.dumps({name: [len(v), statistics.median(v) / 1000] for name, v in samples.items() if v}))
        for values in samples.values():
            values.clear()

    signal.signal(signal.SIGUSR1, dump)
    return cli.main(argv)


# ------------------------------------------------------------------------------------------ the driver


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, key: str, body: Path, conc: int, seconds: float, harness: Path) -> int:
    env = {**os.environ, "BENCH_BODY_FILE": str(body), "BENCH_AUTH": key}
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{seconds:g}s", "-s", str(harness / "wrk" / "post_json.lua"),
                          url + "/v1/chat/completions"], env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "requests in" in line)
    return int(line.split()[0])


def drive(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    import bench  # the harness helpers: processes, configs, the bench key

    work = Path(tempfile.mkdtemp(prefix="appliance-breakdown-"))
    procs: list[Any] = []
    try:
        mport, port = bench.free_port(), bench.free_port()
        mock = bench.Proc("mock", [a.client_python, str(a.harness / "mock_upstream.py"), "--port", str(mport)],
                          dict(os.environ), work / "mock.log")
        procs.append(mock)
        mock_url = f"http://127.0.0.1:{mport}"
        bench.wait_until(lambda: bench.http(mock_url + "/health")[0] == 200, 20, "mock", mock)
        config = work / "appliance.toml"
        bench.appliance_config(config, port=port, workers=1, data_dir=work / "data", mock_url=mock_url,
                               accounting=True)
        readings = work / "readings.json"
        # Set before the wrapper imports prometheus_client (it picks the multiprocess value class at import,
        # as in a real start, where the CLI sets it first; the CLI then moves it to this run's own folder).
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
        metrics_dir = Path(tempfile.mkdtemp(prefix="appliance-breakdown-", dir=shm))
        env = {**os.environ, "APPLIANCE_ADMIN_KEY": bench.ADMIN_KEY, "PYTHONPATH": str(REPO),
               "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        cmd = [a.python, __file__, "--serve", str(readings), "serve", "--config", str(config), "--single-process"]
        server = bench.Proc("appliance", cmd, env, work / "appliance.log", cwd=work)
        procs.append(server)
        url = f"http://127.0.0.1:{port}"
        bench.wait_until(lambda: bench.http(url + "/ready")[0] == 200, 60, "appliance", server)
        key = bench.create_bench_key(url)
        body = bench.write_bodies(work)["chat"]
        wrk(url, key, body, a.conc, 2, a.harness)  # warm-up
        server.p.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        cpu = process_cpu_s(server.pid)
        requests = wrk(url, key, body, a.conc, a.seconds, a.harness)
        cpu = process_cpu_s(server.pid) - cpu
        server.p.send_signal(signal.SIGUSR1)
        bench.wait_until(lambda: readings.stat().st_mtime > time.time() - 5, 10, "readings")
        time.sleep(0.2)
        report(json.loads(readings.read_text()), requests, cpu, a)
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(readings: dict[str, list[float]], requests: int, cpu_s: float, a: argparse.Namespace) -> None:
    per_request_us = cpu_s / requests * 1e6
    print(f"# CPU per request, function by function: chat, c={a.conc}, {a.seconds:g} s, single process\n")
    print(f"{requests} requests; the process's CPU: **{per_request_us:.0f} us per request** (/proc, all threads)\n")
    print("| function | median us per call | calls per request | share of the CPU per request |")
    print("|---|---|---|---|")
    for name, (calls, median_us) in sorted(readings.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        per_request = calls / requests
        print(f"| `{name}` | {median_us:.1f} | {per_request:.2f} | {median_us * per_request / per_request_us:.1%} |")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        sys.exit(serve_instrumented(sys.argv[3:], Path(sys.argv[2])))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--conc", type=int, default=16)
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--client-python", default="/tmp/bench-venv/bin/python")
    parser.add_argument("--harness", type=Path, default=REPO.parent / "shared" / "bench")
    drive(parser.parse_args())


if __name__ == "__main__":
    main()
