"""Per-step summaries of a load test, computed from the request and step records and the resource samples.

Pure: records in, typed records out (stored as run_dir/load/<variant>/summary.json). Only requests measured
inside their step's window count (see locustfiles/_steps.py); the rest are reported as `unmeasured`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, computed_field

from bench.arrivals import LATE_S
from bench.records import Capacity, RequestRecord, StepRecord
from bench.search import CapacitySearch
from bench.slo import Objective, add_sample, evaluate, fewest_to_decide, meets
from bench.timing import token_arrivals
from harness.bandwidth import Bandwidth, DecodeCost, bound_tokens_per_s
from harness.energy import mean_power
from harness.process import exit_reason
from harness.records import Record, StageRecord

LOAD_MODELS = {
    False: "closed-loop: each user sends its next request only after the previous response ended, so under "
    "overload latency grows while the request rate falls (it is not hidden by a fixed arrival rate)",
    True: "open-loop: requests arrive at the offered rate whatever the server does; at most max_in_flight are in "
    "flight, an arrival that finds them all busy waits (its latency counts from its arrival) or is dropped",
}
LOAD_MODEL = LOAD_MODELS[False]


class Percentiles(Record):
    """p50/p90/p99 and mean of one metric over a step (seconds unless named otherwise); numpy, linear method."""

    p50: float
    p90: float
    p99: float
    mean: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> Percentiles | None:
        data = np.asarray(values, dtype=float)
        if data.size == 0:
            return None
        p50, p90, p99 = np.percentile(data, [50, 90, 99])
        return cls(p50=float(p50), p90=float(p90), p99=float(p99), mean=float(data.mean()), n=int(data.size))


class StepSummary(Record):
    step: int
    users: int  # Locust users: the level (closed loop) or the bound on requests in flight (open loop)
    rate: float | None = None  # open loop: the offered rate, requests/s (the level)
    arrival: str = "users"
    achieved_rate: float | None = None  # open loop: requests sent (not dropped) per second of the window
    late_requests: int = 0  # open loop: measured requests that waited over bench.arrivals.LATE_S for a free user
    dropped_requests: int = 0  # open loop: arrivals never sent (failed, measured)
    requests: int  # measured (closed loop: sent and finished inside the window; open: arrived in it)
    failures: int  # measured requests that failed
    unmeasured: int  # recorded but not measured (a settling step's filler, interrupted)
    after_window_requests: int = 0  # measured, but still in flight when the window ended (the slowest ones)
    duration_s: float  # window start -> end of the last measured request
    request_rate: float  # successful measured requests / duration
    window_s: float = 0.0  # while every user of the step ran: release -> the drain began
    window_output_tokens: int = 0  # tokens streamed inside the window, by any successful request of the run
    output_tokens_per_s: float  # window_output_tokens / window_s
    output_tokens_per_s_per_user: float
    input_tokens_per_s: float = 0.0  # server-counted prompt tokens of successful measured requests / duration
    ttft_s: Percentiles | None = None
    tpot_s: Percentiles | None = None
    itl_s: Percentiles | None = None
    e2e_s: Percentiles | None = None
    server_prompt_ms: Percentiles | None = None  # the server's own prefill time per request (timings.prompt_ms)
    server_predicted_ms: Percentiles | None = None  # the server's own generation time per request
    failure_reasons: dict[str, int] = Field(default_factory=dict)
    resources: dict[str, float | None] = Field(default_factory=dict)
    drain_timed_out: bool = False
    # Against the latency objectives ([slo]); None without objectives.
    slo_passed: bool | None = None
    slo_decided: str | None = None  # "within" / "missed" when the anytime-valid test decided it (the early stop)
    slo_detail: str | None = None
    # The fewest measured requests (every one within every limit) from which the test can decide a pass at these
    # objectives: a step with fewer can only estimate one.
    requests_to_decide: int | None = None
    good_requests: int | None = None  # measured requests that met every objective
    goodput_rps: float | None = None  # good requests / duration
    goodput_tps: float | None = None  # their output tokens / duration
    probe: bool = False  # a step of the capacity search
    early_stop: bool = False  # ended as soon as its verdict was certain
    attempt: int = 1  # the attempt (LoadSummary.attempts) that measured it
    # Decode against the memory-bandwidth bound (harness.bandwidth): aggregate decode tokens/s (users / TPOT p50),
    # the bound at this step's users and mean context, and the share of it reached.
    decode_tps: float | None = None
    bound_tps: float | None = None
    bandwidth_share: float | None = None
    # The hardware's energy counters (harness.energy) over the step: mean power / output tokens per second.
    joules_per_output_token: float | None = None

    @property
    def level(self) -> float:
        """The load level: the offered rate (open loop) or the users (closed loop)."""
        return self.rate if self.rate is not None else self.users

    @computed_field  # type: ignore[prop-decorator]
    @property
    def slo_basis(self) -> Literal["decided", "estimated"] | None:
        """How the verdict was reached: "decided" by the anytime-valid test (its claim holds at 2.5 %), or
        "estimated" from the quantiles of the step's requests when it ended (the test had not crossed)."""
        if self.slo_passed is None:
            return None
        return "decided" if self.slo_decided else "estimated"


class Decode(Record):
    """What decoding reads and how fast the memory delivers it, for this variant on this machine."""

    cost: DecodeCost
    bandwidth: Bandwidth
    llama_bench_tg_tps: float | None = None  # llama-bench's single-stream generation rate on the same model


class Attempt(Record):
    """One Locust run of a variant's load on one server process: a resumed or restarted run adds one. Its steps are
    kept by later attempts only while `steps_digest` (everything that determines a step's measurement: lengths,
    objectives, target, server settings, build, the model's content) is unchanged."""

    number: int
    run_id: str  # the `run` its request and step records carry
    steps_digest: str
    started_at: float  # wall clock
    ended_at: float | None = None
    outcome: Literal["running", "complete", "interrupted", "server died", "failed"] = "running"
    error: str | None = None
    build: str | None = None  # the llama.cpp build's cache key (managed servers)
    model_sha256: str | None = None
    server: dict[str, Any] = Field(default_factory=dict)  # what served it: kind, PID, start time, sizing
    server_exit_code: int | None = None  # when the server died
    server_log_tail: list[str] = Field(default_factory=list)
    steps: list[int | float] = Field(default_factory=list)  # levels of the steps it measured whole
    failed_requests: int = 0

    @property
    def server_started_at(self) -> float | None:
        return self.server.get("started_at")

    @property
    def server_pid(self) -> int | None:
        return self.server.get("pid")

    @property
    def argv(self) -> list[str]:
        """The command line of the server this attempt measured (empty for an external endpoint)."""
        return list(self.server.get("argv") or [])

    @property
    def server_exit(self) -> str | None:
        """How the server ended (`killed by SIGILL: ...`), when it died."""
        return None if self.server_exit_code is None else exit_reason(self.server_exit_code)


class Attempts(Record):
    """load/<target>/<variant>/attempts.json: every attempt at this variant's load, oldest first."""

    attempts: list[Attempt] = Field(default_factory=list)


class LoadSummary(StageRecord):
    variant: str
    target: str  # the target's name (its kind unless named)
    target_kind: str  # llama-server | llama-cpp-python | external
    serializes: bool = False  # the server handles one request at a time: concurrent users queue
    model_name: str | None = None  # the `model` field the users sent
    api: str
    route: str
    prompt_tokens: int
    output_tokens: int
    steps: list[StepSummary]
    requests: int  # every recorded request (measured or not)
    failures: int
    load_model: str = LOAD_MODEL
    arrival: dict[str, Any] = Field(default_factory=lambda: {"kind": "users"})  # the arrival process
    objectives: list[str] = Field(default_factory=list)  # the [slo] objectives, described
    capacity: Capacity | None = None
    decode: Decode | None = None
    energy: str | None = None  # the energy counters read (harness.energy), or "not available (why)"
    server: dict[str, Any] = Field(default_factory=dict)
    locust: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    attempts: list[Attempt] = Field(default_factory=list)
    # False: the load stopped before every step was measured (interrupted, or the server failed); `steps` holds
    # the steps that finished, `error` says why the rest are missing.
    complete: bool = True
    error: str | None = None


def summarize_step(
    step: StepRecord,
    requests: Iterable[RequestRecord],
    samples: Sequence[dict[str, Any]] = (),
    *,
    objectives: Sequence[Objective] = (),
    decode: Decode | None = None,
    context_tokens: float | None = None,
) -> StepSummary:
    """The summary of one step from every request record of its run (others are ignored); judged against
    `objectives`, and its decode rate set against the bandwidth bound at `context_tokens` when `decode` is known."""
    mine = [r for r in requests if r.run == step.run and r.epoch == step.epoch]
    measured = [r for r in mine if r.measured]
    ok = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok]
    last_end = max((r.ended_at for r in measured), default=step.ended_at)
    duration = max(last_end - step.started_at, 1e-9)
    window = max(step.ended_at - step.started_at, 1e-9)
    tokens = window_tokens(step, requests)
    tpot = Percentiles.of([r.tpot_s for r in ok if r.tpot_s is not None])
    judged: dict[str, Any] = {}
    if objectives:
        step_samples: dict[str, list[float]] = {}
        for r in measured:
            add_sample(step_samples, r)
        verdict = evaluate(step_samples, objectives)
        good = [r for r in ok if meets({"ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2e_s}, objectives)]
        judged = {
            # The early stop's claim, when it made one, is the step's verdict; otherwise the estimate.
            "slo_passed": step.slo_decided == "within" if step.slo_decided else verdict.passed,
            "slo_decided": step.slo_decided, "slo_detail": verdict.describe(), "good_requests": len(good),
            "requests_to_decide": fewest_to_decide(objectives),
            "goodput_rps": len(good) / duration, "goodput_tps": sum(r.output_tokens or 0 for r in good) / duration,
        }  # fmt: skip
    resources = summarize_resources(samples, step.started_at, last_end)
    open_loop = step.rate is not None
    if open_loop:
        sent = [r for r in measured if not r.dropped]
        judged.update(achieved_rate=len(sent) / window, dropped_requests=sum(r.dropped for r in measured),
                      late_requests=sum((r.queue_s or 0.0) > LATE_S for r in measured))  # fmt: skip
    elif decode is not None and tpot is not None and tpot.p50 > 0 and context_tokens:
        decode_tps = step.users / tpot.p50
        bound = bound_tokens_per_s(decode.cost, decode.bandwidth.bytes_per_s, step.users, context_tokens)
        judged.update(decode_tps=decode_tps, bound_tps=bound, bandwidth_share=decode_tps / bound)
    return StepSummary(
        step=step.step,
        users=step.users,
        rate=step.rate,
        arrival=step.arrival,
        requests=len(measured),
        failures=len(failed),
        unmeasured=len(mine) - len(measured),
        after_window_requests=step.after_window_requests,
        duration_s=duration,
        request_rate=len(ok) / duration,
        window_s=window,
        window_output_tokens=tokens,
        output_tokens_per_s=tokens / window,
        output_tokens_per_s_per_user=tokens / window / step.users,
        input_tokens_per_s=sum(r.prompt_tokens or 0 for r in ok) / duration,
        ttft_s=Percentiles.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=tpot,
        itl_s=Percentiles.of(np.concatenate([r.itl_s for r in ok]) if ok else []),
        e2e_s=Percentiles.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        server_prompt_ms=Percentiles.of(_timing(ok, "prompt_ms")),
        server_predicted_ms=Percentiles.of(_timing(ok, "predicted_ms")),
        failure_reasons=dict(Counter((r.error or "unknown")[:200] for r in failed).most_common(10)),
        resources=resources,
        joules_per_output_token=joules_per_token(resources, tokens / window),
        drain_timed_out=step.drain_timed_out,
        probe=step.probe,
        early_stop=step.early_stop,
        **judged,
    )


def capacity(
    steps: Sequence[StepSummary], *, bound: float, searched: bool, bound_reason: str, unit: str = "users"
) -> Capacity | None:
    """The capacity interval the judged steps give (the same rule the search follows); None without objectives."""
    judged = [s for s in steps if s.slo_passed is not None]
    if not judged:
        return None
    search = CapacitySearch(bound, integer=unit == "users")
    for s in judged:
        search.add(s.level, bool(s.slo_passed))
    low, high = search.interval
    if not searched:
        stopped = "steps"
    elif high is None:
        stopped = f"bound: {bound_reason}"
    elif unit == "users" and low == 0 and high <= 1:
        stopped = "fails at 1 user"
    else:
        stopped = "resolution"
    return Capacity(low=low, high=high, stopped_by=stopped, bound=bound, unit=unit)


def joules_per_token(resources: dict[str, float | None], output_tps: float) -> float | None:
    """Joules per output token: the CPU packages' and GPUs' mean power over the step / its output tokens/s; None
    when neither counter is readable or nothing was generated (never an estimate)."""
    watts = [w for w in (resources.get("cpu_power_w"), resources.get("gpu_power_w")) if w is not None]
    return sum(watts) / output_tps if watts and output_tps > 0 else None


def energy_source(samples: Sequence[dict[str, Any]]) -> str:
    """Where a load's energy figures come from, from the sampler's first line: the counters, or why there are none."""
    energy = next((s["energy"] for s in samples if isinstance(s.get("energy"), dict)), None)
    if energy is None:
        return "not available (no resource samples)"
    found = [e for e in (energy.get("cpu"), energy.get("gpu")) if e]
    if found:
        return ", ".join(found)
    return f"not available ({energy.get('cpu_why_not') or 'no RAPL counters'}; no NVML energy counter)"


def window_tokens(step: StepRecord, requests: Iterable[RequestRecord]) -> int:
    """Tokens streamed while the step's users all ran (its window), from every successful request of the run:
    those measured for latency and those that started in the window and finished in the drain after it."""
    count = 0
    for r in requests:
        if r.run != step.run or not r.ok or r.ttft_s is None:
            continue
        arrivals = token_arrivals(r.sent_at, r.ttft_s, r.itl_s)
        count += sum(1 for t in arrivals if step.started_at <= t <= step.ended_at)
    return count


def _timing(records: Iterable[RequestRecord], key: str) -> list[float]:
    return [
        float(r.server_timings[key])
        for r in records
        if r.server_timings and isinstance(r.server_timings.get(key), int | float)
    ]


def summarize_resources(samples: Sequence[dict[str, Any]], start: float, end: float) -> dict[str, float | None]:
    """Server process and GPU figures over [start, end], plus the server's own /metrics counters' rates.

    llama-server adds to its token counters when a request finishes, so over a window of a few requests those
    rates are coarse; `server_requests_processing_max` shows how many requests it really ran at once.
    """
    window = [s for s in samples if start <= s.get("t", -1.0) <= end]

    def values(key: str) -> list[float]:
        return [float(s[key]) for s in window if isinstance(s.get(key), int | float)]

    def metric(name: str) -> list[tuple[float, float]]:
        return [(s["t"], float(s["metrics"][name])) for s in window if name in (s.get("metrics") or {})]

    def rate(name: str) -> float | None:
        points = metric(name)
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

    def power(key: str) -> float | None:
        return mean_power([(s["t"], float(s[key])) for s in window if isinstance(s.get(key), int | float)])

    cpu, rss = values("cpu_percent"), values("rss_bytes")
    gpu_util, gpu_mem = values("gpu_util_percent"), values("gpu_mem_bytes")
    processing = [v for _, v in metric("llamacpp:requests_processing")]
    return {
        "samples": float(len(values("rss_bytes"))),
        "cpu_percent_mean": float(np.mean(cpu)) if cpu else None,
        "cpu_percent_max": max(cpu) if cpu else None,
        "rss_bytes_max": max(rss) if rss else None,
        "gpu_util_percent_mean": float(np.mean(gpu_util)) if gpu_util else None,
        "gpu_util_percent_max": max(gpu_util) if gpu_util else None,
        "gpu_mem_bytes_max": max(gpu_mem) if gpu_mem else None,
        "server_requests_processing_max": max(processing) if processing else None,
        "cpu_power_w": power("cpu_energy_j"),  # the CPU packages' (RAPL), every process on them
        "gpu_power_w": power("gpu_energy_j"),  # the GPUs' (NVML)
        "server_prompt_tokens_per_s": rate("llamacpp:prompt_tokens_total"),
        "server_output_tokens_per_s": rate("llamacpp:tokens_predicted_total"),
    }
