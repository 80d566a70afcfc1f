#!/usr/bin/env python3
"""Direct-to-mock vs through the appliance, on this machine: RPS, added latency, CPU per request, TTFT.

One run:
  1. starts the shared mock upstream (../shared/bench/mock_upstream.py) on a free port,
  2. starts `appliance serve` (2 workers by default) from a generated TOML config whose only backend is
     the mock, once per --accounting configuration (default both, two appliances on their own ports and
     data dirs):
       "appliance"      accounting on: API keys on, `mock-model` priced (input 1, output 2 USD per Mtok),
                        every request carries a user key created at start through POST /admin/keys with
                        huge rpm/tpm/max_concurrent/budgets, so auth, the limits, budget reservation and
                        settlement, cost and the usage ledger all run, and nothing is refused;
       "appliance-off"  accounting off: `[auth] mode = "none"`, no prices, requests carry no key,
  3. for each round and scenario runs the same load straight at the mock ("direct") and through each
     appliance, back to back, the order rotated every time (direct/appliance/appliance-off,
     appliance/appliance-off/direct, ...),
  4. per segment records the client's RPS and latency percentiles (TTFT for streams), the CPU seconds
     of each appliance's whole process tree (master + workers), of the mock and of the load generator,
     and the CPU used by everything else on the machine ("foreign" CPU: a noisy machine shows),
  5. reports medians over rounds; added latency is appliance - direct paired within the same round, the
     accounting overhead is CPU ms/request on - off paired within the same round, and prints PASS/MISS
     against the targets. Results go to tests/perf/results/ as JSON + Markdown.

Scenarios: non-streaming chat at --conc (default 1,16,64) driven by wrk (C, one thread) with the shared
wrk/post_json.lua; streaming chat at --stream-conc (default 1,16) driven by the shared loadgen.py, which
records the time to the first SSE `data:` bytes (TTFT).

--profile SECONDS additionally holds non-streaming load at --profile-conc (default 16) for that long while
py-spy samples the appliance tree ("appliance", accounting on, when it runs), and prints where the
workers' CPU goes (by function and by package).

The bench exits 0 whatever the figures are; only a crash (nothing to measure) exits non-zero.
See tests/perf/README.md for the commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_HARNESS = Path(os.environ.get("BENCH_HARNESS", REPO.parent / "shared" / "bench"))
ADMIN_KEY = "sk-app-bench-0000000000000000"  # APPLIANCE_ADMIN_KEY: sk-app- and at least 16 characters
MODEL = "mock-model"  # listed by the mock's /v1/models, so the appliance discovers it

# Accounting configurations (--accounting) and the target name each appliance is measured under.
APPLIANCE_TARGETS = {"on": "appliance", "off": "appliance-off"}
ON, OFF = APPLIANCE_TARGETS["on"], APPLIANCE_TARGETS["off"]
FLOOR = "floor"  # --floor: Sanic + aiohttp alone (floor_proxy.py), what the appliance's own code adds is above it
PRICE_INPUT_PER_MTOK = 1  # USD, the accounting-on appliance's price of MODEL
PRICE_OUTPUT_PER_MTOK = 2
# The user key of the accounting-on appliance: every limit and budget set, none of them reachable.
BENCH_KEY_FIELDS = {"name": "bench", "role": "user", "rpm": 100_000_000, "tpm": 10_000_000_000,
                    "max_concurrent": 100_000, "budget_usd": 1_000_000_000, "budget_tokens": 10**15,
                    "budget_period": "month"}
# Headers that show limits and cost ran on a non-streaming answer of the accounting-on appliance.
ACCOUNTING_HEADERS = ("x-ratelimit-limit-requests", "x-appliance-cost-usd")

# The targets this bench is held to (printed as PASS/MISS; never turned into an exit code).
TARGET_CPU_MS = 0.5  # appliance CPU per non-streaming request, every concurrency
TARGET_ADDED_P50_MS = 1.0  # added p50 latency, non-streaming, c=1
TARGET_ADDED_TTFT_MS = 1.0  # first streamed byte, appliance - direct (p50)
TARGET_ACCOUNTING_CPU_MS = 0.15  # CPU per request, accounting on - off, every scenario

# py-spy leaf frames that are a thread waiting, not working (native mode cannot tell them apart).
_IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "PyThread_acquire_lock_timed", "pthread_cond_wait",
                "pthread_cond_timedwait", "select (", "poll (", "sem_wait", "sem_timedwait")


def log(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def wait_until(check: Any, timeout: float, what: str, proc: Proc | None = None) -> float:
    t0 = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - t0 < timeout:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.p.returncode}; see {proc.log_path}")
        try:
            if check():
                return time.monotonic() - t0
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout}s (last error: {last!r}); see logs")


class Proc:
    """A server we start in its own session (process group), stopped by its pid and that group only."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout}s; killing its process group")
        try:  # whatever is left in the group we created (workers of a main that died first)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.alive():
            self.p.wait(5)
        self._log.close()


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, str, float, int]:
    """Run a load generator; (stdout, stderr, its CPU seconds incl. threads, exit code)."""
    with tempfile.TemporaryFile() as ef:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=ef)
        assert p.stdout is not None
        out = p.stdout.read()
        p.stdout.close()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        ef.seek(0)
        err = ef.read()
    return out.decode(errors="replace"), err.decode(errors="replace"), ru.ru_utime + ru.ru_stime, p.returncode


def json_line(text: str, prefix: str) -> dict[str, Any] | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):].strip())
    return None


def median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def rnd(x: float | None, n: int = 3) -> float | None:
    return None if x is None else round(x, n)


def dig(d: Any, *path: str) -> Any:
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d


# ------------------------------------------------------------------------------------------ set-up


def appliance_config(path: Path, *, port: int, workers: int, data_dir: Path, mock_url: str,
                     accounting: bool) -> None:
    path.write_text(
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f"workers = {workers}\n"
        f"data_dir = {json.dumps(str(data_dir))}\n"
        "\n[discovery]\nenabled = false\n"
        f'\n[[backends]]\nname = "mock"\nurl = {json.dumps(mock_url + "/v1")}\n'
        + accounting_config(accounting)
    )


def accounting_config(on: bool) -> str:
    """On: keys (the default) and a price for MODEL. Off: no keys (loopback only), no prices."""
    if not on:
        return '\n[auth]\nmode = "none"\n'
    return (f"\n[[models]]\nname = {json.dumps(MODEL)}\ninput_per_mtok = {PRICE_INPUT_PER_MTOK}\n"
            f"output_per_mtok = {PRICE_OUTPUT_PER_MTOK}\n")


def appliance_cmd(a: argparse.Namespace, config: Path) -> list[str]:
    base = [a.appliance_bin] if a.appliance_bin else [a.python, "-m", "appliance"]
    cmd = [*base, "serve", "--config", str(config)]
    if a.single_process:
        cmd.append("--single-process")
    return cmd + list(a.appliance_arg)


def write_bodies(d: Path) -> dict[str, Path]:
    common = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in one short sentence, please."}],
              "max_tokens": 16}
    bodies = {"chat": common, "stream": {**common, "stream": True, "stream_options": {"include_usage": True}}}
    out = {}
    for kind, body in bodies.items():
        out[kind] = d / f"body_{kind}.json"
        out[kind].write_text(json.dumps(body, separators=(",", ":")))
    return out


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def create_bench_key(url: str) -> str:
    """A user key with every limit and budget set far above what the bench spends; returns its secret."""
    h = {"Content-Type": "application/json", **auth_headers(ADMIN_KEY)}
    st, body, _ = http(url + "/admin/keys", json.dumps(BENCH_KEY_FIELDS).encode(), h, timeout=30)
    if st != 201:
        raise RuntimeError(f"POST {url}/admin/keys: {st} {body[:300]!r}")
    return str(json.loads(body)["key"])


def check_target(url: str, bodies: dict[str, Path], chunks: int, key: str | None,
                 expect_headers: tuple[str, ...] = ()) -> dict[str, str]:
    """One non-streaming and one streaming request must come back whole (the bench measures nothing else),
    the non-streaming one with `expect_headers`; returns its headers (names lower-cased)."""
    h = {"Content-Type": "application/json", **auth_headers(key)}
    st, body, headers = http(url + "/v1/chat/completions", bodies["chat"].read_bytes(), h, timeout=30)
    headers = {k.lower(): v for k, v in headers.items()}
    if st != 200 or b"tok15" not in body or b'"usage"' not in body:
        raise RuntimeError(f"bad non-streaming answer from {url}: {st} {body[:300]!r}")
    missing = [name for name in expect_headers if name not in headers]
    if missing:
        raise RuntimeError(f"non-streaming answer from {url} lacks {missing}; headers {headers}")
    st, body, _ = http(url + "/v1/chat/completions", bodies["stream"].read_bytes(), h, timeout=30)
    if st != 200 or body.count(b"data:") < chunks or b"[DONE]" not in body or b'"usage"' not in body:
        raise RuntimeError(f"bad streaming answer from {url}: {st} {body[-300:]!r}")
    return headers


def versions(a: argparse.Namespace) -> dict[str, Any]:
    v: dict[str, Any] = {"bench_python": platform.python_version(), "kernel": platform.release()}
    probe = ("import sys, appliance, sanic, aiohttp, orjson; print(sys.version.split()[0], appliance.__version__, "
             "sanic.__version__, aiohttp.__version__, orjson.__version__)")
    if a.appliance_bin:
        r = subprocess.run([a.appliance_bin, "version"], capture_output=True, text=True, timeout=60)
        v["appliance"] = r.stdout.strip() + " (binary)"
    else:
        r = subprocess.run([a.python, "-c", probe], capture_output=True, text=True, timeout=60)
        parts = r.stdout.split()
        if len(parts) == 5:
            v.update(zip(("python", "appliance", "sanic", "aiohttp", "orjson"), parts, strict=True))
    r = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    v["wrk"] = " ".join((r.stdout or r.stderr).split()[:2])
    return v


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ------------------------------------------------------------------------------------------ the run


@dataclass
class Appliance:
    """One appliance under test: its accounting configuration, its process, and the key its requests carry."""

    target: str
    accounting: bool
    proc: Proc
    url: str
    config: Path | None  # None for the floor proxy
    ready_s: float
    key: str | None = None


class Bench:
    def __init__(self, a: argparse.Namespace, procstat: Any, work: Path) -> None:
        self.a = a
        self.ps = procstat
        self.work = work
        self.bodies = write_bodies(work)
        self.mock: Proc | None = None
        self.procs: list[Proc] = []  # everything started, stopped in reverse order
        self.apps: dict[str, Appliance] = {}  # target name -> appliance, in --accounting order
        self.urls: dict[str, str] = {}
        self.keys: dict[str, str | None] = {}  # target name -> the key its requests carry

    @property
    def primary(self) -> Appliance:
        """The appliance the absolute targets and --profile apply to: accounting on when it runs."""
        return self.apps.get(ON) or next(iter(self.apps.values()))

    # -------------------------------------------------------------- servers

    def start(self, modes: list[str]) -> None:
        mock_url = self.start_mock()
        for mode in modes:
            app = self.start_appliance(APPLIANCE_TARGETS[mode], mode == "on", mock_url)
            self.apps[app.target] = app
        if self.a.floor:
            self.apps[FLOOR] = self.start_floor(mock_url)
        self.urls = {"direct": mock_url, **{t: app.url for t, app in self.apps.items()}}
        # Direct requests carry the same Authorization header as the accounting-on appliance's (the mock ignores it).
        self.keys = {"direct": self.primary.key, **{t: app.key for t, app in self.apps.items()}}
        check_target(mock_url, self.bodies, self.a.mock_chunks, None)
        for app in self.apps.values():
            self.check_appliance(app)

    def start_mock(self) -> str:
        a = self.a
        mport = free_port()
        menv = {**os.environ, "MOCK_DELAY_MS": str(a.mock_delay_ms), "MOCK_STREAM_CHUNKS": str(a.mock_chunks),
                "MOCK_CHUNK_DELAY_MS": str(a.mock_chunk_delay_ms)}
        self.mock = Proc("mock", [a.client_python, str(a.harness / "mock_upstream.py"), "--port", str(mport)],
                         menv, a.logdir / "mock.log")
        self.procs.append(self.mock)
        mock_url = f"http://127.0.0.1:{mport}"
        wait_until(lambda: http(mock_url + "/health")[0] == 200, 20, "mock", self.mock)
        return mock_url

    def start_appliance(self, target: str, accounting: bool, mock_url: str) -> Appliance:
        """Its own port, config and data dir; with accounting on, also the bench's user key."""
        a = self.a
        port = free_port()
        config = self.work / f"{target}.toml"
        appliance_config(config, port=port, workers=a.workers, data_dir=self.work / f"data-{target}",
                         mock_url=mock_url, accounting=accounting)
        env = {**os.environ, "APPLIANCE_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1"}
        for k in ("APPLIANCE_CONFIG", "APPLIANCE_DATA_DIR"):
            env.pop(k, None)
        cmd = appliance_cmd(a, config)
        t0 = time.monotonic()
        proc = Proc(target, cmd, env, a.logdir / f"{target}.log", cwd=self.work)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http(url + "/ready")[0] == 200, 120, target, proc)
        app = Appliance(target, accounting, proc, url, config, round(time.monotonic() - t0, 2))
        log(f"{target} (accounting {'on' if accounting else 'off'}) ready after {app.ready_s}s: {' '.join(cmd)}")
        if accounting:
            app.key = create_bench_key(url)
        return app

    def start_floor(self, mock_url: str) -> Appliance:
        a = self.a
        port = free_port()
        cmd = [a.python, str(Path(__file__).with_name("floor_proxy.py")), "--port", str(port), "--upstream",
               mock_url, "--workers", "1" if a.single_process else str(a.workers)]
        t0 = time.monotonic()
        proc = Proc(FLOOR, cmd, dict(os.environ), a.logdir / f"{FLOOR}.log", cwd=self.work)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http(url + "/ready")[0] == 200, 60, FLOOR, proc)
        log(f"{FLOOR} (Sanic + aiohttp alone) ready: {' '.join(cmd)}")
        return Appliance(FLOOR, False, proc, url, None, round(time.monotonic() - t0, 2))

    def check_appliance(self, app: Appliance) -> None:
        """Whole answers; with accounting on, rate-limit headers and a non-zero cost on them too."""
        expect = ACCOUNTING_HEADERS if app.accounting else ()
        headers = check_target(app.url, self.bodies, self.a.mock_chunks, app.key, expect)
        if app.accounting and not float(headers["x-appliance-cost-usd"]) > 0:
            raise RuntimeError(f"{app.target}: cost {headers['x-appliance-cost-usd']} USD; is {MODEL} priced?")
        log(f"{app.target}: " + ", ".join(f"{h}={headers.get(h, '-')}" for h in ACCOUNTING_HEADERS))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    # -------------------------------------------------------------- load

    def load_cmd(self, target: str, kind: str, conc: int, seconds: float) -> tuple[list[str], dict[str, str], str]:
        url = self.urls[target] + "/v1/chat/completions"
        key = self.keys[target]
        env = dict(os.environ)
        if kind == "chat":
            env["BENCH_BODY_FILE"] = str(self.bodies["chat"])
            env["BENCH_AUTH"] = key or ""  # post_json.lua sends no Authorization for an empty value
            cmd = ["wrk", "-t", "1", "-c", str(conc), "-d", f"{max(1, round(seconds))}s", "--timeout", "30s",
                   "-s", str(self.a.harness / "wrk" / "post_json.lua"), url]
            return cmd, env, "WRKJSON"
        cmd = [self.a.client_python, str(self.a.harness / "loadgen.py"), "--url", url,
               "--body-file", str(self.bodies["stream"]), "--stream", "-c", str(conc), "--timeout", "30",
               "--duration", str(seconds), "--warmup", "0"]
        if key:
            cmd += ["-H", f"Authorization: Bearer {key}"]
        return cmd, env, "LOADGENJSON"

    def warm(self) -> None:
        """Every worker, both code paths, every target, before the first measured segment."""
        if self.a.initial_warmup <= 0:
            return
        for target in self.urls:
            for kind in ("chat", "stream"):
                cmd, env, _ = self.load_cmd(target, kind, 8, self.a.initial_warmup)
                run_child(cmd, env)

    def tree_cpu(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far of every process of every appliance tree, by target."""
        return {t: {pid: self.ps.cpu_seconds([pid]) for pid in self.ps.tree(app.proc.pid)}
                for t, app in self.apps.items()}

    def segment(self, target: str, kind: str, conc: int, rnd_i: int) -> dict[str, Any]:
        a = self.a
        assert self.mock is not None
        if a.warmup > 0:
            cmd, env, _ = self.load_cmd(target, kind, conc, a.warmup)
            run_child(cmd, env)
        cmd, env, prefix = self.load_cmd(target, kind, conc, a.duration)
        app = self.apps.get(target)
        mock_tree = self.ps.tree(self.mock.pid)
        cpu0 = self.tree_cpu()
        mock0 = self.ps.cpu_seconds(mock_tree)
        busy0 = self.ps.machine_busy_seconds()
        w0 = time.monotonic()
        with self.ps.PeakRss([app.proc.pid] if app else []) as peak:
            out, err, lg_cpu, rc = run_child(cmd, env)
        wall = time.monotonic() - w0
        busy1 = self.ps.machine_busy_seconds()
        per = {t: sorted((self.ps.cpu_seconds([pid]) - c0 for pid, c0 in pids.items()), reverse=True)
               for t, pids in cpu0.items()}
        apps_cpu = {t: sum(v) for t, v in per.items()}
        app_cpu = apps_cpu.get(target)
        mock_cpu = self.ps.cpu_seconds(mock_tree) - mock0
        res = json_line(out, prefix)
        if res is None:
            log(f"segment failed: {target} {kind} c={conc} rc={rc}: {err[-500:]}")
            res = {}
        reqs = res.get("requests") or 0
        errors = {k: v for k, v in (res.get("errors") or {}).items() if v}
        seg = {
            "round": rnd_i, "target": target, "scenario": kind, "concurrency": conc,
            "requests": reqs, "rps": res.get("rps"), "errors": errors,
            "lat_ms": res.get("lat_ms"), "ttft_ms": res.get("ttft_ms"), "wall_s": round(wall, 3),
            "appliance_cpu_s": rnd(app_cpu),  # the target's tree; None for direct
            "appliances_cpu_s": {t: rnd(v) for t, v in apps_cpu.items()},  # every tree, idle ones included
            "appliance_cpu_ms_per_req": rnd(1000 * app_cpu / reqs) if app_cpu is not None and reqs else None,
            # Share of the tree's CPU burnt by its busiest process: ~1/workers when the kernel spread the
            # client's connections evenly, ~1.0 when one worker got them all.
            "appliance_busiest_process_share": rnd(per[target][0] / app_cpu, 2) if app_cpu else None,
            "appliance_peak_rss_mb": rnd(peak.peak / 2**20, 1) if app else None,
            "mock_cpu_s": rnd(mock_cpu), "mock_cpu_ms_per_req": rnd(1000 * mock_cpu / reqs) if reqs else None,
            "loadgen_cpu_s": rnd(lg_cpu),
            "foreign_cpu_s": rnd(max(0.0, (busy1 - busy0) - sum(apps_cpu.values()) - mock_cpu - lg_cpu)),
            "machine_busy_frac": rnd((busy1 - busy0) / (wall * (os.cpu_count() or 1))),
        }
        log(f"r{rnd_i} {target:<13} {kind:<6} c={conc:<3} rps={seg['rps']!s:<9} "
            f"p50={dig(seg, 'lat_ms', 'p50')!s:<7} p99={dig(seg, 'lat_ms', 'p99')!s:<7} "
            f"ttft50={dig(seg, 'ttft_ms', 'p50')!s:<7} cpu/req={seg['appliance_cpu_ms_per_req']} ms "
            f"foreign={seg['foreign_cpu_s']}s")
        return seg


Segment = dict[str, Any]


def aggregate(segments: list[Segment], scenarios: list[tuple[str, int]], apps: list[str]) -> list[dict[str, Any]]:
    """Per scenario: every target's medians over rounds, each appliance against direct and, when both
    appliances ran, the accounting overhead (on - off). Pairs are taken within a round."""
    rows = []
    for kind, conc in scenarios:
        segs = [s for s in segments if s["scenario"] == kind and s["concurrency"] == conc]
        by = {t: {s["round"]: s for s in segs if s["target"] == t} for t in ("direct", *apps)}
        row: dict[str, Any] = {"scenario": kind, "concurrency": conc, "rounds": len(by["direct"]),
                               "direct": target_summary(list(by["direct"].values()))}
        for t in apps:
            ss = list(by[t].values())
            row[t] = {**target_summary(ss), **appliance_summary(ss), **against_direct(by[t], by["direct"])}
        if ON in apps and OFF in apps:
            row["accounting_overhead"] = accounting_overhead(by[ON], by[OFF])
        if FLOOR in apps:
            row["above_floor"] = {t: above_floor(by[t], by[FLOOR]) for t in apps if t != FLOOR}
        foreign = [s["foreign_cpu_s"] for s in segs if s["foreign_cpu_s"] is not None]
        row["foreign_cpu_s"] = {"median": rnd(median(foreign), 2), "max": max(foreign, default=None)}
        rows.append(row)
    return rows


def target_summary(ss: list[Segment]) -> dict[str, Any]:
    """What the client saw of one target in one scenario, medians over rounds."""
    rps = [s["rps"] for s in ss if s["rps"] is not None]
    foreign = [s["foreign_cpu_s"] for s in ss if s["foreign_cpu_s"] is not None]
    return {
        "rps": rnd(median(rps), 1), "rps_range": [min(rps), max(rps)] if rps else None,
        "p50_ms": rnd(median([dig(s, "lat_ms", "p50") for s in ss])),
        "p99_ms": rnd(median([dig(s, "lat_ms", "p99") for s in ss])),
        "ttft_p50_ms": rnd(median([dig(s, "ttft_ms", "p50") for s in ss])),
        "mock_cpu_ms_per_req": rnd(median([s["mock_cpu_ms_per_req"] for s in ss]), 4),
        "errors": sum(sum(s["errors"].values()) for s in ss),
        "foreign_cpu_s": {"median": rnd(median(foreign), 2), "max": max(foreign, default=None)},
    }


def appliance_summary(ss: list[Segment]) -> dict[str, Any]:
    """What one appliance's process tree spent in one scenario."""
    shares = [s["appliance_busiest_process_share"] for s in ss]
    return {
        "cpu_ms_per_req": rnd(median([s["appliance_cpu_ms_per_req"] for s in ss])),
        "busiest_process_share": rnd(median(shares), 2),
        "busiest_process_share_max": max((x or 0 for x in shares), default=None),
        "peak_rss_mb": max((s["appliance_peak_rss_mb"] or 0 for s in ss), default=None),
    }


def paired(a: dict[int, Segment], b: dict[int, Segment], value: Any) -> list[float]:
    """value(a) - value(b) for every round where both have one, in round order."""
    out = []
    for r in sorted(a):
        if r not in b:
            continue
        va, vb = value(a[r]), value(b[r])
        if va is not None and vb is not None:
            out.append(va - vb)
    return out


def p50(s: Segment) -> float | None:
    return dig(s, "lat_ms", "p50")


def p99(s: Segment) -> float | None:
    return dig(s, "lat_ms", "p99")


def ttft50(s: Segment) -> float | None:
    return dig(s, "ttft_ms", "p50")


def against_direct(app: dict[int, Segment], direct: dict[int, Segment]) -> dict[str, Any]:
    """Added latency (appliance - direct) and RPS ratio, paired within each round, medians."""
    ratio = [s["rps"] / direct[r]["rps"] for r, s in app.items() if r in direct and s["rps"] and direct[r]["rps"]]
    return {"added_p50_ms": rnd(median(paired(app, direct, p50))),
            "added_p99_ms": rnd(median(paired(app, direct, p99))),
            "added_ttft_p50_ms": rnd(median(paired(app, direct, ttft50))),
            "rps_ratio": rnd(median(ratio), 4)}


def above_floor(app: dict[int, Segment], floor: dict[int, Segment]) -> dict[str, Any]:
    """The CPU the appliance's own code adds per request: appliance - floor within each round, medians."""
    cpu = paired(app, floor, lambda s: s["appliance_cpu_ms_per_req"])
    return {"cpu_ms_per_req": rnd(median(cpu)), "cpu_ms_per_req_by_round": [rnd(x) for x in cpu]}


def accounting_overhead(on: dict[int, Segment], off: dict[int, Segment]) -> dict[str, Any]:
    """What auth + limits + budgets + cost + ledger cost: on - off within each round, medians."""
    cpu = paired(on, off, lambda s: s["appliance_cpu_ms_per_req"])
    return {"cpu_ms_per_req": rnd(median(cpu)), "cpu_ms_per_req_by_round": [rnd(x) for x in cpu],
            "p50_ms": rnd(median(paired(on, off, p50))), "p99_ms": rnd(median(paired(on, off, p99))),
            "ttft_p50_ms": rnd(median(paired(on, off, ttft50)))}


def target_checks(rows: list[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    """The absolute targets hold `primary` (accounting on, when it ran); the overhead target on - off."""
    checks = []

    def add(what: str, value: float | None, limit: float, note: str = "") -> None:
        verdict = "n/a" if value is None else ("PASS" if value <= limit else "MISS")
        checks.append({"target": what, "limit": limit, "value": value, "result": verdict, "note": note})

    chat = [row for row in rows if row["scenario"] == "chat"]
    stream = [row for row in rows if row["scenario"] == "stream"]
    for row in chat:
        add(f"{primary} CPU per non-streaming request, c={row['concurrency']} (ms)", row[primary]["cpu_ms_per_req"],
            TARGET_CPU_MS)
    for row in chat:
        if row["concurrency"] == 1:
            add(f"{primary} added p50 latency, non-streaming c=1 (ms)", row[primary]["added_p50_ms"],
                TARGET_ADDED_P50_MS)
    for row in stream:
        c = row["concurrency"]
        add(f"{primary} first streamed byte later than direct, p50, c={c} (ms)", row[primary]["added_ttft_p50_ms"],
            TARGET_ADDED_TTFT_MS, "" if c == 1 else "includes queueing once the workers saturate")
    for row in rows:
        if "accounting_overhead" in row:
            add(f"accounting overhead CPU per request (on - off), {row['scenario']} c={row['concurrency']} (ms)",
                row["accounting_overhead"]["cpu_ms_per_req"], TARGET_ACCOUNTING_CPU_MS, "paired per round, median")
    return checks


# ------------------------------------------------------------------------------------------ profile


def thread_cpu(pids: list[int], clk: int) -> dict[tuple[int, int], dict[str, Any]]:
    """utime/stime seconds of every thread of the given processes."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    s = f.read()
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            rest = s[s.rindex(b")") + 2:].split()
            out[(pid, int(tid))] = {"comm": comm, "utime": int(rest[11]) / clk, "stime": int(rest[12]) / clk}
    return out


def _frame_key(frame: str) -> tuple[str, str]:
    """'func (path/file.py:123)' -> ('func (path/file.py)', 'path/file.py:123'); package from the path."""
    name, _, loc = frame.rpartition(" (")
    loc = loc.rstrip(")")
    path, _, _line = loc.rpartition(":")
    if not name:  # no location (native address)
        return frame, frame
    return f"{name} ({path or loc})", loc


def _package(frame: str) -> str:
    _, _, loc = frame.rpartition(" (")
    loc = loc.rstrip(")")
    path = loc.rpartition(":")[0] or loc
    if path.endswith((".so", ".so.6")) or ".so." in path or path.startswith("0x"):
        return "[native] " + path.split("/")[-1]
    if "/" not in path:
        if path.endswith((".c", ".h")):
            return "[C extension]"
        return path.removesuffix(".py") or "?"
    return path.split("/")[0]


def analyse_pyspy(raw: Path, top: int) -> dict[str, Any]:
    """Self and inclusive shares of the workers' main threads, from py-spy's collapsed stacks."""
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    idle = total = 0
    per_thread: Counter[str] = Counter()
    stacks = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        thread_i = next((i for i, f in enumerate(frames) if f.startswith("thread (")), None)
        if thread_i is not None:
            per_thread[frames[thread_i].split(": ", 1)[-1]] += int(n)
            stacks.append((thread_i, frames, int(n)))
    # Serving processes: those whose stacks run Sanic's server loop (the workers, or the single process).
    serving = {frames[t - 1] if t else "" for t, frames, _ in stacks
               if any(f.startswith("_serve_http_1 (") or "sanic/server/runners.py" in f for f in frames)}
    for thread_i, frames, count in stacks:
        body = frames[thread_i + 1:]
        proc = frames[thread_i - 1] if thread_i else ""
        if proc not in serving or not frames[thread_i].endswith("MainThread") or not body:
            continue
        if any(body[-1].startswith(x) or f"{x} (" in body[-1] for x in _IDLE_LEAVES):
            idle += count
            continue
        total += count
        leaf_fn, leaf_line = _frame_key(body[-1])
        self_fn[leaf_fn] += count
        self_line[leaf_line] += count
        self_pkg[_package(body[-1])] += count
        for fn in {_frame_key(f)[0] for f in body}:
            incl_fn[fn] += count

    def pct(c: Counter[str]) -> list[list[Any]]:
        return [[k, v, round(100 * v / total, 1)] for k, v in c.most_common(top)] if total else []

    return {"main_thread_samples": total, "idle_samples_dropped": idle, "self": pct(self_fn),
            "inclusive": pct(incl_fn), "self_by_line": pct(self_line), "self_by_package": pct(self_pkg),
            "samples_by_thread_name": dict(per_thread.most_common())}


def run_profile(b: Bench, out_prefix: Path) -> dict[str, Any] | None:
    a = b.a
    app = b.primary
    pyspy = a.py_spy or shutil.which("py-spy")
    if not pyspy or not Path(pyspy).exists():
        log("--profile: py-spy not found (pip install py-spy into a scratch venv, pass --py-spy PATH)")
        return None
    raw = out_prefix.with_suffix(".pyspy.txt")
    cmd, env, prefix = b.load_cmd(app.target, a.profile_kind, a.profile_conc, a.profile + 2)
    run_child(*b.load_cmd(app.target, a.profile_kind, a.profile_conc, 2)[:2])  # warm
    tree = b.ps.tree(app.proc.pid)
    clk = os.sysconf("SC_CLK_TCK")
    t0 = thread_cpu(tree, clk)
    load = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1)
    spy = [pyspy, "record", "--pid", str(app.proc.pid), "--subprocesses", "--threads", "--format", "raw",
           "--rate", str(a.profile_rate), "--duration", str(int(a.profile)), "--output", str(raw)]
    if a.profile_native:
        spy.append("--native")
    if a.profile_gil:
        spy.append("--gil")
    if a.profile_nonblocking and not a.profile_native:  # py-spy reads native stacks only from paused threads
        spy.append("--nonblocking")
    r = subprocess.run(spy, capture_output=True, text=True)
    out, _ = load.communicate()
    tree = sorted(set(tree) | set(b.ps.tree(app.proc.pid)))
    t1 = thread_cpu(tree, clk)
    log(f"profile: process tree {tree}; {len(t0)} threads before, {len(t1)} after")
    res = json_line(out, prefix) or {}
    if r.returncode != 0 or not raw.exists():
        log("py-spy failed:", r.stderr[-800:])
        return None
    threads = []
    for key, v1 in t1.items():
        v0 = t0.get(key)
        if v0 is None:
            continue
        u, s = v1["utime"] - v0["utime"], v1["stime"] - v0["stime"]
        if u + s > 0:
            threads.append({"pid": key[0], "tid": key[1], "comm": v1["comm"], "user_s": round(u, 2),
                            "sys_s": round(s, 2)})
    threads.sort(key=lambda t: -(t["user_s"] + t["sys_s"]))
    reqs = res.get("requests") or 0
    tot = sum(t["user_s"] + t["sys_s"] for t in threads)
    prof = {"target": app.target, "kind": a.profile_kind, "raw_file": str(raw), "native": a.profile_native,
            "gil": a.profile_gil, "rate_hz": a.profile_rate,
            "seconds": a.profile, "concurrency": a.profile_conc, "rps": res.get("rps"), "requests": reqs,
            "tree_cpu_s": round(tot, 2), "cpu_ms_per_req": round(1000 * tot / reqs, 3) if reqs else None,
            "user_s": round(sum(t["user_s"] for t in threads), 2),
            "sys_s": round(sum(t["sys_s"] for t in threads), 2),
            "threads": threads, **analyse_pyspy(raw, a.profile_top)}
    return prof


def render_profile(p: dict[str, Any]) -> str:
    kind = "streaming" if p.get("kind") == "stream" else "non-streaming"
    out = [f"## Profile of {p.get('target', 'appliance')}: {kind} c={p['concurrency']}, {p['seconds']:.0f}s, "
           f"py-spy {p['rate_hz']} Hz"
           f"{' --native' if p['native'] else ''}{' --gil' if p.get('gil') else ''}", "",
           f"- load during the profile (py-spy pauses the workers to sample, so this is below the bench): "
           f"{p['rps']} RPS; appliance tree CPU {p['tree_cpu_s']} s (user {p['user_s']} s, kernel {p['sys_s']} s)"
           f" = {p['cpu_ms_per_req']} ms/request",
           "- CPU by thread (from /proc): " + ", ".join(
               f"{t['pid']}/{t['comm']}{'(main)' if t['pid'] == t['tid'] else ''} {t['user_s'] + t['sys_s']:.2f}s"
               for t in p["threads"][:8]),
           f"- workers' main-thread samples: {p['main_thread_samples']} (idle waits dropped: "
           f"{p['idle_samples_dropped']}); raw stacks: {p['raw_file']}",
           "- with --gil, time a worker spends with the GIL released (epoll wait, libuv's own reads) is not "
           "sampled; the kernel share above comes from /proc", ""]
    for title, key in (("Self time by function", "self"), ("Inclusive time by function", "inclusive"),
                       ("Self time by line", "self_by_line"), ("Self time by package", "self_by_package")):
        out += [f"### {title}", "", "| # | frame | samples | % of main-thread CPU |", "|---|---|---|---|"]
        out += [f"| {i} | `{k}` | {n} | {pc} |" for i, (k, n, pc) in enumerate(p[key], 1)]
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ output


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render(r: dict[str, Any]) -> str:
    out = render_header(r)
    if r["aggregate"]:
        out += render_table(r["aggregate"], r["params"]["targets"])
        if any("accounting_overhead" in row for row in r["aggregate"]):
            out += render_overhead(r["aggregate"])
        if any("above_floor" in row for row in r["aggregate"]):
            out += render_above_floor(r["aggregate"])
        out += render_foreign(r) + render_targets(r["targets"])
    if r.get("profile"):
        out += ["", render_profile(r["profile"])]
    return "\n".join(out) + "\n"


def render_header(r: dict[str, Any]) -> list[str]:
    m, p = r["machine"], r["params"]
    out = [f"# appliance bench {r['tag']}", "",
           f"- machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; load average at start "
           f"{' '.join(f'{x:.2f}' for x in m['loadavg_start'])}, end {' '.join(f'{x:.2f}' for x in m['loadavg_end'])}",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())]
    for app in r["appliances"]:
        what = ("accounting on: keys, per-key limits and budgets, priced model, usage ledger" if app["accounting"]
                else "Sanic + aiohttp alone" if app["target"] == FLOOR
                else 'accounting off: [auth] mode = "none", no prices, no key')
        out.append(f"- {app['target']} ({what}): `{app['cmd']}` ({app['workers']}), ready in {app['ready_s']} s, "
                   f"PSS at the end {app['end_pss_mb']} MB")
    out += [f"- params: {p['rounds']} rounds x {p['duration_s']:g}s measured (+{p['warmup_s']:g}s warm-up) per "
            f"segment, {'/'.join(p['targets'])} order rotated; mock delay {p['mock_delay_ms']} ms, "
            f"{p['mock_chunks']} stream chunks, chunk gap {p['mock_chunk_delay_ms']} ms; run took "
            f"{r['run_seconds']:.0f}s",
            "- medians over rounds; added = that appliance - direct, paired within each round; CPU = the "
            "appliance's process tree (master + workers) per completed request; busiest process share = CPU of "
            "the busiest process in the tree / the tree's CPU (0.5 = two workers evenly loaded, 1.0 = one worker "
            "got every connection); foreign CPU = other processes during that target's segments", ""]
    return out


def render_table(rows: list[dict[str, Any]], targets: list[str]) -> list[str]:
    out = ["| scenario | c | target | RPS (min-max) | RPS ratio vs direct | p50 / p99 ms | added p50 ms | "
           "added p99 ms | TTFT p50 ms | added TTFT p50 ms | CPU ms/req | busiest process share (median / max) | "
           "peak RSS MB | foreign CPU s (median / max) | errors |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for t in targets:
            x = row[t]
            rr = x["rps_range"] or [None, None]
            fc = x["foreign_cpu_s"]
            out.append(
                f"| {row['scenario']} | {row['concurrency']} | {t} | {fmt(x['rps'], 0)} ({fmt(rr[0], 0)}-"
                f"{fmt(rr[1], 0)}) | {fmt(x.get('rps_ratio'), 3)} | {fmt(x['p50_ms'])} / {fmt(x['p99_ms'])} | "
                f"{fmt(x.get('added_p50_ms'))} | {fmt(x.get('added_p99_ms'))} | {fmt(x['ttft_p50_ms'])} | "
                f"{fmt(x.get('added_ttft_p50_ms'))} | {fmt(x.get('cpu_ms_per_req'), 3)} | "
                f"{fmt(x.get('busiest_process_share'))} / {fmt(x.get('busiest_process_share_max'))} | "
                f"{fmt(x.get('peak_rss_mb'), 0)} | {fmt(fc['median'], 1)} / {fmt(fc['max'], 1)} | {x['errors']} |")
    return out


def render_overhead(rows: list[dict[str, Any]]) -> list[str]:
    out = ["", f"## Accounting overhead: {ON} (on) - {OFF} (off)", "",
           "CPU ms per request of the accounting-on appliance minus the accounting-off one, taken within each "
           "round (segments seconds apart, same machine load), median over rounds; the on and off figures are "
           "the medians from the table above.", ""]
    for row in rows:
        o = row.get("accounting_overhead")
        if o is None:
            continue
        v = o["cpu_ms_per_req"]
        verdict = "n/a" if v is None else "PASS" if v <= TARGET_ACCOUNTING_CPU_MS else "MISS"
        by_round = ", ".join(fmt(x, 3) for x in o["cpu_ms_per_req_by_round"])
        ttft = f", TTFT p50 {fmt(o['ttft_p50_ms'])} ms" if o["ttft_p50_ms"] is not None else ""
        out.append(f"- {row['scenario']} c={row['concurrency']}: accounting overhead CPU ms/req = on - off = "
                   f"{fmt(row[ON]['cpu_ms_per_req'], 3)} - {fmt(row[OFF]['cpu_ms_per_req'], 3)} -> **{fmt(v, 3)}** "
                   f"(per round {by_round}) **{verdict}** (<= {TARGET_ACCOUNTING_CPU_MS:g}); latency on - off: "
                   f"p50 {fmt(o['p50_ms'])} ms, p99 {fmt(o['p99_ms'])} ms{ttft}")
    return out


def render_above_floor(rows: list[dict[str, Any]]) -> list[str]:
    out = ["", f"## Above the floor: each appliance - {FLOOR} (Sanic + aiohttp alone, floor_proxy.py)", ""]
    for row in rows:
        for target, o in row.get("above_floor", {}).items():
            by_round = ", ".join(fmt(x, 3) for x in o["cpu_ms_per_req_by_round"])
            out.append(f"- {row['scenario']} c={row['concurrency']}: {target} CPU ms/req = "
                       f"{fmt(row[target]['cpu_ms_per_req'], 3)}, {FLOOR} {fmt(row[FLOOR]['cpu_ms_per_req'], 3)} -> "
                       f"the appliance's own code adds **{fmt(o['cpu_ms_per_req'], 3)}** (per round {by_round})")
    return out


def render_foreign(r: dict[str, Any]) -> list[str]:
    f, m, p = r["foreign"], r["machine"], r["params"]
    return ["", f"Foreign CPU (processes outside the bench) during the measured windows: {f['total_s']:.1f} s "
            f"over {f['wall_s']:.0f} s of measurement = {f['share_pct']:.1f}% of the machine's "
            f"{m['cores']} cores (max {f['max_s']:.1f} s in one {p['duration_s']:g}s segment)."]


def render_targets(checks: list[dict[str, Any]]) -> list[str]:
    out = ["", "## Targets", "", "| target | limit | measured | result |", "|---|---|---|---|"]
    for c in checks:
        note = f" ({c['note']})" if c["note"] else ""
        out.append(f"| {c['target']}{note} | <= {c['limit']:g} | {fmt(c['value'], 3)} | **{c['result']}** |")
    return out


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    ap.add_argument("--rounds", type=int, default=int(env("ROUNDS", 3)), help="rounds (0: profile only)")
    ap.add_argument("--duration", type=float, default=float(env("DURATION", 3)), help="measured s per segment")
    ap.add_argument("--warmup", type=float, default=float(env("WARMUP", 1)), help="discarded s before each")
    ap.add_argument("--initial-warmup", type=float, default=2.0,
                    help="s of c=8 load per target and code path before the first round")
    ap.add_argument("--conc", default=env("CONC", "1,16,64"), help="non-streaming concurrencies")
    ap.add_argument("--stream-conc", default=env("STREAM_CONC", "1,16"), help="streaming concurrencies ('' = none)")
    ap.add_argument("--python", default=env("APPLIANCE_PYTHON", "/tmp/devenv/bin/python"),
                    help="interpreter that runs `-m appliance serve` (default /tmp/devenv/bin/python)")
    ap.add_argument("--appliance-bin", default=env("APPLIANCE_BIN"),
                    help="bench a built binary instead: PATH serve --config FILE")
    ap.add_argument("--accounting", choices=("on", "off", "both"), default=env("ACCOUNTING", "both"),
                    help="appliance(s) to bench: on = keys + limits + budgets + prices + ledger (target "
                         f"'{ON}'), off = [auth] mode none, no prices (target '{OFF}'), both = the two side by "
                         "side and their CPU difference (default)")
    ap.add_argument("--workers", type=int, default=2, help="[server] workers in the generated config")
    ap.add_argument("--floor", action="store_true",
                    help=f"also bench '{FLOOR}': Sanic + aiohttp alone proxying to the mock (floor_proxy.py, run by "
                         "--python), and report each appliance's CPU per request above it")
    ap.add_argument("--single-process", action="store_true", help="pass --single-process to serve")
    ap.add_argument("--appliance-arg", action="append", default=[], help="extra argument to `serve` (repeatable)")
    ap.add_argument("--harness", type=Path, default=DEFAULT_HARNESS,
                    help="the shared bench folder: mock_upstream.py, loadgen.py, procstat.py, wrk/post_json.lua")
    ap.add_argument("--client-python", default=env("BENCH_PYTHON", "/tmp/bench-venv/bin/python"),
                    help="interpreter for the mock and loadgen.py (uses uvloop when it has it)")
    ap.add_argument("--mock-delay-ms", type=int, default=int(env("MOCK_DELAY_MS", 0)))
    ap.add_argument("--mock-chunks", type=int, default=int(env("MOCK_STREAM_CHUNKS", 16)))
    ap.add_argument("--mock-chunk-delay-ms", type=int, default=int(env("MOCK_CHUNK_DELAY_MS", 0)))
    ap.add_argument("--profile", type=float, default=0, help="also profile with py-spy for this many seconds")
    ap.add_argument("--profile-conc", type=int, default=16)
    ap.add_argument("--profile-kind", choices=("chat", "stream"), default="chat",
                    help="the load held during the profile: non-streaming (chat) or streaming")
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames, kernel calls)")
    ap.add_argument("--profile-gil", action=argparse.BooleanOptionalAction, default=True,
                    help="py-spy --gil: sample only the thread holding the GIL, so an event loop waiting in "
                         "epoll is never counted as work (default on)")
    ap.add_argument("--profile-nonblocking", action="store_true",
                    help="py-spy --nonblocking: cheaper, but stacks read from a running thread come out truncated "
                         "and samples lean towards syscalls (measured: socket writes 34%% vs 20%% paused)")
    ap.add_argument("--profile-top", type=int, default=20)
    ap.add_argument("--py-spy", default=env("PY_SPY", "/tmp/pyspy-venv/bin/py-spy"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--tag", default=env("BENCH_TAG", ""))
    ap.add_argument("--logdir", type=Path, default=Path(env("BENCH_LOGDIR", "/tmp/appliance-bench-logs")))
    a = ap.parse_args(argv)
    if not Path(a.client_python).exists():
        a.client_python = sys.executable
    return a


def accounting_modes(choice: str) -> list[str]:
    return ["on", "off"] if choice == "both" else [choice]


def run_rounds(bench: Bench, scenarios: list[tuple[str, int]], targets: list[str]) -> list[Segment]:
    """Every round, every scenario, every target back to back, the order rotated by one each time."""
    segments = []
    for r in range(bench.a.rounds):
        for si, (kind, c) in enumerate(scenarios):
            k = (r + si) % len(targets)
            for target in targets[k:] + targets[:k]:
                segments.append(bench.segment(target, kind, c, r))
    return segments


def appliance_info(bench: Bench, procstat: Any) -> list[dict[str, Any]]:
    a = bench.a
    return [{"target": app.target, "accounting": app.accounting, "cmd": " ".join(app.proc.cmd),
             "config": app.config.read_text() if app.config else None, "ready_s": app.ready_s,
             "workers": "single process" if a.single_process else f"{a.workers} workers",
             "end_pss_mb": round(procstat.pss_bytes(procstat.tree(app.proc.pid)) / 2**20, 1)}
            for app in bench.apps.values()]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not shutil.which("wrk"):
        sys.exit("wrk not found: run /work/shared/bench/setup.sh (apt-get install wrk)")
    if not (a.harness / "mock_upstream.py").exists():
        sys.exit(f"no mock_upstream.py under --harness {a.harness}")
    if not a.appliance_bin and not Path(a.python).exists():
        sys.exit(f"--python {a.python} does not exist (or pass --appliance-bin)")
    sys.path.insert(0, str(a.harness))
    procstat = importlib.import_module("procstat")
    a.out.mkdir(parents=True, exist_ok=True)
    a.logdir.mkdir(parents=True, exist_ok=True)
    conc = [int(x) for x in a.conc.split(",") if x.strip()]
    sconc = [int(x) for x in a.stream_conc.split(",") if x.strip()]
    scenarios = [("chat", c) for c in conc] + [("stream", c) for c in sconc]
    modes = accounting_modes(a.accounting)
    apps = [APPLIANCE_TARGETS[m] for m in modes] + ([FLOOR] if a.floor else [])
    targets = ["direct", *apps]
    started = dt.datetime.now(dt.UTC)
    tag = started.strftime("%Y%m%dT%H%M%SZ") + (f"-{a.tag}" if a.tag else "")

    with tempfile.TemporaryDirectory(prefix="appliance-bench-") as tmp:
        bench = Bench(a, procstat, Path(tmp))
        try:
            bench.start(modes)
            bench.warm()
            t_run = time.monotonic()
            load0 = os.getloadavg()
            segments = run_rounds(bench, scenarios, targets)
            load1 = os.getloadavg()
            info = appliance_info(bench, procstat)
            profile = run_profile(bench, a.out / tag) if a.profile > 0 else None
            run_s = time.monotonic() - t_run
            primary = bench.primary.target
        finally:
            bench.stop()

    rows = aggregate(segments, scenarios, apps) if segments else []
    foreign = [s["foreign_cpu_s"] for s in segments if s["foreign_cpu_s"] is not None]
    wall = sum(s["wall_s"] for s in segments)
    cores = os.cpu_count() or 1
    result = {
        "tag": tag, "started_utc": started.isoformat(timespec="seconds"), "run_seconds": round(run_s, 1),
        "machine": {"cpu": cpu_model(), "cores": cores,
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "loadavg_start": load0, "loadavg_end": load1},
        "versions": versions(a),
        "appliances": info,
        "params": {"rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup, "conc": conc,
                   "stream_conc": sconc, "mock_delay_ms": a.mock_delay_ms, "mock_chunks": a.mock_chunks,
                   "mock_chunk_delay_ms": a.mock_chunk_delay_ms, "model": MODEL, "accounting": a.accounting,
                   "targets": targets, "bench_key": {k: v for k, v in BENCH_KEY_FIELDS.items() if k != "name"},
                   "prices_per_mtok": {"input": PRICE_INPUT_PER_MTOK, "output": PRICE_OUTPUT_PER_MTOK}},
        "foreign": {"total_s": round(sum(foreign), 2), "max_s": max(foreign, default=0.0), "wall_s": round(wall, 1),
                    "share_pct": round(100 * sum(foreign) / (wall * cores), 1) if wall else 0.0},
        "aggregate": rows,
        "targets": target_checks(rows, primary),
        "profile": profile,
        "segments": segments,
    }
    (a.out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    md = render(result)
    (a.out / f"{tag}.md").write_text(md)
    print(md)
    log(f"wrote {a.out / tag}.json and .md (run {run_s:.0f}s); server logs in {a.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
