"""`llamasys run`: build -> models -> MMLU and KL divergence -> load -> report, in one run directory.

Each stage skips the work whose outputs are fresh, so re-running a finished run costs seconds and an interrupted
one resumes. Whatever happens (Ctrl-C, a crash, a killed server), the report is rendered from what exists and
says what is missing.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from harness.config import Experiment
from harness.errors import ConfigError, HarnessError
from harness.manifest import STAGES, Manifest
from harness.rundir import RunDir


def baseline_name(exp: Experiment) -> str:
    for variant in exp.variants:
        if variant.is_baseline:
            return variant.name
    raise ConfigError("variants: the experiment needs an unquantized baseline variant (type F16, BF16 or F32)")


def open_run_dir(exp: Experiment) -> RunDir:
    """Create the run directory, or check that the one there holds the same experiment (same name and model)."""
    run = RunDir(exp.resolved_run_dir())
    if run.experiment.is_file():
        try:
            previous = tomllib.loads(run.experiment.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{run.experiment} is damaged ({exc}); use another --run-dir") from None
        mine = exp.model_dump(mode="json", exclude_none=True)
        for key in ("name", "model"):
            if previous.get(key) != mine.get(key):
                raise ConfigError(
                    f"run directory {run.root} holds a different experiment ({key} differs: "
                    f"{previous.get(key)!r} there, {mine.get(key)!r} now); use another --run-dir"
                )
    run.root.mkdir(parents=True, exist_ok=True)
    run.experiment.write_text(exp.to_toml(), encoding="utf-8")
    return run


def run_pipeline(exp: Experiment, *, stages: Sequence[str] = STAGES, progress: bool = True) -> RunDir:
    """Run `stages` in order; always end by rendering the report from whatever exists."""
    from harness.llamacpp import ensure_build

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    baseline = baseline_name(exp)
    run = open_run_dir(exp)
    manifest = Manifest.open(run.manifest, name=exp.name)
    try:
        with manifest.stage("build"):
            build = ensure_build(exp.llamacpp, exp.resolved_cache_dir(), progress=progress)
            manifest.set("llamacpp", _build_info(build))
        _say(f"llama.cpp build {build.build_number} ({build.commit}, {build.backend}): {build.bin_dir}")
        if not any(s in stages for s in ("models", "mmlu", "load")):
            return run
        with manifest.stage("models"):
            from harness.models import prepare_models

            artifacts = prepare_models(exp, build, run, progress=progress)
        models = {name: art.path for name, art in artifacts.items()}
        _say(f"models: {', '.join(models)} in {run.models}")
        if "mmlu" in stages and exp.mmlu.enabled:
            with manifest.stage("mmlu"):
                from mmlu.stage import run_quality_stage

                run_quality_stage(exp, build, models, run, baseline=baseline, progress=progress)
            _say(f"quality results in {run.root / 'mmlu'} and {run.root / 'kld'}")
        if "load" in stages and exp.load.enabled:
            with manifest.stage("load"):
                from harness.loadtest import run_load_stage

                run_load_stage(exp, build, models, run, progress=progress)
            _say(f"load results in {run.root / 'load'}")
    finally:
        if "report" in stages:
            _render(exp, run, manifest, baseline)
    return run


def _render(exp: Experiment, run: RunDir, manifest: Manifest, baseline: str) -> None:
    from harness.rundir import write_json
    from reports.collect import collect_results
    from reports.render import render_report

    # Rendering must not hide the error that stopped the run: report its own failure and carry on.
    try:
        with manifest.stage("report"):
            results = collect_results(exp, run, manifest.data, baseline=baseline)
            write_json(run.results, results.to_json())
            render_report(results, run.report, run_dir=run.root)
        partial = " (partial: " + "; ".join(results.missing) + ")" if results.missing else ""
        _say(f"report: {run.report.resolve()}{partial}")
    except HarnessError as exc:
        print(f"llamasys: could not render the report: {exc}", file=sys.stderr)


def _say(text: str) -> None:
    print(text, flush=True)


def _build_info(build) -> dict:
    return {
        "build_number": build.build_number,
        "commit": build.commit,
        "backend": build.backend,
        "source": build.source,
        "era": build.era,
        "cache_key": build.cache_key,
    }


def rerender(run_dirs: Sequence[Path]) -> Path:
    """`llamasys report RUN_DIR [RUN_DIR...]`: re-render from results.json; several runs go side by side."""
    from reports.render import load_results, render_report

    runs = [RunDir(Path(p)) for p in run_dirs]
    results = [load_results(r.results) for r in runs]
    target = runs[0].report
    render_report(results[0], target, run_dir=runs[0].root, runs=results if len(results) > 1 else None)
    return target
