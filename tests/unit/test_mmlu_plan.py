"""Sizing llama-perplexity --multiple-choice from the tasks' token counts, per era and backend."""

from __future__ import annotations

import pytest

from harness.build import Build
from harness.errors import MMLUError
from mmlu.multiple_choice import multiple_choice_args, original_study_plan, plan_multiple_choice
from mmlu.tokens import required_tokens

REQUIRED = [100, 700, 300]


def test_cpu_one_task_per_decode_context_fits_the_longest_task() -> None:
    legacy = plan_multiple_choice(REQUIRED, era="legacy", has_gpu=False, n_ctx_train=8192, n_vocab=49152)
    assert legacy.args() == ["-c", "768", "-np", "4", "-b", "768"]
    assert (legacy.total_ctx, legacy.tasks_per_decode, legacy.longest_task) == (768, 1, 700)
    # The current build multiplies -c by -np in this mode: the same 768 tokens are asked for as 4 x 192.
    current = plan_multiple_choice(REQUIRED, era="current", has_gpu=False, n_ctx_train=8192, n_vocab=49152)
    assert current.args() == ["-c", "192", "-np", "4", "-b", "768"]
    assert current.total_ctx == 768 >= max(REQUIRED)


def test_gpu_packs_32_tasks_within_the_logits_budget() -> None:
    plan = plan_multiple_choice(REQUIRED * 20, era="current", has_gpu=True, n_ctx_train=8192, n_vocab=49152)
    assert (plan.parallel, plan.tasks_per_decode) == (128, 32)
    # 32 x mean (367) x 1.1 = 12907 tokens would exceed 2 GiB of logits at 49152 x 4 bytes (10922 tokens).
    assert plan.total_ctx == 128 * plan.ctx_flag and 10922 <= plan.total_ctx < 10922 + 256 + 128
    assert plan.total_ctx * 49152 * 4 <= (2 << 30) + 384 * 49152 * 4
    assert plan.batch == plan.ubatch == 2048  # a pack is decoded in pieces of -b
    legacy = plan_multiple_choice(REQUIRED * 20, era="legacy", has_gpu=True, n_ctx_train=8192, n_vocab=49152)
    assert legacy.args()[:4] == ["-c", str(legacy.total_ctx), "-np", "128"]


def test_small_vocab_gpu_packs_by_task_length() -> None:
    plan = plan_multiple_choice([200] * 100, era="legacy", has_gpu=True, n_ctx_train=4096, n_vocab=1000)
    assert plan.total_ctx == 7168  # ceil(32 x 200 x 1.1) = 7040, rounded up to 256


def test_tasks_per_decode_override_and_limits() -> None:
    plan = plan_multiple_choice(REQUIRED, era="current", has_gpu=False, n_ctx_train=8192, n_vocab=49152,
                                tasks_per_decode=4)  # fmt: skip
    assert (plan.parallel, plan.tasks_per_decode) == (16, 4)
    wide = plan_multiple_choice(REQUIRED, era="legacy", has_gpu=True, n_ctx_train=8192, n_vocab=49152, n_answers=10)
    assert wide.tasks_per_decode == 12 and wide.parallel == 120  # 128 sequence ids / 10 answers


def test_a_task_too_long_for_any_context_is_an_error_before_running() -> None:
    with pytest.raises(MMLUError, match="task 2 needs 700 tokens but the model's context is 512"):
        plan_multiple_choice(REQUIRED, era="current", has_gpu=False, n_ctx_train=512, n_vocab=49152)


def test_empty_selection_cannot_be_sized() -> None:
    with pytest.raises(MMLUError, match="empty"):
        plan_multiple_choice([], era="current", has_gpu=False, n_ctx_train=512, n_vocab=49152)


def test_required_tokens_counts_the_shared_prefix_once() -> None:
    # BOS + 3 question tokens shared, then 2, 1 and 3 answer tokens: llama-perplexity's required_tokens.
    seqs = [[1, 5, 6, 7, 10, 11], [1, 5, 6, 7, 12], [1, 5, 6, 7, 13, 14, 15]]
    assert required_tokens(seqs) == 4 + 2 + 1 + 3
    assert required_tokens([[1, 2], [1, 2]]) == 2  # identical sequences share everything
    assert required_tokens([[1, 2], [3, 4]]) == 4


def test_command_line_per_era_and_backend(tmp_path) -> None:
    (tmp_path / "llama-perplexity").write_text("")
    cpu = Build(bin_dir=tmp_path, backend="cpu", era="legacy", build_number=3661, commit="x", source="t", cache_key="k")
    plan = plan_multiple_choice(REQUIRED, era="legacy", has_gpu=False, n_ctx_train=8192, n_vocab=49152)
    args = multiple_choice_args(tmp_path / "m.gguf", tmp_path / "t.bin", plan, no_escape=True)
    cmd = cpu.tools.command("llama-perplexity", args, cpu.compute(threads=2))
    assert cmd[1:] == ["-m", str(tmp_path / "m.gguf"), "--multiple-choice", "-bf", str(tmp_path / "t.bin"),
                       "-c", "768", "-np", "4", "-b", "768", "--no-escape", "-t", "2"]  # fmt: skip
    gpu = Build(bin_dir=tmp_path, backend="cuda", era="current", build_number=11312, commit="x", source="t",
                cache_key="k")  # fmt: skip
    plan = plan_multiple_choice(REQUIRED, era="current", has_gpu=True, n_ctx_train=8192, n_vocab=49152)
    args = multiple_choice_args(tmp_path / "m.gguf", tmp_path / "t.bin", plan, no_escape=False)
    cmd = gpu.tools.command("llama-perplexity", args, gpu.compute(threads=None))
    assert "--no-escape" not in cmd and cmd[-2:] == ["-ngl", "999"] and "-ub" in cmd
    original = original_study_plan("current", 700)
    assert original.args() == ["-c", "1024"] and original.total_ctx == 4096
    assert original_study_plan("legacy", 700).total_ctx == 1024
