"""The extension endpoints, routed by model like chat (issue 15, point 2): rerank and score, moderations, images,
audio. Against the fake upstream, which checks each body against its vendor's schema (tests/fakes/extensions.py),
and, for what it serves, the real llama.cpp server (llama-cpp-python: none of these, so the gateway refuses them
itself, or maps the server's 404 to ``unsupported``).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import extensions
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support import openapi
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.threaded import free_port

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
ALL = ["chat", "completions", "embeddings", "rerank", "moderations", "images", "audio"]
BOUNDARY = "appliance-test-boundary-7d1f"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI,
        fake_ollama: FakeOllama) -> Iterator[Appliance]:
    config = {
        "discovery": {"enabled": False},
        "backends": [
            {"name": "fake", "url": fake_openai.url + "/v1", "capabilities": ALL},
            # The same fake with its kind's default (an OpenAI-compatible server: no rerank).
            {"name": "plain", "url": fake_openai.url + "/v1", "discover": False, "models": ["plain-model"]},
            {"name": "ollama", "type": "ollama", "url": fake_ollama.url},
            {"name": "down", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False,
             "models": ["down-model"], "capabilities": ALL},
        ],
        "models": [
            {"name": "reranker", "target": "fake/fake-rerank"},
            {"name": "whisper", "target": "fake/fake-whisper-large"},
            {"name": "whisper-ha", "targets": ["down/down-model", "fake/fake-whisper"]},
            {"name": "reranker-ha", "targets": ["down/down-model", "fake/fake-rerank"]},
            # The names the README's examples use.
            {"name": "moderation", "target": "fake/fake-moderation"},
            {"name": "image", "target": "fake/fake-image"},
            {"name": "tts", "target": "fake/fake-tts"},
        ],
    }
    appliance = Appliance(tmp_path_factory.mktemp("extensions"), config, workers=1)
    appliance.start()
    appliance.wait_ready()
    yield appliance
    appliance.stop()


@pytest.fixture(scope="module")
def http(app: Appliance) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)


def ledger_row(app: Appliance, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for row in app.get("/admin/requests?limit=200")[1]["data"]:
            if row["request_id"] == request_id:
                return row
        time.sleep(0.1)
    raise AssertionError(f"no ledger row for {request_id}")


def form(fields: list[tuple[str, str | tuple[str, bytes]]], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body with the parts in this order (a file: (filename, content))."""
    out = b""
    for name, value in fields:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            out += (f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n").encode() + value[1] + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return out + f"--{boundary}--\r\n".encode()


def multipart_headers(boundary: str = BOUNDARY) -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# ------------------------------------------------------------------------------------------ rerank, score


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_cohere_shape(app: Appliance, http: httpx.Client, fake_openai: FakeOpenAI, path: str) -> None:
    body = {"model": "reranker", "query": "What is the capital of France?",
            "documents": ["Paris is the capital of France.", {"text": "Berlin is in Germany."}],
            "top_n": 2, "return_documents": True}
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert [r["index"] for r in data["results"]] == [0, 1]
    assert data["results"][0]["document"] == {"text": "Paris is the capital of France."}
    assert data["usage"] == {"total_tokens": 6}  # the backend's body, unchanged
    assert response.headers["x-appliance-backend"] == "fake" and response.headers["x-appliance-route"] == "reranker"
    assert response.headers["x-fake-upstream"] == "yes"
    seen = fake_openai.find(response.headers["x-request-id"])
    assert seen.path == "/v1/rerank" and seen.body == {**body, "model": "fake-rerank"}
    row = ledger_row(app, response.headers["x-request-id"])
    assert (row["endpoint"], row["model"], row["backend_model"]) == (path, "reranker", "fake-rerank")
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (6, 0, False)


def test_score_vllm_shape(app: Appliance, http: httpx.Client, fake_openai: FakeOpenAI) -> None:
    response = http.post("/v1/score", json={"model": "fake-rerank", "text_1": "q", "text_2": ["a", "b"]})
    assert response.status_code == 200, response.text
    assert [d["score"] for d in response.json()["data"]] == [0.5, 0.5]
    assert fake_openai.find(response.headers["x-request-id"]).path == "/v1/score"
    assert ledger_row(app, response.headers["x-request-id"])["prompt_tokens"] == 8


def test_rerank_fallback_and_retries_like_chat(http: httpx.Client) -> None:
    response = http.post("/v1/rerank", json={"model": "reranker-ha", "query": "q", "documents": ["a"]})
    assert response.status_code == 200, response.text
    assert response.headers["x-fallback-from"] == "down/down-model"
    assert response.headers["x-appliance-backend"] == "fake"


def test_rerank_checks_its_body(http: httpx.Client) -> None:
    missing = http.post("/v1/rerank", json={"model": "reranker", "query": "q"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "documents"
    streamed = http.post("/v1/rerank", json={"model": "reranker", "query": "q", "documents": ["a"], "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
    no_model = http.post("/v1/moderations", json={"input": "hi"})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"


def test_upstream_status_and_body_kept(http: httpx.Client) -> None:
    refused = http.post("/v1/rerank", json={"model": "fake/fake-400", "query": "q", "documents": ["a"]})
    assert refused.status_code == 400
    assert refused.json()["error"] == {"message": "temperature too hot", "type": "invalid_request_error",
                                       "param": "temperature", "code": "invalid_value"}
    broken = http.post("/v1/moderations", json={"model": "fake/fake-500", "input": "x"},
                       headers={"X-Appliance-No-Retry": "true"})
    assert broken.status_code == 500 and broken.json()["error"]["code"] == "fake_failure"
    # A server without the route (a bare 404 page): the backend does not serve it.
    missing = http.post("/v1/rerank", json={"model": "fake/fake-404-bare", "query": "q", "documents": ["a"]})
    assert missing.status_code == 501 and missing.json()["error"]["code"] == "unsupported"


# ------------------------------------------------------------------------------------------ capabilities


def test_unsupported_when_no_backend_can(http: httpx.Client, fake_openai: FakeOpenAI) -> None:
    before = len(fake_openai.requests)
    # The "plain" backend is an OpenAI-compatible server of unknown kind: OpenAI's endpoints, not rerank.
    response = http.post("/v1/rerank", json={"model": "plain/plain-model", "query": "q", "documents": ["a"]})
    assert response.status_code == 501, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported", "model")
    assert "/v1/rerank" in error["message"] and response.headers["x-should-retry"] == "false"
    # Ollama serves chat, completions and embeddings only.
    speech = http.post("/v1/audio/speech", json={"model": "llama3.2", "input": "hi", "voice": "alloy"})
    assert speech.status_code == 501 and speech.json()["error"]["code"] == "unsupported"
    upload = http.post("/v1/audio/transcriptions", content=form([("model", "llama3.2"), ("file", ("a.wav", b"RIFF"))]),
                       headers=multipart_headers())
    assert upload.status_code == 501 and upload.json()["error"]["code"] == "unsupported"
    assert len(fake_openai.requests) == before  # refused before any backend was asked
    allowed = http.post("/v1/moderations", json={"model": "plain/plain-model", "input": "hi"})
    assert allowed.status_code == 200, allowed.text


def test_key_endpoint_allowlist_knows_the_new_paths(app: Appliance, http: httpx.Client) -> None:
    created = http.post("/admin/keys", json={"name": "rerank-only", "role": "user", "endpoints": ["/v1/rerank"]})
    assert created.status_code == 201, created.text
    key = {"Authorization": f"Bearer {created.json()['key']}"}
    ok = http.post("/v1/rerank", json={"model": "reranker", "query": "q", "documents": ["a"]}, headers=key)
    assert ok.status_code == 200, ok.text
    for path, kwargs in (("/rerank", {"json": {"model": "reranker", "query": "q", "documents": ["a"]}}),
                         ("/v1/audio/transcriptions", {"content": form([("model", "whisper"), ("file", ("a", b"x"))]),
                                                       "headers": {**key, **multipart_headers()}})):
        kwargs.setdefault("headers", key)
        refused = http.post(path, **kwargs)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "endpoint_not_allowed", path


def test_metrics_label_the_new_endpoints(app: Appliance, http: httpx.Client) -> None:
    assert http.post("/v1/score", json={"model": "fake-rerank", "text_1": "q", "text_2": "a"}).status_code == 200
    text = http.get("/metrics").text
    assert 'endpoint="/v1/score"' in text


# ------------------------------------------------------------------------------------------ OpenAI's ones


def test_moderations_through_the_sdk(app: Appliance, sdk: openai.OpenAI) -> None:
    raw = sdk.moderations.with_raw_response.create(model="fake-moderation", input=["one", "two"])
    result = raw.parse()
    assert len(result.results) == 2 and result.results[0].flagged is False
    openapi.validate(raw.http_response.json(), "CreateModerationResponse")
    row = ledger_row(app, raw.headers["x-request-id"])
    assert row["endpoint"] == "/v1/moderations" and row["estimated"] == 1 and row["prompt_tokens"] == 2


def test_image_generation_through_the_sdk(app: Appliance, sdk: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    raw = sdk.images.with_raw_response.generate(model="fake-image", prompt="a red cube", n=2, size="256x256")
    images = raw.parse()
    assert len(images.data) == 2 and images.data[0].b64_json == extensions.PNG_B64
    openapi.validate(raw.http_response.json(), "ImagesResponse")
    assert fake_openai.find(raw.headers["x-request-id"]).body["size"] == "256x256"
    row = ledger_row(app, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (10, 10, 0)


def test_image_generation_stream_passes_as_it_comes(http: httpx.Client) -> None:
    response = http.post("/v1/images/generations", json={"model": "fake-image", "prompt": "x", "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith("event: image_generation.completed\ndata: {")


def test_image_edit_through_the_sdk(sdk: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    raw = sdk.images.with_raw_response.edit(model="fake-image", prompt="add a hat",
                                            image=("cat.png", b"\x89PNG\r\n\x1a\n" + b"p" * 3000, "image/png"))
    assert raw.parse().data[0].b64_json == extensions.PNG_B64
    upload = fake_openai.uploads[-1]
    assert upload.path == "/v1/images/edits" and upload.files["image"] == ("cat.png", 3008)
    assert upload.fields["model"] == "fake-image" and upload.fields["prompt"] == "add a hat"


def test_image_edit_as_json(http: httpx.Client) -> None:
    response = http.post("/v1/images/edits", json={"model": "fake-image", "prompt": "x",
                                                   "images": [{"image_url": "https://example.com/a.png"}]})
    assert response.status_code == 200, response.text


def test_transcription_and_translation_through_the_sdk(app: Appliance, sdk: openai.OpenAI,
                                                       fake_openai: FakeOpenAI) -> None:
    audio = b"RIFF" + os.urandom(5000)
    raw = sdk.audio.transcriptions.with_raw_response.create(model="whisper", file=("speech.wav", audio),
                                                            temperature=0.2, language="en")
    assert raw.parse().text == extensions.TRANSCRIPT
    upload = fake_openai.uploads[-1]
    assert upload.fields["model"] == "fake-whisper-large"  # the alias's target, renamed in the form
    assert upload.files["file"] == ("speech.wav", len(audio))
    row = ledger_row(app, raw.headers["x-request-id"])
    assert (row["endpoint"], row["model"], row["backend_model"]) == ("/v1/audio/transcriptions", "whisper",
                                                                      "fake-whisper-large")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (14, 7)  # the backend's usage
    translated = sdk.audio.translations.create(model="fake-whisper", file=("speech.wav", audio))
    assert translated.text == extensions.TRANSCRIPT
    text = sdk.audio.transcriptions.create(model="fake-whisper", file=("speech.wav", audio), response_format="text")
    assert text.strip() == extensions.TRANSCRIPT  # text/plain passes as it is


def test_transcription_stream(http: httpx.Client) -> None:
    body = form([("model", "fake-whisper"), ("stream", "true"), ("file", ("a.wav", b"RIFF" * 10))])
    with http.stream("POST", "/v1/audio/transcriptions", content=body, headers=multipart_headers()) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert '"transcript.text.done"' in text


@pytest.mark.parametrize("order", ["model first", "file first"])
@pytest.mark.parametrize("size", [100, 1_500_000])  # in memory; past the 256 KB held in memory (spooled)
def test_multipart_goes_through_byte_for_byte(http: httpx.Client, fake_openai: FakeOpenAI, order: str,
                                               size: int) -> None:
    audio = os.urandom(size)
    parts: list[tuple[str, str | tuple[str, bytes]]] = [("model", "fake-whisper"), ("language", "en"),
                                                        ("file", ("clip.mp3", audio)), ("prompt", "Hi")]
    if order == "file first":
        parts = [parts[2], parts[1], parts[3], parts[0]]
    body = form(parts)
    response = http.post("/v1/audio/transcriptions", content=body, headers=multipart_headers())
    assert response.status_code == 200, response.text
    upload = fake_openai.uploads[-1]
    assert upload.raw == body  # the same bytes: boundary, parts and their order
    assert upload.headers["Content-Type"] == f"multipart/form-data; boundary={BOUNDARY}"
    assert upload.headers["Content-Length"] == str(len(body))


def test_multipart_alias_renames_only_the_model(http: httpx.Client, fake_openai: FakeOpenAI) -> None:
    parts: list[tuple[str, str | tuple[str, bytes]]] = [("file", ("clip.mp3", b"ID3" * 1000)), ("model", "whisper")]
    response = http.post("/v1/audio/transcriptions", content=form(parts), headers=multipart_headers())
    assert response.status_code == 200, response.text
    assert fake_openai.uploads[-1].raw == form([parts[0], ("model", "fake-whisper-large")])


def test_multipart_falls_back_before_the_body_flowed(http: httpx.Client, fake_openai: FakeOpenAI) -> None:
    body = form([("model", "whisper-ha"), ("file", ("a.wav", b"RIFF" * 50))])
    response = http.post("/v1/audio/transcriptions", content=body, headers=multipart_headers())
    assert response.status_code == 200, response.text
    assert response.headers["x-fallback-from"] == "down/down-model"
    assert fake_openai.uploads[-1].raw == form([("model", "fake-whisper"), ("file", ("a.wav", b"RIFF" * 50))])


def test_multipart_refusals(http: httpx.Client) -> None:
    no_model = http.post("/v1/audio/transcriptions", content=form([("file", ("a.wav", b"x"))]),
                         headers=multipart_headers())
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    not_multipart = http.post("/v1/audio/translations", json={"model": "fake-whisper"})
    assert not_multipart.status_code == 400 and "multipart/form-data" in not_multipart.json()["error"]["message"]
    broken = http.post("/v1/images/edits", content=b"--" + BOUNDARY.encode() + b"\r\nno headers end",
                       headers=multipart_headers())
    assert broken.status_code == 400 and "malformed" in broken.json()["error"]["message"]
    unknown = http.post("/v1/audio/transcriptions", content=form([("model", "no-such-model"), ("file", ("a", b"x"))]),
                        headers=multipart_headers())
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_upload_limit(start_appliance: Any, fake_openai: FakeOpenAI) -> None:
    small = start_appliance({"discovery": {"enabled": False}, "server": {"max_upload_mb": 1},
                             "backends": [{"name": "fake", "url": fake_openai.url + "/v1", "capabilities": ALL}]},
                            workers=1)
    body = form([("model", "fake-whisper"), ("file", ("a.wav", b"x" * 1_200_000))])
    declared = httpx.post(small.url + "/v1/audio/transcriptions", content=body, headers={**AUTH, **multipart_headers()},
                          timeout=30)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it flows, cut off past the limit
        yield from (body[i:i + 65536] for i in range(0, len(body), 65536))

    counted = httpx.post(small.url + "/v1/audio/transcriptions", content=chunked(),
                         headers={**AUTH, **multipart_headers()}, timeout=30)
    assert counted.status_code == 413 and counted.json()["error"]["code"] == "body_too_large"


# ------------------------------------------------------------------------------------------ speech


def test_speech_streams_binary_as_it_comes(app: Appliance, sdk: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    started = time.monotonic()
    arrivals = []
    with sdk.audio.speech.with_streaming_response.create(model="fake-tts", input="Hello there", voice="alloy",
                                                         response_format="mp3") as response:
        assert response.headers["content-type"] == "audio/mpeg"
        received = b""
        for chunk in response.iter_bytes():
            received += chunk
            arrivals.append(time.monotonic() - started)
        request_id = response.headers["x-request-id"]
    assert received == extensions.SPEECH_CHUNK * extensions.SPEECH_CHUNKS
    # The first bytes came before the backend finished (it pauses between chunks).
    assert arrivals[0] < arrivals[-1] - extensions.SPEECH_GAP_S * 2
    assert fake_openai.find(request_id).body == {"model": "fake-tts", "input": "Hello there", "voice": "alloy",
                                                 "response_format": "mp3"}
    row = ledger_row(app, request_id)
    assert (row["endpoint"], row["status"], row["estimated"]) == ("/v1/audio/speech", 200, 1)


# ------------------------------------------------------------------------------------------ 50 MB through


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def _peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


UPLOAD_MB = 50


@pytest.mark.parametrize("order", ["model first", "file first"])
def test_50_mb_upload_keeps_worker_memory_flat(app: Appliance, http: httpx.Client, fake_openai: FakeOpenAI,
                                               order: str) -> None:
    """50 MB through the gateway: the serving worker's peak RSS grows by less than 10 MB (model first: streamed;
    file first: held on disk until the model field)."""
    assert app.proc is not None
    http.post("/v1/audio/transcriptions", content=form([("model", "fake-whisper"), ("file", ("a", b"warm-up"))]),
              headers=multipart_headers())  # first-use allocations (imports, pools) are not the upload's
    before = {pid: _peak_kb(pid) for pid in [app.proc.pid, *_descendants(app.proc.pid)]}  # the worker among them
    piece = hashlib.sha256(order.encode()).digest() * 2048  # 64 KB
    count = UPLOAD_MB * 1024 * 1024 // len(piece)
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'.encode()
    model = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nfake-whisper\r\n'.encode()
    tail = f"--{BOUNDARY}--\r\n".encode()
    first, last = (model, b"\r\n") if order == "model first" else (b"", b"\r\n" + model)
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:  # made as it is sent: the test holds 64 KB of it
        for part in (first, head, *(piece for _ in range(count)), last, tail):
            digest.update(part)
            yield part

    length = len(first) + len(head) + count * len(piece) + len(last) + len(tail)
    response = http.post("/v1/audio/transcriptions", content=body(),
                         headers={**multipart_headers(), "Content-Length": str(length)}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["x_fake_bytes"] == length and response.json()["x_fake_sha256"] == digest.hexdigest()
    grown = {pid: _peak_kb(pid) - kb for pid, kb in before.items() if Path(f"/proc/{pid}").exists()}
    print(f"{order}: peak RSS growth per process (KB): {grown}, peaks {before}")
    assert max(grown.values()) < 10 * 1024, f"peak RSS growth per process (KB): {grown}"


# ------------------------------------------------------------------------------------------ the README


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Rerank, moderations, images and audio"):text.index("### `GET /v1/models`")]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


@pytest.mark.parametrize("example", _readme_examples())
def test_readme_examples_work_as_written(app: Appliance, tmp_path: Path, example: str) -> None:
    """Each curl example of the README's extension endpoints, against this appliance (its aliases are the
    README's model names), with curl failing on an HTTP error."""
    script = example.replace("http://127.0.0.1:8100", app.url).replace("curl -s ", "curl -sS --fail-with-body ")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "KEY": ADMIN_KEY}, timeout=60)
    assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
    assert '"error"' not in done.stdout, done.stdout


# ------------------------------------------------------------------------------------------ the real server


@pytest.mark.llamacpp
def test_llamacpp_python_serves_none_of_them(start_appliance: Any, llamacpp_url: str) -> None:
    """llama-cpp-python serves chat, completions and embeddings: by its kind's default the gateway refuses the
    rest itself; told it reranks, the server's own 404 becomes ``unsupported`` too."""
    app = start_appliance({"discovery": {"enabled": False}, "backends": [
        {"name": "llamacpp", "url": llamacpp_url, "timeout_s": 120},
        {"name": "told", "url": llamacpp_url, "timeout_s": 120, "capabilities": ["chat", "rerank", "audio"]}]},
        workers=1)
    app.wait_ready()
    body = {"model": "llamacpp/tiny", "query": "q", "documents": ["a"]}
    with httpx.Client(base_url=app.url, headers=AUTH, timeout=120) as http:
        refused = http.post("/v1/rerank", json=body)
        assert refused.status_code == 501 and refused.json()["error"]["code"] == "unsupported"
        passed = http.post("/v1/rerank", json={**body, "model": "told/tiny"})
        assert passed.status_code == 501 and passed.json()["error"]["code"] == "unsupported", passed.text
        speech = http.post("/v1/audio/speech", json={"model": "told/tiny", "input": "hi", "voice": "alloy"})
        assert speech.status_code == 501 and speech.json()["error"]["code"] == "unsupported", speech.text
        upload = http.post("/v1/audio/transcriptions", content=form([("model", "told/tiny"), ("file", ("a", b"x"))]),
                           headers=multipart_headers())
        assert upload.status_code == 501 and upload.json()["error"]["code"] == "unsupported", upload.text
        embedded = http.post("/v1/embeddings", json={"model": "llamacpp/tiny", "input": "hi"})
        assert embedded.status_code == 200, embedded.text
