"""Latency objectives: which requests met them, whether a step passed them, and when that is already certain.

An objective is a limit on a quantile of one per-request metric (TTFT, TPOT or E2E, in seconds), e.g. TTFT p90 <= 2 s.
A request is good when it meets every objective's limit (goodput counts only those). A step passes when, for every
objective, the quantile of its measured requests (numpy's linear interpolation, as the report's percentiles; a
failed request counts as missing every limit) is within the limit. Before a step has all its requests, its verdict
is already certain when the distribution-free confidence interval of each quantile (order statistics: the ranks a
binomial(n, q) count covers with the given confidence) lies entirely on one side of its limit: then the step may end
early.

Pure functions, used by the step controller (Locust's process) and the harness's summaries alike.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

Metric = Literal["ttft_s", "tpot_s", "e2e_s"]
METRIC_LABELS = {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "E2E"}
EARLY_STOP_CONFIDENCE = 0.95
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
    n: int
    value: float | None  # the step's quantile (None: no sample)
    low: float  # confidence interval of the quantile (order statistics; -inf/inf where the sample is too small)
    high: float

    @property
    def passed(self) -> bool:
        return self.value is not None and self.value <= self.objective.limit_s

    @property
    def certain(self) -> bool:
        """The interval lies on one side of the limit: more requests would not change this objective's verdict."""
        return self.high <= self.objective.limit_s or self.low > self.objective.limit_s


@dataclass(frozen=True)
class StepVerdict:
    results: tuple[ObjectiveResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def certain(self) -> bool:
        """Pass or fail is settled: one objective certainly failed, or every one certainly passed."""
        return any(r.certain and not r.passed for r in self.results) or all(r.certain for r in self.results)

    def describe(self) -> str:
        parts = []
        for r in self.results:
            value = "no sample" if r.value is None else "failed requests" if r.value >= FAILED else f"{r.value:.3g} s"
            parts.append(f"{r.objective.describe()}: {value} ({'ok' if r.passed else 'missed'})")
        return "; ".join(parts)


def quantile(values: Sequence[float], q: float) -> float:
    """The q quantile as the report computes percentiles (numpy, linear interpolation)."""
    return float(np.percentile(np.asarray(values, dtype=float), q * 100))


def quantile_interval(
    values: Sequence[float], q: float, confidence: float = EARLY_STOP_CONFIDENCE
) -> tuple[float, float]:
    """Distribution-free interval of the q quantile: order statistics x(l) .. x(u) with P(l <= B < u) >= confidence
    for B ~ binomial(n, q); an end beyond the sample is -inf/inf (not enough requests to bound it)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return -math.inf, math.inf
    tail = (1 - confidence) / 2
    lower_rank = int(stats.binom.ppf(tail, n, q))  # x(lower_rank), 1-based; 0 = below the sample
    upper_rank = int(stats.binom.ppf(1 - tail, n, q)) + 1
    low = ordered[lower_rank - 1] if lower_rank >= 1 else -math.inf
    high = ordered[upper_rank - 1] if upper_rank <= n else math.inf
    return low, high


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


def evaluate(samples: Mapping[str, Sequence[float]], objectives: Sequence[Objective]) -> StepVerdict:
    """Each objective against the step's samples (metric -> values of its measured requests; failures as FAILED)."""
    results = []
    for objective in objectives:
        values = [v for v in samples.get(objective.metric, ()) if v is not None]
        value = quantile(values, objective.quantile) if values else None
        low, high = quantile_interval(values, objective.quantile)
        results.append(ObjectiveResult(objective, len(values), value, low, high))
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
