"""The /api/v1 alias, X-Model-Used, and /proxy/{backend}/{path}, through real HTTP against `appliance serve`.

One private appliance (2 workers) serves the module: its ledger rows and keys are this module's own. The
raw backend (tests/fakes/raw_upstream.py) records what really went over the wire; traversal attempts go
out on raw sockets, since client libraries would normalise the very paths under test. Streaming is shown
without timings: the fake holds its second piece until the test has read the first, and the upload's
second chunk leaves only once the fake holds the first.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import websockets.sync.client

from tests.fakes.raw_upstream import RawUpstream
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.ledger import logged
from tests.support.threaded import free_port

pytestmark = pytest.mark.frozen

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
RAW_KEY = "sk-raw-backend-secret"
HELLO = [{"role": "user", "content": "Hi"}]
MAX_BODY_MB = 1


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    fake = RawUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any, fake_ollama: Any, raw: RawUpstream,
        llamacpp_port: int) -> Iterator[Appliance]:
    config = {
        "server": {"max_body_mb": MAX_BODY_MB},
        "discovery": {"enabled": False},
        "backends": [
            {"name": "fake", "url": fake_openai.url + "/v1", "api_key": "sk-backend-secret"},
            {"name": "raw", "url": raw.url + "/v1", "api_key": RAW_KEY},
            {"name": "ollama", "type": "ollama", "url": fake_ollama.url},
            {"name": "llamacpp", "url": f"http://127.0.0.1:{llamacpp_port}/v1", "timeout_s": 120},
            {"name": "down", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False,
             "models": ["down-model"]},
        ],
        "models": [{"name": "chat", "target": "fake/fake-chat"}],
    }
    app = Appliance(tmp_path_factory.mktemp("proxy"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def new_key(app: Appliance, **fields: Any) -> str:
    status, body, _ = app.post("/admin/keys", {"name": "proxy-test", **fields})
    assert status == 201, body
    return body["key"]


def sdk(app: Appliance, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/api/v1", api_key=key, max_retries=0, timeout=30)


# ------------------------------------------------------------------------------------------ /api/v1


def test_the_openai_sdk_works_against_the_alias(app: Appliance, fake_openai: Any) -> None:
    client = sdk(app)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.parse().choices[0].message.content == "Hello from the fake."
    assert raw.headers["x-model-used"] == raw.headers["x-appliance-model"] == "fake-chat"
    assert fake_openai.find(raw.headers["x-request-id"]).path == "/v1/chat/completions"
    row = logged(app, raw.headers["x-request-id"])
    assert (row["endpoint"], row["backend"], row["status"]) == ("/v1/chat/completions", "fake", 200)

    chunks = list(client.chat.completions.create(model="chat", messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake."
    ids = {m.id for m in client.models.list().data}
    assert {"chat", "fake-chat", "raw-model"} <= ids
    assert client.models.retrieve("chat").id == "chat"


def test_the_alias_answers_errors_in_each_surface_shape(app: Appliance) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk(app).chat.completions.create(model="no-such-model", messages=HELLO)
    error = missing.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["request_id"] == missing.value.response.headers["x-request-id"]

    with pytest.raises(openai.AuthenticationError):
        sdk(app, "sk-app-not-a-real-key-000000000000").models.list()

    claude = anthropic.Anthropic(base_url=app.url + "/api", api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as refused:  # Anthropic's shape, as on /v1/messages
        claude.messages.create(model="chat", max_tokens=16, messages=[])
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "invalid_request_error"
    message = claude.messages.create(model="chat", max_tokens=16, messages=HELLO)
    assert message.content[0].text == "Hello from the fake."

    response = httpx.post(app.url + "/api/v1/responses", headers=AUTH, json={"model": "no-such-model", "input": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_key_patterns_match_both_spellings(app: Appliance) -> None:
    chat_only = sdk(app, new_key(app, endpoints=["/v1/chat/*"]))
    assert chat_only.chat.completions.create(model="chat", messages=HELLO).choices
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat_only.models.list()
    assert denied.value.body["code"] == "endpoint_not_allowed"
    written_as_alias = sdk(app, new_key(app, endpoints=["/api/v1/models*"]))
    assert written_as_alias.models.list().data
    with openai.OpenAI(base_url=app.url + "/v1", api_key=written_as_alias.api_key, max_retries=0) as plain:
        assert plain.models.list().data  # the pattern means the endpoint, whichever spelling calls it


def test_the_responses_websocket_answers_under_the_alias(app: Appliance) -> None:
    url = app.url.replace("http://", "ws://") + "/api/v1/responses"
    with websockets.sync.client.connect(url, additional_headers=AUTH) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "fake/fake-chat", "input": "Hi", "store": False}))
        events = []
        while not events or events[-1]["type"] not in ("response.completed", "response.failed", "error"):
            events.append(json.loads(ws.recv(timeout=30)))
    assert events[-1]["type"] == "response.completed"


def test_one_metrics_label_for_both_spellings(app: Appliance) -> None:
    for base in ("/v1", "/api/v1"):
        assert app.post(base + "/chat/completions", {"model": "chat", "messages": HELLO})[0] == 200
    metrics = httpx.get(app.url + "/metrics").text
    assert 'endpoint="/v1/chat/completions"' in metrics
    assert "/api/v1" not in metrics


# ------------------------------------------------------------------------------------------ X-Model-Used


def test_x_model_used_on_every_answer_from_a_backend(app: Appliance) -> None:
    cached = {"model": "chat", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}
    first = httpx.post(app.url + "/v1/chat/completions", headers=AUTH, json=cached, timeout=30)
    hit = httpx.post(app.url + "/v1/chat/completions", headers=AUTH, json=cached, timeout=30)
    assert hit.headers["x-cache"] == "HIT"
    embedded = httpx.post(app.url + "/v1/embeddings", headers=AUTH, json={"model": "fake-embed", "input": "x"})
    completed = httpx.post(app.url + "/v1/completions", headers=AUTH, json={"model": "chat", "prompt": "x"})
    message = httpx.post(app.url + "/v1/messages", headers=AUTH,
                         json={"model": "chat", "max_tokens": 16, "messages": HELLO})
    response = httpx.post(app.url + "/v1/responses", headers=AUTH, json={"model": "chat", "input": "x"})
    with httpx.stream("POST", app.url + "/v1/chat/completions", headers=AUTH,
                      json={"model": "chat", "messages": HELLO, "stream": True}) as streamed:
        streamed.read()
    for answer, model in ((first, "fake-chat"), (hit, "fake-chat"), (embedded, "fake-embed"),
                          (completed, "fake-chat"), (message, "fake-chat"), (response, "fake-chat"),
                          (streamed, "fake-chat")):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-model-used"] == answer.headers["x-appliance-model"] == model


# ------------------------------------------------------------------------------------------ /proxy


def test_proxy_sends_the_call_as_sent_and_keeps_our_headers_home(app: Appliance, raw: RawUpstream) -> None:
    body = bytes(range(256)) * 4  # byte for byte, whatever the bytes
    response = httpx.put(
        app.url + "/proxy/raw/some/path%20with%3Aescapes?a=1&b=%2F&c=x%20y&a=2", content=body,
        headers={**AUTH, "Content-Type": "application/x-custom", "X-Custom": "kept", "Cookie": "session=ours",
                 "Connection": "keep-alive, X-Hop-Private", "X-Hop-Private": "for the hop", "Keep-Alive": "timeout=9",
                 "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-Appliance-Session-ID": "sess-1",
                 "x-api-key": ADMIN_KEY})
    assert response.status_code == 200, response.text
    assert response.content == body
    seen = raw.last()
    assert (seen.method, seen.path, seen.query) == ("PUT", "/some/path%20with%3Aescapes", "a=1&b=%2F&c=x%20y&a=2")
    assert seen.body == body
    sent = {name.lower(): value for name, value in seen.headers}
    assert sent["host"] == raw.url.removeprefix("http://")  # the backend's own, not the appliance's
    assert sent["authorization"] == f"Bearer {RAW_KEY}"  # the backend's key, never ours
    assert ADMIN_KEY not in repr(seen.headers)
    assert sent["content-type"] == "application/x-custom" and sent["x-custom"] == "kept"
    assert sent["content-length"] == str(len(body))
    assert sent["x-request-id"] == response.headers["x-request-id"]
    for private in ("cookie", "x-hop-private", "keep-alive", "te", "proxy-authorization", "x-appliance-session-id",
                    "x-api-key"):
        assert private not in sent, private
    assert sent.get("connection", "keep-alive") == "keep-alive"  # at most aiohttp's own, for its pool

    assert response.headers["x-upstream"] == "raw"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    for hop in ("keep-alive", "proxy-authenticate", "upgrade", "x-hop-answer"):
        assert hop not in response.headers, hop
    assert response.headers["x-appliance-backend"] == "raw"

    row = logged(app, response.headers["x-request-id"])
    assert (row["endpoint"], row["backend"], row["status"], row["model"]) == (
        "/proxy/raw/some/path%20with%3Aescapes", "raw", 200, None)
    assert 'endpoint="proxy"' in httpx.get(app.url + "/metrics").text


def test_proxy_streams_the_answer_as_it_comes(app: Appliance, raw: RawUpstream) -> None:
    with httpx.stream("GET", app.url + "/proxy/raw/stream", headers=AUTH, timeout=20) as response:
        assert response.status_code == 200
        pieces = response.iter_raw()
        assert next(pieces) == b"first\n"  # before the backend has sent the rest
        raw.release()
        assert b"".join(pieces) == b"second\n"
    assert logged(app, response.headers["x-request-id"])["status"] == 200


def test_proxy_streams_the_upload_as_it_comes(app: Appliance, raw: RawUpstream) -> None:
    def body() -> Iterator[bytes]:
        yield b"x" * 1000
        # The second chunk leaves only once the backend holds the first: nothing waited for the whole body.
        assert raw.first_chunk.wait(10), "the first chunk did not reach the backend on its own"
        yield b"y" * 2000

    response = httpx.post(app.url + "/proxy/raw/upload", headers=AUTH, content=body(), timeout=20)
    assert response.status_code == 200 and response.json() == {"bytes": 3000}
    seen = raw.last()
    assert seen.body == b"x" * 1000 + b"y" * 2000
    assert ("Transfer-Encoding", "chunked") in seen.headers


def test_proxy_passes_the_backend_status_and_head(app: Appliance, raw: RawUpstream) -> None:
    missing = httpx.get(app.url + "/proxy/raw/status/404", headers=AUTH)
    assert (missing.status_code, missing.text) == (404, "status 404 from the backend")
    assert httpx.delete(app.url + "/proxy/raw/status/204", headers=AUTH).status_code == 204
    head = httpx.head(app.url + "/proxy/raw/anything", headers=AUTH)
    assert head.status_code == 200 and head.content == b"" and raw.last().method == "HEAD"
    assert logged(app, missing.headers["x-request-id"])["status"] == 404


def test_proxy_failures_are_the_envelope_and_logged(app: Appliance, raw: RawUpstream) -> None:
    down = httpx.get(app.url + "/proxy/down/slots", headers=AUTH)
    assert down.status_code == 502 and down.json()["error"]["code"] == "backend_unreachable"
    unknown = httpx.get(app.url + "/proxy/nosuch/slots", headers=AUTH)
    assert unknown.status_code == 404
    assert (unknown.json()["error"]["code"], unknown.json()["error"]["param"]) == ("not_found", "backend")
    for response, status in ((down, 502), (unknown, 404)):
        row = logged(app, response.headers["x-request-id"])
        assert row["status"] == status and row["error_code"] == response.json()["error"]["code"]

    with pytest.raises(httpx.RemoteProtocolError):  # cut, never passed off as a complete answer
        httpx.get(app.url + "/proxy/raw/cut", headers={**AUTH, "X-Request-ID": "proxy-cut-1"}).read()
    row = logged(app, "proxy-cut-1")
    assert (row["status"], row["error_code"]) == (200, "backend_unreachable")


def test_proxy_refuses_a_body_over_the_limit(app: Appliance, raw: RawUpstream) -> None:
    before = len(raw.requests)
    declared = raw_request(app, b"/proxy/raw/echo", method=b"POST",
                           headers=f"Content-Length: {MAX_BODY_MB * 1024 * 1024 + 1}\r\n".encode())
    assert declared == (413, declared[1]) and declared[1]["error"]["code"] == "body_too_large"
    assert len(raw.requests) == before  # refused before any byte went upstream

    def chunks() -> Iterator[bytes]:  # no length announced: counted as it streams
        for _ in range(MAX_BODY_MB * 4 + 1):
            yield b"z" * (256 * 1024)

    streamed = httpx.post(app.url + "/proxy/raw/upload", headers=AUTH, content=chunks(), timeout=20)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "body_too_large"
    assert logged(app, streamed.headers["x-request-id"])["status"] == 413


def test_proxy_reaches_ollama_native_api(app: Appliance) -> None:
    shown = httpx.post(app.url + "/proxy/ollama/api/show", headers=AUTH, json={"model": "llama3.2"})
    assert shown.status_code == 200, shown.text
    assert "model_info" in shown.json() or "details" in shown.json()


@pytest.mark.llamacpp
def test_proxy_reaches_the_real_llamacpp_server_root(app: Appliance, llamacpp_url: str) -> None:
    tokenized = httpx.post(app.url + "/proxy/llamacpp/extras/tokenize", headers=AUTH,
                           json={"input": "Hello world"}, timeout=60)
    assert tokenized.status_code == 200, tokenized.text
    tokens = tokenized.json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert logged(app, tokenized.headers["x-request-id"])["backend"] == "llamacpp"


# ------------------------------------------------------------------------------------------ traversal


def raw_request(app: Appliance, target: bytes, *, method: bytes = b"GET",
                headers: bytes = b"") -> tuple[int, dict[str, Any] | None]:
    """Send one request head as written (no client library to normalise it); (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     + ADMIN_KEY.encode() + b"\r\n" + headers + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head, f"no answer to {target!r}"
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else None


TRAVERSALS = [
    b"/proxy/raw/../admin/keys", b"/proxy/raw/a/../../b", b"/proxy/raw/..", b"/proxy/raw/./v1/models",
    b"/proxy/../admin/keys", b"/proxy/raw/..;/admin", b"/proxy/%2e%2e/admin/keys",
    b"/proxy/raw/%2e%2e/x", b"/proxy/raw/%2E%2E/x", b"/proxy/raw/%2e%2E/x", b"/proxy/raw/.%2e/x", b"/proxy/raw/%2e./x",
    b"/proxy/raw/a%2f..%2fb", b"/proxy/raw/a%2Fb", b"/proxy/raw/a%5cb", b"/proxy/raw/a%5C..%5Cb",
    b"/proxy/raw/%252e%252e/x", b"/proxy/raw/a%252fb", b"/proxy/raw/%25252e", b"/proxy/raw/a%25",
    b"/proxy/raw//evil.example/x", b"/proxy/raw/http://evil.example/x",
    b"/proxy/raw/https:evil", b"/proxy/raw/a\\b", b"/proxy/raw/..\\admin",
    b"/proxy/raw/a%00b", b"/proxy/raw/a%0d%0aX-Injected:%201", b"/proxy/raw/a%1f", b"/proxy/raw/a%7F",
    b"/proxy/raw/a\x01b", b"/proxy/raw/a\tb", b"/proxy/raw/a\x7fb",
]


@pytest.mark.parametrize("target", TRAVERSALS, ids=[t.decode(errors="backslashreplace") for t in TRAVERSALS])
def test_every_traversal_form_is_refused(app: Appliance, raw: RawUpstream, target: bytes) -> None:
    before = len(raw.requests)
    status, body = raw_request(app, target)
    assert status == 400, (target, body)
    assert body is not None
    assert (body["error"]["code"], body["error"]["param"]) == ("invalid_value", "path")
    assert len(raw.requests) == before  # nothing reached the backend


def test_a_control_character_elsewhere_gets_an_answer_too(app: Appliance) -> None:
    # Sanic alone would drop the connection without an answer (and log a traceback): see server/request.py.
    assert raw_request(app, b"/v1/models/no\x01such")[0] == 404
    assert raw_request(app, b"/v1/models\x7f")[0] == 404


def test_a_plain_path_on_a_raw_socket_passes(app: Appliance, raw: RawUpstream) -> None:
    status, _ = raw_request(app, b"/proxy/raw/v1/files%3Fnot-a-query/a.b..c?x=%2e%2e")
    assert status == 200
    assert (raw.last().path, raw.last().query) == ("/v1/files%3Fnot-a-query/a.b..c", "x=%2e%2e")


# ------------------------------------------------------------------------------------------ keys


def test_proxy_needs_an_admin_key_or_an_allowlist_naming_it(app: Appliance) -> None:
    def call(key: str, path: str = "/proxy/raw/echo", method: str = "GET") -> httpx.Response:
        return httpx.request(method, app.url + path, headers={"Authorization": f"Bearer {key}"})

    everything = new_key(app)  # no endpoint patterns: all but /admin and /proxy
    star = new_key(app, endpoints=["*"])
    allowed = new_key(app, endpoints=["/proxy/raw/*", "/v1/models"])
    reader = new_key(app, role="read-only", endpoints=["/proxy/raw/*"])
    for key in (everything, star):
        refused = call(key)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "endpoint_not_allowed"
    assert call(allowed).status_code == 200
    assert call(allowed, "/proxy/ollama/api/tags").status_code == 403  # another backend
    assert call(reader).status_code == 200
    assert call(reader, method="POST").status_code == 403
    granted = call(allowed, "/proxy/raw/echo?ledger=1")
    row = logged(app, granted.headers["x-request-id"])
    assert row["key_id"] is not None and row["endpoint"] == "/proxy/raw/echo"


def test_nothing_failed_unseen(app: Appliance) -> None:
    """Runs last (pytest keeps a module's order): no handler failed after its answer began, say mid-stream."""
    log = app.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-5000:]
