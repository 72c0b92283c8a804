"""Checkpoint -> F16 GGUF with the llama.cpp tree's own convert_hf_to_gguf.py, and what a GGUF file holds.

The converter runs as a subprocess of this Python (it needs torch and transformers: the `convert` extra) through
hf_to_gguf_wrapper.py, which adds the configured fallback pre-tokenizer without forking llama.cpp. Its failures
are turned into one clear line by `conversion_error`, a pure function tested on captured converter output.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from harness.build import Build
from harness.errors import ConfigError, ModelError
from harness.records import Record
from harness.tools import error_line, run_logged

WRAPPER = Path(__file__).with_name("hf_to_gguf_wrapper.py")
GGUF_INFO_SCRIPT = Path(__file__).with_name("gguf_info_script.py")
# What the wrapper logs (as a converter WARNING) when it applies model.pretokenizer.
FALLBACK_MARKER = "llamasys: BPE pre-tokenizer not recognized"

# llama.cpp's file types (enum llama_ftype) of the unquantized GGUFs a variant can be made from.
BASELINE_FILE_TYPES = {0: "F32", 1: "F16", 32: "BF16"}


class GGUFInfo(Record):
    """What gguf-py reads from a GGUF file: enough for bits per weight and for checking a baseline."""

    n_params: int
    n_tensors: int
    tensor_bytes: int
    tensor_types: dict[str, int]
    file_type: int | None
    architecture: str | None
    pre_tokenizer: str | None
    # What decoding reads (harness.bandwidth): tensor bytes per decode step, and the KV cache's shape.
    decode_bytes: int | None = None
    layers: int | None = None
    kv_heads: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    context_length: int | None = None

    @property
    def baseline_type(self) -> str | None:
        """F16/BF16/F32 for an unquantized file, None for a quantized one."""
        if set(self.tensor_types) - {"F32", "F16", "BF16"}:
            return None
        if self.file_type in BASELINE_FILE_TYPES:
            return BASELINE_FILE_TYPES[self.file_type]
        # A file without general.file_type (older writers): the 16-bit type its tensors use names it.
        return next((t for t in ("BF16", "F16") if t in self.tensor_types), "F32")


# ---------------------------------------------------------------- pure helpers (unit-tested)


def converter_command(
    tree: Path,
    model_dir: Path,
    outfile: Path,
    *,
    outtype: str,
    pretokenizer: str | None,
    python: str = sys.executable,
) -> list[str]:
    """The wrapper around the tree's convert_hf_to_gguf.py, with its own arguments after `--`."""
    cmd = [python, str(WRAPPER), str(tree)]
    if pretokenizer:
        cmd += ["--fallback-pretokenizer", pretokenizer]
    return [*cmd, "--", str(model_dir), "--outfile", str(outfile), "--outtype", outtype]


def converter_env(tree: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: the tree's gguf-py first on PYTHONPATH, unbuffered output for live progress."""
    env = dict(environ)
    paths = [str(tree / "gguf-py")] + ([environ["PYTHONPATH"]] if environ.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def converter_fingerprint(tree: Path) -> str:
    """Content identity of the converter: its script, the `conversion` package (current era), gguf-py, wrapper."""
    files = [tree / "convert_hf_to_gguf.py", WRAPPER]
    for pattern in ("conversion/**/*.py", "gguf-py/gguf/**/*.py"):
        files += sorted(tree.glob(pattern))
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            name = file.name if file == WRAPPER else str(file.relative_to(tree))
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:24]


_PRETOKENIZER_RE = re.compile(r'tokenizer_pre\s*==\s*"([^"]+)"')


def known_pretokenizers(vocab_source: str) -> set[str]:
    """Pre-tokenizer names llama.cpp's loader accepts, read from its source (llama-vocab.cpp / llama.cpp)."""
    return set(_PRETOKENIZER_RE.findall(vocab_source))


def check_pretokenizer(tree: Path, name: str | None) -> None:
    """Fail before converting when model.pretokenizer names a pre-tokenizer this llama.cpp would refuse to load."""
    if not name:
        return
    sources = [p for p in (tree / "src" / "llama-vocab.cpp", tree / "src" / "llama.cpp") if p.is_file()]
    known: set[str] = set()
    for path in sources:
        known |= known_pretokenizers(path.read_text(encoding="utf-8", errors="replace"))
    if known and name not in known:
        raise ConfigError(
            f"model.pretokenizer: {name!r} is not a pre-tokenizer this llama.cpp knows; "
            f"choose one of: {', '.join(sorted(known))}"
        )


_CHKHSH_RE = re.compile(r"chkhsh:\s*([0-9a-f]{64})")
_UNSUPPORTED_RE = re.compile(r"Model (\S+) is not supported")
_NO_MODULE_RE = re.compile(r"No module named '([^']+)'")


def conversion_error(lines: list[str], *, model_dir: Path, log: Path) -> ModelError:
    """One line saying why convert_hf_to_gguf.py failed, from the end of its output."""
    text = "\n".join(lines)
    if "pre-tokenizer was not recognized" in text:
        found = _CHKHSH_RE.search(text)
        digest = f" (hash {found.group(1)[:16]}...)" if found else ""
        return ModelError(
            f"the BPE pre-tokenizer of {model_dir} is not one llama.cpp's converter recognizes{digest}; set "
            "model.pretokenizer to the llama.cpp pre-tokenizer that splits text the same way, e.g. "
            'model.pretokenizer = "gpt-2" for a GPT-2-style byte-level BPE such as 42dot\'s '
            f"(log: {log})"
        )
    if found := _UNSUPPORTED_RE.search(text):
        return ModelError(
            f"architecture {found.group(1)} is not supported by this llama.cpp's converter "
            f"(convert_hf_to_gguf.py: {found.group(0)}) (log: {log})"
        )
    if found := _NO_MODULE_RE.search(text):
        return ModelError(
            f"the converter needs the Python package '{found.group(1)}': install the convert extra, "
            f"pip install -e '.[convert]' (log: {log})"
        )
    return ModelError(f"convert_hf_to_gguf.py failed: {error_line(lines)} (log: {log})")


_NO_MERGES = "no merges found"


def unusable_output(lines: list[str], *, model_dir: Path, log: Path) -> ModelError | None:
    """A conversion that exited 0 but wrote a GGUF llama.cpp cannot load, or None.

    b3661-era gguf-py reads BPE merges from tokenizer.json only as "a b" strings; tokenizers >= 0.20 writes them as
    ["a", "b"] pairs, so that converter warns, writes no merges, and llama.cpp later refuses the file
    ("cannot find tokenizer merges in model file").
    """
    if any(_NO_MERGES in line for line in lines):
        return ModelError(
            f"convert_hf_to_gguf.py wrote no BPE merges for {model_dir}: this llama.cpp's gguf-py cannot read the "
            "merges in its tokenizer.json (stored as pairs by tokenizers >= 0.20), and llama.cpp would refuse the "
            f"file; convert with a newer llama.cpp (llamacpp.ref) or supply a tokenizer.json with string merges "
            f"(log: {log})"
        )
    return None


def parse_gguf_info(output_lines: list[str]) -> GGUFInfo:
    """The JSON line gguf_info_script.py prints last."""
    for line in reversed(output_lines):
        if line.startswith("{"):
            return GGUFInfo.model_validate_json(line)
    raise ModelError("gguf-py printed no file information")


# ---------------------------------------------------------------- running the tools


def run_converter(
    build: Build, model_dir: Path, outfile: Path, *, outtype: str, pretokenizer: str | None, log: Path
) -> bool:
    """Convert `model_dir` into `outfile`; True when the fallback pre-tokenizer was used. ModelError on failure."""
    tree = require_tree(build)
    cmd = converter_command(tree, model_dir, outfile, outtype=outtype, pretokenizer=pretokenizer)
    warnings: list[str] = []  # the whole output is too long to keep; warnings are few

    def keep_warnings(line: str) -> None:
        if line.startswith("WARNING"):
            warnings.append(line)

    env = converter_env(tree, os.environ)
    run = run_logged(cmd, log_path=log, env=env, on_line=keep_warnings, tail=60)
    if run.signalled:
        raise run.error(ModelError, "convert_hf_to_gguf.py")
    if not run.ok or not outfile.is_file():
        raise conversion_error(run.lines, model_dir=model_dir, log=log)
    problem = unusable_output(warnings, model_dir=model_dir, log=log)
    if problem is not None:
        raise problem
    return any(FALLBACK_MARKER in line for line in warnings)


def gguf_info(path: Path, build: Build, *, log: Path) -> GGUFInfo:
    """Read tensor shapes and metadata with gguf-py in a subprocess.

    The current tree's gguf-py reads what its own build writes (new quant types included). The b3661-era gguf-py
    uses numpy 1 APIs (ndarray.newbyteorder) that numpy 2 removed, so for that era, and for prebuilt binaries, the
    installed `gguf` package (convert extra) reads the file; the format itself has not changed.
    """
    env = dict(os.environ)
    if build.tree is not None and build.era == "current":
        env = converter_env(build.tree, os.environ)
    run = run_logged([sys.executable, GGUF_INFO_SCRIPT, path], log_path=log, env=env, tail=40)
    if not run.ok:
        hint = ""
        if any("No module named 'gguf'" in line for line in run.lines):
            hint = "; install the convert extra (pip install -e '.[convert]')"
        raise ModelError(f"cannot read {path} with gguf-py: {error_line(run.lines)}{hint} (log: {log})")
    return parse_gguf_info(run.lines)


def require_tree(build: Build) -> Path:
    if build.tree is None or not (build.tree / "convert_hf_to_gguf.py").is_file():
        raise ModelError(
            "converting a checkpoint needs the llama.cpp source tree (convert_hf_to_gguf.py), and this build has "
            "none (prebuilt binaries); use a pypi/git/local llama.cpp source, or model.source = 'gguf'"
        )
    return build.tree
