"""No outbound connection but to loopback and configured backends: the appliance (zero-config discovery on)
runs in a network namespace that has only loopback, under ``strace -f -e trace=connect``, from start to stop,
and every connect() of every process it starts is checked.

The namespace holds a fake OpenAI-compatible server on port 8000 (a port discovery probes), so the run also
serves real requests: discovery, a chat, the model list, /statsz, /metrics.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.appliance import ADMIN_KEY, appliance_cmd, toml

pytestmark = pytest.mark.frozen

ROOT = Path(__file__).resolve().parents[2]
FAKE = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from tests.fakes.openai_upstream import FakeOpenAI
fake = FakeOpenAI()
fake.server.port = 8000
fake.start()
time.sleep(600)
"""
CLIENT = """
import json, sys, time, urllib.request
url, key = sys.argv[1], sys.argv[2]
def call(path, body=None):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()
deadline = time.monotonic() + 60
while True:
    try:
        status, body = call("/v1/models")
        if any(m["id"] == "fake-chat" for m in json.loads(body)["data"]):
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the appliance did not discover the fake")
    time.sleep(0.2)
results = [call("/v1/chat/completions", {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]})[0]]
results += [call(path)[0] for path in ("/v1/models", "/statsz", "/metrics", "/ready")]
print(json.dumps(results))
"""
CONNECT = re.compile(r"connect\(\d+, \{sa_family=(AF_\w+)(.*?)\}")
INET = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')


def _namespace() -> subprocess.Popen[bytes]:
    if shutil.which("strace") is None or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs strace, unshare and nsenter (util-linux)")
    holder = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec sleep 600"],
                              stderr=subprocess.PIPE)
    time.sleep(0.3)
    if holder.poll() is not None:
        pytest.skip(f"cannot make a network namespace here: {holder.stderr.read().decode().strip()}")  # type: ignore[union-attr]
    return holder


def connects(log: str) -> list[tuple[str, str]]:
    """(family, address) of every connect() strace saw; the address is the IP for AF_INET/AF_INET6."""
    out = []
    for family, rest in CONNECT.findall(log):
        found = INET.search(rest)
        out.append((family, (found.group(1) or found.group(2)) if found else rest.strip(", ")))
    return out


def test_every_connect_goes_to_loopback(tmp_path: Path) -> None:
    holder = _namespace()
    enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
    fake = subprocess.Popen([*enter, sys.executable, "-c", FAKE])
    data_dir, trace = tmp_path / "data", tmp_path / "connect.trace"
    config = tmp_path / "appliance.toml"
    config.write_text(toml({"server": {"port": 8100, "workers": 2, "data_dir": str(data_dir)},
                            "discovery": {"enabled": True, "interval_s": 2}}))
    app = subprocess.Popen([*enter, "strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
                            *appliance_cmd(), "serve", "--config", str(config)],
                           env={**os.environ, "APPLIANCE_ADMIN_KEY": ADMIN_KEY},
                           stdout=(tmp_path / "appliance.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        client = subprocess.run([*enter, sys.executable, "-c", CLIENT, "http://127.0.0.1:8100", ADMIN_KEY],
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr + (tmp_path / "appliance.log").read_text()
        assert json.loads(client.stdout) == [200, 200, 200, 200, 200]
        main = int((data_dir / "appliance.pid").read_text())
        subprocess.run([*enter, "kill", "-TERM", str(main)], check=True)
        assert app.wait(60) == 0
    finally:
        for process in (app, fake, holder):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
    seen = connects(trace.read_text())
    inet = [(family, address) for family, address in seen if family in ("AF_INET", "AF_INET6")]
    outside = [(family, address) for family, address in inet if not ipaddress.ip_address(address).is_loopback]
    assert outside == [], outside
    assert ("AF_INET", "127.0.0.1") in inet  # the probe really ran: discovery and the proxied chat
    assert {family for family, _ in seen} <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}, seen
