"""Records round-trip through JSONL, and a torn last line (a killed writer) does not lose the rest."""

from __future__ import annotations

import pytest

from locustfiles import RequestRecord, StepRecord, read_records


def request(**overrides) -> RequestRecord:
    values = dict(
        user_id="u1", seq=0, api="native", route="/completion", sent_at=1.0, ended_at=2.0,
        prompt_tokens_asked=128, output_tokens_asked=32, ok=True, itl_s=[0.0123456789, 0.02],
    )  # fmt: skip
    return RequestRecord(**{**values, **overrides})


def test_round_trip_and_torn_last_line(tmp_path):
    path = tmp_path / "requests.jsonl"
    step = StepRecord(step=0, users=1, epoch=1, run="r", started_at=0.5, ended_at=3.0, drained_at=3.1,
                      measured_requests=1, unmeasured_requests=0)  # fmt: skip
    lines = [request().model_dump_json(), step.model_dump_json(), '{"kind": "request", "user_']
    path.write_text("\n".join(lines))
    requests, steps = read_records(path)
    assert steps == [step]
    assert requests[0].itl_s == [0.012346, 0.02]  # stored to the microsecond
    assert requests[0].user_id == "u1" and requests[0].ok


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text("not json\n" + request().model_dump_json() + "\n")
    with pytest.raises(ValueError, match="requests.jsonl:1"):
        read_records(path)
