"""`llama-perplexity --multiple-choice -bf FILE`: sizing, command line, running with progress, parsing its output.

Sizing. llama-perplexity packs whole tasks into one decode while they fit in the context and while
sequence ids remain (four per task, at most 128, so at most 32 tasks); a task longer than the context stops the
run. The longest task is therefore measured exactly (its tokens counted by the model's own tokenizer, see
`mmlu.tokens`) and the context sized from it. How many tasks share a decode depends on the backend: on a GPU many
(more work per kernel launch), on a CPU one, because packing more was measured no faster there. The meaning of
`-c` differs by era: b3661-era builds take it as the whole context; current builds multiply it by `-np` in this
mode (and force a unified KV cache), so the same plan gives different flags per era.

Output (both eras; stdout and stderr merged): a `task\\tacc_norm` header, one `N\\t<running accuracy %>` line per
task in file order, then `Final result: X +/- Y` and `Random chance: ...` (b3661-era builds print those two on
stdout with a leading space, current builds on stderr).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.build import Era
from harness.errors import MMLUError
from harness.records import Record
from harness.tools import Compute, LineProgress, ToolRunner, strip_log_prefix

# llama-perplexity's own limits (tools/perplexity/perplexity.cpp): 32 tasks x 4 answers of sequence ids per decode,
# and at least 4 parallel sequences whatever -np says.
MAX_SEQUENCES = 128
MIN_PARALLEL = 4
GPU_TASKS_PER_DECODE = 32
CPU_TASKS_PER_DECODE = 1
# Host memory llama-perplexity allocates for logits is context x vocabulary x 4 bytes: cap the packed context.
LOGITS_BUDGET_BYTES = 2 << 30
CTX_ROUNDING = 256
# A pack is decoded in -b sized pieces (the KV cache keeps the earlier ones), and llama.cpp keeps an output buffer
# of -b x vocabulary floats: 2048 keeps that buffer small without shrinking the GPU's work per ubatch.
MAX_BATCH = 2048

HEADER = "task\tacc_norm"
_TASK_RE = re.compile(r"^(\d+)\t(\d+(?:\.\d+)?)\s*$")
_NUM = r"([-+]?(?:\d+(?:\.\d*)?|nan|inf))"
_FINAL_RE = re.compile(rf"^\s*Final result:\s*{_NUM}\s*\+/-\s*{_NUM}", re.IGNORECASE)
_CHANCE_RE = re.compile(rf"^\s*Random chance:\s*{_NUM}\s*\+/-\s*{_NUM}", re.IGNORECASE)
_PROBLEM_RE = re.compile(
    r"does not fit|failed|error|no tasks|bad task|empty answer|malformed|requires a higher|bad_alloc|abort",
    re.IGNORECASE,
)


# ---------------------------------------------------------------- sizing (pure)


class MultipleChoicePlan(Record):
    """The flags one llama-perplexity --multiple-choice run gets, and the context they produce."""

    era: Era
    ctx_flag: int  # the -c value
    parallel: int | None  # -np, None = the tool's default (which it raises to 4)
    batch: int | None  # -b, None = the tool's default
    ubatch: int | None  # -ub, None = the tool's default
    total_ctx: int  # tokens of context the tool allocates (ctx_flag x parallel in the current era)
    tasks_per_decode: int
    longest_task: int  # tokens of the longest task

    def args(self) -> list[str]:
        args = ["-c", str(self.ctx_flag)]
        for flag, value in (("-np", self.parallel), ("-b", self.batch), ("-ub", self.ubatch)):
            if value is not None:
                args += [flag, str(value)]
        return args


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def plan_multiple_choice(
    required_tokens: Sequence[int],
    *,
    era: Era,
    has_gpu: bool,
    n_ctx_train: int,
    n_vocab: int,
    n_answers: int = 4,
    tasks_per_decode: int | None = None,
    logits_budget_bytes: int = LOGITS_BUDGET_BYTES,
) -> MultipleChoicePlan:
    """Context, parallel sequences and batch for tasks needing `required_tokens` each (see the module docstring).

    A task longer than the model's training context cannot be scored by any context: that is an error here,
    before anything runs.
    """
    if not required_tokens:
        raise MMLUError("no tasks to size: the MMLU selection is empty")
    longest = max(required_tokens)
    if longest > n_ctx_train:
        worst = required_tokens.index(longest) + 1
        raise MMLUError(
            f"task {worst} needs {longest} tokens but the model's context is {n_ctx_train}; "
            "no context can hold it (drop its subject or use a shorter rendering)"
        )
    per_decode = tasks_per_decode or (GPU_TASKS_PER_DECODE if has_gpu else CPU_TASKS_PER_DECODE)
    per_decode = max(1, min(per_decode, MAX_SEQUENCES // n_answers))
    sequences = max(MIN_PARALLEL, per_decode * n_answers)
    if per_decode == 1:
        total = _round_up(longest, CTX_ROUNDING)
    else:
        mean = sum(required_tokens) / len(required_tokens)
        budget = max(CTX_ROUNDING, logits_budget_bytes // (4 * n_vocab))
        total = _round_up(max(longest, min(math.ceil(per_decode * mean * 1.1), budget)), CTX_ROUNDING)
    if era == "current":
        ctx_flag = -(-total // sequences)
        total = ctx_flag * sequences
    else:
        ctx_flag = total
    batch = min(total, MAX_BATCH)
    return MultipleChoicePlan(
        era=era, ctx_flag=ctx_flag, parallel=sequences, batch=batch, ubatch=batch if has_gpu else None, total_ctx=total,
        tasks_per_decode=per_decode, longest_task=longest,
    )  # fmt: skip


def original_study_plan(era: Era, longest_task: int, ctx_size: int = 1024) -> MultipleChoicePlan:
    """The seed's settings: `--ctx-size 1024` and default parallelism (for comparison, not for use)."""
    total = ctx_size * MIN_PARALLEL if era == "current" else ctx_size
    return MultipleChoicePlan(
        era=era, ctx_flag=ctx_size, parallel=None, batch=None, ubatch=None, total_ctx=total, tasks_per_decode=1,
        longest_task=longest_task,
    )  # fmt: skip


# ---------------------------------------------------------------- output parsing (pure)


@dataclass(frozen=True)
class MultipleChoiceOutput:
    """What llama-perplexity printed: running accuracies (percent) after each task, and its final lines."""

    running: list[float]
    final: float | None
    final_sigma: float | None
    random_chance: float | None
    problems: list[str]  # lines that look like the reason a run stopped early


def task_line(line: str) -> tuple[int, float] | None:
    """`17\\t41.17647059` -> (17, 41.17647059)."""
    match = _TASK_RE.match(line)
    return (int(match[1]), float(match[2])) if match else None


def parse_multiple_choice_output(text: str) -> MultipleChoiceOutput:
    """Parse merged stdout+stderr of either era; task lines are only read after the `task\\tacc_norm` header."""
    running: list[float] = []
    final = sigma = chance = None
    problems: list[str] = []
    in_tasks = False
    for raw in text.splitlines():
        line = strip_log_prefix(raw.rstrip())
        if line.strip() == HEADER:
            in_tasks = True
            continue
        if in_tasks and (parsed := task_line(line)) is not None:
            number, accuracy = parsed
            if number != len(running) + 1:
                raise MMLUError(f"llama-perplexity printed task {number} after task {len(running)}")
            running.append(accuracy)
            continue
        if match := _FINAL_RE.match(line):
            # One task has no spread: the tool prints nan (or -nan) for its sigma; keep JSON free of NaN.
            final, sigma = float(match[1]), float(match[2])
            sigma = sigma if math.isfinite(sigma) else None
        elif match := _CHANCE_RE.match(line):
            chance = float(match[1])
        elif _PROBLEM_RE.search(line):
            problems.append(line.strip())
    return MultipleChoiceOutput(running, final, sigma, chance, problems)


def correctness_from_running(running: Sequence[float]) -> list[bool]:
    """Per-task correctness from running accuracies: line N's accuracy x N rounded, minus the previous count.

    Exact because each line prints 100 x correct / N with 8 decimals, far finer than 1/N for any realistic N.
    """
    flags: list[bool] = []
    previous = 0
    for n, accuracy in enumerate(running, start=1):
        count = round(accuracy * n / 100.0)
        step = count - previous
        if step not in (0, 1) or abs(accuracy * n / 100.0 - count) > 1e-3:
            raise MMLUError(f"running accuracy {accuracy} after task {n} is inconsistent with the lines before it")
        flags.append(step == 1)
        previous = count
    return flags


def check_against_final(correct: Sequence[bool], output: MultipleChoiceOutput) -> None:
    """The recovered answers must reproduce llama-perplexity's own final line (4 decimals, float arithmetic)."""
    if output.final is None:
        raise MMLUError("llama-perplexity printed no 'Final result' line")
    n = len(correct)
    ours = 100.0 * sum(correct) / n
    if abs(ours - output.final) > 1.5e-4:
        raise MMLUError(
            f"recovered accuracy {ours:.4f} over {n} tasks differs from llama-perplexity's final {output.final:.4f}"
        )


# ---------------------------------------------------------------- running


def multiple_choice_args(model: Path, task_file: Path, plan: MultipleChoicePlan, *, no_escape: bool) -> list[str]:
    """llama-perplexity's arguments for one run (the runner adds threads and GPU layers)."""
    args = ["-m", str(model), "--multiple-choice", "-bf", str(task_file), *plan.args()]
    if no_escape:
        # b3661-era builds apply escape processing to the prompt by default, garbling binary task files.
        args.append("--no-escape")
    return args


def needs_no_escape(tools: ToolRunner) -> bool:
    """b3661-era builds escape-process `-bf` contents unless told `--no-escape` (fixed upstream 2024-09-20)."""
    return tools.build.era == "legacy" and tools.supports("llama-perplexity", "--no-escape")


def _task_position(line: str) -> int | None:
    parsed = task_line(line)
    return parsed[0] if parsed else None


def run_multiple_choice(
    tools: ToolRunner,
    model: Path,
    task_file: Path,
    n_tasks: int,
    plan: MultipleChoicePlan,
    *,
    log_path: Path,
    compute: Compute,
    desc: str = "MMLU",
) -> tuple[list[bool], MultipleChoiceOutput, float]:
    """Score every task; returns per-task correctness (file order), the parsed output, and wall seconds."""
    args = multiple_choice_args(model, task_file, plan, no_escape=needs_no_escape(tools))
    run = tools.run(
        "llama-perplexity", args, log_path=log_path, compute=compute,
        progress=LineProgress(n_tasks, desc, "q", _task_position),
    )  # fmt: skip
    output = parse_multiple_choice_output("\n".join(run.lines))
    if run.signalled:
        raise run.error(
            MMLUError, f"llama-perplexity --multiple-choice (after {len(output.running)} of {n_tasks} tasks)"
        )
    if not run.ok or output.final is None or len(output.running) != n_tasks:
        why = output.problems[-1] if output.problems else run.why()
        raise MMLUError(
            f"llama-perplexity --multiple-choice stopped after {len(output.running)} of {n_tasks} tasks "
            f"(exit {run.code}): {why} (log: {log_path})"
        )
    correct = correctness_from_running(output.running)
    check_against_final(correct, output)
    return correct, output, run.seconds
