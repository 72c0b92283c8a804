"""Per-request latency metrics from event timestamps, and the check that the server did what was asked.

Definitions (as GuideLLM, vLLM's benchmarks and AIPerf use them): TTFT = first event carrying a token - request
sent; E2E = last token event - request sent; TPOT = (E2E - TTFT) / (output_tokens - 1); ITL = every gap between
consecutive token events. Token counts are the server's own (timings or usage), never the number of events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamMetrics:
    ttft_s: float
    e2e_s: float
    tpot_s: float | None  # None when the server produced a single token: there is no inter-token time
    itl_s: list[float]  # one gap per token after the first


def stream_metrics(
    sent: float, token_times: Sequence[float], output_tokens: int, *, token_counts: Sequence[int] | None = None
) -> StreamMetrics:
    """Metrics of one streamed request; `token_times` are the arrival times of token-carrying events and
    `token_counts` how many tokens each carried (one each when not given).

    ITL is per token: an event carrying n tokens that arrived g after the previous one counts as n gaps of g / n
    (the tokens shared the time); tokens that arrive with the first one count as gaps of zero.
    """
    if not token_times:
        raise ValueError("the stream carried no token")
    if output_tokens < 1:
        raise ValueError(f"output_tokens must be at least 1, got {output_tokens}")
    counts = list(token_counts) if token_counts is not None else [1] * len(token_times)
    if len(counts) != len(token_times) or any(n < 1 for n in counts):
        raise ValueError("token_counts must give a positive count for every token event")
    ttft = token_times[0] - sent
    e2e = token_times[-1] - sent
    tpot = (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else None
    itl = [0.0] * (counts[0] - 1)
    for previous, now, n in zip(token_times, token_times[1:], counts[1:], strict=False):
        itl += [(now - previous) / n] * n
    return StreamMetrics(ttft_s=ttft, e2e_s=e2e, tpot_s=tpot, itl_s=itl)


def token_arrivals(sent_at: float, ttft_s: float, itl_s: Sequence[float]) -> list[float]:
    """When each generated token arrived (the clock of `sent_at`), from a request's TTFT and per-token ITL."""
    first = sent_at + ttft_s
    times = [first]
    for gap in itl_s:
        times.append(times[-1] + gap)
    return times


def count_mismatch(
    *,
    asked_prompt: int,
    asked_output: int,
    prompt_tokens: int | None,
    output_tokens: int | None,
    prompt_processed: int | None = None,
) -> str | None:
    """Why a request does not measure what was asked (None when it does).

    `prompt_processed` is how many prompt tokens the server evaluated (llama-server's timings.prompt_n); fewer
    than the prompt means it reused a cached prefix, which skips prefill and fakes TTFT.
    """
    problems = []
    if prompt_tokens is None or output_tokens is None:
        return "the server did not report its token counts (timings/usage); the lengths cannot be verified"
    if prompt_tokens != asked_prompt:
        problems.append(f"server counted {prompt_tokens} prompt tokens, asked {asked_prompt}")
    if output_tokens != asked_output:
        problems.append(f"server generated {output_tokens} tokens, asked {asked_output}")
    if prompt_processed is not None and prompt_processed < prompt_tokens:
        problems.append(f"server evaluated only {prompt_processed} of {prompt_tokens} prompt tokens (prompt cache hit)")
    return "; ".join(problems) or None
