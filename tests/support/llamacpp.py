"""The real llama-cpp-python server, started in the background when the test session begins."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.support.threaded import free_port

SCRIPT = Path(__file__).resolve().parent.parent / "backends" / "llamacpp-up.sh"
# The first build compiles llama.cpp (~7-8 min on 2 cores); later starts take seconds.
START_TIMEOUT_S = 1200


class LlamaCpp:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.workdir = Path(os.environ.get("APPLIANCE_TESTS_LLAMACPP_WORKDIR",
                                           Path.home() / ".cache" / "appliance-tests" / "llamacpp"))
        self.log_path = log_dir / "llamacpp-up.log"
        self.env = {**os.environ, "LLAMACPP_WORKDIR": str(self.workdir), "LLAMACPP_CHAT_MODEL": "tiny",
                    "LLAMACPP_WAIT_S": "180"}
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(["bash", str(SCRIPT), str(self.port)], env=self.env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> str:
        """Block until the server answers; returns its /v1 URL."""
        if self._ready:
            return self.url
        if self._proc is None:
            self.start()
        assert self._proc is not None
        started = time.monotonic()
        try:
            code = self._proc.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"llama.cpp server not up after {START_TIMEOUT_S} s:\n{self.log()}") from None
        if code != 0:
            raise RuntimeError(f"llamacpp-up.sh failed ({code}) after {time.monotonic() - started:.0f} s:\n"
                               f"{self.log()}")
        self._ready = True
        return self.url

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-4000:]

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        subprocess.run(["bash", str(SCRIPT), "stop", str(self.port)], env=self.env, capture_output=True,
                       check=False)
