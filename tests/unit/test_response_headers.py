"""The response class's header cleaning: Sanic's result, computed only where a string needs it."""

from __future__ import annotations

from sanic.response import HTTPResponse

from appliance.server.responses import Response

HEADERS = {
    "X-Request-ID": "req-1",
    "x-ratelimit-reset-requests": "6m0s",
    "X-Smuggled": "a\r\nSet-Cookie: b",
    "X-Nul": "x\x00y",
    "X-Tab": "a\tb",
    "X-Unicode": "café",
}


def encoded(response: HTTPResponse) -> list[tuple[bytes, bytes]]:
    return list(response.processed_headers)


def test_same_bytes_as_sanic_for_clean_and_dirty_values() -> None:
    ours = encoded(Response(b"{}", headers=HEADERS, content_type="application/json"))
    sanic = encoded(HTTPResponse(b"{}", headers=HEADERS, content_type="application/json"))
    assert ours == sanic
    assert (b"X-Smuggled", b"aSet-Cookie: b") in ours
    assert (b"X-Nul", b"xy") in ours


def test_content_type_added_only_when_there_is_a_body() -> None:
    assert (b"content-type", b"text/event-stream") in encoded(Response(status=200, content_type="text/event-stream"))
    assert all(name != b"content-type" for name, _ in encoded(Response(status=204, content_type="text/plain")))
