"""Backend load signals, as the servers report them: vLLM's /metrics, llama.cpp's /metrics and /slots.

Parsing only; the gateway samples them in its probe loop and least_busy routing reads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Load:
    """A backend's own account of its load, as last sampled."""

    queue_waiting: float = 0.0  # queued, not started (vLLM num_requests_waiting, llama.cpp requests_deferred)
    running: float = 0.0  # being processed (vLLM num_requests_running, llama.cpp busy slots)
    slots_idle: int | None = None  # llama.cpp: free slots (None: not known)
    slots_total: int | None = None  # llama.cpp: parallel slots, the capacity (None: not known)
    sampled_at: float | None = None  # when it was read (None: Breakers.set_load stamps it)


def _prometheus_sums(text: str, names: Iterable[str]) -> dict[str, float]:
    """Sum of each named series over all its label sets (exact names: ``x_by_reason`` is not ``x``)."""
    wanted = set(names)
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace].strip()
            if name not in wanted:
                continue
            rest = line[line.rfind("}") + 1:]
        else:
            name, _, rest = line.strip().partition(" ")
            if name not in wanted:
                continue
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            sums[name] = sums.get(name, 0.0) + value
    return sums


def parse_vllm_metrics(text: str) -> Load | None:
    """vLLM /metrics: waiting and running requests, summed over engines and models. None: not vLLM's."""
    sums = _prometheus_sums(text, ("vllm:num_requests_waiting", "vllm:num_requests_running"))
    if not sums:
        return None
    return Load(queue_waiting=sums.get("vllm:num_requests_waiting", 0.0),
                running=sums.get("vllm:num_requests_running", 0.0))


def parse_llamacpp_metrics(text: str) -> Load | None:
    """llama.cpp /metrics (``--metrics``): requests processing and deferred (queued for a slot)."""
    sums = _prometheus_sums(text, ("llamacpp:requests_processing", "llamacpp:requests_deferred"))
    if not sums:
        return None
    return Load(queue_waiting=sums.get("llamacpp:requests_deferred", 0.0),
                running=sums.get("llamacpp:requests_processing", 0.0))


def parse_llamacpp_slots(data: Any) -> Load | None:
    """llama.cpp /slots: busy = slots with ``is_processing`` (older builds: ``state`` other than 0, idle).

    /slots shows no queue: queue_waiting is 0 here (the gateway's own in-flight count covers it).
    """
    if not isinstance(data, list) or not data:
        return None
    total = busy = 0
    for slot in data:
        if not isinstance(slot, dict):
            continue
        total += 1
        processing = slot.get("is_processing")
        if processing is None:
            processing = slot.get("state", 0) not in (0, None)
        busy += bool(processing)
    if not total:
        return None
    return Load(running=float(busy), slots_idle=total - busy, slots_total=total)
