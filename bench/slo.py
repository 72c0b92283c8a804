"""Latency objectives: which requests met them, whether a step passed them, and when that is already decided.

An objective is a limit on a quantile of one per-request metric (TTFT, TPOT or E2E, in seconds), e.g. TTFT p90 <= 2 s.
A request is good when it meets every objective's limit (goodput counts only those). A step passes when, for every
objective, the quantile of its measured requests (numpy's linear interpolation, as the report's percentiles; a
failed request counts as missing every limit) is within the limit. Before a step has all its requests, its verdict
is decided once an anytime-valid test says so (bench.sequential.MissRate on the share of requests over the limit,
the error split across the objectives, over the requests in the order they were sent: `SentRequests`): then the
step may end early, and the claim holds however often it was looked at. A request still in flight has not missed
yet, unless it has already run longer than an E2E limit (then it has, whatever happens next); the test treats the
others as censored (bench.sequential).

Pure functions, used by the step controller (Locust's process) and the harness's summaries alike.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bench.sequential import HIT, MISS, OPEN, MissRate

Metric = Literal["ttft_s", "tpot_s", "e2e_s"]
METRIC_LABELS = {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "E2E"}
# The error each early claim may make: at most 2.5 % that a level is declared within when it is not, and 2.5 % that
# it is declared missed when it is not (split equally across its objectives).
EARLY_STOP_ALPHA = 0.025
# A measured request that failed missed every objective: it counts as the slowest possible sample (finite, so that
# quantiles interpolate without NaN).
FAILED = sys.float_info.max


@dataclass(frozen=True)
class Objective:
    metric: Metric
    limit_s: float
    quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.metric not in METRIC_LABELS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRIC_LABELS)}")
        if not (self.limit_s > 0 and 0 < self.quantile < 1):
            raise ValueError(f"an objective needs a positive limit and a quantile in (0, 1), got {self}")

    def describe(self) -> str:
        limit = f"{self.limit_s * 1000:g} ms" if self.metric == "tpot_s" else f"{self.limit_s:g} s"
        return f"{METRIC_LABELS[self.metric]} p{self.quantile * 100:g} <= {limit}"


@dataclass(frozen=True)
class ObjectiveResult:
    objective: Objective
    n: int  # measured requests judged (failed ones count as misses)
    value: float | None  # the step's quantile (None: no sample; FAILED or above: the quantile falls on failures)
    misses: int = 0  # requests over the limit or failed
    failed: int = 0
    decided: Literal["within", "missed"] | None = None  # what the anytime-valid test has shown so far

    @property
    def passed(self) -> bool:
        return self.value is not None and self.value <= self.objective.limit_s

    @property
    def certain(self) -> bool:
        """The test has decided this objective's verdict, in the direction of the current estimate or not."""
        return self.decided is not None


@dataclass(frozen=True)
class StepVerdict:
    results: tuple[ObjectiveResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def decided(self) -> Literal["within", "missed"] | None:
        """Shown by the tests: "missed" when one objective certainly missed, "within" when every one certainly met
        its limit; None while neither is shown."""
        if any(r.decided == "missed" for r in self.results):
            return "missed"
        if self.results and all(r.decided == "within" for r in self.results):
            return "within"
        return None

    @property
    def certain(self) -> bool:
        return self.decided is not None

    def describe(self) -> str:
        parts = []
        for r in self.results:
            if r.value is None:
                value = "no sample"
            elif r.value >= FAILED / 2:
                value = "failed requests"
            else:
                value = f"{r.value:.3g} s"
            share = f"{r.misses} of {r.n} over the limit" + (f", {r.failed} failed" if r.failed else "")
            parts.append(f"{r.objective.describe()}: {value} ({'ok' if r.passed else 'missed'}; {share})")
        return "; ".join(parts)


def quantile(values: Sequence[float], q: float) -> float:
    """The q quantile as the report computes percentiles (numpy, linear interpolation)."""
    return float(np.percentile(np.asarray(values, dtype=float), q * 100))


def sample_values(record: Any) -> dict[str, float]:
    """One finished request's metrics (a RequestRecord or its dict): its values when it succeeded, FAILED for every
    metric when it failed (it missed every limit)."""

    def get(key: str) -> Any:
        return record.get(key) if isinstance(record, Mapping) else getattr(record, key, None)

    if not get("ok"):
        return dict.fromkeys(METRIC_LABELS, FAILED)
    return {m: float(v) for m in METRIC_LABELS if isinstance(v := get(m), int | float) and not isinstance(v, bool)}


def add_sample(samples: dict[str, list[float]], record: Any) -> None:
    """Add one measured request to a step's samples: its metrics when it succeeded, FAILED for each when it failed."""
    for metric, value in sample_values(record).items():
        samples.setdefault(metric, []).append(value)


@dataclass
class SentRequests:
    """The requests of one level in the order they were sent (open loop: arrived), each in flight or finished: what
    the anytime-valid test runs over. The order is fixed when a request is sent, before its outcome is known, so a
    prefix of it is a sample the test may trust; a request that finished without being announced (an open-loop
    arrival dropped before it was sent) takes its place when its record arrives."""

    _position: dict[Hashable, int] = field(default_factory=dict)
    _sent_at: list[float] = field(default_factory=list)
    _values: list[dict[str, float] | None] = field(default_factory=list)  # None: in flight

    def sent(self, key: Hashable, at: float) -> None:
        """A request was sent at `at` (the clock the looks use; no earlier than its latency starts counting)."""
        if key not in self._position:
            self._position[key] = len(self._values)
            self._sent_at.append(at)
            self._values.append(None)

    def finished(self, key: Hashable, values: dict[str, float], at: float) -> None:
        """A request's outcome (sample_values of its record)."""
        if key not in self._position:
            self.sent(key, at)
        self._values[self._position[key]] = values

    def forget(self, key: Hashable) -> None:
        """A request that will not be measured (interrupted when the test stopped) leaves the sequence."""
        i = self._position.pop(key, None)
        if i is not None:
            self._values[i] = {}  # no observation for any objective

    def __len__(self) -> int:
        return len(self._values)

    @property
    def in_flight(self) -> int:
        return sum(v is None for v in self._values)

    def outcomes(self, objective: Objective, now: float) -> np.ndarray:
        """HIT, MISS or OPEN per request in the order sent, against `objective` at time `now`. A request in flight
        for longer than an E2E limit has missed it already (its E2E can only grow); every other one in flight is
        open. A finished request without this metric (a one-token output has no TPOT) is no observation of it."""
        codes = []
        for sent_at, values in zip(self._sent_at, self._values, strict=True):
            if values is None:
                over = objective.metric == "e2e_s" and now - sent_at > objective.limit_s
                codes.append(MISS if over else OPEN)
            elif objective.metric in values:
                codes.append(MISS if values[objective.metric] > objective.limit_s else HIT)
        return np.asarray(codes, dtype=np.int8)


def evaluate(
    samples: Mapping[str, Sequence[float]],
    objectives: Sequence[Objective],
    *,
    sent: SentRequests | None = None,
    now: float = 0.0,
    alpha: float = EARLY_STOP_ALPHA,
) -> StepVerdict:
    """Each objective against the step's samples (metric -> values of its measured requests; failures as FAILED);
    with `sent` (the level's requests in the order they were sent, at time `now`), what the anytime-valid test has
    decided, at `alpha` per claim split across the objectives."""
    results = []
    for objective in objectives:
        values = [v for v in samples.get(objective.metric, ()) if v is not None]
        value = quantile(values, objective.quantile) if values else None
        misses = sum(v > objective.limit_s for v in values)
        failed = sum(v >= FAILED for v in values)
        if failed and value is not None and value > max((v for v in values if v < FAILED), default=-1.0):
            value = FAILED  # interpolated towards a failure: the quantile falls on the failures, not at 1.8e+307 s
        decided = None
        if sent is not None:
            test = MissRate(p0=1 - objective.quantile, alpha=alpha / len(objectives))
            decided = test.decide_outcomes(sent.outcomes(objective, now))
        results.append(ObjectiveResult(objective, len(values), value, misses, failed, decided))
    return StepVerdict(tuple(results))


def fewest_to_decide(objectives: Sequence[Objective], alpha: float = EARLY_STOP_ALPHA) -> int | None:
    """The fewest measured requests from which the test can show a level within every objective (all of them
    within every limit, none in flight): below it a pass can only be estimated. None without objectives."""
    if not objectives:
        return None
    needed = [MissRate(p0=1 - o.quantile, alpha=alpha / len(objectives)).fewest_within() for o in objectives]
    return max((n for n in needed if n is not None), default=None)


def meets(values: Mapping[str, float | None], objectives: Sequence[Objective]) -> bool:
    """Whether one request met every objective's limit (its metrics within the limits): it counts for goodput."""
    for objective in objectives:
        value = values.get(objective.metric)
        if value is None or value > objective.limit_s:
            return False
    return True


def parse_objectives(text: str) -> tuple[Objective, ...]:
    """`ttft_s=2@0.9,tpot_s=0.1@0.9` (limit in seconds, optional @quantile) -> objectives; empty -> none."""
    objectives = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        metric, sep, rest = part.partition("=")
        if not sep:
            raise ValueError(f"objective {part!r}: expected METRIC=LIMIT[@QUANTILE], e.g. ttft_s=2@0.9")
        limit, _, q = rest.partition("@")
        try:
            objectives.append(Objective(metric.strip(), float(limit), float(q) if q else 0.9))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"objective {part!r}: {exc}") from None
    return tuple(objectives)


def format_objectives(objectives: Sequence[Objective]) -> str:
    """The inverse of parse_objectives (how the harness passes them to Locust)."""
    return ",".join(f"{o.metric}={o.limit_s:g}@{o.quantile:g}" for o in objectives)
