"""Turn a llama-architecture GGUF into a Hugging Face checkpoint directory, for the offline demo.

Run as a script (it imports torch and transformers, which the harness process never needs):
`python demo_checkpoint_script.py MODEL.gguf OUT_DIR`. transformers loads the GGUF dequantized; transformers 5
refuses `save_pretrained` for a GGUF-loaded model, so the weights go to model.safetensors and the config to
config.json by hand, while the tokenizer (a plain fast tokenizer once loaded) saves itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(gguf_path: str, out_dir: str) -> int:
    sys.path.pop(0)  # this script's directory is no package root
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.save_pretrained(out)
    print(f"tokenizer written ({time.monotonic() - start:.1f} s)", flush=True)

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        # A tied lm_head shares storage with the embeddings; safetensors refuses shared tensors, and the
        # converter recreates the tie from config.json.
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    # Loading from GGUF marks the config as quantized and points it at the source file: a plain checkpoint is not.
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    n_params = sum(t.numel() for t in state.values())
    print(f"checkpoint written: {n_params} parameters ({time.monotonic() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: demo_checkpoint_script.py MODEL.gguf OUT_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
