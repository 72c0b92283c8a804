"""Command lines the models stage builds (converter wrapper, llama-imatrix, llama-quantize) and the fallback patch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.build import TOOLS, Build
from harness.config import VariantConfig, default_variants
from harness.errors import ConfigError, ModelError
from harness.models import hf_to_gguf_wrapper as wrapper
from harness.models.convert import (
    WRAPPER,
    check_pretokenizer,
    converter_command,
    converter_env,
    converter_fingerprint,
    known_pretokenizers,
)
from harness.models.quantize import check_variants, imatrix_args, imatrix_filename, quantize_args

TREE = Path("/src/llama.cpp")


@pytest.fixture
def build(tmp_path: Path) -> Build:
    """A build whose tools are empty files: enough for the runner to build command lines."""
    for tool in TOOLS:
        (tmp_path / tool).write_text("")
    return Build(bin_dir=tmp_path, backend="cpu", era="current", build_number=1, commit="x", source="t", cache_key="k")


def quantize_command(build: Build, source: Path, output: Path, variant: VariantConfig, *, imatrix, threads):
    args = quantize_args(source, output, variant, imatrix=imatrix)
    return build.tools.command("llama-quantize", args, build.compute(threads=threads))


def test_converter_command_runs_the_wrapper_with_the_tree_and_converter_arguments():
    cmd = converter_command(
        TREE, Path("/m/ckpt"), Path("/c/out.gguf"), outtype="f16", pretokenizer="gpt-2", python="/venv/bin/python"
    )
    assert cmd == [
        "/venv/bin/python", str(WRAPPER), "/src/llama.cpp", "--fallback-pretokenizer", "gpt-2",
        "--", "/m/ckpt", "--outfile", "/c/out.gguf", "--outtype", "f16",
    ]  # fmt: skip
    assert WRAPPER.is_file()


def test_converter_command_without_fallback_passes_no_fallback_flag():
    cmd = converter_command(TREE, Path("/m"), Path("/o.gguf"), outtype="bf16", pretokenizer=None)
    assert "--fallback-pretokenizer" not in cmd
    assert cmd[cmd.index("--outtype") + 1] == "bf16"


def test_converter_env_puts_the_trees_gguf_py_first_and_keeps_the_rest():
    env = converter_env(TREE, {"PATH": "/bin", "PYTHONPATH": "/extra"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/src/llama.cpp/gguf-py", "/extra"]
    assert env["PATH"] == "/bin"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert converter_env(TREE, {})["PYTHONPATH"] == "/src/llama.cpp/gguf-py"


def test_converter_fingerprint_follows_the_converter_sources(tmp_path: Path):
    (tmp_path / "conversion").mkdir()
    (tmp_path / "convert_hf_to_gguf.py").write_text("main()\n")
    (tmp_path / "conversion" / "base.py").write_text("class TextModel: ...\n")
    first = converter_fingerprint(tmp_path)
    assert converter_fingerprint(tmp_path) == first
    (tmp_path / "conversion" / "base.py").write_text("class TextModel: pass\n")
    assert converter_fingerprint(tmp_path) != first


def test_quantize_command_for_each_default_variant(build: Build):
    imat = Path("/c/imatrix.gguf")
    TOOL = build.tool("llama-quantize")
    got = {
        v.name: quantize_command(build, Path("/c/f16.gguf"), Path(f"/c/{v.name}.gguf"), v, imatrix=imat, threads=2)
        for v in default_variants()
        if not v.is_baseline
    }
    assert got["Q4_0"] == [str(TOOL), "/c/f16.gguf", "/c/Q4_0.gguf", "Q4_0", "2"]
    assert got["Q8_0"][-2:] == ["Q8_0", "2"]
    assert got["Q4_K_M"] == [str(TOOL), "/c/f16.gguf", "/c/Q4_K_M.gguf", "Q4_K_M", "2"]
    assert got["Q4_K_M-imat"] == [
        str(TOOL), "--imatrix", "/c/imatrix.gguf", "/c/f16.gguf", "/c/Q4_K_M-imat.gguf", "Q4_K_M", "2",
    ]  # fmt: skip
    assert got["IQ4_XS-imat"][1:3] == ["--imatrix", "/c/imatrix.gguf"]
    assert got["IQ4_XS-imat"][-2] == "IQ4_XS"


def test_quantize_command_options_come_before_the_positional_arguments(build: Build):
    v = VariantConfig(name="x", type="q4_k_m", pure=True, output_tensor_type="Q8_0", token_embedding_type="q6_k")
    TOOL = build.tool("llama-quantize")
    cmd = quantize_command(build, Path("/in.gguf"), Path("/out.gguf"), v, imatrix=None, threads=None)
    assert cmd == [
        str(TOOL), "--pure", "--output-tensor-type", "q8_0", "--token-embedding-type", "q6_k",
        "/in.gguf", "/out.gguf", "Q4_K_M",
    ]  # fmt: skip


def test_quantize_command_never_passes_an_unknown_type(build: Build):
    # Validation makes such a VariantConfig impossible from a file; one built without validation must still stop here.
    bogus = VariantConfig.model_construct(name="bad", type="Q9_9", imatrix=False, pure=False)
    with pytest.raises(ConfigError, match="unknown quant type 'Q9_9'"):
        quantize_command(build, Path("/in.gguf"), Path("/out.gguf"), bogus, imatrix=None, threads=None)
    bad_tensor = VariantConfig.model_construct(name="bad", type="Q4_0", output_tensor_type="q9")
    with pytest.raises(ConfigError, match="output_tensor_type 'q9'"):
        quantize_command(build, Path("/in.gguf"), Path("/out.gguf"), bad_tensor, imatrix=None, threads=None)


def test_quantize_command_refuses_an_imatrix_variant_without_an_imatrix(build: Build):
    v = VariantConfig(name="x", type="Q4_K_M", imatrix=True)
    with pytest.raises(ModelError, match="importance matrix"):
        quantize_command(build, Path("/in.gguf"), Path("/out.gguf"), v, imatrix=None, threads=None)


def test_check_variants_requires_an_imatrix_for_very_low_bit_types():
    check_variants(default_variants())
    check_variants([VariantConfig(name="ok", type="IQ2_XS", imatrix=True)])
    with pytest.raises(ConfigError, match=r"variant tiny: type IQ2_XXS needs an importance matrix; set imatrix = true"):
        check_variants([VariantConfig(name="tiny", type="IQ2_XXS")])
    with pytest.raises(ConfigError, match="unknown quant type"):
        check_variants([VariantConfig.model_construct(name="bad", type="Q3", imatrix=False)])


def test_imatrix_command_and_file_format_per_era(build: Build):
    args = imatrix_args(Path("/c/f16.gguf"), Path("/c/text.txt"), Path("/c/imatrix.gguf"), chunks=8, ctx_size=256)
    cmd = build.tools.command("llama-imatrix", args, build.compute(threads=2))
    assert cmd == [
        str(build.tool("llama-imatrix")), "-m", "/c/f16.gguf", "-f", "/c/text.txt", "-o", "/c/imatrix.gguf",
        "--chunks", "8", "-c", "256", "--no-ppl", "-t", "2",
    ]  # fmt: skip
    assert imatrix_filename("current") == "imatrix.gguf"
    assert imatrix_filename("legacy") == "imatrix.dat"
    gpu = build.model_copy(update={"backend": "cuda"})
    on_gpu = gpu.tools.command("llama-imatrix", args, gpu.compute(threads=None, gpu_layers=99))
    assert on_gpu[-2:] == ["-ngl", "99"]


VOCAB_SNIPPET = """
            } else if (
                tokenizer_pre == "gpt-2"   ||
                tokenizer_pre == "phi-2"   ||
                tokenizer_pre == "jina-es" ||
                tokenizer_pre == "jina-de") {
                pre_type = LLAMA_VOCAB_PRE_TYPE_GPT2;
            } else if (
                tokenizer_pre == "smollm") {
"""


def test_known_pretokenizers_reads_llama_cpps_loader_source():
    assert known_pretokenizers(VOCAB_SNIPPET) == {"gpt-2", "phi-2", "jina-es", "jina-de", "smollm"}


def test_check_pretokenizer_refuses_a_name_llama_cpp_would_not_load(tmp_path: Path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "llama-vocab.cpp").write_text(VOCAB_SNIPPET)
    check_pretokenizer(tmp_path, "gpt-2")
    check_pretokenizer(tmp_path, None)
    with pytest.raises(ConfigError, match=r"model.pretokenizer: 'gpt2' is not a pre-tokenizer this llama.cpp knows"):
        check_pretokenizer(tmp_path, "gpt2")


class _Model:
    def get_vocab_base_pre(self, tokenizer) -> str:
        if tokenizer == "known":
            return "llama-bpe"
        if tokenizer == "unknown":
            raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
        raise NotImplementedError("something else")


class _Subclass(_Model):
    pass


def test_wrapper_falls_back_only_for_an_unrecognized_pre_tokenizer():
    import types

    module = types.ModuleType(__name__)
    module._Model = _Model  # type: ignore[attr-defined]
    module._Subclass = _Subclass  # type: ignore[attr-defined]
    original = _Model.get_vocab_base_pre
    try:
        patched = wrapper.install_fallback([module], "gpt-2")
        assert patched == [_Model]  # the subclass inherits the wrapped method, it is not wrapped twice
        assert _Subclass().get_vocab_base_pre("known") == "llama-bpe"
        assert _Subclass().get_vocab_base_pre("unknown") == "gpt-2"
        with pytest.raises(NotImplementedError, match="something else"):
            _Model().get_vocab_base_pre("other")
        assert wrapper.install_fallback([module], "gpt-2") == []  # idempotent
    finally:
        _Model.get_vocab_base_pre = original  # type: ignore[method-assign]
