"""GET /openapi.json's document: every route described, valid OpenAPI 3.1, OpenAI's paths as OpenAI publishes them."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from appliance.common.config_file import load_settings
from appliance.common.paths import canonical
from appliance.server.app import create_app
from appliance.server.openapi import document, operations, vendored
from appliance.server.routes.openapi import build
from tests.support.openapi import SPEC

ROOT = Path(__file__).resolve().parents[2]


def _vendor_script() -> Any:
    spec = importlib.util.spec_from_file_location("vendor_openapi", ROOT / "build" / "vendor_openapi.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    app = create_app(load_settings(environ={}))
    yield app
    app.__class__._app_registry.pop(app.name, None)


@pytest.fixture(scope="module")
def built(app: Any) -> document.Document:
    return build(app)


@pytest.fixture(scope="module")
def published() -> dict[str, Any]:
    if not SPEC.exists():
        pytest.skip(f"OpenAI's spec is not at {SPEC} (set OPENAI_OPENAPI_SPEC)")
    return _vendor_script().load_spec(SPEC)


def test_every_route_is_described(app, built):
    assert built.undescribed == (), f"routes without an operation in server/openapi/operations.py: {built.undescribed}"
    published = {(method.upper(), path) for path, item in built.body["paths"].items() for method in item}
    assert published == set(document.registered(app.router.routes))


def test_every_description_has_a_route(app):
    registered = set(document.registered(app.router.routes))
    stale = sorted(set(operations.describe(vendored.load())) - registered)
    assert not stale, f"operations.py describes routes the app does not register: {stale}"


def test_a_route_without_description_is_reported():
    class Route:
        methods = ("GET", "HEAD")
        uri = "/v1/new/<thing_id:str>"

    built = document.build(document.registered([Route()]), vendored.load())
    assert built.undescribed == (("GET", "/v1/new/{thing_id}"), ("HEAD", "/v1/new/{thing_id}"))
    assert built.body["paths"] == {}


def test_head_follows_get():
    class Route:
        methods = ("GET", "HEAD")
        uri = "/health"

    built = document.build(document.registered([Route()]), vendored.load())
    head = built.body["paths"]["/health"]["head"]
    assert head["operationId"] == "healthHead"
    assert all("content" not in response for response in head["responses"].values())


def test_valid_openapi_31(built):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
              for e in OpenAPIV31SpecValidator(built.body).iter_errors()]
    assert errors == []
    assert built.body["openapi"].startswith("3.1.")


def test_security_schemes(built):
    schemes = built.body["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"] == {**schemes["apiKeyHeader"], "type": "apiKey", "in": "header",
                                       "name": "x-api-key"}
    paths = built.body["paths"]
    assert paths["/v1/messages"]["post"]["security"][0] == {"apiKeyHeader": []}
    assert paths["/v1/chat/completions"]["post"]["security"][0] == {"bearerAuth": []}
    for public in ("/health", "/ready", "/openapi.json"):
        assert paths[public]["get"]["security"] == []


def test_errors_are_the_envelope(built):
    """Every 4xx/5xx our own routes document is the envelope with the request id (Anthropic's on /v1/messages)."""
    components = built.body["components"]
    error = components["schemas"]["ApplianceError"]
    assert set(error["properties"]) == {"message", "type", "code", "param", "request_id"}
    for path, item in built.body["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status[0] not in "45" or "$ref" not in response:
                    continue
                name = response["$ref"].rsplit("/", 1)[1]
                schema = components["responses"][name]["content"]["application/json"]["schema"]["$ref"]
                expected = ("AnthropicErrorResponse" if canonical(path).startswith("/v1/messages")
                            else "ApplianceErrorResponse")
                assert schema.endswith("/" + expected), (method, path, status)


def _schema_refs(node: Any) -> dict[str, str]:
    """media type -> schema $ref of a requestBody or response; for a stream, the $ref of its events' data."""
    refs = {}
    for media, body in (node or {}).get("content", {}).items():
        schema = body["schema"]
        data = schema.get("properties", {}).get("data", {})
        if media == "text/event-stream" and "anyOf" in data:  # [the [DONE] marker, JSON of a contentSchema]
            schema = next(branch["contentSchema"] for branch in data["anyOf"] if "contentSchema" in branch)
            schema = schema["anyOf"][0] if "anyOf" in schema else schema  # [payload, the error envelope]
        if "allOf" in schema:  # OpenAI's request plus the gateway's own fields (``guardrails``)
            schema = schema["allOf"][0]
        refs[media] = schema.get("$ref", "")
    return refs


# Where our operation differs from OpenAI's on purpose (each difference documented in its description or
# response): the media types a 200 adds or replaces.
_OWN_SUCCESS = {
    ("POST", "/v1/completions"): "text/event-stream is added: stream: true streams completion objects",
    ("DELETE", "/v1/responses/{response_id}"): "OpenAI documents no body; the appliance answers one",
    ("GET", "/v1/files/{file_id}/content"): "the bytes are application/octet-stream, not a JSON string",
    ("POST", "/v1/audio/transcriptions"): "text/plain is added: response_format text, srt and vtt answer it",
    ("POST", "/v1/audio/translations"): "text/plain is added: response_format text, srt and vtt answer it",
    ("POST", "/v1/audio/speech"): "the audio's own media types beside octet-stream (what OpenAI and servers send)",
}


def test_openai_paths_follow_the_published_spec(built, published):
    script = _vendor_script()
    for method, path in script.OPERATIONS:
        theirs = published["paths"][path][method]
        ours = built.body["paths"][script.PREFIX + path][method]
        key = (method.upper(), script.PREFIX + path)
        assert ours["operationId"] == theirs["operationId"]
        assert _schema_refs(ours.get("requestBody")) == _schema_refs(theirs.get("requestBody")), key
        if key not in _OWN_SUCCESS:
            assert _schema_refs(ours["responses"]["200"]) == _schema_refs(theirs["responses"]["200"]), key
        their_params = {(p["in"], p["name"]) for p in theirs.get("parameters", ())}
        our_params = {(p["in"], p["name"]) for p in ours.get("parameters", ())}
        assert {p for p in our_params if p[0] != "header"} <= their_params, key
        for _, name in their_params - our_params:  # a documented subset: what is left out is named
            assert f"`{name}`" in ours["description"], (key, name)


def test_vendored_file_is_current(published):
    script = _vendor_script()
    assert vendored.VENDORED_FILE.read_text() == script.render(script.vendored(published)), (
        "appliance/server/openapi/openai.json is stale: run python build/vendor_openapi.py")
