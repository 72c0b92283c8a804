"""Reading streamed events captured from real llama-server builds of both eras (tests/unit/data/load/*.sse)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.loadtest.sampling import parse_metrics
from locustfiles._events import StreamState, read_native_event, read_openai_event
from locustfiles._sse import SSEEvent, SSEParser

DATA = Path(__file__).parent / "data" / "load"
ERAS = ["b3661-era", "b11312"]


def replay(name: str, read) -> tuple[StreamState, list[int]]:
    parser, state, tokens = SSEParser(), StreamState(), []
    for line in (DATA / name).read_bytes().splitlines(keepends=True):
        if (event := parser.feed_line(line)) is not None:
            tokens.append(read(event, state))
    if (event := parser.finish()) is not None:
        tokens.append(read(event, state))
    return state, tokens


@pytest.mark.parametrize("era", ERAS)
def test_native_stream(era):
    # 7 prompt tokens as ids, n_predict 3, cache_prompt false: three events of one token each, then the final one.
    state, tokens = replay(f"native-{era}.sse", read_native_event)
    assert tokens == [1, 1, 1, 0]
    assert (state.done, state.prompt_tokens, state.output_tokens, state.prompt_processed) == (True, 7, 3, 7)
    assert state.timings["predicted_n"] == 3 and state.timings["prompt_ms"] > 0 and state.error is None


@pytest.mark.parametrize("era", ERAS)
def test_openai_completions_stream(era):
    # b3661-era llama-server streams /v1/completions in its native format; current builds in OpenAI's.
    state, tokens = replay(f"openai-{era}.sse", lambda e, s: read_openai_event(e, s, chat=False))
    assert sum(tokens) == 3
    assert (state.done, state.prompt_tokens, state.output_tokens, state.prompt_processed) == (True, 7, 3, 7)


@pytest.mark.parametrize(("era", "templated"), [("b3661-era", 11), ("b11312", 32)])
def test_chat_stream(era, templated):
    # "Hello there" in SmolLM2's chat template (new builds add its default system message).
    state, tokens = replay(f"chat-{era}.sse", lambda e, s: read_openai_event(e, s, chat=True))
    assert sum(tokens) == 3  # the role-only first chunk of new builds carries no token
    assert state.done and state.output_tokens == 3 and state.prompt_tokens == templated


def test_server_error_event_fails_the_stream():
    state = StreamState()
    event = SSEEvent('{"error":{"code":500,"message":"context shift is disabled"}}')
    assert read_native_event(event, state) == 0
    assert state.error == 'server error: {"code": 500, "message": "context shift is disabled"}'


def test_an_event_with_several_tokens_counts_each():
    # New builds list the event's token ids; when the server sends several at once, each one counts.
    state = StreamState()
    assert read_native_event(SSEEvent('{"content":"Hello world","tokens":[9906,1917],"stop":false}'), state) == 2
    assert read_native_event(SSEEvent('{"content":"","tokens":[],"stop":false}'), state) == 0


def test_garbage_event_fails_the_stream():
    state = StreamState()
    assert read_openai_event(SSEEvent("<html>"), state, chat=False) == 0
    assert state.error.startswith("unreadable event from the server")


@pytest.mark.parametrize("era", ERAS)
def test_metrics_of_both_eras(era):
    metrics = parse_metrics((DATA / f"metrics-{era}.txt").read_text())
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:requests_processing"):
        assert name in metrics
    assert metrics["llamacpp:requests_processing"] == 0
    assert all(isinstance(v, float) for v in metrics.values())


def test_metrics_labels_special_values_and_junk():
    text = (
        "# HELP x_total a counter\n# TYPE x_total counter\n"
        'x_total{slot="0",model="a b"} 12\n'
        "y NaN\nz +Inf 1712345678000\nw 1.5e3\n"
        "not a sample line\n"
    )
    metrics = parse_metrics(text)
    assert metrics['x_total{slot="0",model="a b"}'] == 12.0
    assert metrics["w"] == 1500.0 and metrics["z"] == float("inf")
    assert metrics["y"] != metrics["y"]  # NaN
    assert "not" not in metrics
