#!/usr/bin/env python3
"""Two appliances on one Redis and one PostgreSQL against one appliance on SQLite, side by side in one run.

Not a test (perf/ is not collected). Starts the shared mock upstream, a Redis and a PostgreSQL server
(tests/support/engines: Debian's redis-server and postgresql, on free loopback ports in temp dirs), and:

  single   one appliance, accounting on (keys, limits, budgets, prices, ledger), SQLite in its data dir;
  one      a node alone under the load, with the single appliance's workers: the same accounting with
           `[state] url` (Redis), `[database] url` (PostgreSQL) and a `[files] dir` (what the engines cost a node);
  shared   node A and node B (the same config) sharing the load; the bench key is made on A and used on all three.
           Each has ``--node-workers`` (1): the pair has the single appliance's two workers between them, as two
           hosts would each run on cores of their own; with 2 each, four workers and two mains share this box's
           two cores, and what that costs is the box's, not the engines' (the README has both figures);
  half     the single appliance again, at c/2: the load each node of the shared pair carries (a node with half
           the clients batches less per wake-up, engines or not).

Per round and concurrency c (order rotated every round): wrk at c straight at the mock ("direct"), at the single
appliance, at the lone node, then the same c clients split over the two nodes (c/2 at each at once; c=1 goes to
node A while B idles). Reports per scenario the medians over rounds of p50/p99, RPS and the appliances' CPU ms
per request (every process of each tree; for the two nodes, both trees over both nodes' requests, B's background
work included), with the CPU Redis and PostgreSQL spent per request beside them, and the deltas against the
single appliance the issue holds the shared modes to: CPU per request (target <= 0.3 ms) and added p50.

    .venv/bin/python tests/perf/scaleout.py --python .venv/bin/python                 # ~2 min
    .venv/bin/python tests/perf/scaleout.py --python .venv/bin/python --rounds 5 --conc 1,16
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(HERE), str(REPO)]

import bench  # noqa: E402  (tests/perf/bench.py: the mock, wrk and the appliance config it writes)
from batch_latency import save  # noqa: E402

from tests.support.engines import Engine, create_database, start_postgres, start_redis  # noqa: E402

TARGET_EXTRA_CPU_MS = 0.3
MODES = ("direct", "single", "half", "one", "shared")


def shared_config(redis_url: str, database_url: str, files_dir: Path) -> str:
    return (f"\n[state]\nurl = {json.dumps(redis_url)}\nprefix = \"bench:\"\n"
            f"\n[database]\nurl = {json.dumps(database_url)}\n"
            f"\n[files]\ndir = {json.dumps(str(files_dir))}\n")


class Run:
    def __init__(self, a: argparse.Namespace, procstat: Any, work: Path) -> None:
        self.a = a
        self.ps = procstat
        self.work = work
        self.bodies = bench.write_bodies(work)
        self.procs: list[bench.Proc] = []
        self.mock: bench.Proc | None = None
        self.engines: list[Engine] = []
        self.urls: dict[str, str] = {}
        self.trees: dict[str, int] = {}  # appliance name -> its main pid
        self.key: dict[str, str] = {}

    def start(self) -> None:
        a = self.a
        mock_url = bench.Bench.start_mock(self)  # type: ignore[arg-type]  (it uses only a and procs)
        redis = start_redis(self.work / "redis")
        postgres = start_postgres(self.work / "postgres")
        self.engines += [redis, postgres]
        redis_url = redis.unix_url if a.redis_over == "unix" else redis.url
        extra = shared_config(redis_url, create_database(postgres, "bench"), self.work / "files")
        self.urls["direct"] = mock_url
        self.start_appliance("single", mock_url, "")
        self.start_appliance("one", mock_url, extra)
        self.start_appliance("node-a", mock_url, extra, workers=a.node_workers)
        self.start_appliance("node-b", mock_url, extra, workers=a.node_workers)
        self.key["single"] = bench.create_bench_key(self.urls["single"])
        # One key for every appliance on the engines: made on A, it must answer on B and on the lone node too.
        self.key["one"] = self.key["node-a"] = self.key["node-b"] = self.key["direct"] = \
            bench.create_bench_key(self.urls["node-a"])
        for name in ("single", "one", "node-a", "node-b"):
            bench.check_target(self.urls[name], self.bodies, a.mock_chunks, self.key[name], bench.ACCOUNTING_HEADERS)
        bench.log("all up: the key made on node A answers on node B")

    def start_appliance(self, name: str, mock_url: str, extra: str, workers: int | None = None) -> None:
        a = self.a
        port = bench.free_port()
        config = self.work / f"{name}.toml"
        bench.appliance_config(config, port=port, workers=workers or a.workers, data_dir=self.work / f"data-{name}",
                               mock_url=mock_url, accounting=True)
        config.write_text(config.read_text() + extra)
        env = {**os.environ, "APPLIANCE_ADMIN_KEY": bench.ADMIN_KEY, "PYTHONUNBUFFERED": "1"}
        for k in ("APPLIANCE_CONFIG", "APPLIANCE_DATA_DIR"):
            env.pop(k, None)
        proc = bench.Proc(name, [a.python, "-m", "appliance", "serve", "--config", str(config)], env,
                          a.logdir / f"{name}.log", cwd=self.work)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        bench.wait_until(lambda: bench.http(url + "/ready")[0] == 200, 120, name, proc)
        self.urls[name] = url
        self.trees[name] = proc.pid

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        for engine in self.engines:
            engine.stop()

    # -------------------------------------------------------------- load

    def wrk(self, target: str, conc: int, seconds: float) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "BENCH_BODY_FILE": str(self.bodies["chat"]), "BENCH_AUTH": self.key[target]}
        cmd = ["wrk", "-t", "1", "-c", str(conc), "-d", f"{max(1, round(seconds))}s", "--timeout", "30s",
               "-s", str(self.a.harness / "wrk" / "post_json.lua"), self.urls[target] + "/v1/chat/completions"]
        return cmd, env

    def drive(self, targets: list[str], conc: int, seconds: float) -> dict[str, dict[str, Any]]:
        """One wrk per target at ``conc`` connections, all at once; each one's parsed result."""
        results: dict[str, dict[str, Any]] = {}

        def one(target: str) -> None:
            out, err, _, rc = bench.run_child(*self.wrk(target, conc, seconds))
            results[target] = bench.json_line(out, "WRKJSON") or {"error": f"rc={rc} {err[-300:]}"}

        threads = [threading.Thread(target=one, args=(t,)) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def cpu(self, names: list[str]) -> float:
        pids = [pid for name in names for pid in self.ps.tree(self.trees[name])]
        return self.ps.cpu_seconds(pids)

    def engines_cpu(self) -> float:
        pids = [pid for e in self.engines if e._proc is not None for pid in self.ps.tree(e._proc.pid)]
        return self.ps.cpu_seconds(pids)

    def segment(self, mode: str, conc: int, rnd_i: int) -> dict[str, Any]:
        targets = {"direct": ["direct"], "single": ["single"], "half": ["single"], "one": ["one"],
                   "shared": ["node-a"] if conc == 1 else ["node-a", "node-b"]}[mode]
        per_target = conc if len(targets) == 1 and mode != "half" else max(1, conc // 2)
        if self.a.warmup > 0:
            self.drive(targets, per_target, self.a.warmup)
        measured = {"direct": [], "single": ["single"], "half": ["single"], "one": ["one"],
                    "shared": ["node-a", "node-b"]}[mode]
        cpu0, eng0 = self.cpu(measured), self.engines_cpu()
        results = self.drive(targets, per_target, self.a.duration)
        cpu, eng = self.cpu(measured) - cpu0, self.engines_cpu() - eng0
        requests = sum(r.get("requests") or 0 for r in results.values())
        errors = {t: r["errors"] for t, r in results.items() if any((r.get("errors") or {}).values())}
        p50 = statistics.mean(bench.dig(r, "lat_ms", "p50") or 0 for r in results.values())
        p99 = max(bench.dig(r, "lat_ms", "p99") or 0 for r in results.values())
        seg = {"round": rnd_i, "mode": mode, "concurrency": conc, "requests": requests,
               "rps": round(sum(r.get("rps") or 0 for r in results.values()), 1), "p50_ms": p50, "p99_ms": p99,
               "cpu_ms_per_req": round(1000 * cpu / requests, 3) if requests and measured else None,
               "engines_cpu_ms_per_req": round(1000 * eng / requests, 3) if requests else None, "errors": errors}
        bench.log(f"r{rnd_i} {mode:<7} c={conc:<3} rps={seg['rps']:<8} p50={p50:.3f} p99={p99:.3f} "
                  f"cpu/req={seg['cpu_ms_per_req']} engines/req={seg['engines_cpu_ms_per_req']} {errors or ''}")
        return seg


def summarize(segments: list[dict[str, Any]], concs: list[int]) -> list[dict[str, Any]]:
    rows = []
    for conc in concs:
        row: dict[str, Any] = {"concurrency": conc}
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for s in segments:
            if s["concurrency"] == conc:
                by_round.setdefault(s["round"], {})[s["mode"]] = s
        for mode in MODES:
            ss = [r[mode] for r in by_round.values() if mode in r]
            row[mode] = {k: bench.rnd(bench.median([s[k] for s in ss])) for k in
                         ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "engines_cpu_ms_per_req")}
        for mode in ("one", "shared"):
            pairs = [r for r in by_round.values() if "single" in r and mode in r]
            row[f"extra_cpu_ms_per_req_{mode}_vs_half"] = bench.rnd(bench.median(
                [r[mode]["cpu_ms_per_req"] - r["half"]["cpu_ms_per_req"] for r in pairs
                 if "half" in r and r[mode]["cpu_ms_per_req"] is not None and r["half"]["cpu_ms_per_req"] is not None]))
            row[f"extra_cpu_ms_per_req_{mode}"] = bench.rnd(bench.median(
                [r[mode]["cpu_ms_per_req"] - r["single"]["cpu_ms_per_req"] for r in pairs
                 if r[mode]["cpu_ms_per_req"] is not None and r["single"]["cpu_ms_per_req"] is not None]))
            row[f"extra_p50_ms_{mode}"] = bench.rnd(bench.median([r[mode]["p50_ms"] - r["single"]["p50_ms"]
                                                                  for r in pairs]))
        rows.append(row)
    return rows


def render(result: dict[str, Any]) -> str:
    lines = [f"# Scale-out: two nodes on Redis ({result['redis_over']}) + PostgreSQL vs one on SQLite "
             f"({result['started']})", "",
             f"{result['rounds']} rounds x {result['duration_s']} s per segment, {result['workers']} workers for "
             f"single and one, {result['node_workers']} per node of the pair; shared: the same c clients split over "
             "both nodes (c=1: node A), CPU of both nodes.", "",
             "| c | mode | p50 | p99 | req/s | CPU/req | Redis+PG CPU/req | extra CPU/req | extra p50 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for mode in MODES:
            m = row[mode]
            extra = row.get(f"extra_cpu_ms_per_req_{mode}")
            verdict = "" if extra is None else (" PASS" if extra <= TARGET_EXTRA_CPU_MS else " MISS")
            lines.append(f"| {row['concurrency']} | {mode} | {m['p50_ms']} ms | {m['p99_ms']} ms | {m['rps']} | "
                         f"{m['cpu_ms_per_req'] or '-'} | {m['engines_cpu_ms_per_req']} | "
                         f"{'-' if extra is None else f'{extra} ms{verdict}'} | "
                         f"{row.get(f'extra_p50_ms_{mode}', '-')} |")
    lines += ["", "Shared against the single appliance at c/2 (the same load per node): " + ", ".join(
        f"c={row['concurrency']}: {row.get('extra_cpu_ms_per_req_shared_vs_half')} ms" for row in result["rows"]) + ".",
        "", f"Target: extra CPU per request <= {TARGET_EXTRA_CPU_MS} ms (appliance processes only; Redis and "
        "PostgreSQL are shown beside it)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4, help="measured s per segment")
    ap.add_argument("--warmup", type=float, default=1, help="discarded s before each")
    ap.add_argument("--conc", default="1,16", help="clients (wrk connections); split over the nodes when shared")
    ap.add_argument("--modes", default=",".join(MODES), help="which of " + ", ".join(MODES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--node-workers", type=int, default=1,
                    help="workers of each node of the pair: 1 gives the two nodes the single appliance's two workers "
                    "between them, as two hosts would each have their own cores (2: four workers on this box's cores)")
    ap.add_argument("--redis-over", choices=("tcp", "unix"), default="tcp",
                    help="how the nodes reach Redis: loopback TCP (each send then also runs Redis's TCP receive "
                    "path, charged to the node) or its unix socket (closer to a node's own cost with Redis on "
                    "another host)")
    ap.add_argument("--python", default=sys.executable, type=lambda p: str(Path(p).absolute()),
                    help="the Python with the appliance installed")
    ap.add_argument("--harness", type=Path, default=bench.DEFAULT_HARNESS)
    ap.add_argument("--client-python", default=os.environ.get("BENCH_PYTHON", "/tmp/bench-venv/bin/python"),
                    help="runs the shared mock (see ../shared/bench/setup.sh)")
    ap.add_argument("--mock-delay-ms", type=int, default=0)
    ap.add_argument("--mock-chunks", type=int, default=16)
    ap.add_argument("--mock-chunk-delay-ms", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--logdir", type=Path, default=Path("/tmp/appliance-scaleout-logs"))
    a = ap.parse_args(argv)
    unknown = set(a.modes.split(",")) - set(MODES)
    if unknown:
        ap.error(f"--modes: unknown {', '.join(sorted(unknown))} (choose from {', '.join(MODES)})")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, str(a.harness))
    procstat = importlib.import_module("procstat")
    a.logdir.mkdir(parents=True, exist_ok=True)
    concs = [int(c) for c in a.conc.split(",") if c.strip()]
    modes = a.modes.split(",")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="appliance-scaleout-") as tmp:
        run = Run(a, procstat, Path(tmp))
        try:
            run.start()
            segments = []
            for rnd_i in range(a.rounds):
                order = modes[rnd_i % len(modes):] + modes[:rnd_i % len(modes)]
                for conc in concs:
                    segments += [run.segment(mode, conc, rnd_i) for mode in order]
        finally:
            run.stop()
    result = {"started": started, "redis_over": a.redis_over, "rounds": a.rounds, "duration_s": a.duration,
              "workers": a.workers, "node_workers": a.node_workers, "rows": summarize(segments, concs),
              "segments": segments}
    save(a.out, "scaleout", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
