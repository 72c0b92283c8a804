"""The typed results model (results.json) that the report renders: one record per variant, quality and speed.

Everything here is plain data. It is built from the stage outputs in the run directory by `reports.collect`,
serialised to results.json, and rendered by `reports.render` with a template that only displays.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from harness.records import Record

SCHEMA_VERSION = 1


class SubjectScore(Record):
    subject: str
    n: int
    accuracy: float
    delta: float | None = None  # against the baseline, on the same questions


class Quality(Record):
    """MMLU (llama-perplexity --multiple-choice) and KL divergence against the baseline."""

    n_questions: int | None = None
    accuracy: float | None = None  # percent
    ci_low: float | None = None
    ci_high: float | None = None
    delta: float | None = None  # percentage points against the baseline
    p_value: float | None = None  # exact McNemar on the same questions
    significant: bool | None = None  # p_value < the experiment's alpha
    verdict: str | None = None
    subjects: list[SubjectScore] = Field(default_factory=list)
    kld_mean: float | None = None
    kld_p99: float | None = None
    same_top_pct: float | None = None
    ppl_ratio: float | None = None


class StepResult(Record):
    """One concurrency step of the closed-loop load test."""

    users: int
    requests: int
    failures: int
    duration_s: float
    request_rate: float
    output_tps: float  # all users together
    output_tps_per_user: float
    ttft_s: dict[str, float] = Field(default_factory=dict)  # p50 / p90 / p99
    tpot_s: dict[str, float] = Field(default_factory=dict)
    itl_s: dict[str, float] = Field(default_factory=dict)
    e2e_s: dict[str, float] = Field(default_factory=dict)


class Speed(Record):
    steps: list[StepResult] = Field(default_factory=list)
    cpu_pct_mean: float | None = None
    rss_mb_max: float | None = None
    gpu_util_pct_mean: float | None = None
    gpu_mem_mb_max: float | None = None
    files: dict[str, str] = Field(default_factory=dict)  # label -> path relative to the run directory

    def step(self, users: int) -> StepResult | None:
        return next((s for s in self.steps if s.users == users), None)


class VariantResult(Record):
    name: str
    quant_type: str
    imatrix: bool = False
    is_baseline: bool = False
    size_bytes: int | None = None
    bits_per_weight: float | None = None
    quality: Quality | None = None
    speed: Speed | None = None


class Recommendation(Record):
    variant: str | None
    headline: str
    details: list[str] = Field(default_factory=list)


class Results(Record):
    name: str
    model: str
    baseline: str
    llamacpp: dict[str, Any]  # build number, commit, backend, source
    hardware: dict[str, Any]
    experiment_toml: str
    variants: list[VariantResult]
    alpha: float  # the experiment's significance level (mmlu.alpha): the verdicts, the rule and the page read it here
    missing: list[str] = Field(default_factory=list)  # what the run has not produced (yet)
    recommendation: Recommendation | None = None
    load_settings: dict[str, Any] = Field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def variant(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)
