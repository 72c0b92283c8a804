"""Proof that a llama.cpp build runs on this machine, before any stage relies on it.

Right after compiling, and before a cached build is used on a CPU it has not been checked on, its tools run on a
tiny random model (written with gguf-py, then quantized by the build's own llama-quantize to every weight type the
experiment uses) through the code paths the stages use: llama-perplexity (MMLU, KL divergence), llama-bench (its
prompt and generation rates are what `llamasys build --check` prints) and one llama-server completion. Every tool
runs with a small preloaded signal handler that, should the tool die of SIGILL, prints the bytes of the instruction
it stopped at; objdump names the instruction and `instruction_extension` the extension it belongs to, so that the
build can be made again without it (`harness.llamacpp`). A few seconds in all, recorded per build and CPU.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
from collections.abc import Sequence
from pathlib import Path

from harness.build import Build, BuildCheck, TypeCheck
from harness.cache import CacheDir, atomic_file
from harness.cpu import CpuInfo, c_compiler
from harness.errors import BuildError, HarnessError, ToolMissingError
from harness.process import exit_reason
from harness.records import RecordError, read_record, write_record
from harness.server import LlamaServer, ServerConfig, ServerSizing
from harness.tools import ToolRun, llama_bench_rates

logger = logging.getLogger(__name__)

# The probe model: every matrix a multiple of 256 wide, so K-quants, IQ4 and the repacked and AMX kernels all apply.
PROBE_SHAPE = {"layers": 2, "width": 256, "ffn": 768, "heads": 4, "vocab": 512, "context": 512}
PROBE_CTX = 128  # llama-perplexity context (two chunks of it), and a prompt batch large enough for the tile kernels
# Types llama-quantize makes only with an importance matrix (harness.models.quantize.IMATRIX_REQUIRED).
_NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S")
_FAULT_RE = re.compile(r"llamasys-sigill pc=(0x[0-9a-f]+|\(nil\)) bytes=([0-9a-f]*)")

_REPORTER_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
/* Preloaded into a probed tool: on SIGILL, print the faulting address and the bytes there, then die of it. */
static void on_sigill(int sig, siginfo_t *info, void *context) {
    (void) sig; (void) context;
    const unsigned char *pc = (const unsigned char *) info->si_addr;
    char line[128];
    int n = snprintf(line, sizeof line, "\nllamasys-sigill pc=%p bytes=", (const void *) pc);
    for (int i = 0; pc && i < 15 && n < (int) sizeof line - 3; i++)
        n += snprintf(line + n, sizeof line - n, "%02x", pc[i]);
    line[n++] = '\n';
    if (write(2, line, n) < 0) {}
    /* Only now the default action, which kills when the instruction is executed again on return. Resetting before
       the write (SA_RESETHAND) lost the line whenever two threads faulted at once, as ggml's workers do: the second
       one's signal found the default action and killed the process before the first one had written. */
    signal(SIGILL, SIG_DFL);
}
__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigill;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGILL, &sa, NULL);
}
"""

_PROBE_TEXT = (
    "A build is accepted only after it has proved itself on the machine it runs on. "
    "The quick brown fox jumps over the lazy dog; 0123456789. "
)


# ---------------------------------------------------------------- the probe model


def write_probe_model(path: Path, *, seed: int = 0) -> None:
    """A random llama-architecture F16 GGUF of PROBE_SHAPE with a byte-fallback SentencePiece vocabulary."""
    import gguf
    import numpy as np

    s = PROBE_SHAPE
    width, ffn, heads, vocab = s["width"], s["ffn"], s["heads"], s["vocab"]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llamasys build probe")
    writer.add_context_length(s["context"])
    writer.add_embedding_length(width)
    writer.add_block_count(s["layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    words = ["\u2581" + p for p in pieces] + pieces
    words += [f"\u2581{a}{b}" for a in "etaoinshr" for b in "etaoinshrdlu"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += words[: vocab - len(tokens)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(tokens) - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)

    n = len(tokens)
    writer.add_tensor("token_embd.weight", matrix(n, width))
    writer.add_tensor("output_norm.weight", np.ones(width, dtype=np.float32))
    writer.add_tensor("output.weight", matrix(n, width))
    for i in range(s["layers"]):
        for name, rows, cols in (("attn_q", width, width), ("attn_k", width, width), ("attn_v", width, width),
                                 ("attn_output", width, width), ("ffn_gate", ffn, width), ("ffn_up", ffn, width),
                                 ("ffn_down", width, ffn)):  # fmt: skip
            writer.add_tensor(f"blk.{i}.{name}.weight", matrix(rows, cols))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(width, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(width, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def probe_model(cache: CacheDir) -> Path:
    """The F16 probe model, made once per cache (a few MB, under a second)."""
    import gguf

    digest = hashlib.sha256(f"{PROBE_SHAPE}{gguf.__name__}{_gguf_version()}".encode()).hexdigest()[:12]
    return atomic_file(cache.probe / f"probe-model-{digest}-F16.gguf", write_probe_model)


def _gguf_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return "unknown"


def probe_text(cache: CacheDir) -> Path:
    """Text for llama-perplexity: more than two contexts' worth of tokens with the probe vocabulary."""
    return atomic_file(cache.probe / "probe-text.txt", lambda p: p.write_text(_PROBE_TEXT * 40, encoding="utf-8"))


def sigill_reporter(cache: CacheDir) -> Path | None:
    """The preloaded SIGILL reporter, compiled once; None without a C compiler (a prebuilt build on a bare machine)."""
    digest = hashlib.sha256(_REPORTER_C.encode()).hexdigest()[:12]
    target = cache.probe / f"sigill-report-{digest}.so"

    def compile_it(out: Path) -> None:
        compiler = c_compiler()
        with tempfile.TemporaryDirectory(prefix="llamasys-sigill-") as scratch:
            source = Path(scratch) / "report.c"
            source.write_text(_REPORTER_C, encoding="utf-8")
            subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(out), str(source)], check=True,
                           capture_output=True, timeout=120)  # fmt: skip

    try:
        return atomic_file(target, compile_it)
    except (ToolMissingError, subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        return None


# ---------------------------------------------------------------- reading a fault (pure parts unit-tested)


def fault_bytes(lines: Sequence[str]) -> bytes | None:
    """The instruction bytes the reporter printed, if the tool died of SIGILL with it preloaded."""
    for line in reversed(lines):
        match = _FAULT_RE.search(line)
        if match and match.group(2):
            return bytes.fromhex(match.group(2))
    return None


def decode_instruction(code: bytes, machine: str) -> str | None:
    """The first instruction in `code`, as objdump spells it (`vpdpbusd %zmm0,%zmm0,%zmm0`); None without objdump."""
    objdump = shutil.which("objdump")
    arch = {"x86_64": "i386:x86-64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)
    if objdump is None or arch is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".bin") as fh:
        fh.write(code)
        fh.flush()
        out = subprocess.run([objdump, "-D", "-b", "binary", "-m", arch, fh.name], capture_output=True, text=True)
    return first_instruction(out.stdout)


def first_instruction(objdump_output: str) -> str | None:
    """`   0:\t62 f1 7d 48 ef c0    \tvpxord %zmm0,%zmm0,%zmm0` -> `vpxord %zmm0,%zmm0,%zmm0`."""
    for line in objdump_output.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip().rstrip(":") == "0":
            return " ".join(parts[2].split("#")[0].split())  # objdump's "# 0x1dc214" address comment dropped
    return None


_AMX_INT8 = ("tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud")
_VNNI = ("vpdpbusd", "vpdpbusds", "vpdpwssd", "vpdpwssds")
_VBMI = ("vpermb", "vpermi2b", "vpermt2b", "vpmultishiftqb")
_BF16 = ("vdpbf16ps", "vcvtne2ps2bf16", "vcvtneps2bf16")
_BMI2 = ("pdep", "pext", "bzhi", "mulx", "rorx", "sarx", "shlx", "shrx")
_SSE42 = ("crc32", "crc32b", "crc32w", "crc32l", "crc32q", "pcmpestri", "pcmpestrm", "pcmpistri", "pcmpistrm")
_AVX2_INT = ("vbroadcasti128", "vextracti128", "vinserti128", "vperm2i128", "vpermq", "vpermd", "vpermpd", "vpermps")


def instruction_extension(instruction: str, machine: str) -> str | None:
    """The extension (harness.cpu's names) an instruction objdump printed belongs to, or None when not known."""
    if machine not in ("x86_64", "aarch64", "arm64"):
        return None
    text = instruction.strip()
    vex = text.startswith("{vex}")
    mnemonic, _, operands = text.removeprefix("{vex}").strip().partition(" ")
    if machine != "x86_64":
        return _arm_extension(mnemonic, operands)
    if mnemonic.startswith(("tile", "ldtilecfg", "sttilecfg")):
        return "amx_tile"
    if mnemonic in _AMX_INT8:
        return "amx_int8"
    if mnemonic == "tdpbf16ps":
        return "amx_bf16"
    if mnemonic in _VNNI:
        return "avx_vnni" if vex else "avx512_vnni"
    if mnemonic in _BF16:
        return "avx512_bf16"
    if mnemonic in _VBMI:
        return "avx512_vbmi"
    if "%zmm" in operands or re.search(r"%k[0-7]\b", operands) or re.search(r"%[xy]mm(1[6-9]|2\d|3[01])\b", operands):
        return "avx512"
    if mnemonic.startswith(("vfmadd", "vfmsub", "vfnmadd", "vfnmsub")):
        return "fma"
    if mnemonic in ("vcvtph2ps", "vcvtps2ph"):
        return "f16c"
    if mnemonic in _BMI2:
        return "bmi2"
    if (
        mnemonic in _AVX2_INT
        or mnemonic.startswith(("vpbroadcast", "vgather", "vpgather", "vpmaskmov"))
        or ("%ymm" in operands and mnemonic.startswith("vp"))
    ):
        return "avx2"
    if "%ymm" in operands or mnemonic.startswith("v"):
        return "avx"
    if mnemonic in _SSE42:
        return "sse42"
    return None


def _arm_extension(mnemonic: str, operands: str) -> str | None:
    if mnemonic in ("smstart", "smstop") or "za" in operands.split(","):
        return "sme"
    if mnemonic in ("smmla", "ummla", "usmmla"):
        return "i8mm"
    if mnemonic in ("sdot", "udot", "usdot", "sudot") and not re.search(r"\bz\d", operands):
        return "dotprod"
    if re.search(r"\b[zp]\d+", operands) or mnemonic in ("cntb", "cnth", "cntw", "cntd", "ptrue", "whilelo"):
        return "sve"
    if re.search(r"\.\d*h\b", operands) and mnemonic.startswith("f"):
        return "fp16"
    return None


# ---------------------------------------------------------------- checking a build


def check_path(cache: CacheDir, build: Build, cpu: CpuInfo) -> Path:
    return cache.probe / build.cache_key / f"check-{cpu.fingerprint()}.json"


def cached_check(cache: CacheDir, build: Build, cpu: CpuInfo, types: Sequence[str]) -> BuildCheck | None:
    """The check of `build` on this CPU, if it covered every type in `types` with the same runtime flags."""
    try:
        check = read_record(check_path(cache, build, cpu), BuildCheck)
    except (FileNotFoundError, RecordError):
        return None
    if check.repack != build.repack or not set(_types(types)) <= set(check.types):
        return None
    return check


def check_build(build: Build, types: Sequence[str], cache: CacheDir, cpu: CpuInfo) -> BuildCheck:
    """Run the build's tools on the probe model in each of `types`; a passed check is remembered per build and CPU
    (`cached_check`)."""
    wanted = _types(types)
    started = time.monotonic()
    workdir = cache.probe / build.cache_key
    reporter = sigill_reporter(cache)
    results: dict[str, TypeCheck] = {}
    for weight_type in wanted:
        results[weight_type] = check_type(build, weight_type, cache, workdir, reporter=reporter, machine=cpu.machine)
        if not results[weight_type].ok:
            break  # the build is rejected: the other types need not run on it
    check = BuildCheck(
        build_key=build.cache_key, machine=cpu.fingerprint(), cpu=cpu.model, repack=build.repack,
        checked_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), types=results,
    )  # fmt: skip
    if check.ok:
        # The types an earlier passed check of this build on this CPU proved and this one did not run stay proven
        # (a `llamasys build --check` of the default types must not narrow what a wider experiment's check covered).
        earlier = cached_check(cache, build, cpu, ())
        kept = {t: r for t, r in (earlier.types if earlier else {}).items() if t not in results}
        write_record(check_path(cache, build, cpu), check.model_copy(update={"types": {**results, **kept}}))
    logger.info(
        "build check: %s in %.1f s (%s)", "passed" if check.ok else "FAILED", time.monotonic() - started,
        ", ".join(f"{t} {r.describe() if not r.ok else 'ok'}" for t, r in results.items()),
    )  # fmt: skip
    return check


def _types(types: Sequence[str]) -> list[str]:
    """F16 first (the probe model itself), then each other type once, in the order asked."""
    ordered = ["F16"] + [t.upper() for t in types if t.upper() != "F16"]
    return list(dict.fromkeys(ordered))


def check_type(
    build: Build, weight_type: str, cache: CacheDir, workdir: Path, *, reporter: Path | None, machine: str
) -> TypeCheck:
    """One weight type through llama-quantize, llama-perplexity, llama-bench and a llama-server completion."""
    started = time.monotonic()
    logs = workdir / "logs"
    env = {"LD_PRELOAD": str(reporter)} if reporter else None
    try:
        model = _probe_variant(build, weight_type, cache, workdir, env=env)
    except _ToolFailed as failed:
        return _failed(weight_type, failed.run, "llama-quantize", machine, started)
    text = probe_text(cache)
    runs = (
        ("llama-perplexity", ["-m", model, "-f", text, "-c", PROBE_CTX, "-b", PROBE_CTX, "--chunks", 2]),
        ("llama-bench", ["-m", model, "-p", 64, "-n", 8, "-r", 1, "-o", "json"]),
    )
    rates: dict[str, float] = {}
    for tool, args in runs:
        run = build.tools.run(tool, [str(a) for a in args], log_path=logs / f"{weight_type}-{tool}.log", env=env)
        if not run.ok:
            return _failed(weight_type, run, tool, machine, started)
        rates |= llama_bench_rates(run.lines) if tool == "llama-bench" else {}
    server_failure = _server_completion(
        build, model, logs / f"{weight_type}-llama-server.log", env=env, machine=machine
    )
    if server_failure is not None:
        return server_failure.model_copy(update={"type": weight_type, "seconds": round(time.monotonic() - started, 2)})
    return TypeCheck(
        type=weight_type, ok=True, prompt_tps=rates.get("pp"), generation_tps=rates.get("tg"),
        seconds=round(time.monotonic() - started, 2),
    )  # fmt: skip


class _ToolFailed(BuildError):
    """A tool that makes the probe models failed (the check turns it into a TypeCheck; elsewhere it is an error)."""

    def __init__(self, run: ToolRun) -> None:
        super().__init__(str(run.error(BuildError, f"{Path(run.cmd[0]).name} (making a build probe model)")))
        self.run = run


def _probe_variant(build: Build, weight_type: str, cache: CacheDir, workdir: Path, *, env) -> Path:
    base = probe_model(cache)
    if weight_type == "F16":
        return base
    imatrix: Path | None = None
    if weight_type in _NEEDS_IMATRIX:
        imatrix = workdir / ("imatrix.gguf" if build.era == "current" else "imatrix.dat")
        if not imatrix.is_file():
            args = ["-m", str(base), "-f", str(probe_text(cache)), "-o", str(imatrix), "-c", str(PROBE_CTX),
                    "--chunks", "2"]  # fmt: skip
            run = build.tools.run("llama-imatrix", args, log_path=workdir / "logs" / "imatrix.log", env=env)
            if not run.ok:
                raise _ToolFailed(run)
    output = workdir / f"probe-{weight_type}.gguf"

    def quantize(tmp: Path) -> None:
        args = (["--imatrix", str(imatrix)] if imatrix else []) + [str(base), str(tmp), weight_type]
        run = build.tools.run("llama-quantize", args, log_path=workdir / "logs" / f"{weight_type}-quantize.log")
        if not run.ok:
            raise _ToolFailed(run)

    return atomic_file(output, quantize)


def probe_models(build: Build, types: Sequence[str], cache: CacheDir) -> dict[str, Path]:
    """The probe model in each weight type, quantized by `build` (made by the build check already, usually)."""
    return {t: _probe_variant(build, t, cache, cache.probe / build.cache_key, env=None) for t in _types(types)}


def _server_completion(build: Build, model: Path, log_path: Path, *, env, machine: str) -> TypeCheck | None:
    """One /completion of 64 prompt tokens and 8 generated ones, as the load stage sends them; None when it works."""
    sizing = ServerSizing(parallel=1, prompt_tokens=64, output_tokens=8)
    server = LlamaServer(build, model, sizing, log_path=log_path, settings=ServerConfig(startup_timeout_s=60), env=env)
    body = {"prompt": list(range(3, 67)), "n_predict": 8, "ignore_eos": True, "cache_prompt": False}
    try:
        with server:
            answer = server.post_json("/completion", body, timeout_s=120)
            if answer.get("tokens_predicted") not in (None, 8):
                return TypeCheck(type="", ok=False, tool="llama-server", log=str(log_path),
                                 reason=f"generated {answer.get('tokens_predicted')} tokens, asked for 8")  # fmt: skip
    except (HarnessError, urllib.error.URLError, OSError, ValueError) as exc:
        code = server.exit_code
        instruction, extension = _fault(server.log_tail(40), machine)
        return TypeCheck(
            type="", ok=False, tool="llama-server", reason=exit_reason(code) if code is not None else f"failed: {exc}",
            log=str(log_path), command=" ".join(server.command), instruction=instruction, extension=extension,
        )  # fmt: skip
    return None


def _fault(lines: Sequence[str], machine: str) -> tuple[str | None, str | None]:
    """The instruction a SIGILL stopped at and its extension, from the reporter's line in the tool's output."""
    code = fault_bytes(lines)
    if code is None:
        return None, None
    instruction = decode_instruction(code, machine)
    if instruction is None:
        return f"bytes {code.hex(' ')}", None
    return instruction, instruction_extension(instruction, machine)


def _failed(weight_type: str, run: ToolRun, tool: str, machine: str, started: float) -> TypeCheck:
    instruction, extension = _fault(run.lines, machine)
    reason = exit_reason(run.code) if run.signalled else f"exit {run.code}: {run.why()}"
    return TypeCheck(
        type=weight_type, ok=False, tool=tool, reason=reason, command=" ".join(run.cmd), log=str(run.log_path),
        instruction=instruction, extension=extension, seconds=round(time.monotonic() - started, 2),
    )  # fmt: skip


def repack_gain(build: Build, cache: CacheDir) -> tuple[float, float] | None:
    """llama-bench's Q4_0 prompt rate on the probe model with weight repacking on and off (tokens/s), or None when
    this llama-bench cannot switch it (the b3661 era) or a run fails: what the run-time switch would cost."""
    if not build.tools.supports("llama-bench", "--repack"):
        return None
    workdir = cache.probe / build.cache_key
    try:
        model = _probe_variant(build, "Q4_0", cache, workdir, env=None)
    except _ToolFailed:
        return None
    rates = []
    for flag in ("1", "0"):
        args = ["-m", str(model), "-p", "256", "-n", "0", "-r", "3", "-o", "json", "--repack", flag]
        run = build.tools.run("llama-bench", args, log_path=workdir / "logs" / f"repack-{flag}.log")
        rate = llama_bench_rates(run.lines).get("pp") if run.ok else None
        if rate is None:
            return None
        rates.append(rate)
    return rates[0], rates[1]
