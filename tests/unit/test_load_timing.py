"""Per-request metrics from event timestamps and the count-mismatch failure rule."""

from __future__ import annotations

import pytest

from bench.timing import count_mismatch, stream_metrics, token_arrivals


def test_metrics_follow_the_definitions():
    # sent at 10.0; tokens at 10.5, 10.6, 10.8, 11.1 -> TTFT 0.5, E2E 1.1, TPOT (1.1-0.5)/(4-1) = 0.2
    m = stream_metrics(10.0, [10.5, 10.6, 10.8, 11.1], output_tokens=4)
    assert m.ttft_s == pytest.approx(0.5)
    assert m.e2e_s == pytest.approx(1.1)
    assert m.tpot_s == pytest.approx(0.2)
    assert m.itl_s == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_uses_the_server_count_not_the_number_of_events():
    # Two events carried 6 tokens (a server batching tokens per chunk): TPOT divides by 6-1.
    m = stream_metrics(0.0, [1.0, 2.0], output_tokens=6, token_counts=[2, 4])
    assert m.tpot_s == pytest.approx(1.0 / 5)
    # ITL is per token: the token that came with the first is a gap of zero, the four of the second event share
    # the second's wait (1 s) equally.
    assert m.itl_s == pytest.approx([0.0, 0.25, 0.25, 0.25, 0.25])


def test_token_arrivals_rebuild_each_tokens_time():
    m = stream_metrics(10.0, [10.5, 10.6, 11.0], output_tokens=4, token_counts=[1, 1, 2])
    assert token_arrivals(10.0, m.ttft_s, m.itl_s) == pytest.approx([10.5, 10.6, 10.8, 11.0])
    with pytest.raises(ValueError, match="positive count"):
        stream_metrics(0.0, [1.0], output_tokens=1, token_counts=[0])


def test_single_token_has_no_tpot():
    m = stream_metrics(0.0, [0.25], output_tokens=1)
    assert (m.ttft_s, m.e2e_s, m.tpot_s, m.itl_s) == (0.25, 0.25, None, [])


def test_no_token_is_an_error():
    with pytest.raises(ValueError, match="no token"):
        stream_metrics(0.0, [], output_tokens=3)


def test_counts_equal_to_the_request_pass():
    assert count_mismatch(asked_prompt=128, asked_output=32, prompt_tokens=128, output_tokens=32) is None


@pytest.mark.parametrize(
    ("prompt", "output", "processed", "expected"),
    [
        (129, 32, None, "server counted 129 prompt tokens, asked 128"),
        (128, 20, None, "server generated 20 tokens, asked 32"),
        (128, 32, 3, "evaluated only 3 of 128 prompt tokens (prompt cache hit)"),
        (None, 32, None, "did not report its token counts"),
    ],
)
def test_mismatches_fail_with_the_reason(prompt, output, processed, expected):
    reason = count_mismatch(
        asked_prompt=128, asked_output=32, prompt_tokens=prompt, output_tokens=output, prompt_processed=processed
    )
    assert reason is not None and expected in reason


def test_both_counts_wrong_lists_both():
    reason = count_mismatch(asked_prompt=128, asked_output=32, prompt_tokens=100, output_tokens=31)
    assert reason == "server counted 100 prompt tokens, asked 128; server generated 31 tokens, asked 32"
