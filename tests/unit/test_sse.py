import pytest

from appliance.common.sse import EventSplitter, event_data, first_unreadable, readable


def test_events_split_across_reads_are_held_until_whole():
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a"') == []
    assert splitter.feed(b': 1}\n\ndata: {"b": 2}\n') == [b'data: {"a": 1}\n\n']
    assert splitter.feed(b"\ndata: [DONE]\n\n") == [b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]
    assert splitter.close() == b""


def test_crlf_framing_and_unterminated_tail():
    splitter = EventSplitter()
    assert splitter.feed(b"data: 1\r\n\r\ndata: 2\r") == [b"data: 1\n\n"]
    assert splitter.feed(b"\n\r\ndata: 3") == [b"data: 2\n\n"]
    assert splitter.close() == b"data: 3\n\n"


def test_event_data():
    assert event_data(b'data: {"x": 1}\n\n') == b'{"x": 1}'
    assert event_data(b"data:[DONE]\n\n") == b"[DONE]"
    assert event_data(b": keep-alive\n\n") is None
    assert event_data(b"event: message\ndata: a\ndata: b\n\n") == b"a\nb"


@pytest.mark.parametrize("event", [
    b'data: {"id": "c1", "choices": [{"delta": {"content": "Hi"}}]}\n\n',
    'data: {"choices": [{"delta": {"content": "Grüße, 世界"}}]}\n\n'.encode(),
    b'data:{"x": 1}\n\n',
    b"data: [DONE]\n\n",
    b": keep-alive\n\n",
    b'event: message_start\ndata: {"type": "message_start"}\n\n',  # Anthropic's named events
    b'id: 7\nretry: 3000\ndata: {"a":\ndata: 1}\n\n',  # data over two lines
    b'data: {"logprob": -Infinity}\n\n',  # Python's json writes it; the SDKs read it
    b"event: ping\n\n",
])
def test_readable_events(event):
    assert readable(event)


@pytest.mark.parametrize("event", [
    b"\x00\xff\xfe\x81garbage\n\n",  # not UTF-8
    b'data: {"content": "\xff\xfe"}\n\n',  # the usual shape, but not UTF-8
    b'data: {"id": "c1", "choices": [{"delta": {"content": "Hel\n\n',  # cut short (a stream's tail)
    b"<html><body>502 Bad Gateway</body></html>\n\n",  # not SSE fields
    b'{"id": "chatcmpl-1", "object": "chat.completion"}\n\n',  # a whole JSON answer, no data: field
    b"data: Hello there\n\n",  # data that is no JSON object
    b'data: {"a": 1}\nGARBAGE\n\n',
])
def test_unreadable_events(event):
    assert not readable(event)


def test_first_unreadable():
    good, bad = b'data: {"a": 1}\n\n', b"\xff\n\n"
    assert first_unreadable([good, good]) is None
    assert first_unreadable([good, bad, good]) == 1
