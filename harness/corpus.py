"""Plain-text corpora for llama-imatrix (calibration) and llama-perplexity --kl-divergence (evaluation).

Each purpose gets one UTF-8 text file in the cache, named by the hash of what produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from harness.cache import CacheDir, atomic_file
from harness.config import CorpusConfig
from harness.errors import ConfigError, HarnessError
from harness.records import inputs_digest

Purpose = Literal["imatrix", "kld"]


def corpus_text(cfg: CorpusConfig, purpose: Purpose, *, cache: CacheDir, llamacpp_tree: Path | None = None) -> Path:
    """Write (once) and return the text file for `purpose`."""
    if cfg.source == "file":
        path = cfg.imatrix_path if purpose == "imatrix" else cfg.kld_path
        assert path is not None  # guaranteed by CorpusConfig validation
        if not Path(path).is_file():
            raise ConfigError(f"corpus.{purpose}_path: file not found: {path}")
        return Path(path)
    if cfg.source == "llamacpp-docs":
        if llamacpp_tree is None:
            raise ConfigError("corpus.source 'llamacpp-docs' needs a llama.cpp source tree (not a prebuilt build)")
        files = docs_files(llamacpp_tree, purpose)
        key = _digest({"docs": [str(f.relative_to(llamacpp_tree)) for f in files], "tree": str(llamacpp_tree)})
        return _cached(cache, f"llamacpp-docs-{purpose}-{key}", lambda: "\n\n".join(_read(f) for f in files))
    split = cfg.imatrix_split if purpose == "imatrix" else cfg.kld_split
    key = _digest({"dataset": cfg.dataset, "config": cfg.dataset_config, "split": split, "col": cfg.text_column})
    return _cached(cache, f"hf-{purpose}-{key}", lambda: _hf_text(cfg, split))


def docs_files(tree: Path, purpose: Purpose) -> list[Path]:
    """The tree's markdown files in a fixed order; even positions calibrate, odd ones evaluate (disjoint)."""
    files = sorted(p for p in tree.rglob("*.md") if p.is_file() and "vendor" not in p.relative_to(tree).parts)
    if len(files) < 2:
        raise HarnessError(f"{tree} has too little documentation text for a corpus")
    return files[0::2] if purpose == "imatrix" else files[1::2]


def _hf_text(cfg: CorpusConfig, split: str) -> str:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
    except Exception as exc:  # datasets raises many types (network, missing split, bad name); report them all
        raise HarnessError(f"cannot load corpus {cfg.dataset} ({cfg.dataset_config}, {split}): {exc}") from None
    if cfg.text_column not in ds.column_names:
        raise ConfigError(f"corpus.text_column: {cfg.text_column!r} not in {ds.column_names}")
    return "".join(ds[cfg.text_column])


def _cached(cache: CacheDir, name: str, produce: Callable[[], str]) -> Path:
    def fill(tmp: Path) -> None:
        text = produce()
        if not text.strip():
            raise HarnessError(f"corpus {name} is empty")
        tmp.write_text(text, encoding="utf-8")

    return atomic_file(cache.corpus / f"{name}.txt", fill)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _digest(data: object) -> str:
    return inputs_digest(data)[:16]
