"""/proxy/{backend}/{path}: which paths may go upstream, and which headers travel each way."""

from __future__ import annotations

import pytest

from appliance.common.errors import GatewayError
from appliance.core.passthrough import answer_headers, checked_path, request_headers

ALLOWED = ["tokenize", "slots", "api/show", "v1/models", "", "a.b..c/..d/e..", "v1/models/llama3.2:latest",
           "path%20with%3Aescapes", "caf%C3%A9", "a;b", "extras/tokenize/count", "trailing/"]

REFUSED = [
    "..", "../admin", "a/../../b", ".", "./x", "a/./b", "..;/admin", "a/..;x/b",
    "%2e%2e", "%2E%2E/x", "%2e%2E", ".%2e", "%2e.", "%2e", "a/%2e%2e/b",
    "a%2fb", "a%2F..%2Fb", "a%5cb", "a%5C", "%252e%252e", "a%252fb", "%25", "a%2500",
    "/evil.example/x", "//evil.example/x", "http://evil.example/x", "https:evil", "file:///etc/passwd",
    "a\\b", "..\\admin", "a%00b", "a%0d%0aInjected:%201", "a%1F", "a%7f", "a\x01b", "a\tb", "a\x7fb", "a\nb",
]


@pytest.mark.parametrize("path", ALLOWED)
def test_plain_paths_pass_as_sent(path: str) -> None:
    assert checked_path("vllm", path) == path


@pytest.mark.parametrize("path", REFUSED, ids=[p.encode("unicode_escape").decode() for p in REFUSED])
def test_every_traversal_form_is_refused(path: str) -> None:
    with pytest.raises(GatewayError) as refused:
        checked_path("vllm", path)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "invalid_value", "path")


@pytest.mark.parametrize("backend", ["..", "%2e%2e", ".", "a%2fb", "a\\b"])
def test_the_backend_segment_is_held_to_the_same_rules(backend: str) -> None:
    with pytest.raises(GatewayError):
        checked_path(backend, "admin/keys")


def test_our_headers_stay_and_the_backends_key_goes() -> None:
    sent = [("host", "appliance:8100"), ("authorization", "Bearer sk-app-client"), ("x-api-key", "sk-app-client"),
            ("connection", "keep-alive, x-hop"), ("x-hop", "1"), ("keep-alive", "timeout=5"), ("te", "trailers"),
            ("transfer-encoding", "chunked"), ("upgrade", "h2c"), ("proxy-authorization", "Basic x"),
            ("proxy-foo", "1"), ("cookie", "a=1"), ("expect", "100-continue"), ("x-request-id", "client-id"),
            ("x-appliance-session-id", "s"), ("content-type", "application/json"), ("content-length", "12"),
            ("x-custom", "kept"), ("anthropic-version", "2023-06-01")]
    headers = request_headers(sent, {"Authorization": "Bearer sk-backend"}, "rid-1")
    assert headers == {"content-type": "application/json", "content-length": "12", "x-custom": "kept",
                       "anthropic-version": "2023-06-01", "x-request-id": "rid-1",
                       "Authorization": "Bearer sk-backend"}
    assert request_headers([("authorization", "Bearer sk-app-client")], {}, "rid-2") == {"x-request-id": "rid-2"}


def test_the_answer_keeps_the_backends_headers_less_the_hops() -> None:
    upstream = [("Content-Type", "text/plain"), ("Content-Length", "5"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"), ("Proxy-Authenticate", "Basic"), ("X-Request-ID", "theirs"),
                ("Content-Encoding", "gzip")]
    ours = {"X-Request-ID": "ours", "X-Appliance-Backend": "vllm"}
    assert answer_headers(200, upstream, ours) == [
        ("Content-Type", "text/plain"), ("Content-Length", "5"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"), ("X-Request-ID", "ours"), ("X-Appliance-Backend", "vllm")]
    assert ("Content-Length", "0") not in answer_headers(204, [("Content-Length", "0")], {})
