from appliance.common.sse import EventSplitter, event_data


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
