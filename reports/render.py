"""Render results.json into one self-contained report.html (Jinja2 with autoescape, plotly.js inlined)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import jinja2
from plotly.offline import get_plotlyjs

from harness.errors import ReportError
from harness.loadtest.summary import Percentiles
from harness.records import RecordError, atomic_write, read_record
from harness.rundir import RunDir
from reports.charts import all_charts
from reports.model import Results
from reports.recommend import capacity_note, decided_pass_needs

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("reports", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _fmt(value: float | None, spec: str = ".2f", missing: str = "–") -> str:
    if value is None:
        return missing
    return format(value, spec)


def _ms(value: float | None) -> str:
    return _fmt(value * 1000 if value is not None else None, ".1f")


def _quantile(percentiles: Percentiles | None, which: str) -> float | None:
    """`{{ s.ttft_s | q("p90") }}`: one figure of a step's percentiles, None when the step has none."""
    return None if percentiles is None else getattr(percentiles, which)


def _timestamp(value: float | None) -> str:
    """Wall-clock seconds as local date and time (when an attempt or a server started)."""
    if value is None:
        return "–"
    return dt.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


_ENV.filters["fmt"] = _fmt
_ENV.filters["ms"] = _ms
_ENV.filters["timestamp"] = _timestamp
_ENV.filters["q"] = _quantile


def render_report(
    results: Results, target: Path, *, run_dir: Path | None = None, runs: list[Results] | None = None
) -> Path:
    """Write report.html for `results` (and, side by side, other runs' results when given)."""
    template = _ENV.get_template("report.html")
    run_dir = run_dir or target.parent
    page = template.render(
        r=results,
        runs=runs or [],
        charts=all_charts(results),
        subjects=subject_table(results),
        zip=zip,
        plotlyjs=get_plotlyjs(),
        links=_raw_links(results, run_dir, target.parent),
        results_json=results.model_dump(mode="json"),
        capacity_note=capacity_note,
        decided_pass_needs=decided_pass_needs,
    )
    return atomic_write(target, page)


def subject_table(results: Results) -> dict:
    """Subjects as rows, variants with per-subject scores as columns (a cell is None where a variant lacks one)."""
    variants = [v for v in results.variants if v.quality and v.quality.subjects]
    names = sorted({s.subject for v in variants for s in v.quality.subjects})  # type: ignore[union-attr]
    rows = []
    for subject in names:
        cells = [next((s for s in v.quality.subjects if s.subject == subject), None) for v in variants]  # type: ignore[union-attr]
        n = max((c.n for c in cells if c), default=0)
        rows.append({"subject": subject, "n": n, "cells": cells})
    return {"variants": variants, "rows": rows}


def _raw_links(results: Results, run_dir: Path, report_dir: Path) -> list[tuple[str, str]]:
    """Relative links from the report to the raw files that exist, so the report stays movable with its run."""
    run = RunDir(run_dir)
    candidates = [("experiment.toml", run.experiment), ("manifest.json", run.manifest), ("results.json", run.results)]
    for v in results.variants:
        candidates += [(f"MMLU {v.name}", run.mmlu(v.name)), (f"KLD {v.name}", run.kld(v.name))]
        for target, speed in v.speeds.items():
            candidates += [
                (f"load {v.name} on {target}: {label}", run.root / rel) for label, rel in speed.files.items()
            ]
    for e in results.endpoints:
        candidates += [
            (f"load {e.model} on {e.target}: {label}", run.root / rel) for label, rel in e.speed.files.items()
        ]
    links = []
    for label, path in candidates:
        if path.exists():
            links.append((label, os.path.relpath(path, report_dir)))
    return links


def load_results(path: Path) -> Results:
    try:
        return read_record(path, Results)
    except FileNotFoundError:
        raise ReportError(f"no results.json in {path.parent}: run the pipeline there first") from None
    except RecordError as exc:
        raise ReportError(str(exc)) from None
