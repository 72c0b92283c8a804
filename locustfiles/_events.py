"""What one streamed event says, for llama-server's native /completion and for OpenAI-style routes.

Pure functions over the event's JSON, tested on streams captured from both llama.cpp eras: whether the event
carried generated tokens and how many (for TTFT/ITL timing), and the server's own counts and timings (for
verification).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from locustfiles._sse import DONE, SSEEvent


@dataclass
class StreamState:
    """What one response stream has told us so far."""

    prompt_tokens: int | None = None
    output_tokens: int | None = None
    prompt_processed: int | None = None  # prompt tokens the server evaluated (fewer = cache reuse)
    timings: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False
    token_times: list[float] = field(default_factory=list)  # arrival of each event that carried tokens
    token_counts: list[int] = field(default_factory=list)  # how many tokens each of those events carried
    per_token: int | None = None  # tokens the server's per-token data listed (llama-cpp-python's logprobs)
    counts_from: str | None = None  # where the counts came from: timings, usage, per-token data

    def arrived(self, tokens: int, at: float) -> None:
        if tokens > 0:
            self.token_times.append(at)
            self.token_counts.append(tokens)


def read_native_event(event: SSEEvent, state: StreamState) -> int:
    """llama-server /completion: token events carry `content` (and the token ids, `tokens`, in new builds); the last
    one has `stop: true`, `tokens_evaluated` (the prompt's length) and `timings` (prompt_n evaluated, predicted_n).
    Returns how many generated tokens the event carried."""
    data = event_json(event, state)
    return 0 if data is None else _native(data, state)


def read_openai_event(event: SSEEvent, state: StreamState, *, chat: bool) -> int:
    """OpenAI-style chunks: text in `choices[].text` or `choices[].delta.content`, counts in `usage` (the last
    chunk, opt-in via stream_options in new llama-server builds, always there in b3661-era ones), then `[DONE]`
    (b3661-era chat ends without it). llama-server adds its own `timings` to the last chunk.

    Servers that send no usage in a stream (llama-cpp-python) list each generated token in the chunk's `logprobs`
    when asked (`logprobs.tokens` for completions, `logprobs.content` for chat): then the output count is theirs.
    Without per-token data a chunk with text counts as one token for timing, never for the count."""
    if event.data.strip() == DONE:
        state.done = True
        if state.output_tokens is None and state.per_token is not None:
            state.output_tokens, state.counts_from = state.per_token, "per-token data"
        return 0
    data = event_json(event, state)
    if data is None:
        return 0
    if "choices" not in data and "content" in data:
        # b3661-era llama-server streams /v1/completions in its native format.
        return _native(data, state)
    usage = data.get("usage")
    if isinstance(usage, dict):
        state.prompt_tokens = as_int(usage.get("prompt_tokens"))
        state.output_tokens = as_int(usage.get("completion_tokens"))
        state.counts_from = "usage"
        state.done = True
    timings = data.get("timings")
    if isinstance(timings, dict):
        state.timings = timings
        state.prompt_processed = as_int(timings.get("prompt_n"))
    carried = 0
    for choice in data.get("choices") or []:
        listed = per_token_data(choice, chat=chat)
        if listed is not None:
            state.per_token = (state.per_token or 0) + listed
            carried += listed
        elif chat:
            delta = choice.get("delta") or {}
            carried += int(bool(delta.get("content") or delta.get("reasoning_content")))
        else:
            carried += int(bool(choice.get("text")))
    return carried


def per_token_data(choice: dict[str, Any], *, chat: bool) -> int | None:
    """How many generated tokens a chunk's `logprobs` lists, or None when it lists none."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    listed = logprobs.get("content") if chat else logprobs.get("tokens")
    return len(listed) if isinstance(listed, list) else None


def _native(data: dict[str, Any], state: StreamState) -> int:
    tokens = data.get("tokens")
    # New builds list the event's token ids (several when the server sends them together); b3661-era events
    # carry only their text, one token each.
    carried = len(tokens) if isinstance(tokens, list) and tokens else int(bool(data.get("content")))
    if data.get("stop"):
        timings = data.get("timings") or {}
        state.done = True
        state.timings = timings
        state.output_tokens = as_int(timings.get("predicted_n", data.get("tokens_predicted")))
        state.prompt_processed = as_int(timings.get("prompt_n"))
        # tokens_evaluated is the prompt's length; prompt_n alone is what was evaluated (after cache reuse).
        state.prompt_tokens = as_int(data.get("tokens_evaluated", timings.get("prompt_n")))
        state.counts_from = "timings"
    return carried


def event_json(event: SSEEvent, state: StreamState) -> dict[str, Any] | None:
    """The event's JSON object, or None after recording in `state` why the stream is unusable."""
    try:
        data = json.loads(event.data)
    except ValueError:
        state.error = f"unreadable event from the server: {event.data[:200]!r}"
        return None
    if not isinstance(data, dict):
        state.error = f"unexpected event from the server: {event.data[:200]!r}"
        return None
    if event.event == "error" or data.get("error"):
        state.error = f"server error: {json.dumps(data.get('error', data))[:300]}"
        return None
    return data


def as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
