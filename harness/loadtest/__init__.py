"""The Locust speed stage: a server per variant, the load plan run by locustfiles/, per-level summaries.

By job: `stage` (the stage: units, inputs), `attempts` (one variant across attempts: resume, restarts, the summary),
`serverplan` (the server's sizing and warm-up, the search's bound, the decode figures, deadlines), `runner` (Locust
as a child process), `summary` (the records -> per-level summaries), `sampling` (the server's resources), `webui`
(`llamasys serve`). Public entry points: `LoadStage` (the pipeline and `llamasys load`), `run_variant` and
`serve_with_web_ui`.
"""

from __future__ import annotations

from harness.loadtest.attempts import run_variant
from harness.loadtest.stage import LoadStage, run_load_stage
from harness.loadtest.summary import LoadSummary, Percentiles, StepSummary
from harness.loadtest.webui import serve_with_web_ui

__all__ = [
    "LoadStage",
    "LoadSummary",
    "Percentiles",
    "StepSummary",
    "run_load_stage",
    "run_variant",
    "serve_with_web_ui",
]
