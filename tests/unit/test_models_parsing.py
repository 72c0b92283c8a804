"""Failures of the converter, llama-imatrix and llama-quantize as one line, from their captured real output.

The logs under data/models/ were captured from both llama.cpp eras (b3661-era 0.2.90 tree and the current 0.3.36
tree/build), with paths shortened.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import VariantConfig
from harness.errors import ModelError
from harness.models.convert import GGUFInfo, conversion_error, parse_gguf_info, unusable_output
from harness.models.quantize import imatrix_error, quantize_error

DATA = Path(__file__).parent / "data" / "models"
LOG = Path("/run/models/logs/x.log")


def lines(name: str) -> list[str]:
    return (DATA / name).read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("era", ["current", "legacy"])
def test_unknown_pre_tokenizer_says_how_to_set_the_fallback(era: str):
    err = conversion_error(lines(f"convert-unknown-pretokenizer-{era}.log"), model_dir=Path("/m/tiny"), log=LOG)
    msg = str(err)
    assert isinstance(err, ModelError)
    assert "BPE pre-tokenizer of /m/tiny is not one llama.cpp's converter recognizes" in msg
    assert "(hash bef28a26a1088d1b...)" in msg
    assert 'model.pretokenizer = "gpt-2"' in msg
    assert str(LOG) in msg
    assert "\n" not in msg


@pytest.mark.parametrize("era", ["current", "legacy"])
def test_unsupported_architecture_names_it(era: str):
    msg = str(conversion_error(lines(f"convert-unsupported-{era}.log"), model_dir=Path("/m"), log=LOG))
    assert msg.startswith("architecture FooBarForCausalLM is not supported by this llama.cpp's converter")
    assert "Model FooBarForCausalLM is not supported" in msg


def test_a_conversion_without_merges_is_caught_before_llama_cpp_refuses_it():
    # b3661-era gguf-py with a tokenizers >= 0.20 tokenizer.json: exit 0, but no merges in the GGUF.
    err = unusable_output(lines("convert-no-merges-legacy.log"), model_dir=Path("/m/tiny"), log=LOG)
    assert err is not None
    assert str(err).startswith("convert_hf_to_gguf.py wrote no BPE merges for /m/tiny")
    assert unusable_output(lines("convert-fallback-current.log"), model_dir=Path("/m/tiny"), log=LOG) is None


def test_fallback_conversion_log_shows_the_fallback_was_used():
    assert any("using the configured fallback 'gpt-2'" in line for line in lines("convert-fallback-current.log"))


def test_missing_python_package_points_at_the_convert_extra():
    tail = [
        "Traceback (most recent call last):",
        '  File "convert_hf_to_gguf.py", line 12',
        "ModuleNotFoundError: No module named 'torch'",
    ]
    msg = str(conversion_error(tail, model_dir=Path("/m"), log=LOG))
    assert "needs the Python package 'torch'" in msg
    assert "pip install -e '.[convert]'" in msg


def test_other_converter_failures_quote_the_last_error_line():
    tail = ["INFO:hf-to-gguf:Loading model: m", "ValueError: Can not map tensor 'foo.weight'", "INFO: bye"]
    assert "convert_hf_to_gguf.py failed: ValueError: Can not map tensor 'foo.weight'" in str(
        conversion_error(tail, model_dir=Path("/m"), log=LOG)
    )


@pytest.mark.parametrize("era", ["current", "legacy"])
def test_quantize_refusing_a_type_without_imatrix(era: str):
    v = VariantConfig(name="IQ2", type="IQ2_XXS")
    msg = str(quantize_error(lines(f"quantize-needs-imatrix-{era}.log"), v, log=LOG))
    assert msg.startswith("variant IQ2: llama-quantize refuses IQ2_XXS without an importance matrix")
    assert "set imatrix = true for this variant" in msg


@pytest.mark.parametrize("era", ["current", "legacy"])
def test_imatrix_with_too_short_text_says_what_to_change(era: str):
    msg = str(imatrix_error(lines(f"imatrix-too-short-{era}.log"), text=Path("/c/text.txt"), log=LOG))
    assert msg.startswith("the calibration text /c/text.txt is too short: llama-imatrix needs at least")
    assert "lower imatrix.ctx_size" in msg


def test_imatrix_on_a_model_that_does_not_load_quotes_the_loaders_reason():
    msg = str(imatrix_error(lines("imatrix-no-merges-legacy.log"), text=Path("/c/t.txt"), log=LOG))
    assert msg.startswith("llama-imatrix failed: llama_model_load: error loading model: error loading model vocabulary")
    assert "cannot find tokenizer merges" in msg


def test_gguf_info_is_the_last_json_line():
    fields = {"n_params": 10, "n_tensors": 2, "tensor_bytes": 20, "tensor_types": {"F16": 1, "F32": 1}}
    fields |= {"file_type": 1, "architecture": "llama", "pre_tokenizer": "gpt-2"}
    out = ["some warning", json.dumps(fields)]
    info = parse_gguf_info(out)
    assert info == GGUFInfo(n_params=10, n_tensors=2, tensor_bytes=20, tensor_types={"F16": 1, "F32": 1}, file_type=1,
                            architecture="llama", pre_tokenizer="gpt-2")  # fmt: skip
    assert info.baseline_type == "F16"
    with pytest.raises(ModelError):
        parse_gguf_info(["no json here"])


@pytest.mark.parametrize(
    ("types", "file_type", "expected"),
    [
        ({"F16": 16, "F32": 5}, 1, "F16"),
        ({"BF16": 16, "F32": 5}, 32, "BF16"),
        ({"F32": 21}, 0, "F32"),
        ({"Q4_1": 200, "F32": 61, "Q6_K": 1}, 3, None),
        ({"F16": 2, "F32": 1}, None, "F16"),
        ({"F32": 3}, None, "F32"),
    ],
)
def test_baseline_type_only_for_unquantized_files(types: dict[str, int], file_type: int | None, expected: str | None):
    info = GGUFInfo(n_params=1, n_tensors=1, tensor_bytes=1, tensor_types=types, file_type=file_type,
                    architecture="llama", pre_tokenizer=None)  # fmt: skip
    assert info.baseline_type == expected
