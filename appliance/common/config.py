"""One frozen Settings model, validated once and passed down: what every setting is, its default and its checks.

How a file, the environment and the command line become one (and what a reload may change): config_file.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from appliance.common import capabilities

DEFAULT_PORT = 8100
DEFAULT_DATA_DIR = "appliance-data"

# The guardrails a request, key, route or [guardrails] enforce may name (appliance/guardrails/).
GUARDRAILS = ("pii", "content_moderation", "schema_validation")
GuardrailName = Literal["pii", "content_moderation", "schema_validation"]
PII_KINDS = ("email", "phone", "card", "iban", "ip", "secret")
PiiKind = Literal["email", "phone", "card", "iban", "ip", "secret"]
Direction = Literal["input", "output", "both"]

# Ports probed on 127.0.0.1 when no backend is configured (zero-config discovery).
DISCOVERY_PORTS = (11434, 8000, 8080, 9931, 1234, 30000)


class ConfigError(Exception):
    """A config file or value is wrong; the message names the file, the key and the problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Model):
    host: str = Field("127.0.0.1", description="Address to bind. Loopback unless told otherwise.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port to listen on.")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64,
                         description="Worker processes (default: CPU count).")
    single_process: bool = Field(False, description="Serve from one process, no workers (tiny hosts).")
    data_dir: Path = Field(Path(DEFAULT_DATA_DIR), description="Folder for the SQLite database and files.")
    max_body_mb: float = Field(32, gt=0, description="Largest accepted request body, in MB.")
    max_upload_mb: float = Field(1024, gt=0, description="Largest multipart upload streamed to a backend (image "
                                 "edits, transcriptions, translations), in MB; never held in memory.")
    max_header_kb: int = Field(32, ge=1, le=1024, description="Largest request line plus headers, in KB (431 above).")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS ('*' for any).")
    tls_cert: Path | None = Field(None, description="PEM certificate for HTTPS.")
    tls_key: Path | None = Field(None, description="PEM private key for HTTPS.")
    graceful_timeout_s: float = Field(15, ge=0, description="How long in-flight requests may drain on stop.")
    drain_delay_s: float = Field(0, ge=0, le=60,
                                 description="Seconds /ready answers 503 before the listener closes on stop.")
    flush_interval_ms: int = Field(250, ge=10, le=60_000, description="Buffered database writes, flush period.")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self


class BackendSettings(_Model):
    name: str = Field(description="Unique name; `name/model` in a request forces this backend.")
    type: Literal["anthropic", "openai", "ollama"] = Field("openai", description="Wire protocol of the backend.")
    url: str = Field(description="Base URL, e.g. http://127.0.0.1:8000/v1 (openai) or http://127.0.0.1:11434.")
    api_key: SecretStr | None = Field(None, description="Sent to the backend as a bearer token.")
    timeout_s: float = Field(300, gt=0, description="Total time allowed per upstream request.")
    connect_timeout_s: float = Field(3, gt=0, description="Time allowed to open a connection.")
    discover: bool = Field(True, description="List the backend's models at start and every interval.")
    models: list[str] = Field(default_factory=list, description="Models served, when discover is off.")
    capabilities: list[str] | None = Field(None, description="What it serves: chat, completions, embeddings, "
                                           "rerank, moderations, images, transcriptions, speech, audio "
                                           "(default: by its type, see README).")
    cost_per_hour: float = Field(0, ge=0, allow_inf_nan=False, description="USD per hour of the machine or GPU "
                                 "behind it: each request is charged its share of the busy time as "
                                 "compute_cost_usd (0: off).")
    max_concurrency: int | None = Field(None, gt=0, le=100_000, description="Requests it serves at once: beyond "
                                        "this, requests wait in the appliance's fair queue ([admission]). Default: "
                                        "learned where the server tells (llama.cpp /slots; llama-cpp-python: 1), "
                                        "else none (no queue).")

    @field_validator("capabilities")
    @classmethod
    def _known_capabilities(cls, value: list[str] | None) -> list[str] | None:
        unknown = [name for name in value or () if not capabilities.known(name)]
        if unknown:
            raise ValueError(f"unknown {', '.join(map(repr, unknown))}; use "
                             f"{', '.join([*capabilities.NAMES, *capabilities.GROUPS])}")
        return value

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("use letters, digits, '.', '_' or '-' (no '/')")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")


class RouteCacheSettings(_Model):
    semantic: bool | None = Field(None, description="Semantic cache for this route (default: [cache] semantic).")
    semantic_threshold: float | None = Field(None, gt=0, le=1, description="Its similarity threshold (default: "
                                             "[cache] semantic_threshold).")
    shared: bool | None = Field(None, description="Share this route's cache entries across keys (default: "
                                "[cache] shared).")


class ModelSettings(_Model):
    name: str = Field(description="The model name clients send; may be a glob (`claude-*`): exact names win.")
    target: str | None = Field(None, description="`backend/model` or a model name this alias points to.")
    targets: list[str] | None = Field(None, min_length=1, description="Several targets, tried per `strategy`.")
    strategy: Literal["fallback", "round_robin", "weighted", "least_latency", "least_busy"] = Field(
        "fallback", description="How a target is picked among `targets`.")
    weights: list[float] | None = Field(None, description="Per target, for strategy = weighted.")
    retries: int | None = Field(None, ge=0, le=5, description="Retries per target on retryable errors.")
    timeout_s: float | None = Field(None, gt=0, description="Total time per attempt (caps the backend's).")
    first_token_timeout_s: float | None = Field(None, gt=0, description="Streams: time to the first byte.")
    stream_stall_ms: int | None = Field(None, gt=0, description="Streams: longest silence after the first byte "
                                        "before the stream fails over (default: [routing] stream_stall_ms).")
    context_window: int | None = Field(None, gt=0, description="Overrides the discovered context window.")
    max_output_tokens: int | None = Field(None, gt=0, description="Advertised output limit.")
    capabilities: dict[str, bool] | None = Field(None, description="Overrides discovered capabilities.")
    vision: bool | None = Field(None, description="Takes images (capabilities.vision); false: images are "
                                "described in text first ([vision] describer). Default: as the backend says.")
    system_role: bool | None = Field(None, description="false: system messages are merged into the first user "
                                     "message (for chat templates that reject the system role).")
    input_per_mtok: float = Field(0, ge=0, description="USD per million prompt tokens.")
    output_per_mtok: float = Field(0, ge=0, description="USD per million completion tokens.")
    cached_input_per_mtok: float | None = Field(None, ge=0, description="USD per million cached prompt tokens.")
    rpm: int | None = Field(None, gt=0, description="Requests per minute for this model, all keys together.")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute for this model, all keys together.")
    max_concurrent: int | None = Field(None, gt=0, description="Requests in flight for this model, all keys.")
    cache: RouteCacheSettings | None = Field(None, description="This route's cache: semantic, semantic_threshold, "
                                             "shared.")
    guardrails: list[GuardrailName] = Field(default_factory=list, description="Guardrails every request to this "
                                            "route gets (added to the request's own, never removed).")

    @model_validator(mode="before")
    @classmethod
    def _vision_is_a_capability(cls, data: Any) -> Any:
        """``vision = x`` says ``capabilities.vision = x``: one place (the capabilities) for the catalog to read."""
        if not isinstance(data, dict) or not isinstance(data.get("vision"), bool):
            return data
        said = data.get("capabilities") or {}
        if not isinstance(said, dict):
            return data  # pydantic names the mistake
        if said.get("vision") is not None and said["vision"] != data["vision"]:
            raise ValueError("vision and capabilities.vision disagree")
        return {**data, "capabilities": {**said, "vision": data["vision"]}}

    @model_validator(mode="after")
    def _one_way_to_target(self) -> ModelSettings:
        if self.target and self.targets:
            raise ValueError("give target or targets, not both")
        if self.weights is not None and len(self.weights) != len(self.route_targets):
            raise ValueError("weights: one weight per target")
        if self.weights is not None and (any(w < 0 for w in self.weights) or not any(self.weights)):
            raise ValueError("weights: non-negative, at least one above 0")
        return self

    @property
    def route_targets(self) -> list[str]:
        """Where this alias sends requests (empty for an entry that only describes a model)."""
        return list(self.targets) if self.targets else [self.target] if self.target else []

    @property
    def served_model(self) -> str:
        """The model prices and limits of this entry bind: a single target, else the entry's own name."""
        targets = self.route_targets
        return targets[0] if len(targets) == 1 else self.name


class RoutingSettings(_Model):
    retry_base_s: float = Field(0.25, ge=0, description="First retry's backoff (doubles each time, with jitter).")
    retry_max_s: float = Field(8, ge=0, description="Longest backoff, Retry-After included.")
    retries: int = Field(1, ge=0, le=5, description="Default retries per target on retryable errors.")
    max_timeout_s: float = Field(600, gt=0, description="Cap for a request's own `timeout` (ms in the body).")
    breaker_failures: int = Field(5, ge=1, description="Consecutive failures that open a backend's breaker.")
    breaker_failure_rate: float = Field(0.5, gt=0, le=1, description="Failure share over the window that opens it.")
    breaker_min_requests: int = Field(10, ge=1, description="Requests in the window before the rate counts.")
    breaker_window_s: float = Field(30, gt=0, description="Window of the failure rate.")
    breaker_cooldown_s: float = Field(15, gt=0, description="Open time before one trial request goes through.")
    probe_interval_s: float = Field(10, gt=0, description="Active health probe of each backend.")
    stream_failover: bool = Field(True, description="A chat stream whose backend fails after its first token "
                                  "continues on the route's next healthy target (README: Mid-stream failover).")
    stream_stall_ms: int = Field(30_000, gt=0, description="Streams: longest silence after the first byte before "
                                 "the backend counts as failed (and the stream fails over).")


class CacheSettings(_Model):
    enabled: bool = Field(True, description="Cache non-streaming answers (temperature 0 by default).")
    ttl_s: float = Field(3600, gt=0, description="How long an answer is served from the cache.")
    max_ttl_s: float = Field(86400, gt=0, description="Cap for a request's X-Cache-TTL.")
    shared: bool = Field(False, description="Share entries across keys (default: per key).")
    nonzero_temperature: bool = Field(False, description="Also cache requests with temperature above 0.")
    max_mb: float = Field(256, gt=0, description="Size cap of the cache table; oldest entries go first.")
    memory_entries: int = Field(1024, ge=0, description="Per-worker in-memory entries in front of SQLite.")
    stream: bool = Field(False, description="Serve cached answers to streaming requests as a synthesized stream.")
    sweep_interval_s: float = Field(60, gt=0, description="How often expired entries are removed.")
    semantic: bool = Field(False, description="Also answer chat requests from earlier ones whose last user message "
                           "is similar (needs [embeddings] model); routes opt in or out with their own `cache`.")
    semantic_threshold: float = Field(0.95, gt=0, le=1, description="Cosine similarity a semantic hit needs.")
    semantic_candidates: int = Field(1000, ge=1, le=100_000, description="Most recent entries compared per "
                                     "semantic lookup (same route, parameters, conversation and key).")


class EmbeddingsSettings(_Model):
    model: str | None = Field(None, description="The model the router and the semantic cache embed text with: an "
                              "alias, a model or backend/model that serves /v1/embeddings.")
    timeout_s: float = Field(10, gt=0, description="Time allowed per embedding call.")
    max_input_chars: int = Field(1500, ge=16, description="Longest text embedded: the router embeds the start of "
                                 "a longer message; the semantic cache matches longer ones exactly only.")
    memory_entries: int = Field(4096, ge=0, description="Per-worker LRU of text -> vector.")


DEFAULT_DESCRIBE_PROMPT = (
    "Describe this image for someone who cannot see it: what it shows, any text in it (transcribed exactly), "
    "numbers, charts and layout. Answer with the description only.")


class VisionSettings(_Model):
    describer: str | None = Field(None, description="The model that describes images for models without vision: an "
                                  "alias, a model or backend/model that takes images.")
    prompt: str = Field(DEFAULT_DESCRIBE_PROMPT, min_length=1, description="The instruction sent with each image.")
    max_tokens: int = Field(300, ge=1, le=8192, description="Longest description, in tokens.")
    timeout_s: float = Field(60, gt=0, description="Time allowed per description.")
    memory_entries: int = Field(1024, ge=0, description="Per-worker LRU of image hash -> description, in front of "
                                "the SQLite table all workers share.")


class RouterProfile(_Model):
    name: str = Field(description="The profile's name (X-Appliance-Router-Profile).")
    model: str = Field(description="The model (alias, model or backend/model) this profile sends requests to.")
    description: str | None = Field(None, description="What requests belong here, in a sentence.")
    examples: list[str] = Field(default_factory=list, description="Example requests that belong here.")
    cost: float | None = Field(None, ge=0, description="The profile's price in USD per million tokens (default: "
                               "its model's input_per_mtok + output_per_mtok).")

    @model_validator(mode="after")
    def _something_to_compare(self) -> RouterProfile:
        if not (self.description and self.description.strip()) and not any(e.strip() for e in self.examples):
            raise ValueError("give a description or examples")
        return self

    @property
    def texts(self) -> list[str]:
        """What a request is compared with: the description and every example."""
        return [t for t in (self.description, *self.examples) if t and t.strip()]


class RouterSettings(_Model):
    name: str = Field("router", min_length=1, description="The model name that asks for the router.")
    cost_weight: float = Field(0, ge=0, le=1, description="Price against similarity when a request sends no "
                               "cost_weight: 0 quality only, 1 price only.")
    profiles: list[RouterProfile] = Field(default_factory=list, description="The choices ([[router.profiles]]).")


class PiiSettings(_Model):
    mode: Literal["redact", "block"] = Field("redact", description="Replace what is found with [EMAIL], [CARD]... "
                                             "(redact), or refuse with 400 guardrail_blocked (block).")
    on: Direction = Field("both", description="Check the request's messages (input), the answer (output), or both.")
    kinds: list[PiiKind] = Field(default_factory=lambda: list(PII_KINDS), min_length=1,
                                 description="What to look for: email, phone, card, iban, ip, secret.")


class ModerationSettings(_Model):
    on: Direction = Field("both", description="Check the request's messages (input), the answer (output), or both.")
    categories: dict[str, list[str]] = Field(default_factory=dict, description="Category name -> terms (whole "
                                             "words, any case) or regexes written 're:<pattern>'.")
    model: str | None = Field(None, description="A moderation model reached through the gateway's routing "
                              "(POST /v1/moderations on its backend); a flagged category blocks.")
    timeout_s: float = Field(10, gt=0, description="Time allowed for the moderation model's answer.")

    @field_validator("categories")
    @classmethod
    def _compilable(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, terms in value.items():
            for term in terms:
                if not term.strip() or term.strip() == "re:":
                    raise ValueError(f"{name}: empty term")
                if term.startswith("re:"):
                    try:
                        re.compile(term[3:])
                    except re.error as exc:
                        raise ValueError(f"{name}: {term!r} is not a regex: {exc}") from None
        return value


class SchemaValidationSettings(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema answers must "
                                               "match when the request sends none in response_format: an inline "
                                               "table, or the path of a JSON file.")
    repair: bool = Field(True, description="On a failed whole answer, ask the model once more with the error.")

    @field_validator("json_schema", mode="before")
    @classmethod
    def _from_file(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            loaded = json.loads(Path(value).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read a JSON schema from {value!r}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{value!r} does not hold a JSON object")
        return loaded


class GuardrailsSettings(_Model):
    enforce: list[GuardrailName] = Field(default_factory=list, description="Guardrails applied to every chat and "
                                         "completions request, whatever it asks.")
    pii: PiiSettings = Field(default_factory=PiiSettings)
    content_moderation: ModerationSettings = Field(default_factory=ModerationSettings)
    schema_validation: SchemaValidationSettings = Field(default_factory=SchemaValidationSettings)


class AuthSettings(_Model):
    mode: Literal["keys", "none"] = Field("keys", description="'keys' (default) or 'none' (loopback only).")
    cache_ttl_s: float = Field(1.0, gt=0, le=60,
                               description="How long a worker trusts a looked-up key; bounds revocation delay.")


class TemplatesSettings(_Model):
    cache_ttl_s: float = Field(5.0, gt=0, le=300, description="How long a worker trusts the latest version of a "
                               "template it looked up; bounds how long a new version takes to reach requests "
                               "that name none.")
    version_ttl_s: float = Field(300.0, gt=0, le=86_400, description="How long a worker keeps a numbered version "
                                 "(versions never change; this bounds how long a deleted template still serves).")
    cache_entries: int = Field(1024, ge=1, le=1_000_000, description="Template versions each worker keeps in "
                               "memory.")


class LimitsSettings(_Model):
    window_s: float = Field(60, gt=0, description="The rate-limit window (rpm/tpm count over this).")
    key_slots: int = Field(1024, ge=16, le=1_000_000, description="Keys that can hold live limit counters.")


class ResponsesSettings(_Model):
    keep_days: float = Field(30, gt=0, description="How long stored Responses are kept.")
    ws_max_minutes: float = Field(60, gt=0, description="Longest life of a Responses WebSocket connection.")


class MetricsSettings(_Model):
    require_key: bool = Field(False, description="Ask for an API key on /metrics (public by default).")
    per_key: bool = Field(False, description="Add key_id and key_name labels to the request, token and cost "
                          "series (one series per key: only with few keys).")


class LogSettings(_Model):
    keep_days: float = Field(30, gt=0, description="How long request-log rows (and stored bodies) are kept.")
    store_bodies: bool = Field(False, description="Also store request bodies and whole (non-streamed) answers.")
    max_body_kb: int = Field(64, ge=1, le=16_384, description="Stored bodies are cut to this size, in KB.")
    access: Literal["json", "text", "off"] = Field("json", description="One access-log line per request on "
                                                   "stdout: JSON, text, or none.")


class StatusSettings(_Model):
    public: bool = Field(False, description="Serve /statsz (the status page's data) without a key from anywhere, "
                         "not only from loopback.")


class FilesSettings(_Model):
    max_bytes: int = Field(536_870_912, gt=0, description="Largest upload to /v1/files, in bytes (512 MB).")
    batch_max_bytes: int = Field(209_715_200, gt=0, description="Largest upload with purpose=batch (200 MB).")
    quota_bytes: int | None = Field(None, gt=0, description="Total bytes of stored files, all keys (none: no cap).")
    sweep_interval_s: float = Field(60, gt=0, description="How often expired files are deleted.")
    dir: Path | None = Field(None, description="Where file contents are kept (default: <data_dir>/files); with "
                             "several appliances, a directory every node mounts.")


class StateSettings(_Model):
    url: str | None = Field(None, description="Redis 7 or Valkey (redis://host:6379/0, rediss://, unix://) holding "
                            "the live state several appliances share: limits, budgets, breakers, backend load, the "
                            "response cache, stored Responses, batch leases. Unset: this host's shared memory.")
    on_state_error: Literal["open", "closed"] = Field("open", description="When Redis cannot be reached: 'open' "
                                                      "lets requests through without their limits (a warning and a "
                                                      "metric say so), 'closed' refuses them with 503.")
    timeout_ms: int = Field(250, ge=10, le=60_000, description="Longest wait for one Redis call; a request never "
                            "waits longer on it.")
    retry_s: float = Field(1.0, gt=0, le=300, description="After a failed call, how long Redis is taken as down "
                           "before it is tried again (requests meanwhile do not wait on it).")
    prefix: str = Field("appliance:", min_length=1, max_length=64, description="Prefix of every Redis key (several "
                        "gateways may share one Redis).")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value


class DatabaseSettings(_Model):
    url: str | None = Field(None, description="PostgreSQL (postgresql://user:password@host:5432/db) for the durable "
                            "records: keys, usage, request log, files and batches, templates. Unset: SQLite in "
                            "the data dir.")
    pool_size: int = Field(4, ge=1, le=100, description="PostgreSQL connections per worker.")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value


class BatchesSettings(_Model):
    max_requests: int = Field(50_000, gt=0, description="Most request lines in one batch input file.")
    max_active_per_key: int = Field(100, gt=0, description="Unfinished batches one key may have.")
    max_concurrency: int | None = Field(None, gt=0, description="Batch lines in flight per backend "
                                        "(default by kind: vLLM 4, llama.cpp slots-1, others 1).")
    backend_concurrency: dict[str, int] = Field(default_factory=dict,
                                                description="Per backend name: its batch lines in flight.")
    reserve: int = Field(1, ge=0, description="Backend slots batch lines leave free for interactive requests.")
    max_attempts: int = Field(3, ge=1, le=10, description="Tries per line on connection errors, 429 and 5xx.")
    cancel_grace_s: float = Field(60, ge=0, description="How long cancel waits for lines in flight.")
    allow_mixed_models: bool = Field(False, description="Accept input files naming more than one model.")
    window_seconds_override: float | None = Field(None, gt=0, description="Tests: replaces the 24 h window.")
    lease_s: float = Field(30, gt=0, description="The runner's lease; another worker takes over after it.")
    poll_interval_s: float = Field(0.5, gt=0, description="How often the runner looks for work.")


class AdmissionSettings(_Model):
    enabled: bool = Field(True, description="Hold requests beyond a backend's capacity (max_concurrency, or "
                          "learned) in the appliance's own queue, let in by weighted fair queuing between keys.")
    queue_timeout_ms: int = Field(30_000, gt=0, le=3_600_000, description="Longest wait in the queue (a request's "
                                  "own timeout caps it); then 429 backend_overloaded with Retry-After.")
    default_weight: float = Field(1.0, gt=0, le=1000, allow_inf_nan=False, description="The share weight of keys "
                                  "that set none (and of requests without a key).")


class DiscoverySettings(_Model):
    enabled: bool = Field(True, description="Probe local ports for backends when none is configured.")
    interval_s: float = Field(60, gt=0, description="How often backends are probed and listed.")
    host: str = Field("127.0.0.1", description="Host probed for zero-config backends.")
    ports: list[int] = Field(default_factory=lambda: list(DISCOVERY_PORTS), description="Ports probed.")


class Settings(_Model):
    server: ServerSettings = Field(default_factory=ServerSettings)
    backends: list[BackendSettings] = Field(default_factory=list)
    models: list[ModelSettings] = Field(default_factory=list)
    discovery: DiscoverySettings = Field(default_factory=DiscoverySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    templates: TemplatesSettings = Field(default_factory=TemplatesSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    embeddings: EmbeddingsSettings = Field(default_factory=EmbeddingsSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    vision: VisionSettings = Field(default_factory=VisionSettings)
    responses: ResponsesSettings = Field(default_factory=ResponsesSettings)
    files: FilesSettings = Field(default_factory=FilesSettings)
    batches: BatchesSettings = Field(default_factory=BatchesSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    guardrails: GuardrailsSettings = Field(default_factory=GuardrailsSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    config_file: Path | None = Field(None, description="Where these settings came from (not a TOML key).")

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> Settings:
        if self.auth.mode == "none" and not is_loopback(self.server.host):
            raise ValueError(f"auth.mode: 'none' is only allowed when bound to a loopback address, "
                             f"not {self.server.host!r}; create keys instead")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for kind, names in (("backends", [b.name for b in self.backends]),
                            ("models", [m.name for m in self.models])):
            seen: set[str] = set()
            for i, name in enumerate(names):
                if name in seen:
                    raise ValueError(f"{kind}[{i}].name: duplicate name {name!r}")
                seen.add(name)
        return self

    @model_validator(mode="after")
    def _router_and_semantic_cache(self) -> Settings:
        names = [p.name for p in self.router.profiles]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"router.profiles[{i}].name: duplicate name {name!r}")
        if self.router.profiles and self.router.name in {m.name for m in self.models}:
            raise ValueError(f"router.name: {self.router.name!r} is also a [[models]] name")
        semantic = self.cache.semantic or any(m.cache and m.cache.semantic for m in self.models)
        if (self.router.profiles or semantic) and not self.embeddings.model:
            wanted = "router.profiles" if self.router.profiles else "the semantic cache"
            raise ValueError(f"embeddings.model: {wanted} needs an embedding model")
        return self

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    @property
    def longest_timeout_s(self) -> float:
        return max([b.timeout_s for b in self.backends] or [BackendSettings.model_fields["timeout_s"].default])

    def masked(self) -> dict[str, Any]:
        """The resolved settings as plain data, secrets replaced by '********'."""
        data = self.model_dump(mode="json", by_alias=True)  # the keys as a file writes them ("schema")
        for section in ("state", "database"):
            data[section]["url"] = masked_url(data[section]["url"])
        return data


def masked_url(url: str | None) -> str | None:
    """``url`` with its password (if any) replaced by '********': engine URLs may carry one."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:********@{host}").geturl()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
