"""The fake OpenAI upstream's extension endpoints: rerank and score, moderations, images, audio.

Each request body is checked against its vendor's documented schema (OpenAI's published spec, via
tests/support/openapi.py; for rerank, the Cohere/Jina request shape that vLLM and llama.cpp's server take) and
answered 400 with the reason when it does not fit, so a gateway that mangles a body fails the test that sent it.

Multipart bodies are recorded as received (``Upload``): their exact bytes when small, their size and SHA-256
always, so a test can check a body went through byte for byte. The model name scripts faults as for chat
(fake-500, fake-400, fake-404-bare, fake-slow-<ms>, fake-fail-...).
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema
from aiohttp import web

from tests.support import openapi

if TYPE_CHECKING:
    from tests.fakes.openai_upstream import FakeOpenAI

KEPT_BYTES = 4 * 1024 * 1024  # uploads up to this size are kept whole; larger ones only hashed
SPEECH_CHUNKS = 5
SPEECH_CHUNK = b"ID3\x04fake-audio-frame" * 64  # what the fake's "audio" is made of
SPEECH_GAP_S = 0.05
TRANSCRIPT = "Hello from the fake transcriber."
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
RERANK_SCHEMA = {  # Cohere's v1/v2 and Jina's rerank request, as vLLM and llama.cpp's server accept it
    "type": "object", "required": ["query", "documents"],
    "properties": {
        "model": {"type": "string"}, "query": {"type": "string"},
        "documents": {"type": "array", "items": {"anyOf": [
            {"type": "string"}, {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}]}},
        "top_n": {"type": "integer", "minimum": 0}, "return_documents": {"type": "boolean"},
        "max_tokens_per_doc": {"type": "integer"}, "rank_fields": {"type": "array"}},
}
SCORE_SCHEMA = {  # vLLM's /score
    "type": "object", "required": ["text_1", "text_2"],
    "properties": {"model": {"type": "string"},
                   "text_1": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                   "text_2": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
}


@dataclass
class Upload:
    """A multipart body as the fake received it."""

    path: str
    headers: dict[str, str]
    size: int
    sha256: str
    raw: bytes | None  # None past KEPT_BYTES
    fields: dict[str, Any] = field(default_factory=dict)  # the form's non-file fields (when kept whole)
    files: dict[str, tuple[str | None, int]] = field(default_factory=dict)  # field -> (filename, size)
    at: float = field(default_factory=time.time)


def add_routes(app: web.Application, fake: FakeOpenAI) -> None:
    routes = Extensions(fake)
    app.router.add_post("/v1/rerank", routes.rerank)
    app.router.add_post("/v1/score", routes.score)
    app.router.add_post("/v1/moderations", routes.moderations)
    app.router.add_post("/v1/images/generations", routes.images)
    app.router.add_post("/v1/images/edits", routes.image_edits)
    app.router.add_post("/v1/audio/transcriptions", routes.transcriptions)
    app.router.add_post("/v1/audio/translations", routes.translations)
    app.router.add_post("/v1/audio/speech", routes.speech)


def _invalid(message: str) -> web.Response:
    return web.json_response({"error": {"message": f"the fake upstream refused the body: {message}",
                                        "type": "invalid_request_error", "param": None, "code": "fake_schema"}},
                             status=400)


def _check(instance: Any, schema: dict[str, Any] | str) -> str | None:
    """Why ``instance`` does not fit ``schema`` (a schema, or the name of one of OpenAI's), or None."""
    try:
        if isinstance(schema, str):
            openapi.validate(instance, schema)
        else:
            jsonschema.Draft202012Validator(schema).validate(instance)
    except jsonschema.ValidationError as exc:
        return f"{exc.message} at {list(exc.absolute_path)}"
    return None


class Extensions:
    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake

    async def _json(self, request: web.Request, schema: dict[str, Any] | str) -> tuple[dict[str, Any], Any]:
        """The body (recorded) and the answer to give instead of a normal one (a fault, a schema error)."""
        seen = await self.fake._record(request)
        body = seen.body if isinstance(seen.body, dict) else {}
        fault = await self.fake._fault(body.get("model", "")) if isinstance(body.get("model", ""), str) else None
        if fault is not None:
            return body, fault
        if not isinstance(seen.body, dict):
            return body, _invalid("not a JSON object")
        problem = _check(body, schema)
        return body, _invalid(problem) if problem else None

    async def rerank(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._json(request, RERANK_SCHEMA)
        if refusal is not None:
            return refusal
        documents = body["documents"]
        scored = sorted(({"index": i, "relevance_score": round(1 / (i + 2), 6)} for i in range(len(documents))),
                        key=lambda r: -r["relevance_score"])
        if body.get("top_n") is not None:
            scored = scored[:body["top_n"]]
        if body.get("return_documents"):
            for result in scored:
                document = documents[result["index"]]
                result["document"] = document if isinstance(document, dict) else {"text": document}
        tokens = 2 * (len(documents) + 1)
        return web.json_response({"id": "rerank-fake", "model": body.get("model"), "results": scored,
                                  "usage": {"total_tokens": tokens}}, headers={"x-fake-upstream": "yes"})

    async def score(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._json(request, SCORE_SCHEMA)
        if refusal is not None:
            return refusal
        pairs = body["text_2"] if isinstance(body["text_2"], list) else [body["text_2"]]
        return web.json_response({"id": "score-fake", "object": "list", "created": 1700000000,
                                  "model": body.get("model"),
                                  "data": [{"index": i, "object": "score", "score": 0.5} for i in range(len(pairs))],
                                  "usage": {"prompt_tokens": 4 * len(pairs), "total_tokens": 4 * len(pairs)}})

    async def moderations(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._json(request, "CreateModerationRequest")
        if refusal is not None:
            return refusal
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        categories = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                      "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
                      "sexual/minors", "violence", "violence/graphic")

        def result(text: Any) -> dict[str, Any]:
            # An input flags each category it names as "<flag:violence>" (the guardrail tests' scripted verdicts).
            flags = {c: isinstance(text, str) and f"<flag:{c}>" in text for c in categories}
            return {"flagged": any(flags.values()), "categories": flags,
                    "category_scores": {c: 0.9 if flags[c] else 0.001 for c in categories},
                    "category_applied_input_types": {c: ["text"] for c in categories}}

        return web.json_response({"id": "modr-fake", "model": body.get("model") or "fake-moderation",
                                  "results": [result(text) for text in inputs]})

    async def images(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._json(request, "CreateImageRequest")
        if refusal is not None:
            return refusal
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            event = {"type": "image_generation.completed", "b64_json": PNG_B64, "created_at": 1700000000,
                     "size": "1024x1024", "quality": "low", "background": "opaque", "output_format": "png",
                     "usage": {"total_tokens": 20, "input_tokens": 10, "output_tokens": 10,
                               "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}}
            await response.write(b"event: image_generation.completed\ndata: " + json.dumps(event).encode() + b"\n\n")
            return response
        return web.json_response({"created": 1700000000, "data": [{"b64_json": PNG_B64}] * (body.get("n") or 1),
                                  "usage": {"total_tokens": 20, "input_tokens": 10, "output_tokens": 10,
                                            "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}})

    # ------------------------------------------------------------------ multipart

    async def _upload(self, request: web.Request, schema: str) -> tuple[Upload, Any]:
        digest = hashlib.sha256()
        size = 0
        kept = bytearray()
        async for chunk in request.content.iter_any():
            size += len(chunk)
            digest.update(chunk)
            if size <= KEPT_BYTES:
                kept += chunk
        upload = Upload(request.path, dict(request.headers), size, digest.hexdigest(),
                        bytes(kept) if size <= KEPT_BYTES else None)
        self.fake.uploads.append(upload)
        self.fake.requests.append(_seen(request, upload))
        if upload.raw is None:  # too large to parse here: a big upload's test checks its size and hash
            return upload, None
        problem = _parse_form(upload)
        if problem is None:
            fault = await self.fake._fault(str(upload.fields.get("model", "")))
            if fault is not None:
                return upload, fault
            problem = _check(_typed(upload, schema), schema)
        return upload, _invalid(problem) if problem else None

    async def image_edits(self, request: web.Request) -> web.StreamResponse:
        if request.content_type == "application/json":
            _, refusal = await self._json(request, "EditImageBodyJsonParam")
            return refusal or web.json_response({"created": 1700000000, "data": [{"b64_json": PNG_B64}]})
        _, refusal = await self._upload(request, "CreateImageEditRequest")
        return refusal or web.json_response({"created": 1700000000, "data": [{"b64_json": PNG_B64}]})

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        upload, refusal = await self._upload(request, "CreateTranscriptionRequest")
        if refusal is not None:
            return refusal
        return await self._transcript(request, upload, usage=True)

    async def translations(self, request: web.Request) -> web.StreamResponse:
        upload, refusal = await self._upload(request, "CreateTranslationRequest")
        if refusal is not None:
            return refusal
        return await self._transcript(request, upload, usage=False)

    async def _transcript(self, request: web.Request, upload: Upload, *, usage: bool) -> web.StreamResponse:
        form = upload.fields
        if str(form.get("stream", "")).lower() == "true":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for piece in TRANSCRIPT.split(" "):
                delta = {"type": "transcript.text.delta", "delta": piece + " "}
                await response.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
            done = {"type": "transcript.text.done", "text": TRANSCRIPT,
                    "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 7, "total_tokens": 21}}
            await response.write(b"data: " + json.dumps(done).encode() + b"\n\n")
            return response
        if form.get("response_format") in ("text", "srt", "vtt"):
            return web.Response(text=TRANSCRIPT, content_type="text/plain")
        answer: dict[str, Any] = {"text": TRANSCRIPT, "x_fake_bytes": upload.size, "x_fake_sha256": upload.sha256}
        if usage:
            answer["usage"] = {"type": "tokens", "input_tokens": 14, "output_tokens": 7, "total_tokens": 21}
        return web.json_response(answer)

    # ------------------------------------------------------------------ audio out

    async def speech(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._json(request, "CreateSpeechRequest")
        if refusal is not None:
            return refusal
        media = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}.get(body.get("response_format") or "mp3", "audio/mpeg")
        response = web.StreamResponse(headers={"Content-Type": media, "x-fake-upstream": "yes"})
        await response.prepare(request)
        for _ in range(SPEECH_CHUNKS):
            await response.write(SPEECH_CHUNK)
            await asyncio.sleep(SPEECH_GAP_S)
        return response


def _seen(request: web.Request, upload: Upload) -> Any:
    from tests.fakes.openai_upstream import Seen

    return Seen(request.path, dict(request.headers), {"multipart_bytes": upload.size})


def _parse_form(upload: Upload) -> str | None:
    """Read the form with the standard library's MIME parser (not the gateway's): fields and files."""
    content_type = upload.headers.get("Content-Type", "")
    if not content_type.startswith("multipart/form-data"):
        return f"Content-Type is {content_type!r}, not multipart/form-data"
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n"
                                                    + (upload.raw or b""))
    if not message.is_multipart():
        return "the body is not a multipart message"
    for part in message.get_payload():  # type: ignore[union-attr]
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            return "a part without a field name"
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            upload.files[name] = (part.get_filename(), len(payload))
        elif name.endswith("[]"):
            upload.fields.setdefault(name[:-2], []).append(payload.decode())
        else:
            upload.fields[name] = payload.decode()
    return None


def _typed(upload: Upload, schema_name: str) -> dict[str, Any]:
    """The form as the JSON its schema describes: files as strings, numbers and booleans parsed."""
    properties = openapi._spec()["components"]["schemas"][schema_name]["properties"]
    out: dict[str, Any] = dict.fromkeys(upload.files, "<binary>")
    for name, value in upload.fields.items():
        wanted = json.dumps(properties.get(name, {}))
        if isinstance(value, str) and any(f'"{t}"' in wanted for t in ("number", "integer", "boolean")):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[name] = value
    if isinstance(out.get("image"), str) and "image" in upload.files:
        out["image"] = "<binary>"
    return out
