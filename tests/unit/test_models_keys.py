"""Bits per weight, cache keys (stable, name-independent, sensitive to every real input) and ModelArtifact JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.build import Build
from harness.config import Experiment, VariantConfig
from harness.errors import ModelError
from harness.models.pipeline import (
    conversion_key,
    gguf_source_key,
    imatrix_key,
    stage_inputs,
    tool_identity,
    variant_key,
)
from harness.models.quantize import bits_per_weight
from harness.models.records import ModelArtifact


def test_bits_per_weight():
    # SmolLM2-135M: 134,515,008 weights; an F16 file of 270,903,776 bytes is 16.11 bpw (metadata included).
    assert bits_per_weight(270_903_776, 134_515_008) == pytest.approx(16.111, abs=1e-3)
    assert bits_per_weight(1000, 2000) == 4.0
    with pytest.raises(ModelError):
        bits_per_weight(1000, 0)


def test_conversion_key_is_stable_and_follows_its_inputs():
    key = conversion_key("hf:org/m@abc", "conv1", "f16", "gpt-2", "transformers=5")
    # A fixed value: a change in how keys are made must be deliberate (it orphans every cached model).
    assert key == conversion_key("hf:org/m@abc", "conv1", "f16", "gpt-2", "transformers=5")
    assert len(key) == 24 and all(c in "0123456789abcdef" for c in key)
    assert key == GOLDEN_CONVERSION_KEY
    others = {
        conversion_key("hf:org/m@abd", "conv1", "f16", "gpt-2", "transformers=5"),
        conversion_key("hf:org/m@abc", "conv2", "f16", "gpt-2", "transformers=5"),
        conversion_key("hf:org/m@abc", "conv1", "bf16", "gpt-2", "transformers=5"),
        conversion_key("hf:org/m@abc", "conv1", "f16", None, "transformers=5"),
        conversion_key("hf:org/m@abc", "conv1", "f16", "gpt-2", "transformers=6"),
    }
    assert key not in others and len(others) == 5
    assert gguf_source_key("gguf:/m.gguf:1:2") != gguf_source_key("gguf:/m.gguf:1:3")


GOLDEN_CONVERSION_KEY = "4f55856d0a11575181eb8c08"


def test_variant_key_ignores_the_name_but_not_the_recipe():
    base = variant_key("b", VariantConfig(name="a", type="Q4_K_M"), None, "1:x")
    assert base == variant_key("b", VariantConfig(name="renamed", type="q4_k_m"), None, "1:x")
    recipes = [
        VariantConfig(name="a", type="Q4_0"),
        VariantConfig(name="a", type="Q4_K_M", pure=True),
        VariantConfig(name="a", type="Q4_K_M", output_tensor_type="q8_0"),
        VariantConfig(name="a", type="Q4_K_M", token_embedding_type="q8_0"),
    ]
    keys = {variant_key("b", v, None, "1:x") for v in recipes}
    keys.add(variant_key("other-baseline", VariantConfig(name="a", type="Q4_K_M"), None, "1:x"))
    keys.add(variant_key("b", VariantConfig(name="a", type="Q4_K_M"), None, "2:y"))
    assert base not in keys and len(keys) == 6


def test_variant_key_depends_on_the_imatrix_only_when_the_variant_uses_it():
    plain = VariantConfig(name="a", type="Q4_K_M")
    imat = VariantConfig(name="a", type="Q4_K_M", imatrix=True)
    assert variant_key("b", plain, "imx1", "t") == variant_key("b", plain, None, "t")
    assert variant_key("b", imat, "imx1", "t") != variant_key("b", imat, "imx2", "t")
    assert variant_key("b", imat, "imx1", "t") != variant_key("b", plain, None, "t")


def test_imatrix_key_follows_text_chunks_context_and_tool():
    key = imatrix_key("b", "sha", 8, 256, "t", "imatrix.gguf")
    variants = {
        imatrix_key("b2", "sha", 8, 256, "t", "imatrix.gguf"),
        imatrix_key("b", "sha2", 8, 256, "t", "imatrix.gguf"),
        imatrix_key("b", "sha", 9, 256, "t", "imatrix.gguf"),
        imatrix_key("b", "sha", 8, 512, "t", "imatrix.gguf"),
        imatrix_key("b", "sha", 8, 256, "t2", "imatrix.gguf"),
        imatrix_key("b", "sha", 8, 256, "t", "imatrix.dat"),
    }
    assert key not in variants and len(variants) == 6


def _build(**kw) -> Build:
    defaults = dict(bin_dir=Path("/b/bin"), backend="cpu", era="current", build_number=11312, commit="0c1e57098",
                    source="PyPI", cache_key="k", tree=Path("/src"))  # fmt: skip
    return Build(**{**defaults, **kw})


def test_stage_inputs_ignore_threads_and_backend_but_not_the_recipe(tmp_path: Path):
    exp = Experiment(cache_dir=tmp_path)
    first = stage_inputs(exp, _build())
    assert (
        stage_inputs(exp.model_copy(update={"model": exp.model.model_copy(update={"threads": 2})}), _build()) == first
    )
    assert stage_inputs(exp, _build(backend="cuda", cache_key="other")) == first
    assert stage_inputs(exp, _build(commit="deadbeef")) != first
    fewer = exp.model_copy(update={"variants": exp.variants[:2]})
    assert stage_inputs(fewer, _build()) != first
    # The corpus only matters when some variant uses the importance matrix.
    assert stage_inputs(fewer, _build())["corpus"] is None and first["corpus"] is not None
    assert tool_identity(_build()) == "11312:0c1e57098"


def test_model_artifact_json_round_trip():
    a = ModelArtifact(
        name="Q4_K_M-imat", type="Q4_K_M", path=Path("/c/m/k/model-Q4_K_M.gguf"), size_bytes=105_000_000,
        n_params=134_515_008, bits_per_weight=6.24, imatrix=Path("/c/m/i/imatrix.gguf"),
        source=Path("/c/m/b/model-F16.gguf"), baseline=False, cache_key="k", seconds=3.5,
    )  # fmt: skip
    data = a.model_dump(mode="json")
    assert data["path"] == "/c/m/k/model-Q4_K_M.gguf" and data["imatrix"] == "/c/m/i/imatrix.gguf"
    assert ModelArtifact.model_validate(data) == a
    f16 = ModelArtifact.model_validate({**data, "imatrix": None, "name": "F16", "unknown_future_field": 1})
    assert f16.imatrix is None and f16.name == "F16"
