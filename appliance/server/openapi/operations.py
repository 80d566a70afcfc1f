"""What each route takes and answers: one OpenAPI operation per (method, path) the app registers.

OpenAI's paths start from OpenAI's own operations (the vendored spec: same request schemas, same success
schemas) and swap in the appliance's errors and keys; the rest are described here. document.py matches this
table against Sanic's route table, so a route added without an entry here fails tests/unit/test_openapi.py.
"""

from __future__ import annotations

from typing import Any

from appliance.common.paths import alias_of
from appliance.server.openapi.schemas import GUARDRAILS_FIELD, Schema, ref
from appliance.server.openapi.vendored import OpenAISpec

Operation = dict[str, Any]
OperationKey = tuple[str, str]  # ("POST", "/v1/chat/completions"): path templates as OpenAPI writes them

JSON = "application/json"
SSE = "text/event-stream"

# Either header carries the key on every route; Anthropic's SDKs send x-api-key, OpenAI's a Bearer token.
KEY = [{"bearerAuth": []}, {"apiKeyHeader": []}]
ANTHROPIC_KEY = [{"apiKeyHeader": []}, {"bearerAuth": []}]
PUBLIC: list[dict[str, list[str]]] = []
KEY_OR_LOOPBACK = [{}, *KEY]  # public unless configured otherwise: the description says when


def security_schemes() -> dict[str, Schema]:
    return {
        "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An appliance API key (sk-app-...)."},
        "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key",
                         "description": "The same key in Anthropic's header."},
    }


# ------------------------------------------------------------------------------------------ responses

_ERRORS = {
    400: ("BadRequest", "The request is invalid; `param` names the field at fault."),
    401: ("Unauthorized", "No key, or an unknown, expired or disabled one (`invalid_api_key`)."),
    403: ("Forbidden", "The key's role, models or endpoints do not allow this."),
    404: ("NotFound", "No such model, object or path."),
    409: ("Conflict", "The object is in a state that does not allow this."),
    413: ("PayloadTooLarge", "The body is larger than `server.max_body_mb` (or the file limits)."),
    429: ("RateLimited", "A rate limit or budget of the key or model is spent, or the request waited its longest in "
          "the fair admission queue of a backend at capacity (`backend_overloaded`); see Retry-After."),
    501: ("NotImplemented", "None of the model's backends serves this endpoint (`unsupported`; their "
          "`capabilities`), or the model cannot take what the request holds (images without a describer). Not "
          "retried (`x-should-retry: false`): another model may serve it."),
    "4XX": ("BackendClientError", "A backend's own 4xx, passed through with its status."),
    "5XX": ("BackendFailure", "502 `backend_unreachable`/`backend_error`, 503 `no_healthy_backend`/"
            "`backend_overloaded`/`shutting_down`, 504 `backend_timeout`, or a backend's own 5xx. The appliance "
            "answers no 5xx of its own making, but 500 `upstream_key_unreadable` for a key whose own backend "
            "credential its data dir can no longer decrypt, and 501 `unsupported` (above)."),
}


def response_components() -> dict[str, Schema]:
    components = {name: _error_response(description, "ApplianceErrorResponse")
                  for name, description in _ERRORS.values()}
    components["RateLimited"]["headers"] |= {
        "Retry-After": {"description": "Seconds to wait (1 to 120).", "schema": {"type": "integer"}},
        "x-should-retry": {"description": "`false` when waiting will not help (a budget).",
                           "schema": {"type": "string"}},
    }
    components["AnthropicError"] = _error_response("An error in Anthropic's shape, with Anthropic's status "
                                                   "for it (e.g. 529 when no backend can answer).",
                                                   "AnthropicErrorResponse")
    return components


def _error_response(description: str, schema: str) -> Schema:
    return {"description": description, "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
            "content": {JSON: {"schema": ref(schema)}}}


def header_components() -> dict[str, Schema]:
    return {"RequestId": {"description": "The client's X-Request-ID, echoed, or a generated one.",
                          "schema": {"type": "string"}}}


def errors(*statuses: int | str) -> dict[str, Schema]:
    return {str(status): {"$ref": f"#/components/responses/{_ERRORS[status][0]}"} for status in statuses}


def anthropic_errors() -> dict[str, Schema]:
    return {kind: {"$ref": "#/components/responses/AnthropicError"} for kind in ("4XX", "5XX")}


def ok(description: str, schema: Schema | None = None, media: str = JSON, **more_media: Schema) -> Schema:
    content = {media: {"schema": schema or {}}} | {m: {"schema": s} for m, s in more_media.items()}
    return {"description": description, "content": content}


def sse(payload: Schema) -> Schema:
    """One server-sent event, the unit a text/event-stream schema describes (as OpenAPI 3.2 spells it out):
    ``data`` holds JSON of ``payload`` (its contentSchema), or OpenAI's end marker ``[DONE]``."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "id": {"type": "string"},
        "data": {"anyOf": [{"const": "[DONE]"},
                           {"type": "string", "contentMediaType": JSON, "contentSchema": payload}]}}}


def json_body(schema: Schema, required: bool = True) -> Schema:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def path_param(name: str, description: str) -> Schema:
    return {"in": "path", "name": name, "required": True, "schema": {"type": "string"}, "description": description}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"in": "query", "name": name, "required": False, "schema": schema, "description": description}


def header(name: str, schema: Schema, description: str) -> Schema:
    return {"in": "header", "name": name, "required": False, "schema": schema, "description": description}


_GUARDRAIL = "(pii|content_moderation|schema_validation)"


def guarded(op: Operation) -> Operation:
    """A chat-shaped operation: the ``guardrails`` body field and the X-Guardrails header (README "Guardrails")."""
    body = op["requestBody"]["content"][JSON]
    body["schema"] = {"allOf": [body["schema"], {"type": "object", "properties": {"guardrails": GUARDRAILS_FIELD}}]}
    op["parameters"] = [*op.get("parameters", ()), header(
        "X-Guardrails", {"type": "string", "pattern": rf"^ *{_GUARDRAIL}( *, *{_GUARDRAIL})* *$"},
        "Guardrails for this request, comma-separated (added to the `guardrails` field's).")]
    op["description"] = (f"{op.get('description', '')} Answers of a request with guardrails carry "
                         "`X-Guardrail-Status` (passed, redacted, blocked or failed).").strip()
    return op


def control_headers() -> list[Schema]:
    """The request headers that steer a proxied request (README "Headers")."""
    boolean = {"type": "string", "enum": ["true", "false"]}
    return [
        header("X-Request-ID", {"type": "string", "maxLength": 200}, "Echoed; generated when absent."),
        header("X-Appliance-Backend", {"type": "string"}, "Use only this backend."),
        header("X-Appliance-Route", {"type": "string"}, "Follow this route (alias or model) instead of `model`."),
        header("X-Appliance-No-Cache", boolean, "`true`: skip the cache."),
        header("X-Appliance-No-Retry", boolean, "`true`: make no retries."),
        header("X-Cache", {"type": "string", "enum": ["no-cache"]}, "`no-cache` bypasses the cache."),
        header("X-Cache-TTL", {"type": "string"}, "Cache this answer for so many seconds."),
        header("X-Appliance-Session-ID", {"type": "string", "maxLength": 200},
               "The session this request belongs to (request log)."),
    ]


# ------------------------------------------------------------------------------------------ the table


def describe(openai: OpenAISpec) -> dict[OperationKey, Operation]:
    """Every operation the appliance serves, keyed by (METHOD, OpenAPI path)."""
    own = {**_openai_operations(openai), **_extension_operations(openai), **_provider_operations(),
           **_router_operations(),
           **_anthropic_operations(), **_admin_operations(), **_template_operations(), **_ops_operations(),
           **_proxy_operations()}
    return {**own, **_aliases(own)}


def _aliases(described: dict[OperationKey, Operation]) -> dict[OperationKey, Operation]:
    """Each /v1 operation again under /api/v1 (the same handler answers): its own operationId, else the same."""
    aliases = {}
    for (method, path), operation in described.items():
        alias = alias_of(path)
        if alias is None:
            continue
        same = f"The same as `{method} {path}`."
        copy = {**operation, "description": f"{same} {operation['description']}" if "description" in operation
                else same}
        if "operationId" in operation:
            copy["operationId"] = operation["operationId"] + "ApiV1"
        aliases[(method, alias)] = copy
    return aliases


def _op(summary: str, tag: str, responses: dict[str, Schema], *, security: list[dict[str, list[str]]] = KEY,
        description: str | None = None, parameters: list[Schema] | None = None,
        body: Schema | None = None, operation_id: str | None = None) -> Operation:
    op: Operation = {"summary": summary, "tags": [tag]}
    if operation_id:
        op["operationId"] = operation_id
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = body
    op["security"] = security
    op["responses"] = responses
    return op


def _from_openai(openai: OpenAISpec, method: str, path: str, summary: str, statuses: tuple[int | str, ...], *,
                 unsupported: tuple[str, ...] = (), ok_response: Schema | None = None,
                 more_parameters: list[Schema] | None = None, description: str | None = None,
                 stream_error: bool = True) -> Operation:
    """OpenAI's operation: its request body and parameters (less ``unsupported``), its 200, our errors.

    OpenAI writes a stream's event payload as the text/event-stream schema; here it is the event's data
    (see sse()), which may also be the error envelope (``stream_error``) when a stream fails after it began.
    """
    source = openai.operation(method, path)
    success = ok_response or source["responses"]["200"]
    stream = success.get("content", {}).get(SSE)
    if stream is not None:
        payload = stream["schema"]
        stream["schema"] = sse({"anyOf": [payload, ref("ApplianceErrorResponse")]} if stream_error else payload)
    parameters = [p for p in source.get("parameters", ()) if p["name"] not in unsupported]
    if unsupported:
        note = "Not supported here (ignored): " + ", ".join(f"`{name}`" for name in unsupported) + "."
        description = f"{description} {note}" if description else note
    op = _op(summary, source["tags"][0], {"200": success, **errors(*statuses)},
             description=description, parameters=parameters + (more_parameters or []),
             body=source.get("requestBody"), operation_id=source["operationId"])
    return op


_PROXIED = (400, 401, 403, 404, 413, 429, 501, "4XX", "5XX")


def _openai_operations(openai: OpenAISpec) -> dict[OperationKey, Operation]:
    proxied = "Proxied to a backend that serves the model; fields the appliance does not read pass through."
    completions = openai.operation("post", "/v1/completions")["responses"]["200"]
    completions["content"][SSE] = {"schema": ref("CreateCompletionStreamResponse")}  # stream: true, as OpenAI
    return {
        ("POST", "/v1/chat/completions"): guarded(_from_openai(
            openai, "post", "/v1/chat/completions", "Create a chat completion", _PROXIED,
            more_parameters=control_headers(), description=proxied)),
        ("POST", "/v1/completions"): guarded(_from_openai(
            openai, "post", "/v1/completions", "Create a completion", _PROXIED, ok_response=completions,
            more_parameters=control_headers(), description=proxied)),
        ("POST", "/v1/embeddings"): _from_openai(
            openai, "post", "/v1/embeddings", "Create embeddings", _PROXIED, more_parameters=control_headers(),
            description=proxied),
        ("GET", "/v1/models"): _from_openai(
            openai, "get", "/v1/models", "List the models this key may use", (401, 403)),
        ("GET", "/v1/models/{model}"): _from_openai(
            openai, "get", "/v1/models/{model}", "Describe a model or alias", (401, 403, 404),
            description="`model` may hold a slash (`backend/model`, `Qwen/Qwen2.5-7B`), sent as is or as %2F."),
        ("POST", "/v1/responses"): guarded(_from_openai(
            openai, "post", "/v1/responses", "Create a response (over a chat backend)", _PROXIED,
            more_parameters=control_headers(), stream_error=False, description="Translated to a chat "
            "completion; see README \"Responses\" for the fields that are honoured. A stream that fails ends "
            "with an `error` event.")),
        ("GET", "/v1/responses/{response_id}"): _from_openai(
            openai, "get", "/v1/responses/{response_id}", "Retrieve a stored response", (401, 403, 404),
            unsupported=("include", "stream", "starting_after", "include_obfuscation")),
        ("DELETE", "/v1/responses/{response_id}"): _from_openai(
            openai, "delete", "/v1/responses/{response_id}", "Delete a stored response", (401, 403, 404),
            ok_response=ok("Deleted.", ref("ResponseDeleted"))),
        ("GET", "/v1/responses/{response_id}/input_items"): _from_openai(
            openai, "get", "/v1/responses/{response_id}/input_items", "List a stored response's input items",
            (400, 401, 403, 404), unsupported=("include",)),
        ("GET", "/v1/files"): _from_openai(openai, "get", "/v1/files", "List your files", (400, 401, 403)),
        ("POST", "/v1/files"): _from_openai(
            openai, "post", "/v1/files", "Upload a file (multipart, streamed to disk)", (400, 401, 403, 413)),
        ("GET", "/v1/files/{file_id}"): _from_openai(
            openai, "get", "/v1/files/{file_id}", "Retrieve a file's object", (401, 403, 404)),
        ("DELETE", "/v1/files/{file_id}"): _from_openai(
            openai, "delete", "/v1/files/{file_id}", "Delete a file", (401, 403, 404)),
        ("GET", "/v1/files/{file_id}/content"): _from_openai(
            openai, "get", "/v1/files/{file_id}/content", "Download a file's bytes", (401, 403, 404),
            ok_response=ok("The stored bytes, unchanged.", {"type": "string", "contentMediaType":
                                                             "application/octet-stream"},
                           media="application/octet-stream")),
        ("GET", "/v1/batches"): _from_openai(openai, "get", "/v1/batches", "List your batches", (400, 401, 403)),
        ("POST", "/v1/batches"): _from_openai(
            openai, "post", "/v1/batches", "Create a batch (run by the appliance on its backends)",
            (400, 401, 403, 404, 413, 429)),
        ("GET", "/v1/batches/{batch_id}"): _from_openai(
            openai, "get", "/v1/batches/{batch_id}", "Retrieve a batch", (401, 403, 404)),
        ("POST", "/v1/batches/{batch_id}/cancel"): _from_openai(
            openai, "post", "/v1/batches/{batch_id}/cancel", "Cancel a batch", (401, 403, 404, 409)),
        ("GET", "/v1/responses"): _op(
            "Responses over a WebSocket", "Responses", {
                "101": {"description": "Switching to the WebSocket protocol: each frame sent is a "
                        "`response.create` (or `generate: false` warm-up), each frame received a stream event "
                        "or an error frame."},
                "426": {"description": "A plain GET without the WebSocket upgrade headers."},
                **errors(401, 403)},
            operation_id="responsesWebSocket",
            description="A WebSocket (`ws://.../v1/responses`) that carries many responses over one connection; "
            "the key is checked on the handshake. Not an HTTP request/response operation."),
    }


BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}
STRING_SCHEMA = {"type": "string"}
# The audio speech answers in (OpenAI's spec says octet-stream; OpenAI and local servers send the format's type).
AUDIO_TYPES = ("audio/mpeg", "audio/ogg", "audio/opus", "audio/aac", "audio/flac", "audio/wav", "audio/x-wav",
               "audio/pcm", "audio/L16", "application/octet-stream")
_STREAMED_UPLOAD = ("Multipart: streamed to the backend as it arrives, never held whole; read only as far as the "
                    "`model` field (held on disk when the file comes first). Not retried once the body began to "
                    "flow. The backend's answer goes out as it comes, its content type kept.")


def _extension_operations(openai: OpenAISpec) -> dict[OperationKey, Operation]:
    proxied = "Proxied to a backend of the model that serves it (`unsupported` when none does); its answer unchanged."
    rerank = _op("Rerank documents (Cohere/Jina shape)", "Rerank",
                 {"200": ok("The backend's ranking.", ref("RerankResponse")), **errors(*_PROXIED)},
                 body=json_body(ref("RerankRequest")), parameters=control_headers(), description=proxied)
    transcription = openai.operation("post", "/v1/audio/transcriptions")["responses"]["200"]
    transcription["content"]["text/plain"] = {"schema": STRING_SCHEMA}  # response_format text, srt, vtt
    translation = openai.operation("post", "/v1/audio/translations")["responses"]["200"]
    translation["content"]["text/plain"] = {"schema": STRING_SCHEMA}
    speech = openai.operation("post", "/v1/audio/speech")["responses"]["200"]
    speech["content"] = {media: {"schema": BINARY} for media in AUDIO_TYPES} | {
        SSE: speech["content"][SSE]}
    return {
        ("POST", "/v1/rerank"): {**rerank, "operationId": "rerank"},
        ("POST", "/rerank"): {**rerank, "operationId": "rerankUnversioned",
                              "summary": "Rerank documents (the path vLLM and llama.cpp also serve)"},
        ("POST", "/v1/score"): _op("Score text pairs (vLLM)", "Rerank",
                                   {"200": ok("The backend's scores.", ref("ScoreResponse")), **errors(*_PROXIED)},
                                   body=json_body(ref("ScoreRequest")), parameters=control_headers(),
                                   description=proxied, operation_id="score"),
        ("POST", "/v1/moderations"): _from_openai(
            openai, "post", "/v1/moderations", "Classify text for moderation", _PROXIED,
            more_parameters=control_headers(), description=proxied + " `model` is required here."),
        ("POST", "/v1/images/generations"): _from_openai(
            openai, "post", "/v1/images/generations", "Generate images", _PROXIED, stream_error=False,
            more_parameters=control_headers(), description=proxied + " `model` is required here; a stream "
            "passes as it comes."),
        ("POST", "/v1/images/edits"): _from_openai(
            openai, "post", "/v1/images/edits", "Edit images", _PROXIED, stream_error=False,
            more_parameters=control_headers(), description=_STREAMED_UPLOAD + " `model` is required here."),
        ("POST", "/v1/audio/transcriptions"): _from_openai(
            openai, "post", "/v1/audio/transcriptions", "Transcribe audio", _PROXIED, ok_response=transcription,
            stream_error=False, more_parameters=control_headers(), description=_STREAMED_UPLOAD),
        ("POST", "/v1/audio/translations"): _from_openai(
            openai, "post", "/v1/audio/translations", "Translate audio into English", _PROXIED,
            ok_response=translation, more_parameters=control_headers(), description=_STREAMED_UPLOAD),
        ("POST", "/v1/audio/speech"): _from_openai(
            openai, "post", "/v1/audio/speech", "Generate speech", _PROXIED, ok_response=speech, stream_error=False,
            more_parameters=control_headers(), description=proxied + " The audio streams as it comes."),
    }


def _provider_operations() -> dict[OperationKey, Operation]:
    return {
        ("GET", "/v1/providers"): _op(
            "The backends behind the models: health, load, latency, prices", "Models",
            {"200": ok("One entry per backend, or with `model` per backend the model's route may take.",
                       ref("ProviderList")), **errors(400, 401, 403, 404)},
            parameters=[query("model", {"type": "string", "minLength": 1},
                              "A model, alias or `backend/model`: only where it can go, with prices and the "
                              "route's first choice.")],
            operation_id="listProviders",
            description="A key restricted to some models sees only those and their backends (403 "
            "`model_not_allowed` for another `model`); an unknown `model` is 404 `model_not_found`."),
    }


def _anthropic_operations() -> dict[OperationKey, Operation]:
    return {
        ("POST", "/v1/messages"): _op(
            "Create a message (Anthropic Messages API)", "Anthropic",
            {"200": ok("The message, or its events with `stream: true`.", ref("AnthropicMessage"),
                       **{SSE: sse(ref("AnthropicStreamEvent"))}), **anthropic_errors()},
            security=ANTHROPIC_KEY, body=json_body(ref("AnthropicMessagesRequest")),
            parameters=[*control_headers(), header(
                "X-Guardrails", {"type": "string", "pattern": rf"^ *{_GUARDRAIL}( *, *{_GUARDRAIL})* *$"},
                "Guardrails for this request, comma-separated.")], operation_id="createMessage",
            description="Over chat backends (translated) or Anthropic backends (passed through). Errors come "
            "in Anthropic's shape."),
        ("POST", "/v1/messages/count_tokens"): _op(
            "Count a message's input tokens", "Anthropic",
            {"200": {**ok("The backend's count, or an estimate.", ref("AnthropicTokenCount")),
                     "headers": {"X-Appliance-Token-Count": {"description": "`backend` or `estimate`.",
                                                             "schema": {"enum": ["backend", "estimate"]}}}},
             **anthropic_errors()},
            security=ANTHROPIC_KEY, body=json_body(ref("AnthropicCountTokensRequest")),
            operation_id="countMessageTokens"),
    }


def _router_operations() -> dict[OperationKey, Operation]:
    answer = ok("With `\"execute\": false` the decision; otherwise the chat completion of the chosen model (a "
                "stream with `\"stream\": true`), with `X-Appliance-Router-Profile`.",
                {"anyOf": [ref("RouterDecision"), ref("CreateChatCompletionResponse")]},
                **{SSE: sse({"anyOf": [ref("CreateChatCompletionStreamResponse"), ref("ApplianceErrorResponse")]})})
    answer["headers"] = {"X-Appliance-Router-Profile": {"description": "The profile the router chose.",
                                                        "schema": {"type": "string"}}}
    return {
        ("POST", "/v1/router"): _op(
            "Choose a model by meaning and price, and (by default) answer with it", "Router",
            {"200": answer, **errors(*_PROXIED)}, body=json_body(ref("RouterRequest")),
            parameters=control_headers(), operation_id="route",
            description="A chat completions body plus `models`, `cost_weight` and `execute` (never sent to a "
            "backend). 404 `not_found` when no `[[router.profiles]]` are configured; a failing embedding model is "
            "a 5xx of the backend's kind."),
        ("GET", "/v1/router/profiles"): _op(
            "The router's profiles this key may be routed to", "Router",
            {"200": ok("The profiles (no vectors).", ref("RouterProfileList")), **errors(401, 403)},
            operation_id="listRouterProfiles"),
    }


def _admin_operations() -> dict[OperationKey, Operation]:
    key_id = path_param("key_id", "The key's id (`key_...`).")
    return {
        ("POST", "/admin/keys"): _op(
            "Create an API key", "Admin", {"201": ok("The key, with its secret (shown once).",
                                                     ref("ApiKeyWithSecret")), **errors(400, 401, 403, 413)},
            body=json_body(ref("KeyCreateRequest")), operation_id="createKey",
            description="Admin keys only. A budget needs a `budget_period` and a period needs a budget."),
        ("GET", "/admin/keys"): _op("List API keys", "Admin", {"200": ok("Every key.", ref("ApiKeyList")),
                                                              **errors(401, 403)}, operation_id="listKeys"),
        ("GET", "/admin/keys/{key_id}"): _op(
            "Retrieve an API key", "Admin", {"200": ok("The key.", ref("ApiKey")), **errors(401, 403, 404)},
            parameters=[key_id], operation_id="getKey"),
        ("PATCH", "/admin/keys/{key_id}"): _op(
            "Change an API key", "Admin", {"200": ok("The key as changed.", ref("ApiKey")),
                                           **errors(400, 401, 403, 404, 413)},
            parameters=[key_id], body=json_body(ref("KeyUpdateRequest")), operation_id="updateKey",
            description="Absent fields stay as they are."),
        ("DELETE", "/admin/keys/{key_id}"): _op(
            "Delete an API key", "Admin", {"200": ok("Deleted.", ref("ApiKeyDeleted")), **errors(401, 403, 404)},
            parameters=[key_id], operation_id="deleteKey"),
        ("POST", "/admin/keys/{key_id}/rotate"): _op(
            "Give a key a new secret", "Admin", {"200": ok("The key, with its new secret (shown once).",
                                                           ref("ApiKeyWithSecret")), **errors(401, 403, 404)},
            parameters=[key_id], operation_id="rotateKey",
            description="Same id, limits and usage; the old secret stops working."),
        ("GET", "/admin/usage"): _op(
            "Usage totals from the ledger", "Admin", {"200": ok("Totals per group.", ref("UsageReport")),
                                                      **errors(400, 401, 403)},
            parameters=[
                query("group_by", {"enum": ["day", "model", "key"], "default": "day"}, "How to group."),
                query("key", {"type": "string"}, "Only this key id."),
                query("model", {"type": "string"}, "Only this model (as requested)."),
                query("from", {"type": "string", "format": "date"}, "First UTC day, inclusive (YYYY-MM-DD)."),
                query("to", {"type": "string", "format": "date"}, "Last UTC day, inclusive (YYYY-MM-DD)."),
            ], operation_id="usageReport"),
        ("GET", "/admin/requests"): _op(
            "The request log, newest first", "Admin", {"200": ok("Matching rows.", ref("RequestLog")),
                                                       **errors(400, 401, 403)},
            parameters=[
                query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Rows."),
                query("model", {"type": "string"}, "Only this model."),
                query("status", {"type": "string", "pattern": "^([1-5][0-9][0-9]|[1-5][xX][xX])$"},
                      "An exact status (429) or a class (5xx)."),
                query("key", {"type": "string"}, "Only this key id."),
                query("before", {"type": "integer", "minimum": 1}, "Rows older than this row id (paging)."),
            ], operation_id="requestLog", description="Other query parameters are refused (400)."),
        ("POST", "/admin/reload"): _op(
            "Re-read the config file", "Admin", {"200": ok("Every worker runs the file (or is named as behind).",
                                                          ref("Reload")), **errors(400, 401, 403)},
            operation_id="reloadConfig",
            description="The same as SIGHUP or `appliance reload`. An invalid file is 400 `invalid_config` "
            "naming file, line and key; the running config stays."),
        ("GET", "/admin/debug/profile"): _op(
            "A CPU profile of the worker that answers", "Admin",
            {"200": {**ok("pyinstrument's call tree as text, or speedscope's JSON with `format=speedscope`.",
                          {"type": "string"}, media="text/plain", **{"application/json": {"type": "object"}}),
                     "headers": {"X-Appliance-Worker": {"description": "The pid of the worker profiled.",
                                                        "schema": {"type": "string"}}}},
             **errors(400, 401, 403, 409)},
            parameters=[
                query("seconds", {"type": "integer", "minimum": 1, "maximum": 60, "default": 10},
                      "How long to sample; the answer comes after that."),
                query("format", {"enum": ["text", "speedscope"], "default": "text"}, "The profile's form."),
            ], operation_id="profileWorker",
            description="Samples the event loop thread of the worker that takes this request (all of its "
            "requests, not this one alone) for `seconds`, then answers. One profile at a time per worker (409 "
            "`profile_in_progress`). Other query parameters are refused (400)."),
        ("GET", "/v1/key"): _op("This key: its limits, budget left and usage", "Keys",
                                {"200": ok("The key's own view.", ref("KeyView")), **errors(401, 403)},
                                operation_id="ownKey"),
    }


def _template_operations() -> dict[OperationKey, Operation]:
    template_id = path_param("template_id", "The template's id.")
    return {
        ("POST", "/admin/templates"): _op(
            "Create a prompt template", "Admin", {"201": ok("Its version 1.", ref("TemplateVersion")),
                                                  **errors(400, 401, 403, 409, 413)},
            body=json_body(ref("TemplateCreateRequest")), operation_id="createTemplate",
            description="Admin keys only. 409 `already_exists` for an id that is taken; 400 naming any "
            "placeholder the messages use without declaring it in `variables`."),
        ("GET", "/admin/templates"): _op(
            "List prompt templates", "Admin", {"200": ok("Every template: its latest version and times.",
                                                         ref("TemplateList")), **errors(401, 403)},
            operation_id="listTemplates"),
        ("GET", "/admin/templates/{template_id}"): _op(
            "Retrieve a template's version", "Admin", {"200": ok("The latest version, or the one asked for.",
                                                                 ref("TemplateVersion")),
                                                       **errors(400, 401, 403, 404)},
            parameters=[template_id, query("version", {"type": "integer", "minimum": 1}, "This version.")],
            operation_id="getTemplate"),
        ("GET", "/admin/templates/{template_id}/versions"): _op(
            "List a template's versions", "Admin", {"200": ok("Every version, oldest first.",
                                                              ref("TemplateVersionList")), **errors(401, 403, 404)},
            parameters=[template_id], operation_id="listTemplateVersions"),
        ("POST", "/admin/templates/{template_id}/versions"): _op(
            "Add a template's next version", "Admin", {"201": ok("The new version (versions never change).",
                                                                 ref("TemplateVersion")),
                                                       **errors(400, 401, 403, 404, 413)},
            parameters=[template_id], body=json_body(ref("TemplateVersionRequest")),
            operation_id="addTemplateVersion"),
        ("DELETE", "/admin/templates/{template_id}"): _op(
            "Delete a template and all its versions", "Admin", {"200": ok("Deleted.", ref("TemplateDeleted")),
                                                                **errors(401, 403, 404)},
            parameters=[template_id], operation_id="deleteTemplate"),
    }


def _ops_operations() -> dict[OperationKey, Operation]:
    health = {"200": ok("Alive.", ref("Health"))}
    page = {"200": ok("The status page.", {"type": "string"}, media="text/html")}
    return {
        ("GET", "/health"): _op("Liveness", "Operations", health, security=PUBLIC, operation_id="health"),
        ("GET", "/healthz"): _op("Liveness (the same as /health)", "Operations", health, security=PUBLIC,
                                 operation_id="healthz"),
        ("GET", "/ready"): _op("Readiness: backends discovered, not draining", "Operations",
                               {"200": ok("Ready.", ref("Ready")), "503": ok("Not ready (starting or stopping).",
                                                                             ref("Ready"))},
                               security=PUBLIC, operation_id="ready"),
        ("GET", "/"): _op("The status page", "Operations", page, security=PUBLIC, operation_id="root"),
        ("GET", "/status"): _op("The status page", "Operations", page, security=PUBLIC, operation_id="statusPage"),
        ("GET", "/static/{__file_uri__}"): _op(
            "The status page's files", "Operations",
            {"200": ok("The file.", {"type": "string"}, media="*/*"), **errors(404)},
            security=PUBLIC, parameters=[path_param("__file_uri__", "A file under static/.")],
            operation_id="staticFile"),
        ("GET", "/statsz"): _op(
            "The status page's data", "Operations", {"200": ok("The appliance at a glance.", ref("Statsz")),
                                                     **errors(401, 403)},
            security=KEY_OR_LOOPBACK, operation_id="statsz",
            description="Without a key from loopback (or from anywhere with `[status] public`); else a key."),
        ("GET", "/metrics"): _op(
            "Prometheus metrics", "Operations",
            {"200": ok("The exposition format.", {"type": "string"}, media="text/plain"), **errors(401, 403)},
            security=KEY_OR_LOOPBACK, operation_id="metrics",
            description="Without a key unless `[metrics] require_key`."),
        ("GET", "/openapi.json"): _op(
            "This OpenAPI document", "Operations", {"200": ok("OpenAPI 3.1.", ref("OpenAPIDocument"))},
            security=PUBLIC, operation_id="openapi",
            description="Public, like /health: it describes the routes, the same for every installation of "
            "this version, and holds nothing of the configuration."),
    }


def _proxy_operations() -> dict[OperationKey, Operation]:
    parameters = [
        path_param("backend", "A configured or discovered backend's name."),
        path_param("path", "The backend's own path from its server root, e.g. `tokenize`, `slots`, `api/show`, "
                   "percent-encoded as the backend expects it. Refused (400 `invalid_value`, param `path`): "
                   "`.` or `..` segments (`%2e` too), `%2f`, `%5c`, `%25` (double encoding), `%00`-`%1f`, control "
                   "characters, backslashes, and absolute URLs (`//host`, `http:`)."),
    ]
    answer = {"default": {"description": "The backend's answer as it sent it: its status, headers and body, "
                          "streamed. Or the appliance's own error, in the envelope: 400 `invalid_value` (the path), "
                          "401, 403 `endpoint_not_allowed`, 404 `not_found` (no such backend), 413 `body_too_large`, "
                          "429, 502 `backend_unreachable`, 504 `backend_timeout`."}}
    body = {"required": False, "content": {
        JSON: {"schema": {}},
        "application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}},
    }}
    description = ("A raw call to one backend, for what the appliance has no route for (vLLM's `/tokenize`, "
                   "llama.cpp's `/slots`, Ollama's `/api/show`). Admin keys, or keys whose `endpoints` name "
                   "`/proxy/{backend}/...`. The query string passes unchanged; the client's Host, hop-by-hop headers "
                   "and key stay here, the backend's own key goes instead; bodies stream both ways.")
    operations = {}
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        operations[(method, "/proxy/{backend}/{path}")] = _op(
            f"{method} a backend's own path", "Proxy", answer, parameters=parameters,
            body=body if method in ("POST", "PUT", "PATCH") else None, description=description,
            operation_id="proxy" + method.capitalize())
    return operations
