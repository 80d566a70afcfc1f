"""How fast the appliance starts, from source and frozen, side by side: time from exec to the first 200 on
/health and to every worker answering, `--help`, idle memory, the binary's size.

    python tests/perf/startup.py                                  # .venv/bin/python and dist/appliance
    python tests/perf/startup.py --python /tmp/devenv/bin/python --bin dist/appliance --runs 9
    python tests/perf/startup.py --bin ''                         # from source only
    python tests/perf/startup.py --python '' --bin old/appliance --bin dist/appliance   # two builds

Each start: `appliance serve` (2 workers, or --single-process), discovery off, no backends, a fresh data dir
and TMPDIR (the one-file binary unpacks into it), /health polled every 10 ms on fresh connections. First 200
is when one worker answers; all workers is when /health has answered from every worker's pid. Idle memory:
PSS summed over the whole process tree (bootloader included) from /proc/<pid>/smaps_rollup, 3 s after every
worker answered. The forms alternate start by start, so both see the same machine; medians of --runs.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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


@dataclass
class Start:
    first_s: float  # the first 200 on /health
    all_s: float  # every worker has answered /health
    pss_kb: int
    processes: list[tuple[int, str]]


def one_start(command: list[str], workers: int, single: bool) -> Start:
    scratch = Path(tempfile.mkdtemp(prefix="appliance-startup-"))
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
        pids: set[int] = set()
        first = 0.0
        while len(pids) < (1 if single else workers):
            if proc.poll() is not None or time.perf_counter() - started > 60:
                raise RuntimeError(f"appliance did not start (exit {proc.returncode})")
            body = health(port)
            if body is None:
                time.sleep(0.01)
                continue
            first = first or time.perf_counter() - started
            pids.add(body["pid"])
        every = time.perf_counter() - started
        time.sleep(3)
        per = [(pss_kb(pid), cmdline(pid)) for pid in tree(proc.pid)]
        return Start(first, every, sum(kb for kb, _ in per), per)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            for pid in reversed(tree(proc.pid)):
                os.kill(pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def seconds(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (runs: {', '.join(f'{v:.2f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="measure `PYTHON -m appliance` (from source); '' to skip")
    parser.add_argument("--bin", action="append", help="the one-file binary (dist/appliance); '' to skip; "
                        "given again, the binaries are measured side by side (e.g. two builds of the spec)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    forms: dict[str, list[str]] = {}
    if args.python:
        forms["source"] = [args.python, "-m", "appliance"]
    binaries = [Path(b).resolve() for b in (args.bin or [ROOT / "dist" / "appliance"]) if b]
    for binary in binaries:
        form = "frozen" if len(binaries) == 1 else f"frozen {binary}"
        forms[form] = [str(binary)]
        print(f"{form}: {binary} is {binary.stat().st_size / 1e6:.1f} MB ({binary.stat().st_size} bytes)")
    for form, command in forms.items():
        helps = []
        for _ in range(args.runs * 2):
            t = time.perf_counter()
            subprocess.run([*command, "--help"], check=True, stdout=subprocess.DEVNULL)
            helps.append(time.perf_counter() - t)
        print(f"{form}: --help median {statistics.median(helps) * 1000:.0f} ms "
              f"(min {min(helps) * 1000:.0f}, max {max(helps) * 1000:.0f}, n={len(helps)})")

    for label, workers, single in (("2 workers", 2, False), ("--single-process", 1, True)):
        starts: dict[str, list[Start]] = {form: [] for form in forms}
        for _ in range(args.runs):
            for form, command in forms.items():
                starts[form].append(one_start(command, workers, single))
        for form, runs in starts.items():
            print(f"{form}, {label}: first 200 on /health {seconds([r.first_s for r in runs])}")
            if not single:
                print(f"{form}, {label}: every worker answering {seconds([r.all_s for r in runs])}")
            print(f"{form}, {label}: idle PSS median {statistics.median(r.pss_kb for r in runs) / 1024:.0f} MB;"
                  " last run per process:")
            for kb, cmd in runs[-1].processes:
                print(f"    {kb / 1024:6.1f} MB  {cmd}")


if __name__ == "__main__":
    main()
