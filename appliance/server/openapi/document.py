"""Assemble the OpenAPI 3.1 document over the routes the app registers.

The route table decides what is in the document: every registered (method, path) gets its operation from
operations.describe(); a route without one is left out and reported (``Document.undescribed``), which
tests/unit/test_openapi.py turns into a failure, and an operation without a route is not published.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance import __version__
from appliance.server.openapi import operations, schemas
from appliance.server.openapi.vendored import OpenAISpec

OPENAPI_VERSION = "3.1.0"
_PARAM = re.compile(r"<([^:>]+)(?::[^>]*)?>")
_SKIPPED_METHODS = frozenset(("OPTIONS",))  # CORS preflights are answered by a middleware, not routes

TAGS = (
    ("Chat", "OpenAI chat completions."),
    ("Completions", "OpenAI legacy completions."),
    ("Embeddings", "OpenAI embeddings."),
    ("Models", "The models and aliases a key may use, and the backends behind them."),
    ("Responses", "OpenAI Responses, over chat backends (HTTP, SSE and WebSocket)."),
    ("Rerank", "Rerank (Cohere/Jina shape) and score (vLLM), routed by model."),
    ("Moderations", "OpenAI moderations, routed by model."),
    ("Images", "OpenAI image generations and edits, routed by model."),
    ("Audio", "OpenAI transcriptions, translations (multipart, streamed through) and speech (streamed back)."),
    ("Anthropic", "Anthropic Messages, over chat or Anthropic backends."),
    ("Router", "The semantic router: a model chosen per request by meaning and price."),
    ("Files", "OpenAI Files, stored in the data dir."),
    ("Batch", "OpenAI Batches, run by the appliance on its own backends."),
    ("Keys", "A key's view of itself."),
    ("Admin", "Keys, usage and the request log (admin keys)."),
    ("Proxy", "Raw calls to one backend's own paths."),
    ("Operations", "Health, readiness, the status page, metrics and this document."),
)


class RouteLike(Protocol):
    """What the walk needs of a Sanic route (kept duck-typed: only server/ imports sanic)."""

    methods: Iterable[str]
    uri: str


@dataclass(frozen=True, slots=True)
class Document:
    body: dict[str, Any]
    undescribed: tuple[operations.OperationKey, ...]  # registered routes that operations.py does not describe


def openapi_path(uri: str) -> str:
    """Sanic's ``/v1/files/<file_id:str>`` as OpenAPI writes it: ``/v1/files/{file_id}``."""
    path = _PARAM.sub(r"{\1}", uri)
    return path if path.startswith("/") else "/" + path


def registered(routes: Iterable[RouteLike]) -> list[operations.OperationKey]:
    """Every (METHOD, OpenAPI path) of a route table, in a stable order."""
    keys = {(method.upper(), openapi_path(route.uri)) for route in routes for method in route.methods}
    return sorted(key for key in keys if key[0] not in _SKIPPED_METHODS)


def build(routes: Iterable[operations.OperationKey], openai: OpenAISpec) -> Document:
    described = operations.describe(openai)
    paths: dict[str, dict[str, Any]] = {}
    undescribed = []
    for method, path in routes:
        operation = described.get((method, path))
        if operation is None and method == "HEAD":
            operation = _head_of(described.get(("GET", path)))
        if operation is None:
            undescribed.append((method, path))
            continue
        paths.setdefault(path, {})[method.lower()] = operation
    body = {
        "openapi": OPENAPI_VERSION,
        "info": _info(openai),
        "servers": [{"url": "/", "description": "This appliance."}],
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": dict(sorted(paths.items())),
        "components": _components(openai),
    }
    return Document(body=body, undescribed=tuple(undescribed))


def _head_of(get: operations.Operation | None) -> operations.Operation | None:
    """HEAD answers as GET does, without a body."""
    if get is None:
        return None
    responses = {status: {"description": r.get("description", "As GET, without a body.")}
                 for status, r in get["responses"].items()}
    head = {k: v for k, v in get.items() if k not in ("responses", "operationId")}
    if "operationId" in get:
        head["operationId"] = get["operationId"] + "Head"
    return {**head, "responses": responses}


def _info(openai: OpenAISpec) -> dict[str, Any]:
    source = openai.source
    return {
        "title": "appliance",
        "version": __version__,
        "summary": "A self-hosted LLM gateway: one OpenAI-compatible endpoint in front of your model servers.",
        "description": (
            "Every error is OpenAI's envelope `{\"error\": {\"message\", \"type\", \"code\", \"param\", "
            "\"request_id\"}}` with the true status (Anthropic's shape on /v1/messages). Every /v1 path also "
            "answers under /api/v1, the same in all. The OpenAI paths reuse "
            f"the schemas of {source['title']} {source['version']} ({source['license']} licence; "
            f"appliance/server/openapi/{source['license_file']}), corrected where OpenAI's own answers differ: "
            + "; ".join(f"{name}: {reason}" for name, reason in source.get("corrections", {}).items())
            + ". Added: " + "; ".join(f"{name}, {reason}" for name, reason in source.get("derived", {}).items())
            + ". Discriminators carry the mapping their branches imply."),
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    }


def _components(openai: OpenAISpec) -> dict[str, Any]:
    ours = schemas.own_schemas()
    clash = sorted(set(ours) & set(openai.components["schemas"]))
    if clash:
        raise ValueError(f"schema names taken by OpenAI's spec: {clash}")
    theirs = dict(openai.components["schemas"])
    for name in schemas.TEMPLATED_REQUESTS:
        theirs[name] = schemas.with_template(theirs[name])
    return {
        "schemas": {**theirs, **ours},
        "responses": {**openai.components.get("responses", {}), **operations.response_components()},
        "headers": operations.header_components(),
        "securitySchemes": operations.security_schemes(),
    }
