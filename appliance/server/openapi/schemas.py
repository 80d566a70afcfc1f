"""The appliance's own schemas: errors, operations routes, the admin API, and the Anthropic Messages subset.

What pydantic already models (the key fields the admin API accepts) is generated from the model; the rest
is written here, next to nothing else, so a reader can hold it beside the code that builds the objects
(accounts/auth.public_view, accounts/reports, server/statsz, api/messages).
"""

from __future__ import annotations

from typing import Any

from appliance.accounts.key_fields import KeyFields
from appliance.common.config import GUARDRAILS
from appliance.common.errors import CODES

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# The gateway's own request field (README "Guardrails"): read by the appliance, never sent to a backend.
GUARDRAILS_FIELD: Schema = {"type": "array", "items": {"enum": list(GUARDRAILS)}, "description": "Guardrails "
                            "for this request, added to those its key, route and config enforce."}


def nullable(schema: Schema) -> Schema:
    if isinstance(schema.get("type"), str) and len(schema) == 1:
        return {"type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], required: tuple[str, ...] | None = None, **extra: Any) -> Schema:
    """An object; every property is required unless ``required`` names fewer."""
    return {"type": "object", "properties": properties,
            "required": list(properties if required is None else required), **extra}


def list_of(item: Schema, **more: Schema) -> Schema:
    return obj({"object": {"const": "list"}, "data": {"type": "array", "items": item}, **more})


STRING, INTEGER, NUMBER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
# A stream that failed over mid-way (README: Mid-stream failover): in the request log and the stream's last event.
FAILOVER = obj({"from": STRING, "to": STRING, "at_token": INTEGER})


def error_schemas() -> dict[str, Schema]:
    error = obj({
        "message": STRING,
        "type": {"type": ["string", "null"], "description": "invalid_request_error, permission_error, "
                 "rate_limit_error, server_error (or a backend's own)."},
        "code": {"type": ["string", "null"], "description": "The appliance's stable codes: "
                 + ", ".join(sorted(CODES)) + "; a backend's own code when its envelope passes through."},
        "param": {"type": ["string", "null"], "description": "The request field at fault, when one is."},
        "request_id": {"type": "string", "description": "The X-Request-ID of this request. Absent when a "
                       "backend's own envelope passes through unchanged."},
    }, required=("message", "type", "code", "param"))
    anthropic = obj({
        "type": {"const": "error"},
        "error": obj({"type": STRING, "message": STRING}),
        "request_id": STRING,
    }, required=("type", "error"))
    return {
        "ApplianceError": error,
        "ApplianceErrorResponse": obj({"error": ref("ApplianceError")},
                                      description="OpenAI's error envelope, with the request id."),
        "AnthropicErrorResponse": {**anthropic, "description": "Anthropic's error shape (the /v1/messages routes)."},
    }


def ops_schemas() -> dict[str, Schema]:
    breaker = obj({
        "state": {"enum": ["closed", "open", "half_open"]}, "consecutive_failures": INTEGER,
        "opened_at": nullable(NUMBER), "retry_after_s": NUMBER, "window_ok": INTEGER, "window_fail": INTEGER,
        "in_flight": INTEGER, "load": nullable({"type": "object"}), "up": nullable(BOOLEAN),
        "probed_at": nullable(NUMBER),
    }, description="The backend's circuit breaker and latest probe, as all workers see them.")
    backend = obj({
        "state": STRING, "kind": nullable(STRING), "models": INTEGER, "error": nullable(STRING), "breaker": breaker,
    })
    return {
        "Health": obj({"status": {"const": "ok"}, "version": STRING, "pid": INTEGER}),
        "Ready": obj({
            "status": {"enum": ["ready", "degraded", "not_ready"]},
            "reason": nullable(STRING),
            "degraded": {"type": "array", "items": STRING,
                         "description": "What is impaired while answers still flow (e.g. `database_writes`)."},
            "backends": {"type": "object", "additionalProperties": backend},
        }),
        "Reload": obj({
            "reloaded": {**BOOLEAN, "description": "False when the file says what the running config says."},
            "generation": INTEGER,
            "restart_required": {"type": "array", "items": STRING,
                                 "description": "Changed keys that take effect only at the next start."},
            "workers_behind": {"type": "array", "items": INTEGER,
                               "description": "Workers that had not applied it within 5 s."},
        }),
        "Statsz": obj({
            "version": STRING, "now": NUMBER, "uptime_s": NUMBER,
            "workers": obj({"configured": INTEGER, "alive": INTEGER}), "inflight": INTEGER,
            "degraded": {"type": "array", "items": STRING},
            **{name: {"type": "object"} for name in ("totals", "limits", "db", "batches")},
            **{name: {"type": "array", "items": {"type": "object"}}
               for name in ("models", "backends", "traffic", "recent_errors")},
        }, description="The status page's data; README \"GET /statsz\" describes every field."),
        "OpenAPIDocument": obj({"openapi": STRING, "info": {"type": "object"}, "paths": {"type": "object"}},
                               description="This document."),
    }


def provider_schemas() -> dict[str, Schema]:
    """GET /v1/providers (core/provider_catalog.py)."""
    spread = nullable(obj({"p50": NUMBER, "p95": NUMBER, "samples": INTEGER}))
    load = obj({"queue_waiting": NUMBER, "running": NUMBER, "slots_idle": nullable(INTEGER),
                "slots_total": nullable(INTEGER), "age_s": NUMBER},
               description="The backend's own latest load sample (vLLM /metrics, llama.cpp /slots).")
    price = obj({"input_per_mtok": NUMBER, "output_per_mtok": NUMBER, "cached_input_per_mtok": NUMBER},
                description="USD per million tokens, from [[models]].")
    provider = obj({
        "object": {"const": "provider"},
        "backend": STRING,
        "kind": {**STRING, "description": "openai, ollama, anthropic, or the server discovery found."},
        "up": nullable(BOOLEAN),
        "state": {"enum": ["starting", "ready", "unreachable"], "description": "The latest probe, by any worker."},
        "breaker": obj({"state": {"enum": ["closed", "open", "half_open"]}, "consecutive_failures": INTEGER,
                        "retry_after_s": NUMBER}),
        "available": {**BOOLEAN, "description": "The breaker lets a request through now."},
        "in_flight": {**INTEGER, "description": "Requests in flight to the backend, all workers."},
        "load": nullable(load),
        "latency_ms": {**spread, "description": "Over the window; with `model`, of that backend model."},
        "ttft_ms": {**spread, "description": "Time to first token of streams, likewise."},
        "models": {"type": "array", "items": STRING, "description": "Without `model`: the backend's models "
                   "the key may reach."},
        "model": {**STRING, "description": "With `model`: the backend's name for it."},
        "first_choice": {**BOOLEAN, "description": "Where the next request for `model` goes."},
        "rank": {**INTEGER, "description": "The place in the order the route's strategy tries its targets now."},
        "model_in_flight": INTEGER,
        "price": nullable(price),
    }, required=("object", "backend", "kind", "up", "state", "breaker", "available", "in_flight", "load",
                 "latency_ms", "ttft_ms"))
    return {"ProviderList": list_of(provider, **{
        "model": nullable(STRING),
        "route": {**nullable(STRING), "description": "The alias (pattern) or model that `model` resolved to."},
        "strategy": nullable({"enum": ["fallback", "round_robin", "weighted", "least_latency", "least_busy"]}),
        "window_s": {**NUMBER, "description": "The window of `latency_ms` and `ttft_ms`, in seconds."},
    })}


def key_schemas() -> dict[str, Schema]:
    create = KeyFields.model_json_schema()
    create.pop("title", None)
    update = {**create, "required": []}
    update.pop("description", None)
    fields = create["properties"]
    key = obj({
        "id": STRING, "object": {"const": "api_key"}, "prefix": STRING,
        **{name: schema for name, schema in fields.items()},
        "upstream_keys": {"type": "array", "items": STRING, "description": "The backends this key has its own "
                          "credential for: names only, never a secret or a part of one."},
        "created_at": NUMBER, "updated_at": NUMBER,
    })
    usage_row = obj({
        "requests": INTEGER, "errors": INTEGER, "prompt_tokens": INTEGER, "completion_tokens": INTEGER,
        "cached_tokens": INTEGER, "cost_usd": NUMBER,
        "compute_cost_usd": {**NUMBER, "description": "The share of busy time of backends with a cost_per_hour."},
    }, description="One group's totals, plus the group's own column: day, model or key.")
    recent = obj({
        "request_id": STRING, "created_at": NUMBER, "endpoint": STRING, "model": nullable(STRING),
        "status": INTEGER, "prompt_tokens": nullable(INTEGER), "completion_tokens": nullable(INTEGER),
        "cost_usd": nullable(NUMBER), "latency_ms": nullable(NUMBER),
    })
    log_row = obj({
        "id": INTEGER, "request_id": STRING, "created_at": NUMBER, "endpoint": STRING,
        **{name: nullable(STRING) for name in ("model", "backend", "backend_model", "error_code", "key_id",
                                                "cache")},
        "template": {**nullable(STRING), "description": "The prompt template used, as `id@version`."},
        "status": INTEGER, "stream": BOOLEAN, "estimated": BOOLEAN,
        **{name: nullable(NUMBER) for name in ("latency_ms", "overhead_ms", "ttft_ms", "input_cost_usd",
                                                "output_cost_usd", "cost_usd", "compute_cost_usd")},
        **{name: nullable(INTEGER) for name in ("prompt_tokens", "completion_tokens", "cached_tokens")},
        "guardrails": nullable({"type": "object", "additionalProperties": {
            "enum": ["passed", "redacted", "blocked", "failed"]}, "description": "Each guardrail applied and its "
            "outcome; null when none applied."}),
        "failover": nullable({**FAILOVER, "description": "Where a stream's backend failed after its first token "
                              "and which target went on (README: Mid-stream failover); null: none."}),
        "request_body": {"description": "The stored request (JSON, or text when cut short); null unless "
                         "[log] store_bodies."},
        "response_body": {"description": "The stored response, likewise."},
    })
    key_view = obj({
        "id": STRING, "object": {"const": "api_key"}, "name": STRING, "role": STRING,
        "limits": obj({"rpm": nullable(INTEGER), "tpm": nullable(INTEGER), "max_concurrent": nullable(INTEGER),
                       "window_s": NUMBER}),
        "state": nullable({"type": "object"}),
        "usage": obj({"today": nullable(usage_row), "recent": {"type": "array", "items": recent}}),
    }, description="The key's own record (as in the admin API) with its limits, budget state and usage.")
    return {
        "KeyCreateRequest": create,
        "KeyUpdateRequest": update,
        "ApiKey": key,
        "ApiKeyWithSecret": {"allOf": [ref("ApiKey"), obj({"key": {"type": "string", "description": "The secret, "
                                                                   "shown this once."}})]},
        "ApiKeyList": list_of(ref("ApiKey")),
        "ApiKeyDeleted": obj({"id": STRING, "object": {"const": "api_key"}, "deleted": {"const": True}}),
        "KeyView": key_view,
        "UsageReport": obj({"object": {"const": "list"}, "group_by": {"enum": ["day", "model", "key"]},
                            "data": {"type": "array", "items": usage_row}}),
        "RequestLog": list_of(log_row),
        "ResponseDeleted": obj({"id": STRING, "object": {"const": "response"}, "deleted": {"const": True}}),
    }


def messages_schemas() -> dict[str, Schema]:
    """The Anthropic Messages subset the appliance serves; unknown fields pass through to the backend."""
    block = {"type": "object", "required": ["type"], "properties": {"type": STRING},
             "description": "A content block: text, image, document, tool_use, tool_result, thinking..."}
    content = {"anyOf": [STRING, {"type": "array", "items": block}]}
    message = obj({"role": {"enum": ["user", "assistant"]}, "content": content})
    system = {"anyOf": [STRING, {"type": "array", "items": block}]}
    request = obj({
        "model": STRING,
        "max_tokens": {"type": "integer", "minimum": 1},
        "messages": {"type": "array", "items": message},
        "system": system,
        "stream": BOOLEAN,
        "temperature": {"type": "number", "minimum": 0},
        "top_p": NUMBER,
        "top_k": INTEGER,
        "stop_sequences": {"type": "array", "items": STRING},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"type": "object"},
        "thinking": {"type": "object"},
        "metadata": {"type": "object"},
        "template": {**ref("TemplateUse"), "description": "Its system and developer messages go ahead of `system`, "
                     "the others ahead of `messages` (which may then be empty)."},
        "guardrails": GUARDRAILS_FIELD,
    }, required=("model", "max_tokens", "messages"))
    usage = obj({"input_tokens": INTEGER, "output_tokens": INTEGER,
                 "cache_creation_input_tokens": nullable(INTEGER), "cache_read_input_tokens": nullable(INTEGER)},
                required=("input_tokens", "output_tokens"))
    response = obj({
        "id": STRING, "type": {"const": "message"}, "role": {"const": "assistant"},
        "content": {"type": "array", "items": block}, "model": STRING,
        "stop_reason": nullable(STRING), "stop_sequence": nullable(STRING), "usage": usage,
    })
    count = obj({"model": STRING, "messages": {"type": "array", "items": message}, "system": system,
                 "tools": {"type": "array", "items": {"type": "object"}}, "thinking": {"type": "object"},
                 "template": {**ref("TemplateUse"), "description": "Counted with its messages, as on /v1/messages."}},
                required=("model", "messages"))
    return {
        "AnthropicMessagesRequest": request,
        "AnthropicMessage": response,
        "AnthropicStreamEvent": {"type": "object", "required": ["type"], "properties": {"type": STRING}},
        "AnthropicCountTokensRequest": count,
        "AnthropicTokenCount": obj({"input_tokens": INTEGER}),
    }


def template_schemas() -> dict[str, Schema]:
    """/admin/templates and a request's ``template`` field (core/templates.py checks and builds them)."""
    slug = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,63}$",
            "description": "A slug: lower-case letters, digits, `_`, `.` and `-`."}
    part = obj({"type": {"const": "text"}, "text": STRING}, additionalProperties=False)
    message = obj({
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [STRING, {"type": "array", "minItems": 1, "items": part}],
                    "description": "Text that may hold `{{name}}` placeholders of declared variables."},
        "name": STRING,
    }, required=("role", "content"), additionalProperties=False)
    variable = obj({"default": {**STRING, "description": "Absent: the variable is required."},
                    "description": STRING}, required=(), additionalProperties=False)
    variables = {"type": "object", "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                 "additionalProperties": nullable(variable)}
    version_fields = {
        "messages": {"type": "array", "minItems": 1, "items": message},
        "variables": nullable(variables),
        "description": nullable({"type": "string", "maxLength": 2000}),
    }
    version = obj({
        "object": {"const": "template.version"}, "id": STRING, "version": INTEGER, "latest_version": INTEGER,
        "description": nullable(STRING), "messages": {"type": "array", "items": message}, "variables": variables,
        "created_at": INTEGER,
    })
    summary = obj({"object": {"const": "template"}, "id": STRING, "latest_version": INTEGER,
                   "description": nullable(STRING), "created_at": INTEGER, "updated_at": INTEGER})
    return {
        "TemplateCreateRequest": obj({"id": slug, **version_fields}, required=("id", "messages"),
                                     additionalProperties=False,
                                     description="400 names any placeholder the messages use undeclared."),
        "TemplateVersionRequest": obj(version_fields, required=("messages",), additionalProperties=False,
                                      description="400 names any placeholder the messages use undeclared."),
        "TemplateVersion": version,
        "TemplateVersionList": list_of(version),
        "TemplateList": list_of(summary),
        "TemplateDeleted": obj({"id": STRING, "object": {"const": "template"}, "deleted": {"const": True},
                                "versions": INTEGER}),
        "TemplateUse": obj({
            "id": slug,
            "version": {"type": "integer", "minimum": 1, "description": "Absent: the latest version."},
            "variables": {"type": "object", "additionalProperties": {"anyOf": [STRING, NUMBER]},
                          "description": "A value for each variable without a default, and any others to set."},
        }, required=("id",), additionalProperties=False, description="A prompt template whose rendered messages go "
            "ahead of the request's own (which may then be left out). 404 `not_found` for an unknown id or "
            "version; 400 naming missing or undeclared variables (param `template.variables`)."),
    }


def rerank_schemas() -> dict[str, Schema]:
    """Cohere's and Jina's rerank, vLLM's score: no OpenAI schema exists; these are the shapes the servers take."""
    document = {"anyOf": [STRING, {"type": "object", "required": ["text"], "properties": {"text": STRING}}]}
    texts = {"anyOf": [STRING, {"type": "array", "items": STRING}]}
    return {
        "RerankRequest": obj({
            "model": {**STRING, "description": "The model or alias; routed like chat."},
            "query": STRING,
            "documents": {"type": "array", "items": document, "description": "Texts, or objects with a `text`."},
            "top_n": {"type": "integer", "minimum": 0, "description": "Return the best so many."},
            "return_documents": {**BOOLEAN, "description": "Echo each document in its result."},
        }, required=("model", "query", "documents"),
            description="Other fields pass through to the backend (e.g. Cohere's `max_tokens_per_doc`)."),
        "RerankResponse": obj({
            "results": {"type": "array", "items": obj({
                "index": INTEGER, "relevance_score": NUMBER,
                "document": {"type": "object", "properties": {"text": STRING}},
            }, required=("index", "relevance_score"))},
            "id": STRING, "model": STRING,
            "usage": {"type": "object", "description": "As the backend reports it (vLLM, Jina: `total_tokens`)."},
            "meta": {"type": "object", "description": "Cohere's (`billed_units`)."},
        }, required=("results",), description="The backend's answer, unchanged."),
        "ScoreRequest": obj({"model": STRING, "text_1": texts, "text_2": texts}, required=("model",),
                            description="vLLM's score request; other fields pass through."),
        "ScoreResponse": obj({
            "data": {"type": "array", "items": obj({"index": INTEGER, "object": STRING, "score": NUMBER},
                                                   required=("index", "score"))},
            "id": STRING, "object": STRING, "created": INTEGER, "model": STRING, "usage": {"type": "object"},
        }, required=("data",), description="The backend's answer, unchanged."),
    }


def router_schemas() -> dict[str, Schema]:
    """POST /v1/router and GET /v1/router/profiles (core/router.py builds the objects)."""
    request = obj({
        "messages": {"type": "array", "minItems": 1, "items": ref("ChatCompletionRequestMessage")},
        "model": {**STRING, "description": "Ignored: the router chooses."},
        "models": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                   "description": "Only profiles whose model is one of these."},
        "cost_weight": {"type": "number", "minimum": 0, "maximum": 1,
                        "description": "0: the most similar profile; 1: the cheapest (default [router] cost_weight)."},
        "execute": {**BOOLEAN, "description": "false: answer with the decision only (default true)."},
        "template": {**ref("TemplateUse"), "description": "Rendered before the router judges the prompt."},
        "stream": BOOLEAN,
    }, required=("messages",), description="A chat completions body (its other fields go to the chosen model).")
    score = obj({"profile": STRING, "model": STRING, "similarity": NUMBER,
                 "cost": {**NUMBER, "description": "The profile's price relative to the dearest candidate."},
                 "score": {**NUMBER, "description": "(1 - cost_weight) * similarity - cost_weight * cost."}})
    decision = obj({"object": {"const": "router.decision"}, "model": STRING, "profile": STRING,
                    "cost_weight": NUMBER, "scores": {"type": "array", "items": score, "description": "Best first."}})
    profile = obj({"object": {"const": "router.profile"}, "name": STRING, "model": STRING,
                   "description": nullable(STRING), "examples": {"type": "array", "items": STRING},
                   "cost": {**nullable(NUMBER), "description": "USD per million tokens."},
                   "served": {**BOOLEAN, "description": "A backend serves its model right now."}})
    return {"RouterRequest": request, "RouterDecision": decision, "RouterProfileList": list_of(profile)}


def own_schemas() -> dict[str, Schema]:
    return {**error_schemas(), **ops_schemas(), **provider_schemas(), **key_schemas(), **messages_schemas(),
            **rerank_schemas(), **router_schemas(), **template_schemas()}


# OpenAI's request bodies that take a ``template`` besides their own fields (their $ref stays OpenAI's).
TEMPLATED_REQUESTS = ("CreateChatCompletionRequest", "CreateResponse")


def with_template(schema: Schema) -> Schema:
    return {"allOf": [schema, {"type": "object", "properties": {"template": ref("TemplateUse")}}]}
