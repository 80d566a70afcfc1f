"""Real Redis and PostgreSQL servers for the scale-out tests, each on a free loopback port in a temp dir.

tests/run installs them from Debian's packages (redis-server, postgresql). PostgreSQL refuses to run as root,
so as root its processes run as the ``postgres`` user the package creates.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.support.threaded import free_port

_PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def redis_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def postgres_bin_dir() -> Path | None:
    return _PG_BIN[-1] if _PG_BIN and (_PG_BIN[-1] / "postgres").exists() else None


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {timeout_s} s:\n{log.read_text(errors='replace')[-3000:]}")


class Engine:
    """One server process; ``stop`` ends it, ``kill`` kills it (-9), ``start`` brings it back on the same port."""

    def __init__(self, name: str, workdir: Path, port: int, argv: list[str], url: str,
                 as_user: Callable[[], None] | None = None) -> None:
        self.name = name
        self.workdir = workdir
        self.port = port
        self.url = url
        self._argv = argv
        self._as_user = as_user
        self.log_path = workdir / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.cleanup: Callable[[], None] = lambda: None
        self.unix_url: str | None = None  # Redis: the same server over its unix socket

    def start(self) -> Engine:
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(self._argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                      preexec_fn=self._as_user, start_new_session=True)
        _wait_port(self.port, self._proc, self.log_path)
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self._proc is not None
            self._proc.kill()
            self._proc.wait(10)

    def stop(self) -> None:
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGINT if self.name == "postgres" else signal.SIGTERM)  # pg: fast stop
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.cleanup()


def start_redis(workdir: Path) -> Engine:
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    socket_path = workdir / "redis.sock"  # beside the port: the same server over a unix socket
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--appendonly", "no", "--protected-mode", "yes", "--unixsocket", str(socket_path),
            "--unixsocketperm", "700"]
    engine = Engine("redis", workdir, port, argv, f"redis://127.0.0.1:{port}/0")
    engine.unix_url = f"unix://{socket_path}"
    return engine.start()


def start_postgres(workdir: Path, *, survives_kill: bool = False) -> Engine:
    """``workdir`` holds the log; the cluster goes in a temp dir of its own (the postgres user must reach it,
    and pytest's temp dirs are private to root). Tuned for speed: synchronous_commit=off acknowledges a
    commit before its WAL reaches the kernel, so a kill -9 loses the last commits; a test that kills the
    server asks ``survives_kill`` (fsync stays off: what the kernel has survives the process)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("postgres")
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    as_user = None
    if os.geteuid() == 0:  # initdb and postgres refuse root
        user = pwd.getpwnam("postgres")
        os.chown(cluster, user.pw_uid, user.pw_gid)

        def as_user() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    data = cluster / "data"
    made = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "appliance", "--auth=trust", "-E",
                           "UTF8", "--no-sync"], capture_output=True, preexec_fn=as_user, cwd=cluster)
    if made.returncode:
        raise RuntimeError(f"initdb failed: {made.stderr.decode(errors='replace')}")
    port = free_port()
    argv = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(cluster), "-h", "127.0.0.1",
            "-c", "fsync=off", "-c", f"synchronous_commit={'on' if survives_kill else 'off'}",
            "-c", "full_page_writes=off", "-c", "max_connections=200"]
    engine = Engine("postgres", workdir, port, argv, f"postgresql://appliance@127.0.0.1:{port}/postgres",
                    as_user=as_user)
    engine.cleanup = lambda: shutil.rmtree(cluster, ignore_errors=True)
    return engine.start()


def create_database(engine: Engine, name: str) -> str:
    """A new, empty database on ``engine``; returns its URL."""
    bin_dir = postgres_bin_dir()
    assert bin_dir is not None
    argv = [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(engine.port), "-U", "appliance", "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"']
    deadline = time.monotonic() + 30
    while True:
        made = subprocess.run(argv, capture_output=True)
        if made.returncode == 0:
            break
        # The port opens before the server takes connections ("the database system is starting up").
        if b"starting up" not in made.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"CREATE DATABASE {name}: {made.stderr.decode(errors='replace')}")
        time.sleep(0.1)
    return engine.url.rsplit("/", 1)[0] + f"/{name}"


ENGINES = ("sqlite", "postgresql")


def database_config(request: Any, name: str) -> dict[str, Any]:
    """The ``[database]`` section of a module's appliance whose fixture is parametrized over ENGINES: nothing
    for SQLite, a new database named after ``name`` on the session's PostgreSQL (the ``postgres_engine``
    fixture) else. A new one each time: the fixture may be set up twice in a session (the llama.cpp tests run
    last, so a module's PostgreSQL appliance can come back for them)."""
    if request.param == "sqlite":
        return {}
    unique = f"{name}_{uuid.uuid4().hex[:8]}"
    return {"database": {"url": create_database(request.getfixturevalue("postgres_engine"), unique)}}


def on_database(data_dir: Path, url: str | None) -> Callable[[Callable[[Any], Awaitable[Any]]], Any]:
    """Runs ``work(db)`` on a migrated database of either engine (SQLite in ``data_dir``, or PostgreSQL at
    ``url``), opened and closed around it."""
    from appliance.common.config import DatabaseSettings
    from appliance.common.resources import migrations_dir
    from appliance.storage.engine import migrate_database, open_database

    migrate_database(data_dir, url, migrations_dir())

    def run(work: Callable[[Any], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            db = await open_database(data_dir, DatabaseSettings(url=url))
            try:
                return await work(db)
            finally:
                await db.close()

        return asyncio.run(main())

    return run
