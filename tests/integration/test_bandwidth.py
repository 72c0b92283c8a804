"""What decoding reads, checked by hand on a real GGUF's tensor table; the bandwidth probe; the bound they give."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from harness.bandwidth import bound_tokens_per_s, decode_cost, memory_bandwidth
from harness.build import Build
from harness.cache import CacheDir
from harness.models.convert import gguf_info

pytestmark = pytest.mark.integration


def test_bytes_per_decoded_token_by_hand(smollm2: Path, current_build: Build, tmp_path: Path):
    cost = decode_cost(gguf_info(smollm2, current_build, log=tmp_path / "info.log"))
    # By hand, from the file's own tensor table: SmolLM2 ties its output layer to the token embeddings (no
    # output.weight), so decoding reads every tensor, the embedding table included, once per step.
    reader = GGUFReader(smollm2)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    assert "output.weight" not in sizes and "token_embd.weight" in sizes
    assert cost.weight_bytes == sum(sizes.values())
    # KV cache per token of context: K and V, 30 layers, 3 KV heads of 64 (width 576 / 9 heads), f16.
    assert (cost.layers, cost.kv_heads, cost.key_length, cost.value_length) == (30, 3, 64, 64)
    assert cost.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    # The bound: k sequences share one read of the weights and each reads its own KV cache.
    bound = bound_tokens_per_s(cost, 10e9, users=4, context_tokens=1000)
    assert bound == pytest.approx(4 * 10e9 / (cost.weight_bytes + 4 * 1000 * cost.kv_bytes_per_token))


def test_the_bandwidth_probe_is_plausible_and_cached(tmp_path: Path):
    cache = CacheDir(tmp_path)
    first = memory_bandwidth(cache, threads=1, gpu=False)
    # Any machine this runs on reads memory at more than 1 GB/s and less than 1 TB/s with one thread.
    assert first.method == "probe" and 1e9 < first.bytes_per_s < 1e12 and first.threads == 1
    (record,) = (tmp_path / "hardware").iterdir()
    stamp = record.stat().st_mtime_ns
    assert memory_bandwidth(cache, threads=1, gpu=False) == first  # read from the cache, not measured again
    assert record.stat().st_mtime_ns == stamp
