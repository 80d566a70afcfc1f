"""An Ollama emulator: the native API as spec §3 describes it, with answers a test can script.

Models served by default:

  llama3.2:latest    family llama, completion + tools, llama.context_length 8192
  all-minilm:latest  family bert, embedding only, 384 dimensions
  llava:latest       completion + vision

Nothing is loaded (``/api/ps`` is empty) until a test calls ``load()`` or sends a load request (empty
messages or prompt); ordinary generation leaves ``/api/ps`` alone so tests stay independent.

Scripting: ``script(model, ...)`` queues the answer for the next request(s) to that model on /api/chat,
/api/generate or /api/embed; unscripted requests get a short deterministic text. ``requests`` records
every POST as ``Seen(path, body)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiohttp import web

from tests.support.threaded import ThreadedServer

VERSION = "0.12.6"
DEFAULT_PIECES = ["Hello", " from", " Ollama."]
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MID_STREAM_MESSAGE = "an error was encountered while running the model"
NDJSON = "application/x-ndjson"


@dataclass
class FakeModel:
    name: str
    family: str
    capabilities: list[str]
    context_length: int
    embedding_length: int
    parameter_size: str = "3.2B"
    size: int = 2019393189

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": self.family, "families": [self.family],
                "parameter_size": self.parameter_size, "quantization_level": "Q4_K_M"}


def default_models() -> dict[str, FakeModel]:
    models = [
        FakeModel("llama3.2:latest", "llama", ["completion", "tools"], 8192, 3072),
        FakeModel("all-minilm:latest", "bert", ["embedding"], 512, 384, "23M", 45960996),
        FakeModel("llava:latest", "llama", ["completion", "vision"], 4096, 4096, "7B", 4733363377),
    ]
    return {m.name: m for m in models}


@dataclass
class Script:
    """One scripted answer. ``status`` (with ``error``) answers with an error instead."""

    content_pieces: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    done_reason: str = "stop"
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    status: int | None = None
    error: str | None = None
    mid_stream_error: str | None = None


class Seen(NamedTuple):
    path: str
    body: Any


class BadRequest(Exception):
    """An Ollama error answer: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Loaded:
    context_length: int
    expires_at: str = field(default_factory=lambda: rfc3339(time.time() + 300))


def rfc3339(at: float | None = None) -> str:
    """Go's time format as Ollama writes it: nanosecond fraction, UTC."""
    ns = time.time_ns() if at is None else int(at * 1e9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def normalise(name: str) -> str:
    """Ollama's rule: a name without a tag means ':latest'."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for a text."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [rng.gauss(0, 1) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeOllama:
    def __init__(self, port: int | None = None) -> None:
        self._lock = threading.Lock()
        self.models = default_models()
        self.loaded: dict[str, Loaded] = {}
        self.requests: list[Seen] = []
        self._scripts: dict[str, list[Script]] = {}
        app = web.Application()
        app.router.add_get("/", self.root)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_post("/api/embeddings", self.embeddings)
        self.server = ThreadedServer(app, port)

    # ------------------------------------------------------------------ test controls

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> FakeOllama:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def script(self, model: str, *, times: int = 1, **answer: Any) -> None:
        """Queue an answer (Script's fields) for the next ``times`` requests to ``model``."""
        with self._lock:
            self._scripts.setdefault(normalise(model), []).extend(Script(**answer) for _ in range(times))

    def load(self, model: str, context_length: int = 4096) -> None:
        """Make /api/ps report the model as loaded with this runtime window."""
        with self._lock:
            self.loaded[normalise(model)] = Loaded(context_length)

    def unload(self, model: str) -> None:
        with self._lock:
            self.loaded.pop(normalise(model), None)

    def reset(self) -> None:
        with self._lock:
            self.models = default_models()
            self.loaded.clear()
            self.requests.clear()
            self._scripts.clear()

    def seen(self, path: str) -> list[Any]:
        """The bodies POSTed to ``path``, oldest first."""
        return [s.body for s in list(self.requests) if s.path == path]

    def last(self, path: str) -> Any:
        bodies = self.seen(path)
        if not bodies:
            raise LookupError(f"the emulator saw no request on {path}")
        return bodies[-1]

    def _next_script(self, model: str) -> Script | None:
        with self._lock:
            queued = self._scripts.get(model)
            return queued.pop(0) if queued else None

    # ------------------------------------------------------------------ request helpers

    async def _body(self, request: web.Request, kind: str) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            self.requests.append(Seen(request.path, raw))
            raise BadRequest(400, str(exc)) from None
        self.requests.append(Seen(request.path, body))
        if body is None:
            raise BadRequest(400, "missing request body")
        if not isinstance(body, dict):
            raise BadRequest(400, f"json: cannot unmarshal {type(body).__name__} into Go value of type "
                             f"api.{kind}Request")
        for key, kind_of in (("options", dict), ("messages", list), ("tools", list)):
            if key in body and body[key] is not None and not isinstance(body[key], kind_of):
                raise BadRequest(400, f"json: cannot unmarshal {type(body[key]).__name__} into Go struct field "
                                 f"{kind}Request.{key}")
        return body

    def _model(self, body: dict[str, Any]) -> FakeModel:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise BadRequest(400, "model is required")
        model = self.models.get(normalise(name))
        if model is None:
            raise BadRequest(404, f"model '{name}' not found")
        return model

    @staticmethod
    def _require(model: FakeModel, *capabilities: str) -> None:
        for capability in capabilities:
            if capability not in model.capabilities:
                raise BadRequest(400, f'"{model.name}" does not support {capability}')

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    @staticmethod
    def _scripted_error(script: Script | None, model: str) -> web.Response | None:
        if script is None or (script.status is None and script.error is None):
            return None
        status = script.status or 500
        default = {404: f"model '{model}' not found", 503: BUSY_MESSAGE}.get(status, "internal error")
        return web.json_response({"error": script.error or default}, status=status)

    @staticmethod
    def _metrics(prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
        metrics = {"total_duration": 4883583458, "load_duration": 1334875, "prompt_eval_count": prompt_tokens,
                   "prompt_eval_duration": 342546000, "eval_count": eval_tokens, "eval_duration": 4535599000}
        return {k: v for k, v in metrics.items() if v}  # omitempty, as Ollama

    def _load_reply(self, model: FakeModel, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        """An empty request loads the model; with keep_alive 0 it unloads it."""
        keep_alive = body.get("keep_alive")
        unload = keep_alive in (0, "0", "0s", "0m")
        with self._lock:
            if unload:
                self.loaded.pop(model.name, None)
            else:
                options = body.get("options") or {}
                self.loaded[model.name] = Loaded(options.get("num_ctx") or 4096)
        reply: dict[str, Any] = {"model": body["model"], "created_at": rfc3339()}
        reply.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        reply.update(done=True, done_reason="unload" if unload else "load")
        return reply

    @staticmethod
    def _check_logprobs(body: dict[str, Any]) -> None:
        top = body.get("top_logprobs")
        if top is not None and not (isinstance(top, int) and 0 <= top <= 20):
            raise BadRequest(400, "top_logprobs must be between 0 and 20")

    @staticmethod
    def _pieces(script: Script | None, body: dict[str, Any]) -> tuple[list[str], str, int | None]:
        """The text pieces, done_reason and eval_count to answer with."""
        if script is not None:
            pieces = script.content_pieces if script.content_pieces is not None else []
            if script.content_pieces is None and not script.tool_calls:
                pieces = list(DEFAULT_PIECES)
            return pieces, script.done_reason, script.eval_count
        pieces = ["{", "}"] if body.get("format") else list(DEFAULT_PIECES)
        limit = (body.get("options") or {}).get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(pieces):  # num_predict cut the answer short
            return pieces[:limit], "length", limit
        return pieces, "stop", None

    # ------------------------------------------------------------------ routes

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": m.name, "model": m.name, "modified_at": "2025-05-04T17:37:44.706015396-07:00",
             "size": m.size, "digest": m.digest, "details": m.details()}
            for m in list(self.models.values())]})

    async def ps(self, request: web.Request) -> web.Response:
        with self._lock:
            loaded = sorted(self.loaded.items(), key=lambda item: item[1].expires_at, reverse=True)
        entries = []
        for name, state in loaded:
            model = self.models.get(name)
            if model is not None:
                entries.append({"name": name, "model": name, "size": model.size, "digest": model.digest,
                                "details": model.details(), "expires_at": state.expires_at,
                                "size_vram": model.size, "context_length": state.context_length})
        return web.json_response({"models": entries})

    async def show(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, "Show")
            model = self._model({"model": body.get("model") or body.get("name")})  # older clients send "name"
        except BadRequest as exc:
            return self._error(exc.status, exc.message)
        info = {"general.architecture": model.family, "general.parameter_count": 3212749888,
                f"{model.family}.context_length": model.context_length,
                f"{model.family}.embedding_length": model.embedding_length}
        reply: dict[str, Any] = {
            "modelfile": f"FROM {model.name}\n", "parameters": 'stop "<|eot_id|>"', "template": "{{ .Prompt }}",
            "details": model.details(), "model_info": info, "capabilities": model.capabilities,
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
        }
        if body.get("verbose"):
            reply["tensors"] = []
        return web.json_response(reply)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request, "Chat")
            model = self._model(body)
            self._check_logprobs(body)
            messages = body.get("messages") or []
            if not messages:
                self._require(model, "completion")
                return web.json_response(self._load_reply(model, body, chat=True))
            needs = ["completion"]
            if body.get("tools"):
                needs.append("tools")
            if any(isinstance(m, dict) and m.get("images") for m in messages):
                needs.append("vision")
            if body.get("think") not in (None, False):
                needs.append("thinking")
            self._require(model, *needs)
        except BadRequest as exc:
            return self._error(exc.status, exc.message)
        script = self._next_script(model.name)
        failure = self._scripted_error(script, body["model"])
        if failure is not None:
            return failure
        prompt = " ".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
        return await self._answer(request, body, script, estimate_tokens(prompt), chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request, "Generate")
            model = self._model(body)
            self._check_logprobs(body)
            if body.get("raw") and any(body.get(k) for k in ("template", "system", "context")):
                raise BadRequest(400, "raw mode does not support template, system, or context")
            prompt = body.get("prompt") or ""
            if not isinstance(prompt, str):
                raise BadRequest(400, "json: cannot unmarshal prompt into Go struct field GenerateRequest.prompt "
                                 "of type string")
            if not prompt and not body.get("images"):
                self._require(model, "completion")
                return web.json_response(self._load_reply(model, body, chat=False))
            needs = ["completion"]
            if body.get("suffix"):
                needs.append("insert")
            if body.get("images"):
                needs.append("vision")
            if body.get("think") not in (None, False):
                needs.append("thinking")
            self._require(model, *needs)
        except BadRequest as exc:
            return self._error(exc.status, exc.message)
        script = self._next_script(model.name)
        failure = self._scripted_error(script, body["model"])
        if failure is not None:
            return failure
        return await self._answer(request, body, script, estimate_tokens(prompt), chat=False)

    async def _answer(self, request: web.Request, body: dict[str, Any], script: Script | None, prompt_tokens: int,
                      *, chat: bool) -> web.StreamResponse:
        pieces, done_reason, eval_count = self._pieces(script, body)
        tool_calls = [self._tool_call(call, i) for i, call in enumerate(script.tool_calls or [])] if script else []
        thinking = script.thinking if script else None
        if script is not None and script.prompt_eval_count is not None:
            prompt_tokens = script.prompt_eval_count
        final = {"done": True, "done_reason": done_reason,
                 **self._metrics(prompt_tokens, eval_count if eval_count is not None else max(len(pieces), 1))}
        if not chat and not body.get("raw"):
            final["context"] = list(range(1, prompt_tokens + len(pieces) + 1))
        if body.get("stream", True) is False:  # stream defaults to true
            reply = {"model": body["model"], "created_at": rfc3339(),
                     **self._output("".join(pieces), thinking, tool_calls, chat), **final}
            return web.json_response(reply)
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)
        for item in self._stream_items(pieces, thinking, tool_calls, script, chat):
            if "error" in item:  # the status is long sent: the error is a line of its own, then the end
                await response.write(json.dumps(item).encode() + b"\n")
                return response
            await response.write(json.dumps({"model": body["model"], "created_at": rfc3339(), **item}).encode()
                                 + b"\n")
        await response.write(json.dumps({"model": body["model"], "created_at": rfc3339(),
                                         **self._output("", None, [], chat), **final}).encode() + b"\n")
        return response

    @staticmethod
    def _tool_call(call: dict[str, Any], index: int) -> dict[str, Any]:
        function = {"index": index, **call.get("function", {})}
        return {**call, "function": function}

    @staticmethod
    def _output(text: str, thinking: str | None, tool_calls: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
        if not chat:
            out: dict[str, Any] = {"response": text}
            if thinking:
                out["thinking"] = thinking
            return out
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"message": message}

    def _stream_items(self, pieces: list[str], thinking: str | None, tool_calls: list[dict[str, Any]],
                      script: Script | None, chat: bool) -> Iterator[dict[str, Any]]:
        """The done:false objects of a stream; tool calls arrive whole, in one chunk of their own."""
        if thinking:
            yield {**self._output("", thinking, [], chat), "done": False}
        for i, piece in enumerate(pieces):
            yield {**self._output(piece, None, [], chat), "done": False}
            if i == 0 and script is not None and script.mid_stream_error is not None:
                yield {"error": script.mid_stream_error or MID_STREAM_MESSAGE}
                return
        if tool_calls:
            yield {**self._output("", None, tool_calls, chat), "done": False}
        if not pieces and script is not None and script.mid_stream_error is not None:
            yield {"error": script.mid_stream_error or MID_STREAM_MESSAGE}

    async def embed(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, "Embed")
            model = self._model(body)
            inputs = body.get("input")
            if isinstance(inputs, str):
                inputs = [inputs]
            elif not (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs)):
                raise BadRequest(400, "invalid input type")
            self._require(model, "embedding")
            tokens = sum(estimate_tokens(text) for text in inputs)
            if body.get("truncate") is False and any(estimate_tokens(t) > model.context_length for t in inputs):
                raise BadRequest(400, "the input length exceeds the context length")
        except BadRequest as exc:
            return self._error(exc.status, exc.message)
        script = self._next_script(model.name)
        failure = self._scripted_error(script, body["model"])
        if failure is not None:
            return failure
        if script is not None and script.prompt_eval_count is not None:
            tokens = script.prompt_eval_count
        dimensions = body.get("dimensions") or model.embedding_length
        reply = {"model": body["model"], "embeddings": [embedding(text, dimensions) for text in inputs],
                 "total_duration": 14143917, "load_duration": 1019500, "prompt_eval_count": tokens}
        return web.json_response(reply)

    async def embeddings(self, request: web.Request) -> web.Response:
        """The legacy endpoint: one prompt, one vector under ``embedding``."""
        try:
            body = await self._body(request, "Embedding")
            model = self._model(body)
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise BadRequest(400, "invalid input type")
        except BadRequest as exc:
            return self._error(exc.status, exc.message)
        return web.json_response({"embedding": embedding(prompt, model.embedding_length) if prompt else []})
