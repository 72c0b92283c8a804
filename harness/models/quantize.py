"""llama-imatrix and llama-quantize arguments, their failures as one clear line, and bits per weight.

Pure functions, tested without binaries; the pipeline runs the tools with these arguments through the build's runner.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from harness.build import Era
from harness.config import QUANT_TYPES, TENSOR_TYPES, VariantConfig
from harness.errors import ConfigError, ModelError
from harness.tools import LOADER_REASON, error_line

# Types llama-quantize refuses (or turns into garbage) without an importance matrix: the b3661-era tool lists
# IQ1_S, IQ1_M, IQ2_S, IQ2_XXS, IQ2_XS and Q2_K_S; current builds also need one for IQ3_XXS tensors (IQ2_M mixes
# in IQ2_S). Checked before any work so a long run does not fail at its last variant.
IMATRIX_REQUIRED = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S")


def check_variants(variants: Iterable[VariantConfig]) -> None:
    """Refuse, before anything runs, variants that cannot be made: unknown types, missing importance matrices."""
    for v in variants:
        _check_type(v)
        if v.type in IMATRIX_REQUIRED and not v.imatrix:
            raise ConfigError(f"variant {v.name}: type {v.type} needs an importance matrix; set imatrix = true for it")


def _check_type(variant: VariantConfig) -> None:
    # VariantConfig validates these; a config built without validation (model_construct) must not reach the tool.
    if variant.type not in QUANT_TYPES:
        allowed = ", ".join(QUANT_TYPES)
        raise ConfigError(f"variant {variant.name}: unknown quant type {variant.type!r}; allowed: {allowed}")
    for key in ("output_tensor_type", "token_embedding_type"):
        value = getattr(variant, key)
        if value is not None and value not in TENSOR_TYPES:
            raise ConfigError(f"variant {variant.name}: unknown {key} {value!r}; allowed: {', '.join(TENSOR_TYPES)}")


def quantize_args(source: Path, output: Path, variant: VariantConfig, *, imatrix: Path | None) -> list[str]:
    """`llama-quantize [options] SOURCE OUTPUT TYPE` (the runner appends the thread count), the same in both eras."""
    _check_type(variant)
    if variant.imatrix and imatrix is None:
        raise ModelError(f"variant {variant.name} asks for an importance matrix but none was made")
    args: list[str] = []
    if variant.imatrix and imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    if variant.pure:
        args.append("--pure")
    if variant.output_tensor_type:
        args += ["--output-tensor-type", variant.output_tensor_type]
    if variant.token_embedding_type:
        args += ["--token-embedding-type", variant.token_embedding_type]
    return args + [str(source), str(output), variant.type]


def imatrix_filename(era: Era) -> str:
    """Current builds write GGUF imatrix files (and warn on another suffix); b3661-era builds write the .dat format."""
    return "imatrix.gguf" if era == "current" else "imatrix.dat"


def imatrix_args(model: Path, text: Path, output: Path, *, chunks: int, ctx_size: int) -> list[str]:
    """`llama-imatrix` over the calibration text; `--no-ppl` skips the perplexity it would print (not needed)."""
    args = ["-m", str(model), "-f", str(text), "-o", str(output)]
    return args + ["--chunks", str(chunks), "-c", str(ctx_size), "--no-ppl"]


def bits_per_weight(size_bytes: int, n_params: int) -> float:
    """File size in bits per model weight (metadata and vocabulary included, as llama.cpp's tables count it)."""
    if n_params <= 0:
        raise ModelError(f"cannot compute bits per weight for {n_params} parameters")
    return size_bytes * 8 / n_params


_IMATRIX_NEEDED_RE = re.compile(
    r"without an importance matrix|missing importance matrix|requires an importance matrix|requires an imatrix",
    re.IGNORECASE,
)
_OFFENDING_RE = re.compile(r"(?:offending tensor:|for tensor)\s+(\S+)")
_TOO_SHORT_RE = re.compile(r"you need at least (\d+) tokens for a context of (\d+) tokens")


def quantize_error(lines: list[str], variant: VariantConfig, *, log: Path) -> ModelError:
    """One line saying why llama-quantize failed for `variant`."""
    text = "\n".join(lines)
    if _IMATRIX_NEEDED_RE.search(text):
        tensor = _OFFENDING_RE.search(text)
        which = f" (tensor {tensor.group(1)})" if tensor else ""
        return ModelError(
            f"variant {variant.name}: llama-quantize refuses {variant.type} without an importance matrix{which}; "
            f"set imatrix = true for this variant (log: {log})"
        )
    if "invalid ftype" in text or re.search(r"^usage: ", text, re.MULTILINE):
        return ModelError(
            f"variant {variant.name}: this llama.cpp's llama-quantize does not accept type {variant.type} "
            f"or one of its options (log: {log})"
        )
    return ModelError(f"variant {variant.name}: llama-quantize failed: {_why(lines)} (log: {log})")


def imatrix_error(lines: list[str], *, text: Path, log: Path) -> ModelError:
    """One line saying why llama-imatrix failed."""
    if found := _TOO_SHORT_RE.search("\n".join(lines)):
        need, ctx = found.groups()
        return ModelError(
            f"the calibration text {text} is too short: llama-imatrix needs at least {need} tokens for "
            f"imatrix.ctx_size = {ctx}; lower imatrix.ctx_size or use a longer corpus (log: {log})"
        )
    return ModelError(f"llama-imatrix failed: {_why(lines)} (log: {log})")


def _why(lines: list[str]) -> str:
    # A model that does not load ends with generic lines ("failed to init"); the loader's own reason comes earlier.
    return error_line(lines, prefer=LOADER_REASON)
