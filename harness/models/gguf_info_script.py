"""Print what the harness needs to know about a GGUF file as one JSON line, read with gguf-py's GGUFReader.

Run as a script with PYTHONPATH=<llama.cpp tree>/gguf-py, so the reader matches the tree that wrote the file
(never imported by the harness process): `python gguf_info_script.py FILE`.
"""

from __future__ import annotations

import json
import sys


def _scalar(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0]


def main(path: str) -> int:
    # The script's own directory would shadow nothing, but keep sys.path to what PYTHONPATH and site give.
    sys.path.pop(0)
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensor_types: dict[str, int] = {}
    for tensor in reader.tensors:
        tensor_types[tensor.tensor_type.name] = tensor_types.get(tensor.tensor_type.name, 0) + 1
    names = {t.name: int(t.n_bytes) for t in reader.tensors}
    arch = _scalar(reader, "general.architecture")
    total = sum(names.values())
    # Decode reads every tensor once per step, except the token-embedding table, which is a lookup of one row per
    # token, unless the model has no separate output layer (tied embeddings): then the output product reads it whole.
    decode = total - names["token_embd.weight"] if "token_embd.weight" in names and "output.weight" in names else total
    heads = _scalar(reader, f"{arch}.attention.head_count")
    width = _scalar(reader, f"{arch}.embedding_length")
    head_size = width // heads if isinstance(width, int) and isinstance(heads, int) and heads else None
    info = {
        "decode_bytes": decode,
        "layers": _scalar(reader, f"{arch}.block_count"),
        "kv_heads": _scalar(reader, f"{arch}.attention.head_count_kv") or heads,
        "key_length": _scalar(reader, f"{arch}.attention.key_length") or head_size,
        "value_length": _scalar(reader, f"{arch}.attention.value_length") or head_size,
        "context_length": _scalar(reader, f"{arch}.context_length"),
        "n_params": sum(int(t.n_elements) for t in reader.tensors),
        "n_tensors": len(reader.tensors),
        "tensor_bytes": total,
        "tensor_types": tensor_types,
        "file_type": _scalar(reader, "general.file_type"),
        "architecture": arch,
        "pre_tokenizer": _scalar(reader, "tokenizer.ggml.pre"),
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
