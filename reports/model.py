"""The typed results model (results.json) that the report renders: one record per variant, quality and speed.

Everything here is plain data. It is built from the stage outputs in the run directory by `reports.collect`,
serialised to results.json, and rendered by `reports.render` with a template that only displays.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from bench.records import Capacity
from harness.kld import PairedKLD
from harness.loadtest.summary import Attempt, StepSummary
from harness.manifest import StageTime
from harness.records import Record
from harness.tune import TuneResult

# 5: a speed's steps and attempts are the load stage's StepSummary and Attempt records (no copies).
SCHEMA_VERSION = 5


Verdict = Literal["non-inferior", "worse", "inconclusive"]


class SubjectScore(Record):
    subject: str
    n: int
    accuracy: float
    delta: float | None = None  # against the baseline, on the same questions
    lost: int | None = None  # right -> wrong flips against the baseline
    gained: int | None = None  # wrong -> right


class Quality(Record):
    """MMLU (llama-perplexity --multiple-choice) and KL divergence against the baseline. Percent and points."""

    n_questions: int | None = None
    accuracy: float | None = None  # percent
    ci_low: float | None = None  # Wilson
    ci_high: float | None = None
    delta: float | None = None  # percentage points against the baseline, on the same questions
    delta_ci_low: float | None = None  # paired (Tango score) interval of the change, points: a fixed-n interval
    delta_ci_high: float | None = None
    # A sequential run: the confidence sequence of its own e-processes at the stop, points (valid wherever it
    # stopped; Tango's is not, at a data-dependent stop), at cs_confidence.
    delta_cs_low: float | None = None
    delta_cs_high: float | None = None
    cs_confidence: float | None = None
    verdict: Verdict | None = None  # against Results.margin_points: the sequential test's, or Tango's (Holm)
    fixed_n_verdict: Verdict | None = None  # Tango's on the questions answered (beside a sequential verdict)
    questions_budget: int | None = None  # a sequential run: the questions it could have used (n_questions: used)
    e_non_inferior: float | None = None  # its e-processes at the stop (a verdict at 1 / level)
    e_worse: float | None = None
    e_threshold: float | None = None
    drop_within_margin: bool = False  # non-inferior, yet a real (smaller than the margin) loss
    p_noninferior: float | None = None  # Holm-adjusted one-sided p of "loses the margin or more"
    p_worse: float | None = None  # Holm-adjusted one-sided p of "loses nothing"
    mcnemar_p: float | None = None  # exact McNemar, two-sided, unadjusted
    lost: int | None = None  # right -> wrong flips
    gained: int | None = None  # wrong -> right flips
    questions_needed: int | None = None  # inconclusive: questions that would decide, at Results.power
    needed_for: Verdict | None = None
    needed_rule: Literal["fixed-n", "sequential"] | None = None  # the rule they are planned for (the run's own)
    decide_command: str | None = None  # how to run that many (or all there are: see questions_available)
    questions_available: int | None = None  # what the MMLU selection can draw from, when known
    cannot_decide: str | None = None  # inconclusive, and more questions of this test cannot decide it: why
    no_plan: str | None = None  # inconclusive, and no number of questions can be promised to decide it: why
    subjects: list[SubjectScore] = Field(default_factory=list)
    kld_mean: float | None = None
    kld_mean_sigma: float | None = None  # llama-perplexity's +/- (one standard error)
    kld_p99: float | None = None
    same_top_pct: float | None = None
    same_top_sigma: float | None = None  # points
    rms_dp_pct: float | None = None  # RMS of the change in the right token's probability, points
    rms_dp_sigma: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_sigma: float | None = None
    kld_chunks: list[float] = Field(default_factory=list)  # per-chunk mean KLD on the held-out text
    # This variant's KLD minus each other variant's, paired on the same held-out chunks (harness.kld.paired_kld).
    kld_paired: dict[str, PairedKLD] = Field(default_factory=dict)
    mmlu_failure: str | None = None  # why the variant's MMLU run failed, when it did
    kld_failure: str | None = None

    @property
    def interval(self) -> tuple[float, float, Literal["confidence sequence", "Tango"]] | None:
        """The interval of the change to print beside the verdict: a sequential run's confidence sequence, else
        Tango's fixed-n interval (points)."""
        if self.delta_cs_low is not None and self.delta_cs_high is not None:
            return self.delta_cs_low, self.delta_cs_high, "confidence sequence"
        if self.delta_ci_low is not None and self.delta_ci_high is not None:
            return self.delta_ci_low, self.delta_ci_high, "Tango"
        return None


class Speed(Record):
    """One target's measurement of one variant (or of an external endpoint's model)."""

    target: str = ""
    api: str = ""
    serializes: bool = False  # the server handles one request at a time: concurrent users queue
    steps: list[StepSummary] = Field(default_factory=list)  # the load stage's own step records
    objectives: list[str] = Field(default_factory=list)
    capacity: Capacity | None = None
    llama_bench_tg_tps: float | None = None  # single-stream generation rate of the same model (llama-bench tg)
    bandwidth_gbps: float | None = None  # memory bandwidth decode is bound by, GB/s
    bandwidth_detail: str | None = None  # how it was obtained
    weight_mb_per_token: float | None = None  # weight bytes each decode step reads, MB
    kv_kb_per_token: float | None = None  # KV cache bytes per token of context, kB
    cpu_pct_mean: float | None = None
    rss_mb_max: float | None = None
    gpu_util_pct_mean: float | None = None
    gpu_mem_mb_max: float | None = None
    energy: str | None = None  # the energy counters read, or "not available (why)" (harness.energy)
    files: dict[str, str] = Field(default_factory=dict)  # label -> path relative to the run directory
    attempts: list[Attempt] = Field(default_factory=list)  # the load stage's own attempt records
    complete: bool = True  # False: the load stopped before every step; `error` says why
    error: str | None = None

    def step(self, level: float) -> StepSummary | None:
        return next((s for s in self.steps if s.level == level), None)

    @property
    def unit(self) -> str:
        """What a level counts: users, or requests/s (open-loop arrivals)."""
        return "requests/s" if any(s.rate is not None for s in self.steps) else "users"


class SearchSummary(Record):
    """A searched recipe's search (harness.models.search.SearchRecord, without the measurements)."""

    budget_bytes: int
    budget_from: str
    granularity: str
    types: list[str]
    excluded: list[str] = Field(default_factory=list)
    groups: int
    measurements: int
    chosen: dict[str, str]  # group -> the tensor types chosen for it
    predicted_kld: float
    measured_kld: float | None
    file_bytes: int
    gap: float
    seconds: float


class VariantResult(Record):
    name: str
    quant_type: str
    imatrix: bool = False
    is_baseline: bool = False
    size_bytes: int | None = None
    bits_per_weight: float | None = None
    recipe: str | None = None  # a searched per-tensor recipe: its --tensor-type-file, relative to the run directory
    search: SearchSummary | None = None  # how the recipe was found
    quality: Quality | None = None
    speeds: dict[str, Speed] = Field(default_factory=dict)  # by target, in the experiment's order

    @property
    def speed(self) -> Speed | None:
        """The first target's measurement: what the recommendation compares (the first target is the primary)."""
        return next(iter(self.speeds.values()), None)


class TargetResult(Record):
    name: str
    kind: str  # llama-server | llama-cpp-python | external
    api: str
    serializes: bool = False
    managed: bool = True  # started by the harness for each variant (an external endpoint is not)


class EndpointResult(Record):
    """An external endpoint's measurement: not a variant of this run, reported beside them."""

    target: str
    url: str
    model: str
    speed: Speed


class Recommendation(Record):
    variant: str | None  # the variant to ship; None when none qualifies
    headline: str
    details: list[str] = Field(default_factory=list)
    closest: str | None = None  # when nothing qualifies: the variant closest to the baseline by KL divergence
    rule: str = ""  # the decision rule, as the report's method section states it


class Results(Record):
    name: str
    model: str
    baseline: str
    llamacpp: dict[str, Any]  # build number, commit, backend, source
    isa_summary: str | None = None  # the instruction sets the build uses, and why any are off
    build_check: list[dict[str, Any]] = Field(default_factory=list)  # the post-build probe, per weight type
    hardware: dict[str, Any]
    experiment_toml: str
    variants: list[VariantResult]
    # The experiment's quality settings, read by the verdicts, the rule and the page from here alone.
    alpha: float  # two-sided 1 - alpha intervals; each one-sided verdict test at alpha / 2
    margin_points: float  # the largest accepted loss of MMLU accuracy (mmlu.margin_points)
    power: float  # for the questions that would decide an inconclusive verdict (mmlu.power)
    baseline_provenance: str | None = None  # what the baseline really is, when it is not a plain F16 checkpoint
    missing: list[str] = Field(default_factory=list)  # what the run has not produced (yet)
    recommendation: Recommendation | None = None
    load_settings: dict[str, Any] = Field(default_factory=dict)
    targets: list[TargetResult] = Field(default_factory=list)
    endpoints: list[EndpointResult] = Field(default_factory=list)
    tuning: list[TuneResult] = Field(default_factory=list)  # the tune stage's, per tuned variant
    stage_times: list[StageTime] = Field(default_factory=list)  # where the run's time went (manifest.json)
    schema_version: int = SCHEMA_VERSION

    def variant(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)

    def kld_pairs(self) -> list[tuple[str, str, PairedKLD]]:
        """The paired KLD comparisons the report shows: each recipe against every stock variant, and each pair of
        stock variants once (in the run's order)."""
        order = {v.name: i for i, v in enumerate(self.variants)}
        pairs = []
        for v in self.variants:
            for other, pair in v.quality.kld_paired.items() if v.quality else ():
                theirs = self.variant(other)
                if theirs is None or theirs.recipe:
                    continue
                if v.recipe or order[v.name] < order[other]:
                    pairs.append((v.name, other, pair))
        return pairs
