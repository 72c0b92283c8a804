"""Latency objectives: which requests met them, whether a step passed them, and when that is already decided.

An objective is a limit on a quantile of one per-request metric (TTFT, TPOT or E2E, in seconds), e.g. TTFT p90 <= 2 s.
A request is good when it meets every objective's limit (goodput counts only those). A step passes when, for every
objective, the quantile of its measured requests (numpy's linear interpolation, as the report's percentiles; a
failed request counts as missing every limit) is within the limit. Before a step has all its requests, its verdict
is decided once an anytime-valid test says so (bench.sequential.MissRate on the share of requests over the limit,
the error split across the objectives; the requests still in flight counted against the claim): then the step may
end early, and the claim holds however often it was looked at.

Pure functions, used by the step controller (Locust's process) and the harness's summaries alike.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bench.sequential import MissRate

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


def add_sample(samples: dict[str, list[float]], record: Any) -> None:
    """Add one measured request (a RequestRecord or its dict) to a step's samples: its metrics when it succeeded,
    FAILED for each metric when it failed."""

    def get(key: str) -> Any:
        return record.get(key) if isinstance(record, Mapping) else getattr(record, key, None)

    ok = bool(get("ok"))
    for metric in METRIC_LABELS:
        value = get(metric)
        if not ok:
            samples.setdefault(metric, []).append(FAILED)
        elif isinstance(value, int | float):
            samples.setdefault(metric, []).append(float(value))


def evaluate(
    samples: Mapping[str, Sequence[float]],
    objectives: Sequence[Objective],
    *,
    sent: int | None = None,
    in_flight: int = 0,
    alpha: float = EARLY_STOP_ALPHA,
) -> StepVerdict:
    """Each objective against the step's samples (metric -> values of its measured requests; failures as FAILED);
    with `sent` (requests sent in the step so far, `in_flight` of them unfinished), what the anytime-valid test has
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
            decided = test.decide(max(sent, len(values)), misses, in_flight)
        results.append(ObjectiveResult(objective, len(values), value, misses, failed, decided))
    return StepVerdict(tuple(results))


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
