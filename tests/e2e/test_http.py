"""HTTP itself, as a client meets it: HEAD on the GET routes, the request header block and its limit.

Raw sockets where a client library would hide what went over the wire.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance

pytestmark = pytest.mark.frozen

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

# Every GET route; HEAD must answer each like GET, without the body.
GET_PATHS = ("/health", "/healthz", "/ready", "/", "/status", "/static/app.js", "/metrics", "/statsz",
             "/v1/models", "/v1/models/fake-chat", "/v1/models/fake/fake-chat", "/v1/key", "/v1/files",
             "/v1/batches", "/admin/keys", "/admin/usage", "/admin/requests")


@pytest.mark.parametrize("path", GET_PATHS)
def test_head_answers_like_get_without_a_body(gateway, path):
    got = httpx.get(gateway.url + path, headers=AUTH, timeout=10)
    head = httpx.head(gateway.url + path, headers=AUTH, timeout=10)
    assert got.status_code == 200, got.text
    assert head.status_code == got.status_code
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert int(head.headers["content-length"]) > 0


def test_head_on_file_content_and_a_file(gateway, client):
    uploaded = client.files.create(file=("head.jsonl", b'{"a": 1}\n' * 100), purpose="batch")
    for path in (f"/v1/files/{uploaded.id}/content", f"/v1/files/{uploaded.id}"):
        got = httpx.get(gateway.url + path, headers=AUTH)
        head = httpx.head(gateway.url + path, headers=AUTH)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    assert int(head.headers["content-length"]) > 0
    client.files.delete(uploaded.id)


def test_head_on_an_unknown_model_and_without_a_key(gateway):
    assert httpx.head(gateway.url + "/v1/models/no-such-model", headers=AUTH).status_code == 404
    assert httpx.head(gateway.url + "/v1/models").status_code == 401
    refused = httpx.head(gateway.url + "/v1/chat/completions", headers=AUTH)
    assert refused.status_code == 405 and "POST" in refused.headers["allow"]


# ------------------------------------------------------------------------------------------ header block size

DEFAULT_HEADER_LIMIT = 32 * 1024  # [server] max_header_kb = 32


def head_of(size: int, path: str = "/v1/models") -> bytes:
    """A GET whose head (request line and headers, without the blank line that ends it) is ``size`` bytes."""
    start = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nX-Pad: ".encode()
    assert size > len(start)
    return start + b"a" * (size - len(start)) + b"\r\n\r\n"


def send_raw(url_port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request over a raw socket; the server closes or keeps the connection."""
    with socket.create_connection(("127.0.0.1", url_port), timeout=10) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        headers = {}
        while (line := reader.readline().rstrip(b"\r\n")):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", 0)))
    return status, headers, body


def assert_431(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 431, body
    error = json.loads(body)["error"]
    assert error == {"message": error["message"], "type": "invalid_request_error",
                     "code": "request_header_fields_too_large", "param": None,
                     "request_id": headers["x-request-id"]}
    assert "max_header_kb" in error["message"]
    assert headers["connection"] == "close"


def test_a_header_block_just_below_the_limit_is_served(gateway):
    status, _, body = send_raw(gateway.port, head_of(DEFAULT_HEADER_LIMIT - 1))
    assert status == 200, body
    assert json.loads(body)["object"] == "list"


def test_a_header_block_at_the_limit_is_431_not_401(gateway):
    assert_431(*send_raw(gateway.port, head_of(DEFAULT_HEADER_LIMIT)))


def test_a_much_larger_header_block_is_431_through_a_client(gateway):
    for size in (DEFAULT_HEADER_LIMIT + 1, 200_000):
        response = httpx.get(gateway.url + "/v1/models", headers={**AUTH, "X-Big": "b" * size}, timeout=10)
        assert response.status_code == 431
        assert response.json()["error"]["code"] == "request_header_fields_too_large"


def test_a_431_on_a_v1_path_without_a_key_is_still_431(gateway):
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * DEFAULT_HEADER_LIMIT + b"\r\n\r\n"
    assert_431(*send_raw(gateway.port, request))


def test_a_malformed_request_line_is_400_not_401(gateway):
    status, headers, body = send_raw(gateway.port, b"GARBAGE\r\n\r\n")
    assert status == 400
    assert json.loads(body)["error"]["request_id"] == headers["x-request-id"]


@pytest.fixture(scope="module")
def small_headers(tmp_path_factory, fake_openai):
    """An appliance with [server] max_header_kb = 4."""
    app = Appliance(tmp_path_factory.mktemp("small-headers"), {
        "server": {"max_header_kb": 4}, "discovery": {"enabled": False},
        "backends": [{"name": "fake", "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]}]})
    app.start()
    yield app
    app.stop()


def test_the_limit_is_the_max_header_kb_setting(small_headers):
    assert send_raw(small_headers.port, head_of(4 * 1024 - 1))[0] == 200
    assert_431(*send_raw(small_headers.port, head_of(4 * 1024)))
