"""SSE parsing as llama-server (both eras) and OpenAI-style servers stream it."""

from __future__ import annotations

import json

from locustfiles._sse import DONE, SSEEvent, SSEParser


def events(lines: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    out = [e for line in lines if (e := parser.feed_line(line)) is not None]
    if (last := parser.finish()) is not None:
        out.append(last)
    return out


def test_llama_server_stream_one_event_per_blank_line():
    body = (
        b'data: {"content":" Hello","stop":false,"id_slot":0}\n\n'
        b'data: {"content":"","stop":true,"timings":{"prompt_n":128,"predicted_n":32}}\n\n'
    )
    got = events(body.splitlines(keepends=True))
    assert [json.loads(e.data)["stop"] for e in got] == [False, True]
    assert json.loads(got[1].data)["timings"]["predicted_n"] == 32


def test_crlf_comments_and_event_field():
    lines = [b": keep-alive\r\n", b"event: error\r\n", b'data: {"error":"boom"}\r\n', b"\r\n"]
    (event,) = events(lines)
    assert event == SSEEvent(data='{"error":"boom"}', event="error")


def test_multi_line_data_joined_with_newline_and_optional_space():
    (event,) = events([b"data:first\n", b"data: second\n", b"\n"])
    assert event.data == "first\nsecond"


def test_done_marker_and_stream_without_final_blank_line():
    got = events([b'data: {"choices":[]}\n', b"\n", b"data: [DONE]\n"])
    assert [e.data for e in got] == ['{"choices":[]}', DONE]


def test_blank_lines_alone_are_not_events():
    assert events([b"\n", b"\r\n", b"\n"]) == []


def test_utf8_split_across_events_is_kept_per_event():
    text = "é".encode()
    (event,) = events([b'data: {"content":"' + text + b'"}\n', b"\n"])
    assert json.loads(event.data)["content"] == "é"
