"""The tune screen and quality guard for real: llama-bench and llama-perplexity (b11312) on the build's probe model."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.build import Build
from harness.buildcheck import probe_model, probe_text
from harness.cache import CacheDir
from harness.kld import base_logits, run_kld
from harness.tune import Setting, candidates, guard, screen

pytestmark = pytest.mark.integration


def test_every_candidate_is_measured_and_ranked(current_build: Build, cache_dir: Path, tmp_path: Path):
    model = probe_model(CacheDir(cache_dir))
    settings = candidates([1, 2], [512], [128], [False, True], ["f16", "q8_0"])
    assert len(settings) == 6  # q8_0 caches only with flash attention
    ranked = screen(current_build.tools, model, settings, prompt_tokens=64, output_tokens=8, repetitions=1,
                    log_path=tmp_path / "screen.log")  # fmt: skip
    # Two llama-bench runs (flash attention off and on) cover the six settings, each with both of its rates.
    assert sorted(r.setting for r in ranked) == sorted(s.describe() for s in settings)
    assert all(r.pp_tps > 0 and r.tg_tps > 0 for r in ranked)
    assert [r.predicted_s for r in ranked] == sorted(r.predicted_s for r in ranked)
    assert (tmp_path / "screen.log").read_text().count("$ ") == 2


def test_a_kv_cache_that_loses_quality_beyond_the_margin_is_rejected(current_build: Build, cache_dir: Path,
                                                                     tmp_path: Path):  # fmt: skip
    cache = CacheDir(cache_dir)
    model, text = probe_model(cache), probe_text(cache)
    compute = current_build.compute(threads=2)
    base, _ = base_logits(current_build.tools, model, text, ctx_size=64, chunks=4, cache=cache,
                          log_path=tmp_path / "base.log", compute=compute)  # fmt: skip
    default = run_kld(current_build.tools, model, base, ctx_size=64, chunks=4, log_path=tmp_path / "default.log",
                      compute=compute)  # fmt: skip
    assert default.mean_kld < 1e-4 and len(default.chunk_kld) == 4  # the model against itself
    q4 = Setting(flash_attn=True, cache_k="q4_0", cache_v="q4_0")
    kwargs = dict(base_file=base, default=default, alpha=0.05, ctx_size=64, chunks=4, compute=compute)
    tight = guard(current_build.tools, model, q4, margin=1e-4, log_path=tmp_path / "q4.log", **kwargs)
    assert not tight.accepted and tight.difference > 1e-4 and "not shown within the margin" in tight.why
    assert "-ctk q4_0 -ctv q4_0 -fa on" in (tmp_path / "q4.log").read_text()  # measured as it would be served
    loose = guard(current_build.tools, model, q4, margin=10.0, log_path=tmp_path / "q4-loose.log", **kwargs)
    assert loose.accepted and loose.kld == pytest.approx(tight.kld, rel=1e-6)
