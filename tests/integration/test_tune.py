"""The tune screen and quality guard for real: llama-bench and llama-perplexity (b11312) on the build's probe model."""

from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

import pytest

from harness.build import Build
from harness.buildcheck import probe_model, probe_text
from harness.cache import CacheDir
from harness.kld import base_logits, run_kld
from harness.tune import Setting, candidates, guard, screen, served_command
from tests.integration.helpers import llamasys, start_cli, stopped_at_the_end, wait_until

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
    # b11312's default -fa auto already runs flash attention on the CPU: -fa on is the defaults' twin, to the bit.
    twin = guard(current_build.tools, model, Setting(flash_attn=True), margin=1e-4, log_path=tmp_path / "fa.log",
                 **kwargs)  # fmt: skip
    assert twin.accepted and twin.difference == 0.0 and twin.kld == default.mean_kld


TUNE_TOML = """
name = "tune"
[llamacpp]
source = "pypi"
ref = "0.3.36"
[model]
source = "demo"
pretokenizer = "smollm"
[[variants]]
name = "F16"
type = "F16"
[[variants]]
name = "Q4_K_M-imat"
type = "Q4_K_M"
imatrix = true
[imatrix]
chunks = 8
ctx_size = 256
[corpus]
source = "llamacpp-docs"
[mmlu]
enabled = false
kld_chunks = 4         # the quality guard's held-out chunks
[load]
prompt_tokens = 128
output_tokens = 16
steps = [1]
requests_per_user = 2
min_requests = 4
search = true
max_users = 3
[slo]
# Prefilling 128 tokens one at a time misses it at 1 user; 128 at once meets it at 2 and 3: the trial has levels
# left to measure when it is interrupted at its first request.
ttft_s = { limit = 1.0, quantile = 0.9 }
[[targets]]
kind = "llama-server"
[server]
threads = 1
# A bad default: prompts prefilled one token at a time. The tune grid's one candidate restores -ub 512.
extra_args = ["-ub", "1"]
[tune]
enabled = true
variants = ["Q4_K_M-imat"]
threads = [1]
batch = [2048]
ubatch = [512]
flash_attn = [false]
cache_types = ["f16"]
survivors = 1
repetitions = 1
"""


def test_a_grid_against_a_real_llama_server_finds_the_better_setting(current_build: Build, cache_dir: Path,
                                                                    tmp_path: Path):  # fmt: skip
    experiment = tmp_path / "tune.toml"
    experiment.write_text(TUNE_TOML)
    run_dir = tmp_path / "run"
    env = {"LLAMASYS_CACHE_DIR": str(cache_dir)}
    # Ctrl-C while the trial's requests are being recorded: the run stops (130) with no tune result ...
    proc = start_cli("run", str(experiment), "--run-dir", str(run_dir), "--no-progress", env=env)
    trial_records = run_dir / "tune" / "Q4_K_M-imat"
    with stopped_at_the_end(proc):
        wait_until(lambda: any(p.stat().st_size for p in trial_records.glob("*/load/*/*/requests.jsonl")), proc, 1500,
                   "the trial's first request record")  # fmt: skip
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not (run_dir / "tune" / "Q4_K_M-imat.json").exists()
    defaults_summary = run_dir / "load" / "llama-server" / "Q4_K_M-imat" / "summary.json"
    before_resume = defaults_summary.stat().st_mtime_ns
    # ... and the next run resumes it: the defaults are not measured again, the trial's load gets a second attempt.
    result = llamasys("run", str(experiment), "--run-dir", str(run_dir), "--no-progress", env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert defaults_summary.stat().st_mtime_ns == before_resume
    tuned = json.loads((run_dir / "tune" / "Q4_K_M-imat.json").read_text())
    defaults, trial = tuned["trials"]
    trial_summary = json.loads((run_dir / trial["summary"]).read_text())
    assert [a["outcome"] for a in trial_summary["attempts"]] == ["interrupted", "complete"]
    assert defaults["setting"] == "(defaults)" and defaults["server_args"] == ["-ub", "1"]
    # The setting's flags replace [server]'s own -ub 1.
    assert trial["setting"] == "-t 1 -b 2048 -ub 512 -ctk f16 -ctv f16 -fa off"
    assert trial["server_args"] == ["-b", "2048", "-ub", "512", "-ctk", "f16", "-ctv", "f16", "-fa", "off"]
    # Prefilling 128 tokens at once is much faster than one at a time: the trial's TTFT is lower, so it serves at
    # least as many users within the objective, with more goodput, and is chosen.
    summary = json.loads((run_dir / trial["summary"]).read_text())
    base = json.loads((run_dir / defaults["summary"]).read_text())
    assert summary["steps"][0]["ttft_s"]["p50"] < base["steps"][0]["ttft_s"]["p50"]
    assert (trial["capacity_low"], trial["goodput_rps"] or 0) > (defaults["capacity_low"], defaults["goodput_rps"] or 0)
    # The command to serve it is the command line the chosen trial's server ran with, to the flag (its own
    # --no-kv-unified and sizing included), the binary and the model named.
    measured = summary["attempts"][-1]["server"]["argv"]
    assert trial["argv"] == measured and "--no-kv-unified" in measured and "512" in measured
    model = Path(measured[measured.index("--model") + 1])
    assert tuned["chosen"] == trial["setting"] and tuned["command"] == served_command(measured, model, "Q4_K_M-imat")
    assert shlex.split(tuned["command"]) == ["llama-server", "--model", "models/Q4_K_M-imat.gguf", *measured[3:]]
    assert (run_dir / "models" / "Q4_K_M-imat.gguf").resolve() == model.resolve()
    assert [r["setting"] for r in tuned["screen"]] == [trial["setting"]]
    # -fa off is not b11312's default (-fa auto runs flash attention on the CPU): guarded, and kept.
    assert [(g["setting"], g["accepted"]) for g in tuned["guards"]] == [(trial["setting"], True)]
    page = (run_dir / "report.html").read_text()
    assert 'id="tune-Q4_K_M-imat"' in page and "-ub 512" in page
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["tune"]["state"] == "done"
    # Run again: nothing is measured again (the tune result and each trial's load are fresh).
    result_file, trial_file = run_dir / "tune" / "Q4_K_M-imat.json", run_dir / trial["summary"]
    before = result_file.stat().st_mtime_ns, trial_file.stat().st_mtime_ns
    again = llamasys("run", str(experiment), "--run-dir", str(run_dir), "--no-progress", env=env, timeout=600)
    assert again.returncode == 0 and (result_file.stat().st_mtime_ns, trial_file.stat().st_mtime_ns) == before
    # Trials are load runs of their own: a tuning that stopped after them (here: its result removed) keeps them.
    result_file.unlink()
    resumed = llamasys("run", str(experiment), "--run-dir", str(run_dir), "--no-progress", env=env, timeout=600)
    assert resumed.returncode == 0 and result_file.is_file() and trial_file.stat().st_mtime_ns == before[1]
    assert json.loads(result_file.read_text())["chosen"] == trial["setting"]
