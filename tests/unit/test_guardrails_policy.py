"""Guardrail selection (the union that a request cannot shrink), outcomes, and the text walkers."""

import pytest

from appliance.common.errors import GatewayError
from appliance.guardrails import policy, texts
from appliance.guardrails.pii import redact
from appliance.guardrails.stream import StreamGuard


def test_selection_is_the_union_of_request_key_route_and_config() -> None:
    chosen = policy.select({"guardrails": ["pii"]}, "content_moderation", ["pii"], ["schema_validation"], [])
    assert chosen == {"pii", "content_moderation", "schema_validation"}


def test_a_request_cannot_switch_off_what_is_enforced() -> None:
    assert policy.select({"guardrails": []}, None, ["pii"], (), ()) == {"pii"}
    assert policy.select({}, "", (), (), ["content_moderation"]) == {"content_moderation"}


@pytest.mark.parametrize(("body", "header"), [({"guardrails": ["pii", "nope"]}, None), ({"guardrails": "pii"}, None),
                                              ({}, "pii,,nope"), ({"guardrails": [1]}, None)])
def test_unknown_names_are_400_on_the_guardrails_param(body: dict, header: str | None) -> None:
    with pytest.raises(GatewayError) as refused:
        policy.requested(body, header)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "invalid_value", "guardrails")


def test_status_is_the_worst_outcome_and_the_log_names_every_guardrail() -> None:
    guard = policy.Guard(frozenset(("pii", "content_moderation")))
    assert guard.status() == "passed"
    guard.note("pii", "redacted")
    guard.note("pii", "passed")  # the output passed after the input was redacted: still redacted
    assert guard.status() == "redacted"
    assert guard.log() == {"content_moderation": "passed", "pii": "redacted"}
    guard.note("content_moderation", "blocked")
    assert guard.status() == "blocked"


def test_request_rewrite_copies_only_what_changed() -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "plain"},
        {"role": "user", "content": [{"type": "text", "text": "mail a@b.io"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"to": "a@b.io"}'}}]},
    ]}
    out = texts.rewrite_request("chat/completions", body, lambda t: redact(t)[0])
    assert out is not body and out["messages"][0] is body["messages"][0]
    assert out["messages"][1]["content"][0]["text"] == "mail [EMAIL]"
    assert out["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"to": "[EMAIL]"}'
    assert body["messages"][1]["content"][0]["text"] == "mail a@b.io"  # the client's body is left as it was
    clean = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert texts.rewrite_request("chat/completions", clean, lambda t: redact(t)[0]) is clean


def test_stream_guard_releases_the_held_text_with_the_finish_chunk() -> None:
    guard = StreamGuard(policy.Guard(frozenset(("pii",))), kinds=("email",), block=False, collect=True)
    pieces = ["Write to jane.", "doe@exam", "ple.com now"]
    out = []
    for piece in pieces:
        chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        guard.chunk(chunk)
        out.append(chunk["choices"][0]["delta"]["content"])
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    guard.chunk(end)
    out.append(end["choices"][0]["delta"].get("content", ""))
    assert "".join(out) == "Write to [EMAIL] now" == guard.text
    assert guard.tail() == [] and guard.found == ["email"]
