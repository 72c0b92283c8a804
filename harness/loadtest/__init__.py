"""The Locust speed stage: llama-server per variant, stepped load from locustfiles/, per-step summaries.

Public entry points: `LoadStage` (the pipeline and `llamasys load`; it runs `run_load_stage`) and `serve_with_web_ui`
(`llamasys serve`).
"""

from __future__ import annotations

from harness.loadtest.stage import LoadStage, run_load_stage, run_variant, serve_with_web_ui
from harness.loadtest.summary import LoadSummary, Percentiles, StepSummary

__all__ = [
    "LoadStage",
    "LoadSummary",
    "Percentiles",
    "StepSummary",
    "run_load_stage",
    "run_variant",
    "serve_with_web_ui",
]
