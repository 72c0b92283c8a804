"""Model sources and artefacts: Hugging Face checkpoints, conversion to GGUF, quantized variants, the demo model.

`ModelsStage` (and `prepare_models`, what it runs) is the stage's entry point; the submodules hold its parts:
sources (hub, directory, GGUF file, demo model), convert (convert_hf_to_gguf.py, gguf-py), quantize
(llama-imatrix, llama-quantize) and pipeline (caching, models.json).
"""

from __future__ import annotations

from harness.models.pipeline import ModelArtifact, ModelsStage, load_models_json, load_models_record, prepare_models
from harness.models.sources import DEMO_PROVENANCE, SMOLLM2_MEMBER, SMOLLM2_WHEEL, smollm2_gguf

__all__ = [
    "DEMO_PROVENANCE",
    "SMOLLM2_MEMBER",
    "SMOLLM2_WHEEL",
    "ModelArtifact",
    "ModelsStage",
    "load_models_json",
    "load_models_record",
    "prepare_models",
    "smollm2_gguf",
]
