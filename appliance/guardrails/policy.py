"""Which guardrails apply to a request, and what became of each.

What applies is the union of the request's own (body ``"guardrails"``, header ``X-Guardrails``), its key's,
its route's and ``[guardrails] enforce``: a request can add guardrails, never drop one that is enforced.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from appliance.common.config import GUARDRAILS
from appliance.common.errors import GatewayError

PII, MODERATION, SCHEMA = GUARDRAILS
FIELD = "guardrails"
HEADER = "x-guardrails"  # as the web layer gives header names
STATUS_HEADER = "X-Guardrail-Status"

PASSED, REDACTED, BLOCKED, FAILED = "passed", "redacted", "blocked", "failed"
# The request's status is its worst outcome.
_SEVERITY = {PASSED: 0, REDACTED: 1, BLOCKED: 2, FAILED: 3}


def _invalid(message: str) -> GatewayError:
    return GatewayError("invalid_value", message, param=FIELD)


def _checked(names: Iterable[Any], where: str) -> list[str]:
    out = []
    for name in names:
        if name not in GUARDRAILS:
            raise _invalid(f"Unknown guardrail {name!r} in {where} (known: {', '.join(GUARDRAILS)}).")
        out.append(name)
    return out


def requested(body: dict[str, Any], header: str | None) -> list[str]:
    """The guardrails the request itself asks for: its body field and its header."""
    names: list[str] = []
    asked = body.get(FIELD)
    if asked is not None:
        if not isinstance(asked, list):
            raise _invalid("'guardrails' must be an array of guardrail names.")
        names += _checked(asked, "'guardrails'")
    if header:
        names += _checked((part.strip() for part in header.split(",") if part.strip()), "X-Guardrails")
    return names


def select(body: dict[str, Any], header: str | None, *enforced: Iterable[str]) -> frozenset[str]:
    """Every guardrail that applies: the request's own and all ``enforced`` (its key's, route's, config's)."""
    names = set(requested(body, header))
    for more in enforced:
        names.update(more)
    return frozenset(names)


@dataclass(slots=True)
class Guard:
    """One request's guardrails and their outcomes (the request log's ``guardrails`` column)."""

    names: frozenset[str]
    outcomes: dict[str, str] = field(default_factory=dict)

    def note(self, name: str, outcome: str) -> None:
        """Record an outcome; a guardrail checked twice (input and output) keeps its worst."""
        if _SEVERITY[outcome] >= _SEVERITY.get(self.outcomes.get(name, PASSED), 0):
            self.outcomes[name] = outcome

    def status(self) -> str:
        """X-Guardrail-Status: the worst outcome so far (passed while nothing went wrong)."""
        return max(self.outcomes.values(), key=_SEVERITY.__getitem__, default=PASSED)

    def log(self) -> dict[str, str]:
        """Every guardrail applied and its outcome (passed unless it did something)."""
        return {name: self.outcomes.get(name, PASSED) for name in sorted(self.names)}


def blocked(name: str, what: str, found: Iterable[str], *, param: str | None = None) -> GatewayError:
    """400 guardrail_blocked naming the guardrail and what it found (kinds or categories, never the values)."""
    return GatewayError("guardrail_blocked", f"Guardrail '{name}' blocked the {what}: it found "
                        f"{', '.join(found)}.", param=param)
