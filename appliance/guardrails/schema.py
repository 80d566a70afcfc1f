"""schema_validation: an answer must be JSON that matches a JSON Schema.

The schema is the request's ``response_format`` (``{"type": "json_schema", "json_schema": {"schema": ...}}``),
else ``[guardrails.schema_validation] schema``. ``jsonschema`` is imported on first use: start-up and requests
without this guardrail never load it.
"""

from __future__ import annotations

import json
from typing import Any

REPAIR_PROMPT = ("Your previous answer is not valid: {problem}. Reply with the corrected JSON only: no prose, no "
                 "code fences, nothing before or after it.")


def schema_of(body: dict[str, Any], configured: dict[str, Any] | None) -> dict[str, Any] | None:
    """The schema an answer to ``body`` must match: the request's own, else the configured one."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return spec["schema"]
    return configured


def problem(text: str | None, schema: dict[str, Any]) -> str | None:
    """Why ``text`` is not JSON matching ``schema`` (the validator's message), or None when it is."""
    import jsonschema  # on first use (see the module's doc)

    if text is None:
        return "the answer holds no text"
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"the answer is not JSON ({exc})"
    try:
        kind = jsonschema.validators.validator_for(schema)
        kind.check_schema(schema)
        error = jsonschema.exceptions.best_match(kind(schema).iter_errors(value))
    except jsonschema.exceptions.SchemaError as exc:
        return f"the JSON Schema itself is invalid ({exc.message})"
    if error is None:
        return None
    where = "/" + "/".join(str(p) for p in error.absolute_path)
    return f"{error.message} (at {where})"


def repair_messages(messages: list[Any], answer: str | None, found: str) -> list[Any]:
    """The conversation, the model's answer and a request to correct it: one repair attempt."""
    return [*messages, {"role": "assistant", "content": answer or ""},
            {"role": "user", "content": REPAIR_PROMPT.format(problem=found)}]
