#!/usr/bin/env python3
"""CPU of the guardrails (issue 16): a pii scan of a 4 kB prompt, the stream redactor, the no-guardrail path.

    PYTHONPATH=. /work/main/.venv/bin/python tests/perf/guardrails.py [--rounds 7] [--n 2000]

Each figure is the median over rounds of the process CPU time (time.process_time) of ``n`` calls, divided by
``n``. The prompts are English prose of exactly 4096 characters: ``clean`` holds no personal data (but some
numbers, which the digit patterns must look at), ``hits`` holds an e-mail address, a phone number, a card
number and an IP address. Target (issue 16): a pii scan of a 4 kB prompt <= 0.2 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from appliance.common.config import GuardrailsSettings
from appliance.core import guarding
from appliance.core.catalog import Plan
from appliance.guardrails import pii

PROSE = ("The quarterly report shows revenue growth of 12.5% across all regions, with the strongest results in "
         "Europe and Asia. Please summarise the key findings for the board meeting on Thursday 14 March, and list "
         "the risks that the team identified in section 3.2 of the appendix (pages 17-24). ")
CLEAN = (PROSE * 20)[:4096]
HITS = (CLEAN[:1500] + " Write to jane.doe@example.com or call +44 20 7946 0958. " + CLEAN[:1000]
        + " The card is 4111 1111 1111 1111 and the server 10.20.30.40. " + CLEAN)[:4096]


def per_call_us(fn: Callable[[], Any], n: int, rounds: int) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - start) / n * 1e6)
    return statistics.median(samples)


def stream(text: str, size: int = 16) -> None:
    redactor = pii.StreamRedactor()
    for at in range(0, len(text), size):
        redactor.feed(text[at:at + size])
    redactor.finish()


def no_guardrail_begin() -> Callable[[], Any]:
    """guarding.begin for a request that names none, on a gateway that enforces none (the hot path's cost)."""
    gw: Any = SimpleNamespace(settings=SimpleNamespace(guardrails=GuardrailsSettings()),
                              catalog=SimpleNamespace(configured=lambda plan: None))
    x: Any = SimpleNamespace(controls={}, principal=SimpleNamespace(guardrails=()), guard=None)
    body = {"model": "m", "messages": [{"role": "user", "content": CLEAN}]}
    plan = Plan("m", (), None)
    return lambda: guarding.begin(gw, x, "chat/completions", body, plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    assert len(CLEAN) == len(HITS) == 4096
    assert pii.redact(CLEAN)[1] == [] and pii.redact(HITS)[1] == ["email", "phone", "card", "ip"]
    rows = [
        ("pii.redact, 4 kB, no hits", per_call_us(lambda: pii.redact(CLEAN), args.n, args.rounds)),
        ("pii.redact, 4 kB, 4 hits", per_call_us(lambda: pii.redact(HITS), args.n, args.rounds)),
        ("StreamRedactor, 4 kB in 16-char pieces, no hits", per_call_us(lambda: stream(CLEAN), args.n // 10,
                                                                         args.rounds)),
        ("StreamRedactor, 4 kB in 16-char pieces, 4 hits", per_call_us(lambda: stream(HITS), args.n // 10,
                                                                        args.rounds)),
        ("guarding.begin, no guardrail anywhere", per_call_us(no_guardrail_begin(), args.n * 50, args.rounds)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}}  CPU per call")
    for name, us in rows:
        print(f"{name:{width}}  {us / 1000:.3f} ms" if us >= 100 else f"{name:{width}}  {us:.2f} us")


if __name__ == "__main__":
    main()
