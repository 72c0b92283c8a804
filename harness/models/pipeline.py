"""The models stage: source -> F16 GGUF -> importance matrix -> quantized variants, listed in models/models.json.

Every artefact lives in cache_dir/models/<key>/, where the key hashes what produced it (source identity,
converter, options, llama.cpp build, calibration text); variant names are not part of any key, so renaming a
variant reuses its file. A run whose models.json was written for the same inputs returns at once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.cache import atomic_dir, file_sha256
from harness.config import Experiment, ModelConfig, VariantConfig
from harness.corpus import corpus_text
from harness.errors import ModelError
from harness.llamacpp import Build
from harness.models.convert import (
    GGUFInfo,
    check_pretokenizer,
    converter_fingerprint,
    gguf_info,
    require_tree,
    run_converter,
)
from harness.models.quantize import (
    bits_per_weight,
    check_variants,
    imatrix_command,
    imatrix_error,
    imatrix_filename,
    quantize_command,
    quantize_error,
)
from harness.models.sources import ModelSource, dir_fingerprint, resolve_source
from harness.process import run_streaming
from harness.rundir import RunDir, inputs_digest, is_fresh, read_json, write_json

# Bump when the stage writes different artefacts for the same inputs: every cache key changes with it.
PIPELINE_VERSION = 1
RECORD = "artefact.json"
MODELS_JSON = "models.json"


@dataclass
class ModelArtifact:
    """One variant's GGUF as the later stages (MMLU, KLD, load, report) use it."""

    name: str
    type: str
    path: Path
    size_bytes: int
    n_params: int
    bits_per_weight: float
    imatrix: Path | None  # the importance matrix used to quantize it, if any
    source: Path  # the unquantized (F16/BF16/F32) GGUF it was made from; itself for the baseline
    baseline: bool
    pure: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    cache_key: str = ""
    seconds: float = 0.0  # how long making it took (when it was made; a cached artefact keeps that time)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("path", "imatrix", "source"):
            data[key] = str(data[key]) if data[key] is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelArtifact:
        data = dict(data)
        data["path"] = Path(data["path"])
        data["source"] = Path(data["source"])
        data["imatrix"] = Path(data["imatrix"]) if data.get("imatrix") else None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Baseline:
    """The unquantized GGUF every variant is made from."""

    path: Path
    key: str
    type: str
    info: GGUFInfo
    seconds: float
    pretokenizer_fallback: bool = False  # the converter did not know the tokenizer; model.pretokenizer was used


@dataclass(frozen=True)
class Imatrix:
    path: Path
    key: str
    text: Path
    seconds: float


# ---------------------------------------------------------------- cache keys (pure, unit-tested)


def tool_identity(build: Build) -> str:
    """What identifies llama-quantize/llama-imatrix output: the llama.cpp version, not the backend it runs on."""
    return f"{build.build_number}:{build.commit}"


def conversion_key(source_identity: str, converter: str, outtype: str, pretokenizer: str | None, env: str) -> str:
    return inputs_digest(
        {
            "kind": "convert",
            "v": PIPELINE_VERSION,
            "source": source_identity,
            "converter": converter,
            "outtype": outtype,
            "pretokenizer": pretokenizer,
            "env": env,
        }
    )


def gguf_source_key(source_identity: str) -> str:
    return inputs_digest({"kind": "gguf", "v": PIPELINE_VERSION, "source": source_identity})


def imatrix_key(baseline_key: str, text_sha256: str, chunks: int, ctx_size: int, tool: str, filename: str) -> str:
    return inputs_digest(
        {
            "kind": "imatrix",
            "v": PIPELINE_VERSION,
            "baseline": baseline_key,
            "text": text_sha256,
            "chunks": chunks,
            "ctx_size": ctx_size,
            "tool": tool,
            "file": filename,
        }
    )


def variant_key(baseline_key: str, variant: VariantConfig, imatrix: str | None, tool: str) -> str:
    """Key of a quantized file: its recipe (not its name), the baseline, the imatrix if used, the tool version."""
    return inputs_digest(
        {
            "kind": "quantize",
            "v": PIPELINE_VERSION,
            "baseline": baseline_key,
            "type": variant.type,
            "pure": variant.pure,
            "output_tensor_type": variant.output_tensor_type,
            "token_embedding_type": variant.token_embedding_type,
            "imatrix": imatrix if variant.imatrix else None,
            "tool": tool,
        }
    )


def stage_inputs(exp: Experiment, build: Build) -> dict[str, Any]:
    """Everything that decides the stage's outputs, for the run directory's freshness check.

    A hub model counts as its configured repo and revision, so a finished run re-runs offline in seconds; pin
    model.revision to a commit to make the run reproducible against later pushes to the repo.
    """
    model = exp.model.model_dump(mode="json", exclude={"threads"})
    if exp.model.source == "dir" and exp.model.path is not None and Path(exp.model.path).is_dir():
        model["fingerprint"] = dir_fingerprint(Path(exp.model.path))
    if exp.model.source == "gguf" and exp.model.path is not None and Path(exp.model.path).is_file():
        stat = Path(exp.model.path).stat()
        model["fingerprint"] = f"{stat.st_size}:{stat.st_mtime_ns}"
    uses_imatrix = any(v.imatrix for v in exp.variants)
    return {
        "v": PIPELINE_VERSION,
        "model": model,
        "variants": [v.model_dump(mode="json") for v in exp.variants],
        "imatrix": exp.imatrix.model_dump(mode="json") if uses_imatrix else None,
        "corpus": exp.corpus.model_dump(mode="json") if uses_imatrix else None,
        "build": tool_identity(build),
        "tree": str(build.tree) if build.tree else None,
        "cache_dir": str(exp.resolved_cache_dir()),
    }


# ---------------------------------------------------------------- the stage


def prepare_models(
    exp: Experiment, build: Build, run_dir: RunDir, *, progress: bool = True
) -> dict[str, ModelArtifact]:
    """Make (or reuse) every variant of `exp` and list them in run_dir/models/models.json; returns them by name."""
    check_variants(exp.variants)
    if exp.model.source != "gguf":
        check_pretokenizer(require_tree(build), exp.model.pretokenizer)
    manifest = run_dir.models / MODELS_JSON
    digest = inputs_digest(stage_inputs(exp, build))
    if is_fresh(manifest, digest):
        artifacts = load_models_json(manifest)
        if all(a.path.is_file() for a in artifacts.values()):
            _say(progress, f"models: up to date ({len(artifacts)} variants, {manifest})")
            return artifacts

    cache_dir = exp.resolved_cache_dir()
    log_dir = run_dir.models / "logs"
    source = resolve_source(exp.model, cache_dir=cache_dir, log_dir=log_dir, progress=progress)
    baseline = make_baseline(source, exp.model, build, cache_dir=cache_dir, log_dir=log_dir, progress=progress)

    imatrix = None
    if any(v.imatrix for v in exp.variants):
        text = corpus_text(exp.corpus, "imatrix", cache_dir=cache_dir, llamacpp_tree=build.tree)
        imatrix = make_imatrix(baseline, text, exp, build, cache_dir=cache_dir, log_dir=log_dir, progress=progress)

    artifacts = {}
    for n, variant in enumerate(exp.variants, 1):
        artifacts[variant.name] = make_variant(
            variant, baseline, imatrix, build, threads=exp.model.threads, cache_dir=cache_dir,
            log_dir=log_dir, progress=progress, step=f"[{n}/{len(exp.variants)}]",
        )  # fmt: skip
    link_into_run_dir(run_dir.models, artifacts)
    write_json(
        manifest,
        {
            "model": {
                "source": exp.model.source,
                "description": source.description,
                "identity": source.identity,
                "checkpoint": str(source.path) if source.kind == "checkpoint" else None,
                "baseline": str(baseline.path),
                "baseline_type": baseline.type,
                "n_params": baseline.info.n_params,
                "architecture": baseline.info.architecture,
                "pre_tokenizer": baseline.info.pre_tokenizer,
                "pretokenizer_fallback": baseline.pretokenizer_fallback,
                "convert_seconds": round(baseline.seconds, 2),
            },
            "imatrix": None
            if imatrix is None
            else {
                "path": str(imatrix.path),
                "text": str(imatrix.text),
                "chunks": exp.imatrix.chunks,
                "ctx_size": exp.imatrix.ctx_size,
                "seconds": round(imatrix.seconds, 2),
            },
            "build": {"build_number": build.build_number, "commit": build.commit, "era": build.era},
            "variants": [a.to_json() for a in artifacts.values()],
        },
        digest=digest,
    )
    return artifacts


def load_models_json(path: Path) -> dict[str, ModelArtifact]:
    """The variants a previous run listed in models/models.json, by name."""
    data = read_json(path)
    return {v["name"]: ModelArtifact.from_json(v) for v in data.get("variants", [])}


def make_baseline(
    source: ModelSource, cfg: ModelConfig, build: Build, *, cache_dir: Path, log_dir: Path, progress: bool
) -> Baseline:
    """The converted GGUF (cached by source, converter and options), or a ready GGUF checked to be unquantized."""
    if source.kind == "gguf":
        key = gguf_source_key(source.identity)

        def describe(tmp: Path) -> dict[str, Any]:
            info = gguf_info(source.path, build, log=log_dir / "gguf-info.log")
            return {"kind": "gguf", "path": str(source.path), "info": asdict(info), "seconds": 0.0}

        record = _cached(cache_dir, key, describe)
        info = GGUFInfo(**record["info"])
        if info.baseline_type is None:
            types = ", ".join(sorted(info.tensor_types))
            raise ModelError(
                f"{source.path} is already quantized ({types}); model.source = 'gguf' needs an F16, BF16 or F32 GGUF "
                "to make the variants from"
            )
        return Baseline(source.path, key, info.baseline_type, info, 0.0)

    tree = require_tree(build)
    key = conversion_key(
        source.identity, converter_fingerprint(tree), cfg.outtype, cfg.pretokenizer, _converter_environment()
    )
    target_type = cfg.outtype.upper()

    def convert(tmp: Path) -> dict[str, Any]:
        log = log_dir / "convert.log"
        outfile = tmp / f"model-{target_type}.gguf"
        _say(progress, f"models: converting {source.description} to {target_type} GGUF (log: {log})")
        start = time.monotonic()
        fallback = run_converter(
            build, source.path, outfile, outtype=cfg.outtype, pretokenizer=cfg.pretokenizer, log=log
        )
        seconds = time.monotonic() - start
        info = gguf_info(outfile, build, log=log_dir / "gguf-info.log")
        _say(progress, f"models: {target_type} GGUF written in {seconds:.1f} s ({_mb(outfile)})")
        return {"kind": "baseline", "file": outfile.name, "info": asdict(info), "seconds": seconds,
                "source": source.identity, "pretokenizer_fallback": fallback}  # fmt: skip

    record = _cached(cache_dir, key, convert)
    path = cache_dir / "models" / key / record["file"]
    info = GGUFInfo(**record["info"])
    return Baseline(
        path, key, info.baseline_type or target_type, info, float(record["seconds"]), record["pretokenizer_fallback"]
    )


def make_imatrix(
    baseline: Baseline, text: Path, exp: Experiment, build: Build, *, cache_dir: Path, log_dir: Path, progress: bool
) -> Imatrix:
    """llama-imatrix once on the baseline over the calibration text; cached by baseline, text, chunks and context."""
    filename = imatrix_filename(build.era)
    key = imatrix_key(
        baseline.key, file_sha256(text), exp.imatrix.chunks, exp.imatrix.ctx_size, tool_identity(build), filename
    )

    def compute(tmp: Path) -> dict[str, Any]:
        log = log_dir / "imatrix.log"
        output = tmp / filename
        cmd = imatrix_command(
            build.tool("llama-imatrix"), baseline.path, text, output,
            chunks=exp.imatrix.chunks, ctx_size=exp.imatrix.ctx_size, threads=exp.model.threads,
        )  # fmt: skip
        _say(progress, f"models: importance matrix over {exp.imatrix.chunks} chunks of {text.name} (log: {log})")
        start = time.monotonic()
        # b3661-era tools also write llama.log into their working directory: keep it with the logs.
        code, tail = run_streaming(cmd, log_path=log, cwd=log_dir, tail_lines=40)
        if code != 0 or not output.is_file():
            raise imatrix_error(tail, text=text, log=log)
        seconds = time.monotonic() - start
        _say(progress, f"models: importance matrix written in {seconds:.1f} s")
        return {"kind": "imatrix", "file": filename, "text": str(text), "seconds": seconds}

    record = _cached(cache_dir, key, compute)
    return Imatrix(cache_dir / "models" / key / record["file"], key, text, float(record["seconds"]))


def make_variant(
    variant: VariantConfig,
    baseline: Baseline,
    imatrix: Imatrix | None,
    build: Build,
    *,
    threads: int | None,
    cache_dir: Path,
    log_dir: Path,
    progress: bool,
    step: str = "",
) -> ModelArtifact:
    """The baseline itself for a variant of its type; otherwise llama-quantize from the baseline (cached)."""
    n_params = baseline.info.n_params
    options = {
        "pure": variant.pure,
        "output_tensor_type": variant.output_tensor_type,
        "token_embedding_type": variant.token_embedding_type,
    }
    if variant.type == baseline.type and not variant.imatrix and not any(options.values()):
        size = baseline.path.stat().st_size
        _say(progress, f"models: {step} {variant.name} is the {baseline.type} GGUF ({_mb(baseline.path)})")
        return ModelArtifact(
            name=variant.name, type=variant.type, path=baseline.path, size_bytes=size, n_params=n_params,
            bits_per_weight=bits_per_weight(size, n_params), imatrix=None, source=baseline.path, baseline=True,
            cache_key=baseline.key, seconds=baseline.seconds, **options,
        )  # fmt: skip

    used_imatrix = imatrix if variant.imatrix else None
    key = variant_key(baseline.key, variant, used_imatrix.key if used_imatrix else None, tool_identity(build))

    def quantize(tmp: Path) -> dict[str, Any]:
        log = log_dir / f"quantize-{variant.name}.log"
        output = tmp / f"model-{variant.type}.gguf"
        cmd = quantize_command(
            build.tool("llama-quantize"), baseline.path, output, variant,
            imatrix=used_imatrix.path if used_imatrix else None, threads=threads,
        )  # fmt: skip
        _say(progress, f"models: {step} quantizing {variant.name} ({variant.type}) (log: {log})")
        start = time.monotonic()
        code, tail = run_streaming(cmd, log_path=log, cwd=log_dir, tail_lines=40)
        if code != 0 or not output.is_file():
            raise quantize_error(tail, variant, log=log)
        seconds = time.monotonic() - start
        _say(progress, f"models: {step} {variant.name} written in {seconds:.1f} s ({_mb(output)})")
        return {"kind": "variant", "file": output.name, "type": variant.type, "seconds": seconds}

    cached = (cache_dir / "models" / key / RECORD).is_file()
    record = _cached(cache_dir, key, quantize)
    path = cache_dir / "models" / key / record["file"]
    size = path.stat().st_size
    if cached:
        _say(progress, f"models: {step} {variant.name} ({variant.type}) cached ({_mb(path)})")
    return ModelArtifact(
        name=variant.name, type=variant.type, path=path, size_bytes=size, n_params=n_params,
        bits_per_weight=bits_per_weight(size, n_params), imatrix=used_imatrix.path if used_imatrix else None,
        source=baseline.path, baseline=variant.is_baseline, cache_key=key,
        seconds=float(record["seconds"]), **options,
    )  # fmt: skip


def link_into_run_dir(models_dir: Path, artifacts: dict[str, ModelArtifact]) -> None:
    """run_dir/models/<variant>.gguf -> the cached file, so the run directory shows what it used without copies."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for artifact in artifacts.values():
        link = models_dir / f"{artifact.name}.gguf"
        tmp = models_dir / f".{artifact.name}.gguf.link"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(artifact.path, tmp)
        os.replace(tmp, link)


# ---------------------------------------------------------------- helpers


def _cached(cache_dir: Path, key: str, make: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The record of cache_dir/models/<key>/, made by `make(tmp_dir)` into a temporary directory if missing."""
    final = cache_dir / "models" / key

    def fill(tmp: Path) -> None:
        record = make(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")

    if not (final / RECORD).is_file():
        atomic_dir(final, fill)
    try:
        return json.loads((final / RECORD).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise ModelError(f"the model cache entry {final} is damaged ({exc}); delete it and run again") from None


def _converter_environment() -> str:
    """Versions of the Python packages the converter's output depends on (tokenizer loading, tensor maths)."""
    versions = []
    for package in ("transformers", "tokenizers", "torch"):
        try:
            versions.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    return ",".join(versions)


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
