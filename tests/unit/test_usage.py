import orjson

from appliance.accounts.usage import FREE, Price, Prices, StreamMeter, Tokens, cost_of, estimate_prompt, from_reply
from appliance.common.config import ModelSettings


def chunk(data):
    return b"data: " + orjson.dumps(data) + b"\n\n"


CONTENT = chunk({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "Hello there"}}]})
USAGE = chunk({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
               "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
DONE = b"data: [DONE]\n\n"
BODY = {"messages": [{"role": "user", "content": "hi there, how are you?"}]}


def test_usage_chunk_the_client_did_not_ask_for_is_dropped_but_counted():
    meter = StreamMeter(client_wants_usage=False)
    assert meter.feed([CONTENT, USAGE, DONE]) == CONTENT
    assert meter.done
    tokens = meter.final_tokens(BODY)
    assert (tokens.prompt, tokens.completion, tokens.estimated) == (7, 2, False)
    assert meter.finish(BODY) == DONE


def test_usage_chunk_the_client_asked_for_is_kept():
    meter = StreamMeter(client_wants_usage=True)
    assert meter.feed([CONTENT, USAGE, DONE]) == CONTENT + USAGE
    assert meter.finish(BODY) == DONE


def test_missing_usage_is_estimated_and_marked_when_the_client_asked():
    meter = StreamMeter(client_wants_usage=True)
    meter.feed([CONTENT, DONE])
    tail = meter.finish(BODY)
    assert tail.endswith(DONE)
    usage_chunk = orjson.loads(tail.split(b"\n\n")[0][6:])
    assert usage_chunk["choices"] == [] and usage_chunk["id"] == "c1" and usage_chunk["model"] == "m"
    usage = usage_chunk["usage"]
    assert usage["estimated"] is True
    assert usage["completion_tokens"] == 1  # one streamed chunk of output
    assert usage["prompt_tokens"] == estimate_prompt(BODY)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_only_chunks_with_output_count():
    meter = StreamMeter(client_wants_usage=False)
    role = chunk({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    finish = chunk({"choices": [{"delta": {}, "finish_reason": "stop"}]})
    spaced = b'data: {"choices": [{"delta": {"content": " w"}}]}\n\n'  # Python's json.dumps spacing
    text = chunk({"choices": [{"text": "Once"}]})
    meter.feed([role, CONTENT, spaced, text, finish, DONE])
    assert meter.content_events == 3


def test_tool_call_fragments_count_as_output_and_errors_are_noted():
    meter = StreamMeter(client_wants_usage=False)
    call = {"index": 0, "function": {"arguments": '{"city": "Tokyo"}'}}
    frag = chunk({"choices": [{"delta": {"tool_calls": [call]}}]})
    error = chunk({"error": {"message": "boom", "type": "server_error"}})
    assert meter.feed([frag, error]) == frag + error
    assert meter.content_events == 1
    assert meter.error == {"message": "boom", "type": "server_error"}


def test_non_streaming_usage_reported_or_estimated():
    reported = from_reply({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}, BODY)
    assert (reported.prompt, reported.completion, reported.estimated) == (3, 4, False)
    estimated = from_reply({"choices": [{"message": {"content": "12345678"}}]}, BODY)
    assert estimated.estimated and estimated.completion == 2


def test_prompt_estimates_cover_every_body_shape():
    assert estimate_prompt({"prompt": "abcdefgh"}) == 2
    assert estimate_prompt({"input": ["abcd", "efgh"]}) == 2
    assert estimate_prompt({"input": [[1, 2, 3]]}) == 3
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}]}]}
    assert estimate_prompt(parts) == 3 + 4 + 1


def test_costs_attach_to_the_backend_model_that_served() -> None:
    prices = Prices([
        ModelSettings(name="gpt", target="openai/gpt-4o", input_per_mtok=2.5, output_per_mtok=10),
        ModelSettings(name="llama3", input_per_mtok=0.1, output_per_mtok=0.2, cached_input_per_mtok=0.05),
        ModelSettings(name="chat", target="ollama/qwen"),
    ])
    assert prices.of("openai", "gpt-4o") == Price(2.5, 10)
    assert prices.of("ollama", "llama3") == Price(0.1, 0.2, 0.05)
    assert prices.of("ollama", "qwen") is FREE  # a fallback to a free local model costs nothing
    cost = cost_of(Price(2.5, 10), Tokens(1_000_000, 100_000))
    assert (cost.input, cost.output, cost.total) == (2.5, 1.0, 3.5)
    cached = cost_of(Price(1, 0, 0.5), Tokens(1_000_000, 0, cached=400_000))
    assert cached.input == 0.6 + 0.2
    assert cost_of(FREE, Tokens(10**9, 10**9)).total == 0
