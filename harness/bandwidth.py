"""Where decode sits against the hardware: bytes read per decoded token, the memory bandwidth, and the bound they set.

Decoding is memory-bound: each decode step reads every weight tensor once (shared by the whole batch) and each
sequence's KV cache up to its current length. So at k concurrent sequences of context c,

    bound (tokens/s) = k x bandwidth / (weight bytes + k x c x KV bytes per token)

The weight bytes come from the GGUF's own tensor table (the token-embedding table is a lookup, one row per token,
unless the model ties it to the output layer: then the output product reads it whole). KV bytes per token of
context are 2 (K and V) x layers x KV heads x head size x 2 bytes (llama.cpp's default f16 cache). The bandwidth is
measured once per machine and thread count by a short probe (numpy sums of a buffer far larger than the caches, one
slice per thread), or on a GPU taken as NVML's theoretical peak; each says which. llama-bench's single-stream
generation rate on the same model is the reference beside the bound.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

from harness.cache import CacheDir
from harness.errors import LoadTestError
from harness.manifest import cpu_model
from harness.models.convert import GGUFInfo
from harness.records import Record, RecordError, inputs_digest, read_record, write_record
from harness.tools import Compute, ToolRunner, llama_bench_rates

logger = logging.getLogger(__name__)

KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default KV cache type is f16
PROBE_BYTES = 512 << 20  # far beyond any CPU cache
PROBE_REPEATS = 5


class DecodeCost(Record):
    """What one decoded token reads from memory, from the GGUF's tensor table and hyperparameters."""

    weight_bytes: int  # every tensor read once per decode step (shared by the batch)
    kv_bytes_per_token: int  # per sequence, per token of context held in the KV cache
    layers: int
    kv_heads: int
    key_length: int
    value_length: int


def decode_cost(info: GGUFInfo) -> DecodeCost:
    """DecodeCost of a model from what gguf_info read (its decode_bytes and attention shapes)."""
    missing = [
        k for k in ("decode_bytes", "layers", "kv_heads", "key_length", "value_length") if getattr(info, k) is None
    ]
    if missing:
        raise LoadTestError(f"the GGUF file does not say its {', '.join(missing)}; cannot compute the decode cost")
    kv = (info.key_length + info.value_length) * info.kv_heads * info.layers * KV_BYTES_PER_ELEMENT  # type: ignore[operator]
    return DecodeCost(
        weight_bytes=info.decode_bytes, kv_bytes_per_token=kv, layers=info.layers, kv_heads=info.kv_heads,  # type: ignore[arg-type]
        key_length=info.key_length, value_length=info.value_length,  # type: ignore[arg-type]
    )  # fmt: skip


def bound_tokens_per_s(cost: DecodeCost, bandwidth_bytes_per_s: float, users: int, context_tokens: float) -> float:
    """The memory-bandwidth bound on aggregate decode tokens/s at `users` sequences of `context_tokens` each."""
    read_per_step = cost.weight_bytes + users * context_tokens * cost.kv_bytes_per_token
    return users * bandwidth_bytes_per_s / read_per_step


MEMORY_HEADROOM = 1 << 30  # left free for the server's own buffers and the rest of the machine


def available_memory(gpu: bool) -> tuple[int, str]:
    """Bytes free for the KV cache: the first GPU's free memory on a GPU build (NVML), else the host's available."""
    if gpu:
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                free = int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free)
            finally:
                pynvml.nvmlShutdown()
            return free, "GPU memory"
        except Exception:  # noqa: BLE001 - any NVML failure: fall back to the host's memory, and say so
            logger.warning("GPU memory could not be read through NVML; sizing the KV cache from host memory")
    import psutil

    return int(psutil.virtual_memory().available), "host memory"


def kv_memory_bound(cost: DecodeCost, *, per_slot_tokens: int, model_bytes: int, gpu: bool) -> tuple[int, str]:
    """How many slots of `per_slot_tokens` the KV cache can hold beside the model in free memory, and where."""
    free, where = available_memory(gpu)
    room = free - model_bytes - MEMORY_HEADROOM
    return max(room // (per_slot_tokens * cost.kv_bytes_per_token), 0), where


class Bandwidth(Record):
    bytes_per_s: float
    method: Literal["probe", "nvml-peak"]
    detail: str  # how it was obtained, for the report
    threads: int | None = None
    device: str = ""


def probe_bandwidth(threads: int, *, size_bytes: int = PROBE_BYTES, repeats: int = PROBE_REPEATS) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` passes summing a `size_bytes` buffer, one slice per thread
    (numpy releases the GIL while it sums, so the threads read concurrently, as llama.cpp's do)."""
    buffer = np.ones(size_bytes // 8, dtype=np.float64)
    slices = np.array_split(buffer, max(threads, 1))
    best = 0.0
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        list(pool.map(np.sum, slices))  # touch every page once before timing
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = max(best, buffer.nbytes / (time.perf_counter() - started))
    return best


def gpu_peak_bandwidth() -> Bandwidth | None:
    """The first GPU's theoretical peak from NVML (memory clock x bus width x 2 for double data rate), if any."""
    try:
        import pynvml  # nvidia-ml-py, the `gpu` extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name if isinstance(name, str) else name.decode()
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
    peak = clock_mhz * 1e6 * 2 * bus_bits / 8
    return Bandwidth(
        bytes_per_s=peak, method="nvml-peak", device=name,
        detail=f"theoretical peak of {name} from NVML: {clock_mhz} MHz x 2 x {bus_bits} bits",
    )  # fmt: skip


def memory_bandwidth(cache: CacheDir, *, threads: int, gpu: bool) -> Bandwidth:
    """The bandwidth decode is bound by: the GPU's peak on a GPU build, else this machine's measured read rate with
    the server's thread count (probed once per CPU model and thread count, then read from the cache)."""
    if gpu and (peak := gpu_peak_bandwidth()) is not None:
        return peak
    cpu = cpu_model()
    path = cache.root / "hardware" / f"bandwidth-{inputs_digest({'cpu': cpu, 'threads': threads})[:16]}.json"
    try:
        return read_record(path, Bandwidth)
    except (FileNotFoundError, RecordError):
        pass
    logger.info("load: measuring this machine's memory bandwidth with %d thread(s) (once)", threads)
    measured = Bandwidth(
        bytes_per_s=probe_bandwidth(threads), method="probe", threads=threads, device=cpu,
        detail=f"measured: numpy sums of a {PROBE_BYTES >> 20} MiB buffer on {threads} thread(s), best of "
        f"{PROBE_REPEATS}, on {cpu}",
    )  # fmt: skip
    write_record(path, measured)
    return measured


def llama_bench_generation(
    tools: ToolRunner, model: Path, *, compute: Compute, log_path: Path, tokens: int = 64
) -> float:
    """llama-bench's single-stream generation rate (tokens/s, `tg`) on `model`: the reference beside the bound."""
    run = tools.run(
        "llama-bench", ["-m", str(model), "-p", "0", "-n", str(tokens), "-r", "3", "-o", "json"],
        log_path=log_path, compute=compute,
    )  # fmt: skip
    if not run.ok:
        raise run.error(LoadTestError, "llama-bench")
    rate = llama_bench_rates(run.lines).get("tg")
    if rate is None:
        raise LoadTestError(f"llama-bench printed no generation rate (log: {log_path})")
    return rate
