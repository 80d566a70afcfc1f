"""Waiting for what the appliance does a moment later (a flush, a probe) without sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def eventually(check: Callable[[], Any], timeout: float = 10) -> Any:
    """Retry ``check`` (its AssertionError) until it passes, and answer what it answers: buffered rows land
    within a flush interval."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
