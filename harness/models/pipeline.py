"""The models stage: source -> F16 GGUF -> importance matrix -> quantized variants, listed in models/models.json.

Every artefact lives in cache_dir/models/<key>/, where the key hashes what produced it (source identity,
converter, options, llama.cpp build, calibration text); variant names are not part of any key, so renaming a
variant reuses its file. A run whose models.json was written for the same inputs returns at once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from harness.build import Build
from harness.cache import atomic_dir, damage, file_sha256
from harness.config import Experiment, VariantConfig
from harness.context import RunContext
from harness.corpus import corpus_text
from harness.errors import ModelError
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
    imatrix_args,
    imatrix_error,
    imatrix_filename,
    quantize_args,
    quantize_error,
)
from harness.models.records import ImatrixInfo, ModelArtifact, ModelSourceInfo, ModelsRecord
from harness.models.search import budget_of, make_recipe
from harness.models.sources import ModelSource, dir_fingerprint, resolve_source
from harness.records import Record, RecordError, inputs_digest, read_record, write_record
from harness.stage import Stage, Unit
from harness.storage import check_free_space

log = logging.getLogger(__name__)

# Bump when the stage writes different artefacts for the same inputs: every cache key changes with it.
PIPELINE_VERSION = 1
RECORD = "artefact.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SPACE_MARGIN = 256 * 2**20  # logs, records and file-system slack beside a model file


class CacheEntry(Record):
    """artefact.json beside a cached artefact: what it is and how long it took to make."""

    kind: Literal["gguf", "baseline", "imatrix", "variant"]
    file: str | None = None  # the artefact's file name in the entry (None: a GGUF used where it is)
    path: str | None = None
    info: GGUFInfo | None = None
    seconds: float = 0.0
    source: str | None = None
    pretokenizer_fallback: bool = False
    text: str | None = None
    type: str | None = None


class Baseline(Record):
    """The unquantized GGUF every variant is made from."""

    path: Path
    key: str
    type: str
    info: GGUFInfo
    seconds: float
    pretokenizer_fallback: bool = False  # the converter did not know the tokenizer; model.pretokenizer was used


class Imatrix(Record):
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
        "search": exp.search.model_dump(mode="json") if any(v.recipe for v in exp.variants) else None,
        "build": tool_identity(build),
        "tree": str(build.tree) if build.tree else None,
        "cache_dir": str(exp.resolved_cache_dir()),
    }


# ---------------------------------------------------------------- the stage


class ModelsStage(Stage[ModelsRecord]):
    """Source -> unquantized GGUF -> importance matrix -> quantized variants, listed in models/models.json: the
    variants every later stage measures (one unit: the whole list)."""

    name = "models"
    what = "models"
    record = ModelsRecord
    error = ModelError

    def units(self, ctx: RunContext) -> list[Unit]:
        return [Unit("models")]

    def inputs(self, ctx: RunContext, unit: Unit) -> Any:
        return stage_inputs(ctx.experiment, ctx.build)

    def output(self, ctx: RunContext, unit: Unit) -> Path:
        return ctx.run.models_json

    def usable(self, ctx: RunContext, unit: Unit, record: ModelsRecord) -> bool:
        if all(_usable(a.path, ctx.cache.models) for a in record.variants):
            log.info("models: up to date (%d variants, %s)", len(record.variants), ctx.run.models_json)
            return True
        return False

    def make(self, ctx: RunContext, units: list[Unit]) -> Iterator[tuple[Unit, ModelsRecord]]:
        yield units[0], make_models(ctx)


def prepare_models(ctx: RunContext) -> dict[str, ModelArtifact]:
    """Make (or reuse) every variant of the experiment and list them in models/models.json; returns them by name."""
    (record,) = ModelsStage().run(ctx).values()
    return {v.name: v for v in record.variants}


def make_models(ctx: RunContext) -> ModelsRecord:
    """Every variant of the experiment, made (or found in the cache) and linked into the run directory; what cannot
    be made is refused before anything is."""
    exp, build, run = ctx.experiment, ctx.build, ctx.run
    check_variants(exp.variants)
    if exp.model.source != "gguf":
        check_pretokenizer(require_tree(build), exp.model.pretokenizer)
    log_dir = run.logs("models")
    source = resolve_source(exp.model, cache=ctx.cache, log_dir=log_dir)
    baseline = make_baseline(ctx, source)

    imatrix = None
    if any(v.imatrix for v in exp.variants):
        text = corpus_text(exp.corpus, "imatrix", cache=ctx.cache, llamacpp_tree=build.tree)
        imatrix = make_imatrix(ctx, baseline, text)

    made = {}
    # Stock variants first: a searched recipe's default budget is the size of one of them.
    order = sorted(enumerate(exp.variants, 1), key=lambda item: item[1].recipe is not None)
    for n, variant in order:
        step = f"[{n}/{len(exp.variants)}]"
        if variant.recipe:
            assert imatrix is not None  # a recipe variant has imatrix = true (VariantConfig validation)
            made[variant.name] = make_recipe_variant(ctx, variant, baseline, imatrix, made, step=step)
        else:
            made[variant.name] = make_variant(ctx, variant, baseline, imatrix, step=step)
    artifacts = {v.name: made[v.name] for v in exp.variants}
    link_into_run_dir(ctx, artifacts)
    record = ModelsRecord(
        model=ModelSourceInfo(
            source=exp.model.source,
            description=source.description,
            identity=source.identity,
            checkpoint=str(source.path) if source.kind == "checkpoint" else None,
            baseline=str(baseline.path),
            baseline_type=baseline.type,
            n_params=baseline.info.n_params,
            architecture=baseline.info.architecture,
            pre_tokenizer=baseline.info.pre_tokenizer,
            pretokenizer_fallback=baseline.pretokenizer_fallback,
            convert_seconds=round(baseline.seconds, 2),
            provenance=source.provenance,
        ),
        imatrix=None
        if imatrix is None
        else ImatrixInfo(
            path=str(imatrix.path),
            text=str(imatrix.text),
            chunks=exp.imatrix.chunks,
            ctx_size=exp.imatrix.ctx_size,
            seconds=round(imatrix.seconds, 2),
        ),
        build={"build_number": build.build_number, "commit": build.commit, "era": build.era},
        variants=list(artifacts.values()),
    )
    return record


def make_baseline(ctx: RunContext, source: ModelSource) -> Baseline:
    """The converted GGUF (cached by source, converter and options), or a ready GGUF checked to be unquantized."""
    cfg, build, log_dir = ctx.experiment.model, ctx.build, ctx.run.logs("models")
    if source.kind == "gguf":
        key = gguf_source_key(source.identity)

        def describe(tmp: Path) -> CacheEntry:
            info = gguf_info(source.path, build, log=log_dir / "gguf-info.log")
            return CacheEntry(kind="gguf", path=str(source.path), info=info, seconds=0.0)

        info = _cached(ctx, key, describe).info
        assert info is not None  # a "gguf" entry always holds its file's info
        if info.baseline_type is None:
            types = ", ".join(sorted(info.tensor_types))
            raise ModelError(
                f"{source.path} is already quantized ({types}); model.source = 'gguf' needs an F16, BF16 or F32 GGUF "
                "to make the variants from"
            )
        return Baseline(path=source.path, key=key, type=info.baseline_type, info=info, seconds=0.0)

    tree = require_tree(build)
    key = conversion_key(
        source.identity, converter_fingerprint(tree), cfg.outtype, cfg.pretokenizer, _converter_environment()
    )
    target_type = cfg.outtype.upper()

    def convert(tmp: Path) -> CacheEntry:
        convert_log = log_dir / "convert.log"
        outfile = tmp / f"model-{target_type}.gguf"
        # The GGUF holds the checkpoint's weights at 16 bits: at most the checkpoint's size (f32 halves).
        check_free_space(tmp, _weights_bytes(source.path) + SPACE_MARGIN, f"the {target_type} GGUF")
        log.info("models: converting %s to %s GGUF (log: %s)", source.description, target_type, convert_log)
        start = time.monotonic()
        fallback = run_converter(
            build, source.path, outfile, outtype=cfg.outtype, pretokenizer=cfg.pretokenizer, log=convert_log
        )
        seconds = time.monotonic() - start
        info = gguf_info(outfile, build, log=log_dir / "gguf-info.log")
        log.info("models: %s GGUF written in %.1f s (%s)", target_type, seconds, _mb(outfile))
        return CacheEntry(
            kind="baseline", file=outfile.name, info=info, seconds=seconds, source=source.identity,
            pretokenizer_fallback=fallback,
        )  # fmt: skip

    entry = _cached(ctx, key, convert)
    assert entry.info is not None and entry.file is not None  # a "baseline" entry always holds both
    return Baseline(
        path=ctx.cache.models / key / entry.file, key=key, type=entry.info.baseline_type or target_type,
        info=entry.info, seconds=entry.seconds, pretokenizer_fallback=entry.pretokenizer_fallback,
    )  # fmt: skip


def make_imatrix(ctx: RunContext, baseline: Baseline, text: Path) -> Imatrix:
    """llama-imatrix once on the baseline over the calibration text; cached by baseline, text, chunks and context."""
    exp, build, log_dir = ctx.experiment, ctx.build, ctx.run.logs("models")
    filename = imatrix_filename(build.era)
    key = imatrix_key(
        baseline.key, file_sha256(text), exp.imatrix.chunks, exp.imatrix.ctx_size, tool_identity(build), filename
    )

    def compute(tmp: Path) -> CacheEntry:
        output = tmp / filename
        args = imatrix_args(baseline.path, text, output, chunks=exp.imatrix.chunks, ctx_size=exp.imatrix.ctx_size)
        tool_log = log_dir / "imatrix.log"
        log.info("models: importance matrix over %d chunks of %s (log: %s)", exp.imatrix.chunks, text.name, tool_log)
        run = ctx.tools.run("llama-imatrix", args, log_path=tool_log, compute=ctx.compute(exp.model.threads), tail=40)
        if run.signalled:
            raise run.error(ModelError, "llama-imatrix")
        if not run.ok or not output.is_file():
            raise imatrix_error(run.lines, text=text, log=tool_log)
        log.info("models: importance matrix written in %.1f s", run.seconds)
        return CacheEntry(kind="imatrix", file=filename, text=str(text), seconds=run.seconds)

    entry = _cached(ctx, key, compute)
    return Imatrix(path=ctx.cache.models / key / filename, key=key, text=text, seconds=entry.seconds)


def make_variant(
    ctx: RunContext, variant: VariantConfig, baseline: Baseline, imatrix: Imatrix | None, *, step: str = ""
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
        log.info("models: %s %s is the %s GGUF (%s)", step, variant.name, baseline.type, _mb(baseline.path))
        return ModelArtifact(
            name=variant.name, type=variant.type, path=baseline.path, size_bytes=size, n_params=n_params,
            bits_per_weight=bits_per_weight(size, n_params), imatrix=None, source=baseline.path, baseline=True,
            cache_key=baseline.key, seconds=baseline.seconds, **options,
        )  # fmt: skip

    used_imatrix = imatrix if variant.imatrix else None
    key = variant_key(baseline.key, variant, used_imatrix.key if used_imatrix else None, tool_identity(ctx.build))

    def quantize(tmp: Path) -> CacheEntry:
        tool_log = ctx.run.logs("models") / f"quantize-{variant.name}.log"
        output = tmp / f"model-{variant.type}.gguf"
        # Every quantized type is at most half a 16-bit baseline (Q8_0: 8.5 bits per weight).
        check_free_space(tmp, baseline.path.stat().st_size // 2 + SPACE_MARGIN, f"{variant.name} ({variant.type})")
        args = quantize_args(baseline.path, output, variant, imatrix=used_imatrix.path if used_imatrix else None)
        log.info("models: %s quantizing %s (%s) (log: %s)", step, variant.name, variant.type, tool_log)
        compute = ctx.compute(ctx.experiment.model.threads)
        run = ctx.tools.run("llama-quantize", args, log_path=tool_log, compute=compute, tail=40)
        if run.signalled:
            raise run.error(ModelError, f"variant {variant.name}: llama-quantize")
        if not run.ok or not output.is_file():
            raise quantize_error(run.lines, variant, log=tool_log)
        log.info("models: %s %s written in %.1f s (%s)", step, variant.name, run.seconds, _mb(output))
        return CacheEntry(kind="variant", file=output.name, type=variant.type, seconds=run.seconds)

    cached = (ctx.cache.models / key / RECORD).is_file()
    entry = _cached(ctx, key, quantize)
    assert entry.file is not None  # a "variant" entry always names its file
    path = ctx.cache.models / key / entry.file
    size = path.stat().st_size
    if cached:
        log.info("models: %s %s (%s) cached (%s)", step, variant.name, variant.type, _mb(path))
    return ModelArtifact(
        name=variant.name, type=variant.type, path=path, size_bytes=size, n_params=n_params,
        bits_per_weight=bits_per_weight(size, n_params), imatrix=used_imatrix.path if used_imatrix else None,
        source=baseline.path, baseline=variant.is_baseline, cache_key=key, seconds=entry.seconds, **options,
    )  # fmt: skip


def make_recipe_variant(
    ctx: RunContext, variant: VariantConfig, baseline: Baseline, imatrix: Imatrix, made: dict[str, ModelArtifact],
    *, step: str,
) -> ModelArtifact:  # fmt: skip
    """A `recipe = "search"` variant: the per-tensor recipe searched under its budget (harness.models.search)."""
    n_params = baseline.info.n_params
    budget = budget_of(ctx, variant, n_params, {name: a.size_bytes for name, a in made.items() if not a.recipe})
    log.info("models: %s %s: searching a per-tensor recipe within %s bytes (%s)", step, variant.name,
             f"{budget[0]:,}", budget[1])  # fmt: skip
    found = make_recipe(
        ctx, variant, baseline=baseline.path, baseline_key=baseline.key, imatrix=imatrix.path,
        imatrix_key=imatrix.key, budget=budget, tool=tool_identity(ctx.build), step=step,
    )  # fmt: skip
    size = found.path.stat().st_size
    return ModelArtifact(
        name=variant.name, type=variant.type, path=found.path, size_bytes=size, n_params=n_params,
        bits_per_weight=bits_per_weight(size, n_params), imatrix=imatrix.path, source=baseline.path, baseline=False,
        cache_key=found.key, seconds=found.record.seconds, recipe=found.recipe,
    )  # fmt: skip


def link_into_run_dir(ctx: RunContext, artifacts: dict[str, ModelArtifact]) -> None:
    """run_dir/models/<variant>.gguf -> the cached file, so the run directory shows what it used without copies."""
    ctx.run.models.mkdir(parents=True, exist_ok=True)
    for artifact in artifacts.values():
        link = ctx.run.model_link(artifact.name)
        tmp = link.with_name(f".{link.name}.link")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(artifact.path, tmp)
        os.replace(tmp, link)
        if artifact.recipe is not None:  # the recipe as a plain file beside its model, for the report to link
            shutil.copyfile(artifact.recipe, ctx.run.recipe(artifact.name))


# ---------------------------------------------------------------- helpers


def _usable(path: Path, cached_models: Path) -> bool:
    """Whether a listed variant can be used as it is: a cache entry still as sealed, or the user's own file."""
    if path.parent.parent == cached_models:
        return path.is_file() and damage(path.parent) is None
    return path.is_file()


def _cached(ctx: RunContext, key: str, make: Callable[[Path], CacheEntry]) -> CacheEntry:
    """The record of cache/models/<key>/, made by `make(tmp_dir)` into a temporary directory if missing."""
    final = ctx.cache.models / key

    def fill(tmp: Path) -> None:
        write_record(tmp / RECORD, make(tmp))

    atomic_dir(final, fill)  # checked against its seal; made again if missing or damaged
    try:
        return read_record(final / RECORD, CacheEntry)
    except (FileNotFoundError, RecordError) as exc:
        raise ModelError(f"the model cache entry {final} is damaged ({exc}); delete it and run again") from None


def _weights_bytes(checkpoint: Path) -> int:
    """The size of a checkpoint's weight files."""
    files = [checkpoint] if checkpoint.is_file() else checkpoint.rglob("*")
    return sum(f.stat().st_size for f in files if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


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
