"""Validate JSON against schemas of OpenAI's published OpenAPI spec (../shared/specs/openai-openapi.yaml)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC = Path(os.environ.get("OPENAI_OPENAPI_SPEC",
                           Path(__file__).resolve().parents[3] / "shared" / "specs" / "openai-openapi.yaml"))


def _nullable_to_type(node: Any) -> Any:
    """The spec mixes OpenAPI 3.0's ``nullable: true`` into 3.1 schemas; make it JSON Schema."""
    if isinstance(node, dict):
        node = {k: _nullable_to_type(v) for k, v in node.items()}
        if node.pop("nullable", False):
            if isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
            elif "$ref" in node or "anyOf" in node or "oneOf" in node or "allOf" in node:
                node = {"anyOf": [node, {"type": "null"}]}
            if "enum" in node and None not in node["enum"]:
                node["enum"] = [*node["enum"], None]
        return node
    if isinstance(node, list):
        return [_nullable_to_type(v) for v in node]
    return node


@functools.cache
def _spec() -> dict[str, Any]:
    with SPEC.open() as f:
        return _nullable_to_type(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless ``instance`` matches components/schemas/<schema_name>."""
    spec = _spec()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


@functools.cache
def _event_schemas() -> dict[str, str]:
    """Each streamed event type -> the name of its schema, from ResponseStreamEvent's members."""
    schemas = _spec()["components"]["schemas"]
    by_type: dict[str, str] = {}
    for member in schemas["ResponseStreamEvent"]["anyOf"]:
        name = member["$ref"].rsplit("/", 1)[1]
        for kind in schemas[name]["properties"]["type"].get("enum", ()):
            by_type[kind] = name
    return by_type


def validate_event(event: dict[str, Any]) -> str:
    """Validate one streamed Responses event against its own schema (not the whole union: clearer errors).

    Returns the schema's name; an event type the spec does not list raises.
    """
    name = _event_schemas().get(event.get("type"))  # type: ignore[arg-type]
    if name is None:
        raise jsonschema.ValidationError(f"no ResponseStreamEvent member has type {event.get('type')!r}")
    validate(event, name)
    return name


def validate_ws_frame(frame: dict[str, Any]) -> str:
    """A Responses WebSocket frame: a stream event, or an error frame (ResponseWsError)."""
    if frame.get("type") == "error" and "error" in frame:
        validate(frame, "ResponseWsError")
        return "ResponseWsError"
    return validate_event(frame)
