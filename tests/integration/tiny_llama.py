"""A tiny random LlamaForCausalLM checkpoint (numpy + safetensors) with a byte-level BPE trained on the spot.

The tokenizer is GPT-2 style (byte-level pre-tokenizer with the GPT-2 split regex), so llama.cpp's `gpt-2`
pre-tokenizer reproduces it exactly, but its vocabulary is new, so the converter does not know its hash: the same
situation as 42dot's tokenizer (whose hash llama.cpp's converter does not know either).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<|bos|>", "<|endoftext|>"

# Training text: varied enough for a few hundred merges; also used as calibration text for llama-imatrix.
SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. A model quantized to four bits keeps most of its quality.
llama.cpp converts Hugging Face checkpoints to GGUF, then llama-quantize writes Q8_0, Q4_0 and Q4_K_M files.
Numbers like 3, 33, 333 and 3.14 are split by the pre-tokenizer; so are contractions: I'm, you're, it's, we'll.
Importance matrices weight the rounding error by how much each column matters on calibration text.
Benchmarks measure time to first token, time per output token and throughput at 1, 2, 4 and 8 users.
"""


def corpus(repeat: int = 40) -> str:
    """Calibration text: the sample text with numbered lines, long enough for a few 64-token chunks."""
    lines = SAMPLE_TEXT.strip().splitlines()
    return "\n".join(f"{i}: {lines[i % len(lines)]}" for i in range(repeat)) + "\n"


def train_tokenizer(vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus(80)], trainer=trainer)
    return tok


def write_checkpoint(
    out: Path, *, layers: int = 2, width: int = 64, ffn: int = 256, heads: int = 4, kv_heads: int = 2, seed: int = 0
) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into `out`; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "add_bos_token": False,
                "model_max_length": 512,
            }
        )
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    rng = np.random.default_rng(seed)
    head_dim = width // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, width), "lm_head.weight": w(vocab, width)}
    tensors["model.norm.weight"] = np.ones(width, dtype=np.float32)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = w(heads * head_dim, width)
        tensors[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, width)
        tensors[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, width)
        tensors[p + "self_attn.o_proj.weight"] = w(width, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = w(ffn, width)
        tensors[p + "mlp.up_proj.weight"] = w(ffn, width)
        tensors[p + "mlp.down_proj.weight"] = w(width, ffn)
        tensors[p + "input_layernorm.weight"] = np.ones(width, dtype=np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(width, dtype=np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def parameter_count(out: Path) -> int:
    """Number of weights in the checkpoint (what the GGUF must hold too)."""
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as fh:
        return sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())  # noqa: SIM118
