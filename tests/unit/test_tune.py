"""The tune screen's pure parts: the candidate settings, llama-bench's arguments and its captured JSON (b11312)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.tune import Setting, bench_args, candidates, merge_args, parse_bench, screen_rows, search, survivors

DATA = Path(__file__).parents[1] / "data" / "tune"


def test_candidates_never_quantize_the_v_cache_without_flash_attention():
    settings = candidates([1, 2], [512], [128, 512, 1024], [False, True], ["f16", "q8_0"])
    assert Setting(1, 512, 512, False, "q8_0", "q8_0") not in settings  # llama.cpp refuses that context
    assert Setting(1, 512, 512, True, "q8_0", "q8_0") in settings
    assert all(s.ubatch <= s.batch for s in settings) and len(settings) == 2 * 2 * 3  # 1024 > 512 dropped
    assert Setting(2, 512, 128, True, "q8_0", "q8_0").server_args() == [
        "-b", "512", "-ub", "128", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on",
    ]  # fmt: skip
    assert Setting().describe() == "(defaults)"


def test_one_llama_bench_run_per_flash_attention_value():
    settings = candidates([1, 2], [2048], [512], [False, True], ["f16", "q8_0"])
    runs = bench_args(Path("m.gguf"), settings, prompt_tokens=256, output_tokens=32, repetitions=2)
    assert len(runs) == 2
    off, on = runs
    assert off[off.index("-fa") + 1] == "off" and off[off.index("-ctv") + 1] == "f16"
    assert on[on.index("-fa") + 1] == "on" and on[on.index("-ctv") + 1] == "f16,q8_0"
    assert off[off.index("-d") + 1] == "0,256" and off[off.index("-t") + 1] == "1,2"


def test_captured_llama_bench_json_becomes_ranked_predictions():
    # b11312 on the build probe model: -p 64 -n 16 -d 0,64 -t 1,2 -fa off,on -ctk f16,q8_0 -r 2 -o json.
    rows = parse_bench("log line\n" + (DATA / "llama-bench-b11312.json").read_text() + "\nmore log")
    assert len(rows) == 32
    ranked = screen_rows(rows, prompt_tokens=64, output_tokens=16)
    assert len(ranked) == 8  # 2 threads x 2 flash attention x 2 K-cache types, each with its pp and its tg at depth
    first = ranked[0]
    assert first.predicted_s == pytest.approx(64 / first.pp_tps + 16 / first.tg_tps)
    assert [r.predicted_s for r in ranked] == sorted(r.predicted_s for r in ranked)
    # The pp row is the one at depth 0, the tg row the one at depth 64 (the load's prompt length).
    row = next(r for r in ranked if r.threads == 1 and not r.flash_attn and r.cache_k == "f16")
    assert (row.pp_tps, row.tg_tps) == (pytest.approx(16263.001884), pytest.approx(5812, abs=1))
    with pytest.raises(HarnessError, match="no JSON results"):
        parse_bench("error: failed to create context")


def test_a_settings_flags_replace_the_servers_own():
    assert merge_args(["-ub", "1", "--mlock", "-b", "64"], ["-b", "2048", "-ub", "512"]) == [
        "--mlock", "-b", "2048", "-ub", "512",
    ]  # fmt: skip
    assert merge_args([], ["-fa", "on"]) == ["-fa", "on"]


def test_survivors_are_the_settings_predicted_within_the_keep_factor():
    rows = parse_bench((DATA / "llama-bench-b11312.json").read_text())
    ranked = screen_rows(rows, prompt_tokens=64, output_tokens=16)
    kept = survivors(ranked, 1.5)
    assert kept[0] == ranked[0] and all(r.predicted_s <= 1.5 * ranked[0].predicted_s for r in kept)
    assert len(survivors(ranked, 1.0)) >= 1 and survivors([], 2.0) == []


def _grid() -> list[Setting]:
    return candidates([1, 2, 4], [512, 2048], [128, 512], [False, True], ["f16", "q8_0"])


def _capacity(s: Setting) -> float:
    """A made-up landscape: more threads and flash attention serve more users."""
    return s.threads + (2 if s.flash_attn else 0) + (s.ubatch == 512)


def test_few_survivors_are_each_measured_in_the_screens_order():
    kept = _grid()[:3]
    seen: list[Setting] = []
    done = search(kept, 5, lambda s: seen.append(s) or _capacity(s), stop=lambda: False, seed=0)
    assert done == seen == kept


def test_many_survivors_are_searched_by_optuna_within_the_budget_and_replayed_the_same_on_resume():
    kept = _grid()
    runs = []
    for _ in range(2):  # a resumed run asks for the same settings in the same order (the load runs are then done)
        seen: list[Setting] = []
        done = search(kept, 6, lambda s, seen=seen: seen.append(s) or _capacity(s), stop=lambda: False, seed=3)
        runs.append(seen)
        assert done == seen and len(seen) == 6 and len(set(seen)) == 6  # never one setting twice
        assert seen[:3] == kept[:3] and set(seen) <= set(kept)  # the screen's best half first; only survivors
    assert runs[0] == runs[1]
    # A setting the guard rejects (None) is not measured and does not count against the budget.
    rejected = [s for s in kept if s.cache_k == "q8_0"]
    seen = []
    done = search(kept, 4, lambda s: seen.append(s) or (None if s in rejected else _capacity(s)),
                  stop=lambda: False, seed=3)  # fmt: skip
    assert len(done) == 4 and not set(done) & set(rejected) and len(seen) >= 4
    # The time budget stops the search between measurements.
    calls: list[Setting] = []
    assert len(search(kept, 6, lambda s: calls.append(s) or 1.0, stop=lambda: len(calls) >= 2, seed=3)) == 2


def test_flash_attention_set_either_way_and_a_quantized_cache_are_guarded():
    # Which of -fa on / off is the build's default depends on the build (b11312: auto, on for the CPU; b3661: off).
    assert Setting(flash_attn=True).changes_numerics and Setting(flash_attn=False).changes_numerics
    assert Setting(cache_k="q8_0", cache_v="q8_0").changes_numerics
    assert not Setting(threads=2, batch=512, ubatch=128, cache_k="f16", cache_v="f16").changes_numerics
    assert Setting(flash_attn=False).numerics_args() == ["-fa", "off"]


def test_gpu_layers_are_searched_as_one_more_dimension_on_a_gpu_build():
    from harness.tools import Compute

    settings = candidates([1], [2048], [512], [True], ["f16"], [20, 999])
    assert [s.describe() for s in settings] == [
        "-t 1 -b 2048 -ub 512 -ctk f16 -ctv f16 -fa on -ngl 20",
        "-t 1 -b 2048 -ub 512 -ctk f16 -ctv f16 -fa on -ngl 999",
    ]
    assert settings[0].server_args()[-2:] == ["-fa", "on"]  # -ngl reaches the server through [server] gpu_layers
    (run,) = bench_args(Path("m.gguf"), settings, prompt_tokens=64, output_tokens=16, repetitions=1)
    assert run[run.index("-ngl") + 1] == "20,999"
    assert "-ngl" not in bench_args(Path("m.gguf"), candidates([1], [2048], [512], [True], ["f16"]),
                                    prompt_tokens=64, output_tokens=16, repetitions=1)[0]  # fmt: skip
    # The screen's own -ngl list replaces the Compute's (which then adds none), and its rows name their layers.
    assert Compute(gpu_layers=None, backend="cuda").args("llama-bench") == []
    rows = parse_bench((DATA / "llama-bench-b11312.json").read_text())
    ranked = screen_rows(rows, prompt_tokens=64, output_tokens=16, gpu_layers=True)
    assert all(r.gpu_layers == -1 and r.setting.endswith("-ngl -1") for r in ranked)  # b11312 CPU rows: -1


def test_the_command_to_serve_with_is_the_measured_one_with_the_binary_and_the_model_named():
    from harness.tune import served_command

    argv = ["/cache/builds/k/bin/llama-server", "--model", "/cache/models/x/model-Q4_K_M.gguf", "--host", "127.0.0.1",
            "--port", "40123", "--parallel", "2", "--no-kv-unified", "-ub", "512", "-t", "1"]  # fmt: skip
    command = served_command(argv, Path("/cache/models/x/model-Q4_K_M.gguf"), "Q4_K_M-imat")
    assert command == ("llama-server --model models/Q4_K_M-imat.gguf --host 127.0.0.1 --port 40123 --parallel 2 "
                       "--no-kv-unified -ub 512 -t 1")  # fmt: skip
    assert served_command([], Path("m.gguf"), "v") == ""
