"""The one-file binary: what only a frozen build can get wrong.

Spawned workers re-executing the binary (freeze_support), the bundled static/ and migrations/, the
_MEI* extraction directory shared by the tree and removed on exit, the process group the entry script
sets up, graceful SIGTERM/Ctrl-C through the PyInstaller bootloader, kill -9 of the bootloader, respawned
workers, TLS verification by the bundled OpenSSL, and no network traffic beyond the configured backends.
Run with APPLIANCE_BIN=<repo>/dist/appliance; the whole e2e suite also runs against the binary that way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

import appliance
from tests.fakes.openai_upstream import REPLY_TEXT, STREAM_PIECES, FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance, appliance_cmd, descendants
from tests.support.threaded import ThreadedServer

pytestmark = [
    pytest.mark.frozen,
    pytest.mark.skipif(not os.environ.get("APPLIANCE_BIN"), reason="set APPLIANCE_BIN to the built binary"),
]

REPO = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "Hi"}]


def fake_only(fake: FakeOpenAI, **server: Any) -> dict[str, Any]:
    """One configured backend (the fake) and discovery off: the appliance has nothing else to talk to."""
    return {"server": server, "discovery": {"enabled": False},
            "backends": [{"name": "fake", "url": fake.url + "/v1"}]}


def run_binary(*args: str, tmpdir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*appliance_cmd(), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TMPDIR": str(tmpdir), **(env or {})})


def leftovers(tmpdir: Path) -> list[str]:
    """What a one-file run leaves in TMPDIR: the bootloader's _MEI* and the SyncManager's pymp-*."""
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith(("_MEI", "pymp-")))


def mei_dirs(tmpdir: Path) -> list[str]:
    return [name for name in leftovers(tmpdir) if name.startswith("_MEI")]


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    return [child for child in descendants(pid) if _stat(child)[1] == str(pid)]


def alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def count_requests(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / "appliance.db")
    try:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        conn.close()


def slow_request_in_flight(app: Appliance, fake: FakeOpenAI, model: str) -> tuple[threading.Thread, dict[str, Any]]:
    """POST a chat on a thread and return once the fake is working on it: (thread, result dict)."""
    marker = f"in-flight {uuid.uuid4().hex}"  # found in the body the fake records
    result: dict[str, Any] = {}

    def send() -> None:
        result["status"] = app.post("/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": marker}]}, timeout=60)[0]

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(isinstance(seen.body, dict) and marker in json.dumps(seen.body) for seen in fake.requests[-20:]):
        assert time.monotonic() < deadline, f"the fake never saw the {model} request: {result}"
        time.sleep(0.02)
    return thread, result


# ---------------------------------------------------------------------------------- the command line


def test_version_help_and_check_config(private_tmp, tmp_path):
    result = run_binary("version", tmpdir=private_tmp)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"appliance {appliance.__version__}\n"  # stale binary? bash build/build.sh
    result = run_binary("--help", tmpdir=private_tmp)
    assert result.returncode == 0
    assert "serve" in result.stdout and "check-config" in result.stdout

    config = tmp_path / "a.toml"
    config.write_text('[server]\ndata_dir = "d"\nworkers = 3\n[discovery]\nenabled = false\n'
                      '[[backends]]\nname = "v"\nurl = "http://127.0.0.1:8000/v1"\napi_key = "${FROZEN_SECRET}"\n')
    result = run_binary("check-config", str(config), tmpdir=private_tmp, env={"FROZEN_SECRET": "sk-not-printed"})
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["server"]["workers"] == 3
    assert resolved["server"]["data_dir"] == str(tmp_path / "d")
    assert "sk-not-printed" not in result.stdout

    config.write_text("[server]\nport = 0\n")
    result = run_binary("check-config", str(config), tmpdir=private_tmp)
    assert result.returncode == 2 and "server.port" in result.stderr
    assert leftovers(private_tmp) == []  # every run removed its extraction directory


# ------------------------------------------------------------------------------------ serving


def test_two_workers_serve_chat_stream_status_page_and_migrations(start_frozen, fake_openai, private_tmp):
    app = start_frozen(fake_only(fake_openai), workers=2)
    workers = app.worker_pids(2)
    assert len(workers) == 2, app.log()

    # The tree: bootloader -> Python main (own process group: entry.py's setpgrp) -> workers.
    launcher = app.proc.pid
    (main,) = children(launcher)
    assert os.getpgid(main) == main != os.getpgid(launcher)
    assert workers <= set(children(main))
    # Every process re-executed the binary and reuses the launcher's one extraction directory.
    assert len(mei_dirs(private_tmp)) == 1, leftovers(private_tmp)
    # The fast paths made it into the bundle: Sanic silently falls back to asyncio and a pure-Python parser.
    for pid in workers:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "uvloop/loop.cpython" in maps and "httptools/parser/parser.cpython" in maps

    client = openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    completion = client.chat.completions.create(model="fake-chat", messages=HELLO)
    assert completion.choices[0].message.content == REPLY_TEXT
    stream = client.chat.completions.create(model="fake-chat", messages=HELLO, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "".join(STREAM_PIECES)

    status, body, headers = app.get("/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert body.lstrip().lower().startswith("<!doctype html")

    conn = sqlite3.connect(app.data_dir / "appliance.db")
    try:
        applied = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    finally:
        conn.close()
    assert "0001_init.sql" in applied
    assert applied == {p.name for p in (REPO / "migrations").glob("*.sql")}  # everything shipped was bundled


def test_single_process(start_frozen, fake_openai, private_tmp):
    app = start_frozen(fake_only(fake_openai), workers=1, extra_args=["--single-process"])
    status, body, _ = app.get("/health")
    assert status == 200
    assert descendants(app.proc.pid) == [body["pid"]]  # bootloader -> one Python process, nothing spawned
    assert app.post("/v1/chat/completions", {"model": "fake-chat", "messages": HELLO})[0] == 200
    assert app.stop() == 0
    assert leftovers(private_tmp) == []


# ------------------------------------------------------------------------------------ stopping


def test_the_router_and_the_semantic_cache_work_in_the_binary(start_frozen, fake_openai):
    """SimSIMD (imported on first use, so the analysis must have followed it) compares their vectors."""
    config = {**fake_only(fake_openai), "embeddings": {"model": "fake/fake-embed"},
              "models": [{"name": "faq", "target": "fake/fake-chat", "cache": {"semantic": True}}],
              "router": {"profiles": [{"name": "any", "model": "faq", "description": "Anything."}]}}
    app = start_frozen(config, workers=1)
    status, decision, _ = app.post("/v1/router", {"execute": False, "messages": HELLO})
    assert status == 200 and decision["profile"] == "any", decision
    body = {"model": "faq", "temperature": 0, "messages": HELLO}
    assert app.post("/v1/chat/completions", body)[2]["x-cache"] == "MISS"
    # The fake's embeddings are all alike: another question is "similar" (what is checked is SimSIMD, not meaning).
    again = app.post("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "Hello"}]})
    assert again[2]["x-cache"] == "HIT-SEMANTIC", app.log()[-3000:]


def test_sigterm_to_the_launcher_drains_flushes_and_cleans_up(start_frozen, fake_openai, private_tmp):
    # A one-minute flush interval: only the final flush at stop can write the request log.
    app = start_frozen(fake_only(fake_openai, flush_interval_ms=60_000), workers=2)
    assert len(app.worker_pids(2)) == 2
    tree = [app.proc.pid, *descendants(app.proc.pid)]
    sent = 0
    for _ in range(4):
        assert app.post("/v1/chat/completions", {"model": "fake-chat", "messages": HELLO})[0] == 200
        sent += 1
    thread, result = slow_request_in_flight(app, fake_openai, "fake/fake-slow-2000")  # backend/model: not listed
    sent += 1

    app.proc.send_signal(signal.SIGTERM)  # what systemd (KillMode=mixed), docker stop and kill <pid> do
    thread.join(30)
    assert result.get("status") == 200, app.log()  # the in-flight request completed
    assert app.proc.wait(30) == 0, app.log()
    assert count_requests(app.data_dir) == sent
    assert wait_gone(tree) == []
    assert leftovers(private_tmp) == []  # no _MEI* or pymp-* left behind


def test_ctrl_c_at_a_terminal_stops_cleanly(fake_openai, private_tmp, tmp_path, binary):
    """Ctrl-C signals the shell's whole foreground group: here, the launcher's new process group."""
    app = Appliance(tmp_path / "ctrlc", fake_only(fake_openai), workers=2, env={"TMPDIR": str(private_tmp)})
    app.proc = subprocess.Popen([*appliance_cmd(), "serve", "--config", str(app.config_path)], cwd=app.root,
                                env=app.env, stdout=app.log_path.open("ab"), stderr=subprocess.STDOUT,
                                process_group=0)
    try:
        app.wait_healthy()
        assert len(app.worker_pids(2)) == 2
        tree = [app.proc.pid, *descendants(app.proc.pid)]
        thread, result = slow_request_in_flight(app, fake_openai, "fake/fake-slow-1000")
        os.killpg(app.proc.pid, signal.SIGINT)
        thread.join(30)
        assert result.get("status") == 200, app.log()
        assert app.proc.wait(30) == 0, app.log()
        assert wait_gone(tree) == []
        assert leftovers(private_tmp) == []
    finally:
        if app.proc.poll() is None:
            app.kill_tree()


# ------------------------------------------------------------------------------------ crashes


def test_killed_worker_is_respawned(start_frozen, fake_openai, private_tmp):
    app = start_frozen(fake_only(fake_openai), workers=2)
    pids = app.worker_pids(2)
    assert len(pids) == 2
    victim = min(pids)
    assert victim in descendants(app.proc.pid)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    fresh: set[int] = set()
    while time.monotonic() < deadline:
        fresh = app.worker_pids(2, timeout=2)
        if len(fresh) == 2 and victim not in fresh:
            break
        time.sleep(0.2)
    assert len(fresh) == 2 and victim not in fresh, app.log()
    assert fresh <= set(descendants(app.proc.pid))
    assert len(mei_dirs(private_tmp)) == 1  # the new worker reused the extraction directory
    assert app.post("/v1/chat/completions", {"model": "fake-chat", "messages": HELLO})[0] == 200
    assert app.stop() == 0
    assert leftovers(private_tmp) == []


def test_kill_9_of_the_launcher_stops_the_tree(start_frozen, fake_openai, private_tmp):
    """The bootloader dies without forwarding anything; entry.py's PR_SET_PDEATHSIG turns that into a SIGTERM
    for the main process, whose workers follow. Only the bootloader's _MEI* dir is left (the README's
    ExecStartPre removes it)."""
    app = start_frozen(fake_only(fake_openai), workers=2)
    assert len(app.worker_pids(2)) == 2
    tree = [app.proc.pid, *descendants(app.proc.pid)]
    app.proc.kill()
    app.proc.wait(10)
    assert wait_gone(tree, timeout=20) == [], "the main process or its workers outlived the launcher"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", app.port), timeout=2).close()
    assert not (app.data_dir / "appliance.pid").exists()  # the main process shut down cleanly
    assert [name[:4] for name in leftovers(private_tmp)] == ["_MEI"]


# ------------------------------------------------------------------------------------ the network


def _address(field: str) -> tuple[str, int]:
    """An address of /proc/net/{tcp,udp}[6]: hex IP in host-order 32-bit words, ':', hex port."""
    ip_hex, port_hex = field.split(":")
    raw = bytes.fromhex(ip_hex)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port_hex, 16)


def inet_sockets() -> dict[int, tuple[str, tuple[str, int], tuple[str, int], str]]:
    """inode -> (protocol, local, remote, state) for every IP socket in this network namespace."""
    table = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            table[int(fields[9])] = (proto, _address(fields[1]), _address(fields[2]), fields[3])
    return table


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


LISTEN = "0A"


class SocketWatch:
    """Samples every IP socket of the appliance's process tree until stopped (best effort: a connection
    opened and closed between two samples, 20 ms apart, goes unseen)."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.seen: set[tuple[int, str, tuple[str, int], tuple[str, int], str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SocketWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            proc = self.app.proc
            if proc is not None and proc.poll() is None:
                table = inet_sockets()
                for pid in [proc.pid, *descendants(proc.pid)]:
                    for inode in socket_inodes(pid):
                        if inode in table:
                            self.seen.add((pid, *table[inode]))
            time.sleep(0.02)

    def unexpected(self) -> list[str]:
        """Sockets other than the appliance's listener and connections between loopback addresses."""
        bad = []
        for pid, proto, local, remote, state in sorted(self.seen):
            if proto.startswith("tcp") and state == LISTEN:
                ok = local[1] == self.app.port
            else:
                ok = _loopback(local[0]) and _loopback(remote[0])
            if not ok:
                bad.append(f"pid {pid} {proto} {local[0]}:{local[1]} -> {remote[0]}:{remote[1]} state {state}")
        return bad


def test_no_connections_beyond_the_listener_and_the_configured_backend(fake_openai, private_tmp, tmp_path,
                                                                         binary):
    """With discovery off and one backend on 127.0.0.1, every IP socket the tree opens is its listener or a
    loopback connection (the backend, or a test client). Sampled from launch to stop, see SocketWatch."""
    app = Appliance(tmp_path / "net", fake_only(fake_openai), workers=2, env={"TMPDIR": str(private_tmp)})
    with SocketWatch(app) as watch:
        try:
            app.start()
            assert len(app.worker_pids(2)) == 2
            assert app.post("/v1/chat/completions", {"model": "fake-chat", "messages": HELLO})[0] == 200
            time.sleep(2)  # idle: anything phoning home on a timer would show up here
        finally:
            assert app.stop() == 0
    assert any(state == LISTEN and local[1] == app.port for _, _, local, _, state in watch.seen), \
        "the sampler never saw the listener: the check itself is broken"
    assert any(remote[1] == fake_openai.server.port for _, _, _, remote, _ in watch.seen), \
        "the sampler never saw the backend connection: the check itself is broken"
    assert watch.unexpected() == []


# ------------------------------------------------------------------------------------ TLS to backends


class TlsServer(ThreadedServer):
    """ThreadedServer over HTTPS."""

    def __init__(self, app: web.Application, context: ssl.SSLContext) -> None:
        super().__init__(app)
        self.context = context

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=0.5)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.context)
        self.loop.run_until_complete(site.start())
        self._started.set()
        self.loop.run_forever()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_backend_verified_with_the_bundled_openssl(start_frozen, tmp_path):
    """The bundled OpenSSL verifies backends, and looks for CA certificates where the BUILD host keeps them
    (OPENSSLDIR, /usr/lib/ssl on Debian): SSL_CERT_FILE must override that on hosts laid out otherwise."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake = FakeOpenAI()
    fake.server = TlsServer(fake.server.app, context)
    fake.start()
    try:
        config = {"discovery": {"enabled": False},
                  "backends": [{"name": "tls", "url": f"https://127.0.0.1:{fake.server.port}/v1"}]}
        hello = {"model": "tls/fake-chat", "messages": HELLO}
        trusted = start_frozen(config, workers=1, env={"SSL_CERT_FILE": str(cert)})
        status, body, _ = trusted.post("/v1/chat/completions", hello)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == REPLY_TEXT
        assert trusted.stop() == 0
        untrusted = start_frozen(config, workers=1)  # the self-signed certificate is in no CA store
        status, body, _ = untrusted.post("/v1/chat/completions", hello)
        assert status == 502, body
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.log()
    finally:
        fake.stop()
