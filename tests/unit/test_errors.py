import orjson

from appliance.common.errors import GatewayError, retry_after_headers, upstream_error


def test_envelope_has_all_keys_and_the_request_id():
    error = GatewayError("missing_field", "Missing required parameter: 'messages'.", param="messages")
    assert error.status == 400
    assert error.envelope("req-1") == {"error": {
        "message": "Missing required parameter: 'messages'.", "type": "invalid_request_error",
        "param": "messages", "code": "missing_field", "request_id": "req-1"}}


def test_non_retryable_codes_tell_the_sdk():
    assert GatewayError("budget_exceeded", "x").headers["x-should-retry"] == "false"
    assert GatewayError("unsupported", "x").status == 501
    assert GatewayError("unsupported", "x").headers["x-should-retry"] == "false"


def test_valid_upstream_envelope_passes_through_with_its_status():
    body = orjson.dumps({"error": {"message": "nope", "type": "invalid_request_error", "param": "n",
                                   "code": "bad_n"}})
    error = upstream_error(422, body, "vllm")
    assert (error.status, error.code, error.param) == (422, "bad_n", "n")
    assert error.json_body() == body


def test_incomplete_upstream_envelope_is_completed():
    error = upstream_error(400, b'{"error": {"message": "too long", "type": "invalid_request_error"}}', "x")
    assert orjson.loads(error.json_body())["error"] == {"message": "too long", "type": "invalid_request_error",
                                                         "param": None, "code": None}


def test_vllm_integer_code_and_plain_text_are_wrapped():
    vllm = upstream_error(400, b'{"error": {"message": "m", "type": "BadRequestError", "code": 400}}', "v")
    data = orjson.loads(vllm.json_body())["error"]
    assert (vllm.status, data["message"], data["type"], data["code"]) == (400, "m", "invalid_request_error",
                                                                          "backend_error")
    text = upstream_error(500, b"upstream exploded", "v")
    assert (text.status, text.type, text.message) == (500, "server_error", "upstream exploded")
    flat = upstream_error(404, b'{"detail": "Not Found"}', "v")
    assert (flat.status, flat.code, flat.message) == (404, "not_found", "Not Found")


def test_retry_after_is_clamped_to_what_sdks_honour():
    assert retry_after_headers(0.2) == {"Retry-After": "1", "retry-after-ms": "1000"}
    assert retry_after_headers(2.5) == {"Retry-After": "3", "retry-after-ms": "2500"}
    assert retry_after_headers(999) == {"Retry-After": "120", "retry-after-ms": "120000"}
