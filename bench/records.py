"""The per-request and per-step records a load test writes as JSON lines, and how to read them back.

One file holds both kinds (field `kind`): the request records in the order they finished and, after each step,
the step's measurement window. Pure (no Locust import): the harness reads these files in its own process.
They are the project's typed records (pydantic), which also cost less per request than a dataclass's `asdict`
(benchmarks/record_cost.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer


class Record(BaseModel):
    """Base of every stored record. Unknown keys are ignored, so a newer field never breaks reading an older file."""

    model_config = ConfigDict(extra="ignore")


class RequestRecord(Record):
    """One completion request as the load generator saw it, with the server's own counts and timings."""

    user_id: str
    seq: int  # the user's request number, from 0
    api: str  # native | openai | chat
    route: str
    sent_at: float  # wall clock (time.time) when the request was sent
    ended_at: float  # wall clock when the response ended (or failed)
    prompt_tokens_asked: int
    output_tokens_asked: int
    ok: bool
    error: str | None = None
    status: int = 0
    step: int | None = None  # index of the load level the request was sent in (None: no step shape)
    users: int | None = None  # that level's Locust users (closed loop: its concurrency)
    rate: float | None = None  # open loop: the offered rate of its process's share of the level, requests/s
    scheduled_at: float | None = None  # open loop: when it arrived (wall clock); its latency counts from here
    queue_s: float | None = None  # open loop: how long it waited for a free user after arriving (late when > 0)
    dropped: bool = False  # open loop: it waited longer than the arrival process allows and was never sent
    epoch: int | None = None
    run: str | None = None
    # Counted for its level: closed loop, sent and finished inside the window; open loop, arrived inside it.
    measured: bool = False
    prompt_tokens: int | None = None  # as the server reported them
    output_tokens: int | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = Field(default_factory=list)
    token_events: int = 0  # events that carried tokens (for ITL; never used as a token count)
    server_timings: dict[str, Any] | None = None
    counts: str | None = None  # where the counts came from: timings, usage, per-token data (+ the tokenizer)
    pid: int | None = None  # the Locust process that sent it (tells workers apart)
    kind: Literal["request"] = "request"

    @field_serializer("itl_s")
    def _microseconds(self, itl: list[float]) -> list[float]:
        # Microseconds are more than the clock resolution that matters here and keep records small.
        return [round(x, 6) for x in itl]


class StepRecord(Record):
    """One load level: its measurement window (all its users running) and what it counted."""

    step: int
    users: int  # Locust users: the level's concurrency (closed loop), or the bound on requests in flight (open)
    rate: float | None = None  # open loop: the offered rate, requests/s (the level); None for closed-loop users
    arrival: str = "users"  # the arrival process's kind
    epoch: int
    run: str
    started_at: float  # every user ready and released: concurrency reached `users`
    ended_at: float  # the drain began: no user starts another request in this step
    drained_at: float  # every in-flight request had finished
    measured_requests: int
    unmeasured_requests: int
    after_window_requests: int = 0  # measured requests still in flight when the window ended (the slowest ones)
    late_requests: int = 0  # open loop: measured requests that waited for a free user
    dropped_requests: int = 0  # open loop: arrivals never sent (waited too long): failed, measured
    requests_per_user: int | None = None
    requests_per_step: int | None = None
    duration_s: float | None = None
    drain_timed_out: bool = False
    error: str | None = None
    probe: bool = False  # a step of the capacity search, beyond the configured ones
    early_stop: bool = False  # ended before its requests_per_user/duration: its verdict was already certain
    slo_passed: bool | None = None  # against the latency objectives (None: no objectives)
    slo_decided: Literal["within", "missed"] | None = None  # shown by the anytime-valid test (the early stop's claim)
    slo_detail: str | None = None
    kind: Literal["step"] = "step"

    @property
    def level(self) -> float:
        """The load level: the offered rate (open loop) or the users (closed loop)."""
        return self.rate if self.rate is not None else self.users


class Capacity(Record):
    """The highest level (users, or requests/s) whose step met every objective, as an interval:
    [last pass, first fail]."""

    low: int | float  # 0: even the smallest step missed
    high: int | float | None  # None: no step failed up to the bound
    stopped_by: str  # why the search ended: "steps" (no search), "resolution", "bound: max_users", "bound: memory"
    bound: int | float  # the highest level a step could have
    unit: str = "users"  # or "requests/s"


def read_records(path: Path) -> tuple[list[RequestRecord], list[StepRecord]]:
    """Request and step records of a JSONL file. A torn last line (the writer was killed) is skipped."""
    requests: list[RequestRecord] = []
    steps: list[StepRecord] = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record") from None
        if data.get("kind") == "step":
            steps.append(StepRecord.model_validate(data))
        elif data.get("kind") == "request":
            requests.append(RequestRecord.model_validate(data))
    return requests, steps
