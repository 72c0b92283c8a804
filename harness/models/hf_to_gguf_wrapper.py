"""Run llama.cpp's own convert_hf_to_gguf.py, optionally with a fallback BPE pre-tokenizer name.

Run as a script (never imported by the harness process): `python hf_to_gguf_wrapper.py TREE [--fallback-pretokenizer
NAME] -- CONVERTER ARGS...`. The converter identifies a BPE pre-tokenizer by hashing how the tokenizer splits a
check text; a model whose hash llama.cpp does not know (42dot's) stops the conversion. Instead of forking llama.cpp
to add the hash, this wrapper wraps `get_vocab_base_pre` so that, only when the original raises NotImplementedError
for an unrecognized pre-tokenizer, the configured name is returned. Any other error passes through unchanged.

It works with both converter layouts: the b3661 era defines `Model.get_vocab_base_pre` in convert_hf_to_gguf.py,
the current era defines `TextModel.get_vocab_base_pre` in the `conversion` package next to it.
This file must not import the harness: it runs with only the tree, its gguf-py and the converter's dependencies.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

# The converter's message for an unknown hash (both eras); only this NotImplementedError triggers the fallback.
UNRECOGNIZED = "pre-tokenizer was not recognized"
PATCH_TARGET = "get_vocab_base_pre"
EXIT_NO_PATCH_TARGET = 3

logger = logging.getLogger("hf-to-gguf")


def with_fallback(original: Callable, fallback: str) -> Callable:
    """`original(self, tokenizer)`, or `fallback` when it raises NotImplementedError for an unknown hash."""

    @functools.wraps(original)
    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError as exc:
            if UNRECOGNIZED not in str(exc):
                raise
            logger.warning("llamasys: BPE pre-tokenizer not recognized; using the configured fallback %r", fallback)
            return fallback

    get_vocab_base_pre.__llamasys_fallback__ = fallback  # type: ignore[attr-defined]
    return get_vocab_base_pre


def install_fallback(modules: list[object], fallback: str) -> list[type]:
    """Wrap every class in `modules` that itself defines `get_vocab_base_pre`; returns the classes patched."""
    patched = []
    for module in modules:
        for value in list(vars(module).values()):
            if not isinstance(value, type) or value.__module__ != getattr(module, "__name__", None):
                continue  # classes imported from elsewhere are patched where they are defined
            original = value.__dict__.get(PATCH_TARGET)
            if callable(original) and not hasattr(original, "__llamasys_fallback__"):
                setattr(value, PATCH_TARGET, with_fallback(original, fallback))
                patched.append(value)
    return patched


def _converter_modules() -> list[object]:
    names = sorted(n for n in sys.modules if n == "convert_hf_to_gguf" or n.startswith("conversion"))
    return [sys.modules[n] for n in names]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or "--" not in argv:
        print("usage: hf_to_gguf_wrapper.py TREE [--fallback-pretokenizer NAME] -- CONVERTER ARGS...", file=sys.stderr)
        return 2
    split = argv.index("--")
    own, converter_args = argv[:split], argv[split + 1 :]
    tree = Path(own[0]).resolve()
    fallback = own[own.index("--fallback-pretokenizer") + 1] if "--fallback-pretokenizer" in own else None

    # The tree replaces this script's directory on sys.path, so `conversion` and `gguf` come from the tree.
    sys.path[0] = str(tree)
    sys.path.insert(1, str(tree / "gguf-py"))
    sys.argv = [str(tree / "convert_hf_to_gguf.py"), *converter_args]
    import convert_hf_to_gguf  # noqa: PLC0415 - only importable once the tree is on sys.path

    if fallback and not install_fallback(_converter_modules(), fallback):
        print(f"llamasys: this converter defines no {PATCH_TARGET}; cannot apply a fallback", file=sys.stderr)
        return EXIT_NO_PATCH_TARGET
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
