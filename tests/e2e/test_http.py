"""HTTP itself, as a client meets it: HEAD on the GET routes, the request header block and its limit.

Raw sockets where a client library would hide what went over the wire.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.appliance import ADMIN_KEY

pytestmark = pytest.mark.frozen

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

# Every GET route; HEAD must answer each like GET, without the body.
GET_PATHS = ("/health", "/healthz", "/ready", "/", "/status", "/static/app.js", "/metrics", "/statsz",
             "/v1/models", "/v1/models/fake-chat", "/v1/key", "/v1/files",
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
