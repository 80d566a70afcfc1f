"""Vendor the part of OpenAI's published OpenAPI spec that the appliance's own document reuses.

    python build/vendor_openapi.py [--spec ../shared/specs/openai-openapi.yaml] [--check]

Writes appliance/server/openapi/openai.json: the operations of the OpenAI paths the appliance serves
(under /v1, as clients call them) and every component they reference, directly or not. The appliance
never reads the full spec at run time (3 MB of YAML, outside the package); this file ships in the wheel and
the one-file build instead. ``--check`` only compares: exit code 1 when the committed file is stale
(tests/unit/test_openapi.py runs the same comparison).

Trimmed on the way: ``x-*`` extensions (OpenAI's doc-site metadata) and operation descriptions. Converted:
OpenAPI 3.0's ``nullable: true``, which the spec still mixes into its 3.1 schemas, becomes JSON Schema's
``null`` type, so validators read what the spec means; 2019-09's ``$recursiveRef`` a plain ``$ref``.
Corrected (``CORRECTIONS``): the few schemas that OpenAI's own answers contradict.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = ROOT.parent / "shared" / "specs" / "openai-openapi.yaml"
OUTPUT = ROOT / "appliance" / "server" / "openapi" / "openai.json"
PREFIX = "/v1"  # the spec's server is https://api.openai.com/v1; the appliance serves the same paths under /v1

# (method, path in the spec) of every OpenAI operation the appliance implements.
OPERATIONS = (
    ("post", "/chat/completions"),
    ("post", "/completions"),
    ("post", "/embeddings"),
    ("get", "/models"),
    ("get", "/models/{model}"),
    ("post", "/responses"),
    ("get", "/responses/{response_id}"),
    ("delete", "/responses/{response_id}"),
    ("get", "/responses/{response_id}/input_items"),
    ("get", "/files"),
    ("post", "/files"),
    ("get", "/files/{file_id}"),
    ("delete", "/files/{file_id}"),
    ("get", "/files/{file_id}/content"),
    ("get", "/batches"),
    ("post", "/batches"),
    ("get", "/batches/{batch_id}"),
    ("post", "/batches/{batch_id}/cancel"),
    ("post", "/moderations"),
    ("post", "/images/generations"),
    ("post", "/images/edits"),
    ("post", "/audio/transcriptions"),
    ("post", "/audio/translations"),
    ("post", "/audio/speech"),
)
_KEPT_OPERATION_FIELDS = ("operationId", "tags", "parameters", "requestBody", "responses")


def _null_for_optional(schema: dict[str, Any]) -> None:
    required = set(schema.get("required", ()))
    for name, prop in schema["properties"].items():
        if name not in required and not _allows_null(prop):
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}]}


def _refusal_optional(schema: dict[str, Any]) -> None:
    schema["required"] = [name for name in schema["required"] if name != "refusal"]


def _nullable_page_ids(schema: dict[str, Any]) -> None:
    for name in ("first_id", "last_id"):
        schema["properties"][name] = {"anyOf": [schema["properties"][name], {"type": "null"}]}


def _purpose_evals(schema: dict[str, Any]) -> None:
    schema["properties"]["purpose"]["enum"].append("evals")


def _no_default(schema: dict[str, Any]) -> None:
    del schema["default"]


# Where OpenAI's own answers, and its SDKs' types, contradict its spec, or local servers rightly differ. Each
# is listed in the vendored file ("corrections"), and the document's description names them.
CORRECTIONS = {
    "Batch": (_null_for_optional, "optional properties may be null (OpenAI sends null for the times and file "
              "ids that do not exist yet; its SDKs type them Optional)"),
    "OpenAIFile": (_null_for_optional, "optional properties may be null (`expires_at` and `status_details` "
                   "are null when unset, as OpenAI sends them)"),
    "OpenAIFile.purpose": (_purpose_evals, "`evals` is a purpose too (the upload accepts it, so the File "
                           "object carries it)"),
    **{name: (_nullable_page_ids, "`first_id` and `last_id` are null on an empty page, as OpenAI answers")
       for name in ("ListFilesResponse", "ListBatchesResponse", "ResponseItemList")},
    "TranscriptionInclude": (_no_default, "no `default: []` on this string schema (the list default belongs to "
                             "the `include` array that holds it; a validator refuses the document otherwise)"),
    "ChatCompletionResponseMessage": (_refusal_optional, "`refusal` is optional (local servers such as "
                                      "llama.cpp omit it; OpenAI's SDKs type it Optional)"),
}


def load_spec(path: Path) -> dict[str, Any]:
    import yaml  # a test/build dependency only: the appliance reads the JSON this script writes

    with path.open() as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def vendored(spec: dict[str, Any]) -> dict[str, Any]:
    """The trimmed document: {"source", "operations": {"METHOD /v1/path": op}, "components": {...}}."""
    operations = {}
    for method, path in OPERATIONS:
        operation = spec["paths"][path][method]
        kept = {name: operation[name] for name in _KEPT_OPERATION_FIELDS if name in operation}
        operations[f"{method.upper()} {PREFIX}{path}"] = _clean(kept)
    components: dict[str, dict[str, Any]] = {}
    for kind, name in sorted(_closure(spec, operations)):
        component = _plain_recursion(spec["components"][kind][name], f"#/components/{kind}/{name}")
        components.setdefault(kind, {})[name] = _clean(component)
    for name, (correct, _) in CORRECTIONS.items():
        correct(components["schemas"][name.split(".")[0]])
    for name, (derive, _) in DERIVED.items():
        components["schemas"][name] = derive(components["schemas"])
    components = _explicit_discriminators(components)
    return {
        "source": {"title": spec["info"]["title"], "version": spec["info"]["version"],
                   "license": spec["info"]["license"].get("identifier", spec["info"]["license"]["name"]),
                   "license_file": "openai-openapi.LICENSE",
                   "corrections": {name: reason for name, (_, reason) in CORRECTIONS.items()},
                   "derived": {name: reason for name, (_, reason) in DERIVED.items()}},
        "operations": operations,
        "components": {kind: dict(sorted(entries.items())) for kind, entries in sorted(components.items())},
    }


def _completion_chunk(schemas: dict[str, Any]) -> dict[str, Any]:
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    reason["type"], reason["enum"] = ["string", "null"], [*reason["enum"], None]
    chunk["description"] = "One streamed chunk of a completion: a completion object whose finish_reason is null " \
                           "until its last chunk."
    return chunk


# Schemas the spec lacks: the appliance streams completions as OpenAI does, which the spec does not describe.
DERIVED = {
    "CreateCompletionStreamResponse": (_completion_chunk, "one streamed chunk of /v1/completions: "
                                       "CreateCompletionResponse with a null finish_reason until the last"),
}


def _explicit_discriminators(components: dict[str, Any]) -> dict[str, Any]:
    """Give each discriminator the mapping its branches imply.

    Without a mapping, OpenAPI maps a discriminator's values to schema *names* ("ChatCompletionMessageToolCall"),
    while the spec means each branch's ``type`` value ("function"): validators then refuse OpenAI's own
    answers. A discriminator whose branches do not each name one value is dropped (it is only a hint).
    """
    schemas = components["schemas"]

    def value_of(branch: Any, prop: str) -> str | None:
        target = schemas.get(branch.get("$ref", "").rsplit("/", 1)[-1]) if isinstance(branch, dict) else None
        field = (target or {}).get("properties", {}).get(prop, {})
        values = [field["const"]] if "const" in field else field.get("enum", [])
        return values[0] if len(values) == 1 and isinstance(values[0], str) else None

    def fix(node: Any) -> Any:
        if isinstance(node, list):
            return [fix(value) for value in node]
        if not isinstance(node, dict):
            return node
        node = {key: fix(value) for key, value in node.items()}
        discriminator = node.get("discriminator")
        if isinstance(discriminator, dict) and "mapping" not in discriminator:
            branches = node.get("oneOf") or node.get("anyOf") or []
            values = [value_of(branch, discriminator["propertyName"]) for branch in branches]
            if branches and None not in values and len(set(values)) == len(values):
                node["discriminator"] = {**discriminator, "mapping": {
                    value: branch["$ref"] for value, branch in zip(values, branches, strict=True)}}
            else:
                del node["discriminator"]
        return node

    return fix(components)


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref)
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def _closure(spec: dict[str, Any], root: Any) -> set[tuple[str, str]]:
    """Every (kind, name) under #/components that ``root`` reaches through $refs."""
    seen: set[tuple[str, str]] = set()
    todo = list(_refs(root))
    while todo:
        ref = todo.pop()
        parts = ref.split("/")
        if len(parts) != 4 or parts[:2] != ["#", "components"]:
            raise ValueError(f"unexpected $ref {ref!r}: only #/components/<kind>/<name> is handled")
        kind, name = parts[2], parts[3]
        if (kind, name) in seen:
            continue
        seen.add((kind, name))
        todo += _refs(spec["components"][kind][name])
    return seen


def _plain_recursion(node: Any, self_ref: str) -> Any:
    """JSON Schema 2019-09's ``$recursiveRef: "#"`` (no keyword of OpenAPI 3.1's 2020-12) as a plain $ref."""
    if isinstance(node, list):
        return [_plain_recursion(value, self_ref) for value in node]
    if not isinstance(node, dict):
        return node
    if node.get("$recursiveRef") == "#":
        return {"$ref": self_ref}
    return {key: _plain_recursion(value, self_ref) for key, value in node.items() if key != "$recursiveAnchor"}


def _clean(node: Any) -> Any:
    """Drop x-* extensions; turn ``nullable: true`` into JSON Schema's null type."""
    if isinstance(node, list):
        return [_clean(value) for value in node]
    if not isinstance(node, dict):
        return node
    node = {key: _clean(value) for key, value in node.items() if not (isinstance(key, str) and key.startswith("x-"))}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node and None not in node["enum"]:
                node["enum"] = [*node["enum"], None]
        elif any(key in node for key in ("$ref", "anyOf", "oneOf", "allOf")):
            node = {"anyOf": [node, {"type": "null"}]}
    if "default" in node and node["default"] is None and not _allows_null(node):
        del node["default"]  # "default: null" on a schema that refuses null: validators reject the document
    return node


def _allows_null(schema: dict[str, Any]) -> bool:
    """Whether null is plainly one of the schema's types (a conservative reading: no $ref is followed)."""
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    branches = schema.get("anyOf", []) + schema.get("oneOf", [])
    return any(isinstance(branch, dict) and _allows_null(branch) for branch in branches)


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="OpenAI's openapi.yaml")
    parser.add_argument("--check", action="store_true", help="only compare with the committed file")
    args = parser.parse_args(argv)
    text = render(vendored(load_spec(args.spec)))
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python build/vendor_openapi.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    license_file = args.spec.with_name("openai-openapi.LICENSE")
    if license_file.exists():
        OUTPUT.with_name("openai-openapi.LICENSE").write_text(license_file.read_text())
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
