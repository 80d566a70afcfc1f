"""Measure the one-file binary: size, `--help` time, time to the first 200 on /health, idle memory.

    python build/measure.py [--bin dist/appliance] [--runs 5]
    python build/measure.py --python .venv-build/bin/python   # the same, from source, for comparison

Time to first 200: from spawning `appliance serve` (2 workers, discovery off, no backends) until /health
first answers 200, polled every 10 ms on fresh connections. Idle memory: PSS summed over the whole process
tree (bootloader included) from /proc/<pid>/smaps_rollup, 3 s after both workers answered. Medians of
--runs runs; each start gets a fresh TMPDIR and data dir, removed afterwards.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> dict | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        return json.loads(response.read()) if response.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:70]


def one_start(command: list[str], workers: int, single: bool) -> tuple[float, int, list[tuple[int, str]]]:
    """(seconds to first 200, total PSS kB, per-process PSS) for one start."""
    scratch = Path(tempfile.mkdtemp(prefix="appliance-measure-"))
    port = free_port()
    (scratch / "tmp").mkdir()
    config = scratch / "appliance.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = {workers}\ndata_dir = "data"\n'
                      f"single_process = {'true' if single else 'false'}\n[discovery]\nenabled = false\n")
    env = {**os.environ, "TMPDIR": str(scratch / "tmp")}
    started = time.perf_counter()
    proc = subprocess.Popen([*command, "serve", "--config", str(config)], env=env, cwd=scratch,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while health(port) is None:
            if proc.poll() is not None or time.perf_counter() - started > 60:
                raise RuntimeError(f"appliance did not start (exit {proc.returncode})")
            time.sleep(0.01)
        first = time.perf_counter() - started
        pids = set()
        while len(pids) < (1 if single else workers):
            body = health(port)
            if body:
                pids.add(body["pid"])
        time.sleep(3)
        per = [(pss_kb(pid), cmdline(pid)) for pid in tree(proc.pid)]
        return first, sum(kb for kb, _ in per), per
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            for pid in reversed(tree(proc.pid)):
                os.kill(pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=str(ROOT / "dist" / "appliance"))
    parser.add_argument("--python", metavar="PYTHON", help="measure `PYTHON -m appliance` (from source) instead")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.python:
        command = [args.python, "-m", "appliance"]
    else:
        binary = Path(args.bin).resolve()
        command = [str(binary)]
        print(f"size: {binary.stat().st_size / 1e6:.1f} MB ({binary.stat().st_size} bytes)")
    helps = []
    for _ in range(args.runs * 2):
        t = time.perf_counter()
        subprocess.run([*command, "--help"], check=True, stdout=subprocess.DEVNULL)
        helps.append(time.perf_counter() - t)
    print(f"--help: median {statistics.median(helps) * 1000:.0f} ms "
          f"(min {min(helps) * 1000:.0f}, max {max(helps) * 1000:.0f}, n={len(helps)})")

    for label, workers, single in (("2 workers", 2, False), ("--single-process", 1, True)):
        firsts, totals, per = [], [], []
        for _ in range(args.runs):
            first, total, per = one_start(command, workers, single)
            firsts.append(first)
            totals.append(total)
        print(f"{label}: first 200 on /health median {statistics.median(firsts):.2f} s "
              f"(runs: {', '.join(f'{f:.2f}' for f in firsts)})")
        print(f"{label}: idle PSS median {statistics.median(totals) / 1024:.0f} MB "
              f"(runs: {', '.join(f'{t / 1024:.0f}' for t in totals)}); last run per process:")
        for kb, cmd in per:
            print(f"    {kb / 1024:6.1f} MB  {cmd}")


if __name__ == "__main__":
    main()
