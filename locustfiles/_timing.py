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
    itl_s: list[float]


def stream_metrics(sent: float, token_times: Sequence[float], output_tokens: int) -> StreamMetrics:
    """Metrics of one streamed request; `token_times` are the arrival times of token-carrying events."""
    if not token_times:
        raise ValueError("the stream carried no token")
    if output_tokens < 1:
        raise ValueError(f"output_tokens must be at least 1, got {output_tokens}")
    ttft = token_times[0] - sent
    e2e = token_times[-1] - sent
    tpot = (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else None
    itl = [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
    return StreamMetrics(ttft_s=ttft, e2e_s=e2e, tpot_s=tpot, itl_s=itl)


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
