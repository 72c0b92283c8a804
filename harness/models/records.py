"""models/models.json: the models stage's output, which every later stage reads for the variants it measures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.records import Record, StageRecord, read_record


class ModelArtifact(Record):
    """One variant's GGUF as the later stages (MMLU, KLD, load, report) use it."""

    name: str
    type: str
    path: Path
    size_bytes: int
    n_params: int
    bits_per_weight: float
    imatrix: Path | None  # the importance matrix used to quantize it, if any
    source: Path  # the unquantized (F16/BF16/F32) GGUF it was made from; itself for the baseline
    baseline: bool
    pure: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    recipe: Path | None = None  # a searched variant's --tensor-type-file
    cache_key: str = ""
    seconds: float = 0.0  # how long making it took (when it was made; a cached artefact keeps that time)


class ModelSourceInfo(Record):
    """Where the baseline came from and what it is."""

    source: str
    description: str
    identity: str
    checkpoint: str | None
    baseline: str
    baseline_type: str
    n_params: int
    architecture: str | None
    pre_tokenizer: str | None
    pretokenizer_fallback: bool
    convert_seconds: float
    provenance: str | None = None  # what the baseline really is, when a reader could take it for something else


class ImatrixInfo(Record):
    path: str
    text: str
    chunks: int
    ctx_size: int
    seconds: float


class ModelsRecord(StageRecord):
    """models/models.json: the stage's output."""

    model: ModelSourceInfo
    imatrix: ImatrixInfo | None = None
    build: dict[str, Any]
    variants: list[ModelArtifact]


def load_models_record(path: Path) -> ModelsRecord:
    """models/models.json as the models stage wrote it."""
    return read_record(path, ModelsRecord)


def load_models_json(path: Path) -> dict[str, ModelArtifact]:
    """The variants a previous run listed in models/models.json, by name."""
    return {v.name: v for v in load_models_record(path).variants}
