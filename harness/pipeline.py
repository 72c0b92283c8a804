"""`llamasys run`: build -> models -> MMLU and KL divergence -> load -> report, in one run directory.

The pipeline builds llama.cpp, makes the run context, and walks its list of stages; each skips the work whose
outputs are fresh, so re-running a finished run costs seconds and an interrupted one resumes. Whatever happens
(Ctrl-C, a crash, a killed server), the report is rendered from what exists and says what is missing.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from harness import console
from harness.config import Experiment, load_experiment
from harness.context import RunContext
from harness.errors import ConfigError, HarnessError, ReportError
from harness.llamacpp import ensure_build
from harness.manifest import Manifest, ManifestRecord
from harness.records import read_record, write_record
from harness.rundir import RunDir
from harness.stage import Stage
from harness.storage import check_writable, sole_writer

if TYPE_CHECKING:
    from reports.model import Results

log = logging.getLogger(__name__)

# Every stage in order: "build" makes the context the others run with, "report" always ends a run.
STAGES = ("build", "models", "mmlu", "kld", "load", "tune", "report")


def stages() -> list[Stage]:
    """The stages between the build and the report, in order (imported here: MMLU pulls in scipy and datasets)."""
    from harness.loadtest import LoadStage
    from harness.models.pipeline import ModelsStage
    from harness.tune import TuneStage
    from mmlu import KLDStage, QualityStage

    return [ModelsStage(), QualityStage(), KLDStage(), LoadStage(), TuneStage()]


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


def run_pipeline(exp: Experiment, *, stages_to_run: Sequence[str] = STAGES) -> RunDir:
    """Run `stages_to_run` in order; always end by rendering the report from whatever exists."""
    unknown = [s for s in stages_to_run if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    exp.baseline  # noqa: B018 - an experiment without a baseline is refused before anything runs
    with sole_writer(exp.resolved_run_dir()):
        return _run(exp, stages_to_run)


def _run(exp: Experiment, stages_to_run: Sequence[str]) -> RunDir:
    check_writable(exp.resolved_cache_dir(), "cache directory")
    run = open_run_dir(exp)
    console.log_to_file(run.log)
    manifest = Manifest.open(run.manifest, name=exp.name)
    deferred: list[HarnessError] = []  # stages where some variants failed: the others, and later stages, go on
    outputs: dict[str, dict] = {}  # what each stage returned: its units' records
    try:
        with manifest.stage("build"):
            build = ensure_build(exp.llamacpp, exp.resolved_cache_dir(), exp.weight_types)
            manifest.set_build(build)
        log.info("llama.cpp build %s (%s, %s): %s", build.build_number, build.commit, build.backend, build.bin_dir)
        ctx = RunContext.of(exp, build, run)
        for stage in stages():
            if stage.name in stages_to_run and stage.enabled(ctx):
                try:
                    with manifest.stage(stage.name):
                        outputs[stage.name] = stage.run(ctx)
                except HarnessError as exc:
                    if not exc.partial:
                        raise
                    deferred.append(exc)
                    continue
                log.info("%s: done (%d outputs)", stage.name, len(outputs[stage.name]))
        if deferred:
            raise deferred[0]
    finally:
        if "report" in stages_to_run:
            _render(exp, run, manifest)
        console.close_file_log()
    return run


def _render(exp: Experiment, run: RunDir, manifest: Manifest) -> None:
    from reports.render import render_report

    # Rendering must not hide the error that stopped the run: report its own failure and carry on.
    try:
        with manifest.stage("report"):
            results = _collected(exp, run, manifest.record)
            render_report(results, run.report, run_dir=run.root)
        partial = " (partial: " + "; ".join(results.missing) + ")" if results.missing else ""
        log.info("report: %s%s", run.report.resolve(), partial)
    except HarnessError as exc:
        log.error("could not render the report: %s", exc)


def rerender(run_dirs: Sequence[Path]) -> Path:
    """`llamasys report RUN_DIR [RUN_DIR...]`: re-render from results.json; several runs go side by side."""
    from reports.render import render_report

    runs = [RunDir(Path(p)) for p in run_dirs]
    results = [_results_of(r) for r in runs]
    target = runs[0].report
    with sole_writer(runs[0].root):
        render_report(results[0], target, run_dir=runs[0].root, runs=results if len(results) > 1 else None)
    return target


def _results_of(run: RunDir) -> Results:
    """The run's results.json; one an older version wrote (another schema) is collected again from the run's own
    records (experiment.toml, manifest.json and the stage outputs), which is the migration, and saved."""
    from reports.render import load_results

    try:
        return load_results(run.results)
    except ReportError:
        if not (run.results.is_file() and run.experiment.is_file() and run.manifest.is_file()):
            raise
    exp = load_experiment(run.experiment, environ={})
    manifest = read_record(run.manifest, ManifestRecord)
    log.warning("%s was written by another version: collecting it again from the run's records", run.results)
    with sole_writer(run.root):
        return _collected(exp, run, manifest)


def _collected(exp: Experiment, run: RunDir, manifest: ManifestRecord) -> Results:
    """The run's results collected from its records, and saved as results.json."""
    from reports.collect import collect_results

    results = collect_results(exp, run, manifest)
    write_record(run.results, results)
    return results
