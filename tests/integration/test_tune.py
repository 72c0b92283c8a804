"""The tune screen for real: llama-bench (b11312) on the build's probe model over a small grid of settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.build import Build
from harness.buildcheck import probe_model
from harness.cache import CacheDir
from harness.tune import candidates, screen

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
