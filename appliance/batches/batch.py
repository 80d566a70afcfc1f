"""Batches: the Batch object, the create-time checks, the input-file rules, and the output line formats.

Pure logic; the runner (runner.py) executes lines, the routes and the CLI read and cancel.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance.common.errors import GatewayError
from appliance.providers.base import CHAT, COMPLETIONS, EMBEDDINGS

RESPONSES = "responses"
# Batch endpoint -> the pipeline endpoint a line goes through.
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/embeddings": EMBEDDINGS,
             "/v1/responses": RESPONSES}
WINDOW = "24h"
WINDOW_S = 86_400
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")
TERMINAL = frozenset(("failed", "completed", "expired", "cancelled"))
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
CANCELLABLE = frozenset(("validating", "in_progress"))
MAX_METADATA = 16
MAX_ERRORS = 100
MAX_EMBEDDING_INPUTS = 50_000

EXPIRED_ERROR = {"code": "batch_expired",
                 "message": "This request could not be executed before the completion window expired."}
CANCELLED_ERROR = {"code": "batch_cancelled", "message": "This request was cancelled before it could be executed."}


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def new_line_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


def not_found(batch_id: str) -> GatewayError:
    return GatewayError("not_found", f"No such Batch object: {batch_id}", param="batch_id")


def not_cancellable(status: str) -> GatewayError:
    return GatewayError("batch_not_cancellable", f"Cannot cancel a batch with status '{status}'.")


def cancel_needed(row: dict[str, Any]) -> bool:
    """Whether a cancel must still flip this batch to cancelling (False: it already is, or is cancelled).

    Raises batch_not_cancellable for a batch past the point of cancelling (finalizing, completed...)."""
    status = row["status"]
    if status in CANCELLABLE:
        return True
    if status in ("cancelling", "cancelled"):
        return False
    raise not_cancellable(status)


def batch_object(row: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI Batch object: every key present, null where a value does not exist yet."""
    errors = orjson.loads(row["errors_json"]) if row["errors_json"] else None
    inputs, outputs = row["input_tokens"], row["output_tokens"]
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "model": row["model"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
        "created_at": row["created_at"], "in_progress_at": row["in_progress_at"], "expires_at": row["expires_at"],
        "finalizing_at": row["finalizing_at"], "completed_at": row["completed_at"], "failed_at": row["failed_at"],
        "expired_at": row["expired_at"], "cancelling_at": row["cancelling_at"], "cancelled_at": row["cancelled_at"],
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "usage": {"input_tokens": inputs, "input_tokens_details": {"cached_tokens": row["cached_tokens"]},
                  "output_tokens": outputs, "output_tokens_details": {"reasoning_tokens": row["reasoning_tokens"]},
                  "total_tokens": inputs + outputs},
        "metadata": orjson.loads(row["metadata_json"]) if row["metadata_json"] else None,
    }


# ------------------------------------------------------------------------------------------ create


@dataclass(frozen=True, slots=True)
class CreateRequest:
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    output_expires_s: int | None


def parse_create(body: dict[str, Any]) -> CreateRequest:
    """The checks a POST /v1/batches body must pass before any batch exists (400 otherwise)."""
    for name in ("input_file_id", "endpoint", "completion_window"):
        if body.get(name) is None:
            raise GatewayError("missing_required_parameter", f"Missing required parameter: '{name}'.", param=name)
    endpoint = body["endpoint"]
    if endpoint not in ENDPOINTS:
        raise GatewayError("invalid_value", f"Unsupported endpoint {endpoint!r}; use one of "
                           f"{', '.join(ENDPOINTS)}.", param="endpoint")
    if body["completion_window"] != WINDOW:
        raise GatewayError("invalid_value", "completion_window must be '24h'.", param="completion_window")
    if not isinstance(body["input_file_id"], str):
        raise GatewayError("invalid_value", "input_file_id must be a string.", param="input_file_id")
    return CreateRequest(body["input_file_id"], endpoint, _metadata(body.get("metadata")),
                         _output_expiry(body.get("output_expires_after")))


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    problem = None
    if not isinstance(value, dict):
        problem = "metadata must be an object of strings"
    elif len(value) > MAX_METADATA:
        problem = f"metadata may hold at most {MAX_METADATA} pairs"
    elif any(len(k) > 64 for k in value):
        problem = "metadata keys may be at most 64 characters"
    elif any(not isinstance(v, str) or len(v) > 512 for v in value.values()):
        problem = "metadata values must be strings of at most 512 characters"
    if problem:
        raise GatewayError("invalid_value", problem + ".", param="metadata", extra={"code": None})
    return value


def _output_expiry(value: Any) -> int | None:
    if value is None:
        return None
    seconds = value.get("seconds") if isinstance(value, dict) else None
    if (not isinstance(value, dict) or value.get("anchor") != "created_at" or not isinstance(seconds, int)
            or isinstance(seconds, bool) or not 3600 <= seconds <= 2_592_000):
        raise GatewayError("invalid_value", "output_expires_after must be {\"anchor\": \"created_at\", "
                           "\"seconds\": 3600..2592000}.", param="output_expires_after", extra={"code": None})
    return seconds


# ------------------------------------------------------------------------------------------ input lines


@dataclass
class Validation:
    """What validating an input file found: its model and line count, or the errors that fail the batch."""

    model: str | None = None
    total: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})

    @property
    def full(self) -> bool:
        return len(self.errors) >= MAX_ERRORS


@dataclass(frozen=True, slots=True)
class Line:
    number: int
    custom_id: str
    body: dict[str, Any]


def split_lines(chunks: Iterable[bytes]) -> Iterable[tuple[int, bytes]]:
    """(1-based number, content without its line ending) for each line; a final newline ends no line."""
    number = 0
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for raw in whole:
            number += 1
            yield number, raw.removesuffix(b"\r")
    if rest:
        yield number + 1, rest.removesuffix(b"\r")


def read_lines(lines: Iterable[tuple[int, bytes]], endpoint: str, *, max_requests: int, allow_mixed: bool,
               model_ok: Callable[[str], bool], found: Validation) -> Iterable[Line]:
    """The valid lines of an input file; every problem goes into ``found`` (which callers check after)."""
    seen: set[str] = set()
    checked_models: dict[str, bool] = {}
    inputs = 0
    for number, raw in lines:
        if found.full:
            return
        line = _parse_line(number, raw, endpoint, found)
        if line is None:
            continue
        if line.custom_id in seen:
            found.fail("duplicate_custom_id", f"The custom_id '{line.custom_id}' is used by an earlier line.",
                       number, "custom_id")
            continue
        seen.add(line.custom_id)
        model = line.body["model"]
        if found.model is None:
            found.model = model
        elif model != found.model and not allow_mixed:
            found.fail("model_mismatch", f"Line {number} names model '{model}', but the file's first line names "
                       f"'{found.model}'; a batch targets one model.", number, "body.model")
            continue
        if model not in checked_models:
            checked_models[model] = model_ok(model)
        if not checked_models[model]:
            found.fail("model_not_found", f"The model '{model}' does not exist or this key may not use it.",
                       number, "body.model")
            continue
        if endpoint == "/v1/embeddings":
            value = line.body.get("input")
            inputs += len(value) if isinstance(value, list) else 1
        found.total += 1
        yield line
    if found.total > max_requests:
        found.fail("too_many_tasks", f"The file holds {found.total} requests; the limit is {max_requests}.")
    if inputs > MAX_EMBEDDING_INPUTS:
        found.fail("too_many_tasks", f"The file holds {inputs} embedding inputs; the limit is "
                   f"{MAX_EMBEDDING_INPUTS}.", param="body.input")
    if found.total == 0 and not found.errors:
        found.fail("empty_file", "The input file holds no request lines.")


def _parse_line(number: int, raw: bytes, endpoint: str, found: Validation) -> Line | None:
    try:
        data = orjson.loads(raw)  # also refuses invalid UTF-8 and blank lines
    except orjson.JSONDecodeError:
        found.fail("invalid_json_line", "This line is not parseable as valid JSON.", number)
        return None
    if not isinstance(data, dict):
        found.fail("invalid_request", "Each line must be a JSON object.", number)
        return None
    for name, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
        if name not in data or data[name] is None:
            found.fail("missing_required_parameter", f"Missing required parameter: '{name}'.", number, name)
            return None
        if not isinstance(data[name], kind) or (name == "custom_id" and not data[name]):
            what = "a non-empty string" if name == "custom_id" else "an object" if kind is dict else "a string"
            found.fail("invalid_request", f"'{name}' must be {what}.", number, name)
            return None
    if data["method"] != "POST":
        found.fail("invalid_request", "'method' must be 'POST'.", number, "method")
        return None
    if data["url"] != endpoint:
        found.fail("url_mismatch", f"The line's url '{data['url']}' differs from the batch endpoint '{endpoint}'.",
                   number, "url")
        return None
    body = data["body"]
    if not isinstance(body.get("model"), str) or not body["model"]:
        found.fail("invalid_request", "'body.model' must be a non-empty string.", number, "body.model")
        return None
    if body.get("stream") is True:
        found.fail("streaming_unsupported", "Batch requests cannot be streamed; drop 'stream'.", number,
                   "body.stream")
        return None
    return Line(number, data["custom_id"], body)


# ------------------------------------------------------------------------------------------ output lines


def output_line(custom_id: str, line_id: str, *, status_code: int | None, request_id: str | None,
                body: Any, error: dict[str, Any] | None) -> bytes:
    """One line of an output or error file (OpenAI's BatchRequestOutput), newline included."""
    response = None if status_code is None else {"status_code": status_code, "request_id": request_id,
                                                 "body": body}
    return orjson.dumps({"id": line_id, "custom_id": custom_id, "response": response, "error": error}) + b"\n"


def usage_of(endpoint: str, body: Any) -> tuple[int, int, int, int]:
    """(input, cached, output, reasoning) tokens of a successful line's answer."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0, 0, 0
    if endpoint == "/v1/responses":
        inputs, outputs = usage.get("input_tokens"), usage.get("output_tokens")
        cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
        reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
    else:
        inputs, outputs = usage.get("prompt_tokens"), usage.get("completion_tokens")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    return tuple(v if isinstance(v, int) and not isinstance(v, bool) else 0  # type: ignore[return-value]
                 for v in (inputs, cached, outputs, reasoning))
