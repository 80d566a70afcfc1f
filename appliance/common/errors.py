"""The gateway's error table and the OpenAI error envelope.

Every failure the gateway reports is a GatewayError carrying the HTTP status, OpenAI's error ``type``,
our stable ``code``, the ``param`` at fault and any headers the client needs (Retry-After,
x-should-retry). Each API surface renders the same error in its own shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

# code -> (status, type); the single source of truth for statuses (see ARCHITECTURE.md).
CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "missing_field": (400, "invalid_request_error"),
    "invalid_value": (400, "invalid_request_error"),
    "invalid_config": (400, "invalid_request_error"),  # POST /admin/reload of a file that does not validate
    "context_length_exceeded": (400, "invalid_request_error"),
    "invalid_api_key": (401, "invalid_request_error"),
    "model_not_allowed": (403, "permission_error"),
    "endpoint_not_allowed": (403, "permission_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "body_too_large": (413, "invalid_request_error"),
    "request_header_fields_too_large": (431, "invalid_request_error"),
    "rate_limit_exceeded": (429, "rate_limit_error"),
    "budget_exceeded": (429, "rate_limit_error"),
    # None of the model's backends serves this endpoint (their capabilities), or the appliance cannot do what the
    # request needs for this model: 501 as ARCHITECTURE.md has it, with the client's type (another model would
    # do) and x-should-retry: false (the same request can never succeed).
    "unsupported": (501, "invalid_request_error"),
    "backend_unreachable": (502, "server_error"),
    "backend_error": (502, "server_error"),
    "no_healthy_backend": (503, "server_error"),
    "backend_overloaded": (503, "server_error"),
    "shutting_down": (503, "server_error"),
    # [state] on_state_error = "closed" and the shared state (Redis) cannot be reached: limits cannot be checked.
    "state_unavailable": (503, "server_error"),
    # [database] url is set and PostgreSQL cannot be reached for a read the request needs (e.g. a key not cached).
    "database_unavailable": (503, "server_error"),
    "backend_timeout": (504, "server_error"),
    "internal_error": (500, "server_error"),
    # A key's own upstream credential that this appliance cannot decrypt (its key file is missing or replaced).
    "upstream_key_unreadable": (500, "server_error"),
    "client_closed": (499, "invalid_request_error"),  # logged only: the client is gone
    # Files and Batches (the codes OpenAI is seen to use there)
    "missing_required_parameter": (400, "invalid_request_error"),
    "invalid_file_format": (400, "invalid_request_error"),
    "invalid_file_purpose": (400, "invalid_request_error"),
    "storage_quota_exceeded": (400, "invalid_request_error"),
    "batch_not_cancellable": (409, "invalid_request_error"),
    "already_exists": (409, "invalid_request_error"),  # POST /admin/templates with an id that is taken
    "profile_in_progress": (409, "invalid_request_error"),  # GET /admin/debug/profile: one at a time per worker
    "file_too_large": (413, "invalid_request_error"),
    "batch_limit_exceeded": (429, "rate_limit_error"),
    # Guardrails: a request or answer a guardrail refused (its message names the guardrail and the kinds or
    # categories found, never the values), and an answer that stayed invalid (schema_validation).
    "guardrail_blocked": (400, "invalid_request_error"),
    "guardrail_failed": (422, "invalid_request_error"),
}

# Statuses a client must not retry blindly: the SDKs honour x-should-retry.
_NO_RETRY = {"budget_exceeded", "unsupported", "storage_quota_exceeded", "batch_not_cancellable",
             "batch_limit_exceeded", "guardrail_blocked"}

MAX_RETRY_AFTER_S = 120  # the OpenAI SDK gives up on larger values


class GatewayError(Exception):
    """An error with a place in the table above.

    ``body`` replaces the rendered envelope when an upstream sent a valid one that must pass through.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        default_status, default_type = CODES.get(code, (500, "server_error"))
        self.code = code
        self.message = message
        self.param = param
        self.status = status or default_status
        self.type = type or default_type
        self.headers = dict(headers or {})
        self.body = body
        self.extra = extra or {}  # more fields for the error object, e.g. retry_after
        if code in _NO_RETRY:
            self.headers.setdefault("x-should-retry", "false")

    def envelope(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param,
                                 "code": self.code}
        error.update(self.extra)
        if request_id:
            error["request_id"] = request_id
        return {"error": error}

    def json_body(self, request_id: str | None = None) -> bytes:
        return self.body if self.body is not None else orjson.dumps(self.envelope(request_id))

    def sse_event(self, request_id: str | None = None) -> bytes:
        """The error as one OpenAI-style SSE event, for failures after the first streamed byte."""
        return b"data: " + orjson.dumps(self.envelope(request_id)) + b"\n\n"


def retry_after_headers(seconds: float) -> dict[str, str]:
    """Retry-After and retry-after-ms, clamped to what the official SDKs honour (1..120 s)."""
    seconds = min(max(seconds, 1.0), MAX_RETRY_AFTER_S)
    return {"Retry-After": str(int(-(-seconds // 1))), "retry-after-ms": str(int(seconds * 1000))}


def is_openai_envelope(data: Any) -> bool:
    """True for {"error": {"message": str, "type": str|None, "code": str|None, ...}}.

    vLLM puts its integer status in ``code``; such bodies are re-wrapped rather than passed on.
    """
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return False
    error = data["error"]
    return (
        isinstance(error.get("message"), str)
        and isinstance(error.get("type", None), str | None)
        and isinstance(error.get("code", None), str | None)
        and isinstance(error.get("param", None), str | None)
    )


def upstream_error(status: int, body: bytes, backend: str, headers: Mapping[str, str] | None = None) -> GatewayError:
    """An upstream 4xx/5xx: same status; its body when it is a valid envelope, else wrapped in one.

    The upstream's Retry-After travels along: the gateway's retries honour it, and so can the client.
    """
    error = _upstream_error(status, body, backend)
    if headers:
        for name in ("Retry-After", "retry-after-ms"):
            value = headers.get(name)
            if value is not None:
                error.headers[name] = value
    return error


def _upstream_error(status: int, body: bytes, backend: str) -> GatewayError:
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    if is_openai_envelope(data):
        error = data["error"]
        if not {"message", "type", "param", "code"} <= error.keys():
            # Complete the envelope so clients can rely on all four keys.
            error = {"message": error["message"], "type": error.get("type"), "param": error.get("param"),
                     "code": error.get("code"), **error}
            body = orjson.dumps({**data, "error": error})
        return GatewayError(error.get("code") or "backend_error", error["message"], status=status,
                            type=error.get("type"), param=error.get("param"), body=body)
    message = _upstream_message(data, body) or f"backend {backend!r} answered HTTP {status}"
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "not_found", 429: "rate_limit_exceeded"}.get(status, "backend_error")
    if status == 429:
        kind = "rate_limit_error"
    return GatewayError(code, message, status=status, type=kind)


def _upstream_message(data: Any, body: bytes) -> str | None:
    """Best-effort message from the many error shapes backends use."""
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            for key in ("message", "detail", "error"):
                if isinstance(error.get(key), str):
                    return error[key]
        if isinstance(error, str):
            return error
        if isinstance(data.get("detail"), str):
            return data["detail"]
    text = body[:500].decode("utf-8", "replace").strip()
    return text or None
