"""The Locust speed stage: llama-server per variant, stepped load from locustfiles/, per-step summaries.

Public entry points: `run_load_stage` (pipeline and `llamasys load`) and `serve_with_web_ui` (`llamasys serve`).
"""

from __future__ import annotations

from harness.loadtest.stage import run_load_stage, run_variant, serve_with_web_ui
from harness.loadtest.summary import LoadSummary, Percentiles, StepSummary

__all__ = ["LoadSummary", "Percentiles", "StepSummary", "run_load_stage", "run_variant", "serve_with_web_ui"]
