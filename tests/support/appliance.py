"""Start a real `appliance serve` for a test: from source, or the frozen binary when APPLIANCE_BIN is set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.threaded import free_port

# Tests send a key from the start, so turning auth on later breaks nothing.
ADMIN_KEY = "sk-app-test-admin-key-0000000000000000"


def appliance_cmd() -> list[str]:
    """How the appliance is started: the built binary (frozen suite) or this checkout's package."""
    binary = os.environ.get("APPLIANCE_BIN")
    return [binary] if binary else [sys.executable, "-m", "appliance"]


def toml(data: dict[str, Any]) -> str:
    """Just enough TOML for test configs: tables, arrays of tables, scalars and scalar lists."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, str | Path):
            return json.dumps(str(value))
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {scalar(v)}" for k, v in value.items()) + "}"
        raise TypeError(value)

    def table(prefix: str, values: dict[str, Any]) -> list[str]:
        lines = [f"{k} = {scalar(v)}" for k, v in values.items() if not _is_table(v)]
        for k, v in values.items():
            if isinstance(v, dict) and _is_table(v):
                lines += ["", f"[{prefix}{k}]", *table(f"{prefix}{k}.", v)]
            elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
                for item in v:
                    lines += ["", f"[[{prefix}{k}]]", *table(f"{prefix}{k}.", item)]
        return lines

    return "\n".join(table("", data)) + "\n"


def _is_table(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(i, dict) for i in value)
    return isinstance(value, dict) and not value.get("__inline__", False)


class Appliance:
    """One appliance process tree on a free port, with its own data dir."""

    def __init__(self, root: Path, config: dict[str, Any], *, workers: int = 2, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        server = {"port": self.port, "workers": workers, "data_dir": "data", **config.get("server", {})}
        self.config = {**config, "server": server}
        self.config_path = root / "appliance.toml"
        self.config_path.write_text(toml(self.config))
        self.data_dir = root / "data"
        self.log_path = root / "appliance.log"
        self.env = {**os.environ, "APPLIANCE_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("APPLIANCE_CONFIG", None)
        self.env.pop("APPLIANCE_DATA_DIR", None)
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> Appliance:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*appliance_cmd(), "serve", "--config", str(self.config_path), *self.extra_args],
            cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"appliance exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"appliance did not answer /health within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, Any, Any]:
        """(status, parsed JSON or text, headers) of a GET on a fresh connection."""
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                                                   **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw, hdrs = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            status, raw, hdrs = exc.code, exc.read(), exc.headers
        try:
            return status, json.loads(raw), hdrs
        except ValueError:
            return status, raw.decode(errors="replace"), hdrs

    def post(self, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
             timeout: float = 30) -> tuple[int, Any, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST", headers={
            "Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw, hdrs = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            status, raw, hdrs = exc.code, exc.read(), exc.headers
        try:
            return status, json.loads(raw), hdrs
        except ValueError:
            return status, raw.decode(errors="replace"), hdrs

    def cli(self, *args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run an appliance subcommand (keys, usage, backup...) on this appliance's config and data dir;
        ``input`` is its standard input (else none: an empty one)."""
        return subprocess.run([*appliance_cmd(), *args, "--config", str(self.config_path)], cwd=self.root,
                              env=self.env, capture_output=True, text=True, timeout=timeout, input=input or "")

    def worker_pids(self, want: int, timeout: float = 20) -> set[int]:
        """Distinct pids answering /health (each on a new connection) until ``want`` are seen."""
        pids: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(pids) < want:
            try:
                status, body, _ = self.get("/health", timeout=2)
                if status == 200:
                    pids.add(body["pid"])
            except OSError:
                time.sleep(0.05)
        return pids

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: Any = None
        while time.monotonic() < deadline:
            status, body, _ = self.get("/ready")
            if status == 200:
                return body
            time.sleep(0.1)
        raise TimeoutError(f"not ready: {body}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"appliance still running {timeout} s after signal {sig}; its log:\n{self.log()[-6000:]}")
                self.kill_tree()
                self.proc.wait(10)
        return self.proc.returncode

    def kill_tree(self) -> None:
        """SIGKILL the launcher and every process it started."""
        if self.proc is None:
            return
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(pid: int) -> list[int]:
    """All descendant pids, children first found via /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
