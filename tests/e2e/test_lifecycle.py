"""The process: one per data dir, config errors, migrations, graceful SIGTERM, crashed workers respawned."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import threading
import time

import httpx
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance, appliance_cmd, descendants

# The frozen subset runs this module again against the built binary (tests/run).
pytestmark = pytest.mark.frozen

HELLO = [{"role": "user", "content": "Hi"}]


def run_cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*appliance_cmd(), *args], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env={**os.environ, **(env or {})})


def fake_only(fake_openai, **server):
    return {"server": server, "discovery": {"enabled": False},
            "backends": [{"name": "fake", "url": fake_openai.url + "/v1"}]}


def count_rows(data_dir) -> int:
    conn = sqlite3.connect(data_dir / "appliance.db")
    try:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        conn.close()


def test_version_and_help():
    assert run_cli("version").stdout.startswith("appliance ")
    out = run_cli("--help").stdout
    assert "serve" in out and "check-config" in out


def test_check_config_prints_the_resolved_config_with_secrets_masked(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('[server]\ndata_dir = "d"\n[[backends]]\nname = "v"\nurl = "http://h:8000/v1"\n'
                      'api_key = "${SECRET_FOR_TEST}"\n')
    result = run_cli("check-config", str(config), env={"SECRET_FOR_TEST": "sk-do-not-print"})
    assert result.returncode == 0, result.stderr
    assert "sk-do-not-print" not in result.stdout
    assert '"data_dir": "' + str(tmp_path / "d") + '"' in result.stdout
    assert '"api_key": "**********"' in result.stdout


def test_config_errors_exit_2_naming_file_and_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = 0\n")
    for command in ("serve", "check-config"):
        result = run_cli(command, "--config", str(config))
        assert result.returncode == 2
        assert str(config) in result.stderr and "server.port" in result.stderr
    result = run_cli("serve", env={"APPLIANCE_CONFIG": str(tmp_path / "missing.toml")})
    assert result.returncode == 2 and "no such file" in result.stderr


def test_one_appliance_per_data_dir(start_appliance, fake_openai):
    first = start_appliance(fake_only(fake_openai), workers=1)
    assert (first.data_dir / "appliance.pid").read_text().strip() == str(first.proc.pid)
    second = subprocess.run([*appliance_cmd(), "serve", "--config", str(first.config_path), "--port", "1"],
                            capture_output=True, text=True, timeout=60, cwd=first.root)
    assert second.returncode == 1
    assert "already running" in second.stderr and str(first.proc.pid) in second.stderr
    assert first.get("/health")[0] == 200


def test_a_newer_schema_refuses_to_start(tmp_path, fake_openai):
    app = Appliance(tmp_path, fake_only(fake_openai))
    result = run_cli("check-config", "--config", str(app.config_path))
    assert result.returncode == 0
    app.data_dir.mkdir()
    conn = sqlite3.connect(app.data_dir / "appliance.db")
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    conn.execute("INSERT INTO _migrations VALUES ('9999_future.sql', 'now')")
    conn.commit()
    conn.close()
    result = run_cli("serve", "--config", str(app.config_path))
    assert result.returncode == 2
    assert "newer version" in result.stderr


def test_data_dir_flag_and_relative_paths(tmp_path, fake_openai):
    app = Appliance(tmp_path, fake_only(fake_openai), workers=1,
                    extra_args=["--data-dir", "elsewhere", "--single-process"])
    app.start()
    try:
        assert (tmp_path / "elsewhere" / "appliance.db").exists()
        assert (tmp_path / "elsewhere" / "appliance.pid").exists()
    finally:
        assert app.stop() == 0
    assert not (tmp_path / "elsewhere" / "appliance.pid").exists()


def test_sigterm_turns_ready_off_drains_in_flight_and_flushes(start_appliance, fake_openai):
    app = start_appliance(fake_only(fake_openai, drain_delay_s=1.5, flush_interval_ms=60_000))
    app.wait_ready()
    assert len(app.worker_pids(2)) == 2
    for _ in range(5):
        assert app.post("/v1/chat/completions", {"model": "fake-chat", "messages": HELLO})[0] == 200
    result = {}

    def slow():
        result["status"] = app.post("/v1/chat/completions", {"model": "fake/fake-slow-2500", "messages": HELLO},
                                    timeout=30)[0]

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 5
    while not any(r.body and r.body.get("model") == "fake-slow-2500" for r in fake_openai.requests[-5:]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    app.proc.send_signal(signal.SIGTERM)
    saw_not_ready = False
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline and not saw_not_ready:
        try:
            status, body, _ = app.get("/ready", timeout=1)
            saw_not_ready = status == 503 and body["reason"] == "shutting down"
        except OSError:
            pass
    assert saw_not_ready, "/ready kept answering 200 after SIGTERM"
    thread.join(30)
    assert result["status"] == 200  # the in-flight request finished
    assert app.proc.wait(30) == 0
    # The flush interval was a minute: only the final flush at stop can have written these.
    assert count_rows(app.data_dir) == 6  # 5 chats and the slow one (/ready and /health are not logged)
    assert not (app.data_dir / "appliance.pid").exists()


def test_crashed_worker_is_respawned(start_appliance, fake_openai):
    app = start_appliance(fake_only(fake_openai))
    pids = app.worker_pids(2)
    assert len(pids) == 2
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    fresh: set[int] = set()
    while time.monotonic() < deadline:
        fresh = app.worker_pids(2, timeout=2)
        if len(fresh) == 2 and victim not in fresh:
            break
    assert len(fresh) == 2 and victim not in fresh, app.log()
    assert app.post("/v1/chat/completions", {"model": "fake-chat", "messages": HELLO})[0] == 200


def test_cors_for_configured_origins(start_appliance, fake_openai):
    app = start_appliance(fake_only(fake_openai, cors_origins=["http://ui.example"]), workers=1)
    preflight = httpx.options(app.url + "/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    allowed = httpx.get(app.url + "/v1/models", headers={"Origin": "http://ui.example",
                                                         "Authorization": f"Bearer {ADMIN_KEY}"})
    assert allowed.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx.get(app.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert httpx.options(app.url + "/v1/models", headers={"Origin": "http://evil.example"}).status_code == 403


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(start_appliance, fake_openai, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    config = fake_only(fake_openai, tls_cert=str(cert), tls_key=str(key))
    app = Appliance(tmp_path / "tls", config, workers=1)
    app.proc = subprocess.Popen([*appliance_cmd(), "serve", "--config", str(app.config_path)], cwd=app.root,
                                env=app.env, stdout=app.log_path.open("ab"), stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"https://127.0.0.1:{app.port}/health", verify=context, timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, app.log()
                time.sleep(0.1)
        assert response.status_code == 200
    finally:
        app.stop()


def test_workers_follow_a_killed_main_process(start_appliance, fake_openai):
    """kill -9 of the main process (OOM killer) must leave no orphan: no worker holding the port, nor Sanic's
    SyncManager. (No resource tracker runs: the shared tables' locks are fork's, which need none.)"""
    app = start_appliance(fake_only(fake_openai))
    workers = app.worker_pids(2)
    assert len(workers) == 2
    tree = set(descendants(app.proc.pid))
    assert workers <= tree and len(tree) >= 3  # the workers, the SyncManager (and frozen, the Python main)
    assert not [pid for pid in tree if b"resource_tracker" in _cmdline(pid)]
    app.proc.kill()
    app.proc.wait(10)
    deadline = time.monotonic() + 20
    while left := [pid for pid in tree if os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid)]:
        assert time.monotonic() < deadline, f"orphans kept running: {left}"
        time.sleep(0.1)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
