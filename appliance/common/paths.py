"""The path families the appliance answers: ``/v1/...`` and its alias ``/api/v1/...``, and ``/proxy/...``.

Every ``/v1/`` route is registered a second time under ``/api/v1/`` (server/routes/__init__.py). The rules
that look at a path (key endpoint patterns, error shapes, the ledger's ``endpoint``, metric labels) see the
canonical ``/v1/`` spelling, so the two spellings behave, and are counted, as one endpoint.
"""

from __future__ import annotations

V1 = "/v1/"
ALIAS_PREFIX = "/api"
ALIASED = ALIAS_PREFIX + V1
PROXY = "/proxy/"


def canonical(path: str) -> str:
    """``/api/v1/x`` -> ``/v1/x``; any other path as it is."""
    return path[len(ALIAS_PREFIX):] if path.startswith(ALIASED) else path


def alias_of(path: str) -> str | None:
    """``/v1/x`` -> ``/api/v1/x``; None for a path without an alias."""
    return ALIAS_PREFIX + path if path.startswith(V1) else None
