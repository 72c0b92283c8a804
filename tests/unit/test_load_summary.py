"""Step summaries from records: only measured requests count, percentiles are numpy's, throughput per window."""

from __future__ import annotations

import numpy as np
import pytest

from harness.loadtest.summary import LoadSummary, Percentiles, StepSummary, summarize_resources, summarize_step
from harness.records import read_record, write_record
from locustfiles import RequestRecord, StepRecord

STEP = StepRecord(step=1, users=2, epoch=2, run="r", started_at=100.0, ended_at=110.0, drained_at=111.0,
                  measured_requests=0, unmeasured_requests=0)  # fmt: skip


def record(i: int, *, measured=True, ok=True, epoch=2, run="r", ttft=0.5, e2e=2.0, out=32, error=None):
    return RequestRecord(
        user_id=f"u{i % 2}", seq=i, api="native", route="/completion", sent_at=100.0 + i, ended_at=100.0 + i + e2e,
        prompt_tokens_asked=128, output_tokens_asked=32, ok=ok, error=error, step=1, users=2, epoch=epoch, run=run,
        measured=measured, prompt_tokens=128, output_tokens=out if ok else None, ttft_s=ttft if ok else None,
        tpot_s=(e2e - ttft) / (out - 1) if ok else None, e2e_s=e2e if ok else None,
        itl_s=[0.05] * (out - 1) if ok else [], server_timings={"prompt_ms": 400.0 + i, "predicted_ms": 1500.0},
    )  # fmt: skip


def test_percentiles_are_numpys():
    values = [0.1, 0.4, 0.2, 0.9, 0.3, 0.35, 2.0]
    p = Percentiles.of(values)
    assert (p.p50, p.p90, p.p99) == tuple(np.percentile(values, [50, 90, 99]))
    assert p.mean == pytest.approx(np.mean(values)) and p.n == 7
    assert Percentiles.of([]) is None


def test_only_measured_requests_of_the_step_count():
    ttfts = [0.5, 0.6, 0.7, 0.8]
    records = [record(i, ttft=t) for i, t in enumerate(ttfts)]
    records += [
        record(4, measured=False, ttft=9.0),  # drain tail
        record(5, ok=False, error="server generated 20 tokens, asked 32"),  # measured failure
        record(6, epoch=1, ttft=9.0),  # another step
        record(7, run="old", ttft=9.0),  # another run
    ]
    s = summarize_step(STEP, records)
    assert (s.requests, s.failures, s.unmeasured) == (5, 1, 1)
    assert s.ttft_s == Percentiles.of(ttfts)
    assert s.failure_reasons == {"server generated 20 tokens, asked 32": 1}
    # The duration runs from the step's start to the end of its last measured request (record 5: 105 + 2).
    assert s.duration_s == pytest.approx(7.0)
    # Throughput counts the tokens streamed in the window (100 -> 110 s): the four measured requests' 32 each; the
    # drain-tail request's first token came at 113 s, the failed one's tokens are not verified.
    assert (s.window_s, s.window_output_tokens) == (pytest.approx(10.0), 128)
    assert s.output_tokens_per_s == pytest.approx(12.8)
    assert s.output_tokens_per_s_per_user == pytest.approx(6.4)

    assert s.request_rate == pytest.approx(4 / 7.0)
    assert s.itl_s.n == 4 * 31 and s.itl_s.p50 == pytest.approx(0.05)
    assert s.tpot_s.p50 == pytest.approx(np.median([(2.0 - t) / 31 for t in ttfts]))
    assert s.server_prompt_ms == Percentiles.of([400.0, 401.0, 402.0, 403.0])


def test_throughput_counts_every_token_streamed_inside_the_window():
    # Sent at 108 s, first token at 108.5 s, then one every 0.05 s: tokens up to 110 s fall in the window
    # (108.5 + 30 x 0.05 = 110.0), the last arrives in the drain. Not measured for latency, counted for throughput.
    straddling = record(8, measured=False)
    s = summarize_step(STEP, [straddling])
    assert s.requests == 0 and s.unmeasured == 1 and s.ttft_s is None
    assert s.window_output_tokens == 31 and s.output_tokens_per_s == pytest.approx(3.1)


def test_resources_in_the_window_and_server_counter_rates():
    samples = [
        {"t": 99.0, "cpu_percent": 999.0, "rss_bytes": 1, "metrics": {}},
        {"t": 101.0, "cpu_percent": 150.0, "rss_bytes": 100,
         "metrics": {"llamacpp:tokens_predicted_total": 1000.0, "llamacpp:requests_processing": 1.0}},
        {"t": 103.0, "cpu_percent": 190.0, "rss_bytes": 300, "gpu_util_percent": 80.0,
         "metrics": {"llamacpp:tokens_predicted_total": 1500.0, "llamacpp:requests_processing": 2.0}},
    ]  # fmt: skip
    r = summarize_resources(samples, 100.0, 110.0)
    assert r["samples"] == 2
    assert r["cpu_percent_mean"] == pytest.approx(170.0) and r["cpu_percent_max"] == 190.0
    assert r["rss_bytes_max"] == 300 and r["gpu_util_percent_max"] == 80.0 and r["gpu_mem_bytes_max"] is None
    assert r["server_output_tokens_per_s"] == pytest.approx(250.0)
    assert r["server_requests_processing_max"] == 2.0
    assert r["server_prompt_tokens_per_s"] is None


def test_summary_json_round_trip(tmp_path):
    step = summarize_step(STEP, [record(0), record(1)])
    summary = LoadSummary(variant="Q4_0", target="llama-server", target_kind="llama-server", api="native",
                          route="/completion", prompt_tokens=128, output_tokens=32, steps=[step], requests=2,
                          failures=0)  # fmt: skip
    write_record(tmp_path / "summary.json", summary, digest="d")
    again = read_record(tmp_path / "summary.json", LoadSummary)
    assert again == summary.model_copy(update={"inputs_digest": "d"})
    assert isinstance(again.steps[0], StepSummary) and isinstance(again.steps[0].ttft_s, Percentiles)
