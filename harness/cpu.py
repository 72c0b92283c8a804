"""The CPU a llama.cpp build is for: the instruction-set extensions it advertises, which of them it really executes,
and the ggml CMake options that build for exactly those.

A CPU, or the virtual machine around it, may advertise an extension it cannot execute (AMX inside some VMs):
`-march=native` compiles it in and the first such instruction kills the tool with SIGILL. So before compiling, one
tiny program per extension ggml uses is compiled and run in a child process (`probe_extensions`); an extension whose
program dies is left out and the build names the others explicitly (GGML_NATIVE=OFF), as `decide_isa` says. The
built tools are then probed too (`harness.buildcheck`), which catches what these programs cannot.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock
from pydantic import Field

from harness.errors import BuildError, ToolMissingError
from harness.process import exit_reason
from harness.records import Record, RecordError, read_record, write_record

# /proc/cpuinfo's flag line: "flags" on x86, "Features" on ARM.
_FLAG_LINE = re.compile(r"^(flags|Features)\s*:\s*(.*)$", re.MULTILINE)
_MODEL_LINE = re.compile(r"^(model name|Model|CPU part)\s*:\s*(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Extension:
    """One instruction-set extension ggml can use: what /proc/cpuinfo calls it, how ggml's CMake turns it on, and a
    few statements that execute one of its instructions (its probe)."""

    name: str
    flags: tuple[str, ...]  # every one of these in /proc/cpuinfo means the CPU advertises it
    options: tuple[str, ...]  # x86: ggml CMake options; ARM: the -march tag GGML_CPU_ARM_ARCH gets
    cflags: tuple[str, ...]  # compiler flags the probe needs
    probe: str  # C statements; exit code 3 means the kernel refused the extension's state
    requires: tuple[str, ...] = ()
    arch_level: str = ""  # ARM: the lowest -march level that has it


_ZMM = '__asm__ volatile("vpxord %%zmm0, %%zmm0, %%zmm0" ::: "xmm0");\n'
# AMX needs the kernel's permission for the tile data state, then a tile configuration (palette 1, three 16x64-byte
# tiles), as ggml's own AMX code does before its first tile load.
_AMX_SETUP = r"""
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return 3;
    static struct { unsigned char palette, start, reserved[14]; unsigned short colsb[16]; unsigned char rows[16]; }
        __attribute__((aligned(64))) cfg;
    static unsigned char buf[16 * 64] __attribute__((aligned(64)));
    cfg.palette = 1;
    for (int i = 0; i < 3; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
    __asm__ volatile("ldtilecfg %0" :: "m"(cfg));
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm0" :: "r"(buf), "r"(64L));
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm1" :: "r"(buf), "r"(64L));
"""
_AMX_END = '    __asm__ volatile("tilerelease");\n'

X86_EXTENSIONS: tuple[Extension, ...] = (
    Extension("sse42", ("sse4_2",), ("GGML_SSE42",), ("-msse4.2",),
              'unsigned x = 1; __asm__ volatile("crc32l %0, %0" : "+r"(x));'),
    Extension("avx", ("avx",), ("GGML_AVX",), ("-mavx",),
              '__asm__ volatile("vxorps %%ymm0, %%ymm0, %%ymm0\\n\\tvaddps %%ymm0, %%ymm0, %%ymm0" ::: "xmm0");'),
    Extension("avx2", ("avx2",), ("GGML_AVX2",), ("-mavx2",),
              '__asm__ volatile("vpxor %%ymm0, %%ymm0, %%ymm0\\n\\tvpaddd %%ymm0, %%ymm0, %%ymm0" ::: "xmm0");',
              requires=("avx",)),
    Extension("fma", ("fma",), ("GGML_FMA",), ("-mfma",),
              '__asm__ volatile("vfmadd231ps %%ymm0, %%ymm0, %%ymm0" ::: "xmm0");', requires=("avx",)),
    Extension("f16c", ("f16c",), ("GGML_F16C",), ("-mf16c",),
              '__asm__ volatile("vcvtph2ps %%xmm0, %%ymm0" ::: "xmm0");', requires=("avx",)),
    Extension("bmi2", ("bmi2",), ("GGML_BMI2",), ("-mbmi2",),
              'unsigned long x = 5; __asm__ volatile("pdep %0, %0, %0" : "+r"(x));'),
    Extension("avx_vnni", ("avx_vnni",), ("GGML_AVX_VNNI",), ("-mavxvnni",),
              '__asm__ volatile("%{vex%} vpdpbusd %%ymm0, %%ymm0, %%ymm0" ::: "xmm0");', requires=("avx2",)),
    Extension("avx512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), ("GGML_AVX512",),
              ("-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw"),
              _ZMM + '__asm__ volatile("vpaddb %%zmm0, %%zmm0, %%zmm0\\n\\tkmovq %%k0, %%rax" ::: "xmm0", "rax");',
              requires=("avx2",)),
    Extension("avx512_vbmi", ("avx512vbmi",), ("GGML_AVX512_VBMI",), ("-mavx512vbmi",),
              _ZMM + '__asm__ volatile("vpermb %%zmm0, %%zmm0, %%zmm0" ::: "xmm0");', requires=("avx512",)),
    Extension("avx512_vnni", ("avx512_vnni",), ("GGML_AVX512_VNNI",), ("-mavx512vnni",),
              _ZMM + '__asm__ volatile("vpdpbusd %%zmm0, %%zmm0, %%zmm0" ::: "xmm0");', requires=("avx512",)),
    Extension("avx512_bf16", ("avx512_bf16",), ("GGML_AVX512_BF16",), ("-mavx512bf16",),
              _ZMM + '__asm__ volatile("vdpbf16ps %%zmm0, %%zmm0, %%zmm0" ::: "xmm0");', requires=("avx512",)),
    Extension("amx_tile", ("amx_tile",), ("GGML_AMX_TILE",), ("-mamx-tile",), _AMX_SETUP + _AMX_END,
              requires=("avx512",)),
    # ggml's AMX matrix code is compiled only with AVX512-VNNI as well.
    Extension("amx_int8", ("amx_int8",), ("GGML_AMX_INT8",), ("-mamx-tile", "-mamx-int8"),
              _AMX_SETUP + '    __asm__ volatile("tdpbssd %%tmm1, %%tmm0, %%tmm2" :::);\n' + _AMX_END,
              requires=("amx_tile", "avx512_vnni")),
    Extension("amx_bf16", ("amx_bf16",), ("GGML_AMX_BF16",), ("-mamx-tile", "-mamx-bf16"),
              _AMX_SETUP + '    __asm__ volatile("tdpbf16ps %%tmm1, %%tmm0, %%tmm2" :::);\n' + _AMX_END,
              requires=("amx_tile",)),
)  # fmt: skip

# ARM: with GGML_NATIVE=OFF ggml takes one -march string (GGML_CPU_ARM_ARCH); each extension adds its tag and raises
# the level to the first that has it, as ggml's own CPU variants do.
ARM_EXTENSIONS: tuple[Extension, ...] = (
    Extension("dotprod", ("asimddp",), ("+dotprod",), ("-march=armv8.2-a+dotprod",),
              '__asm__ volatile("sdot v0.4s, v1.16b, v2.16b" ::: "v0");', arch_level="armv8.2-a"),
    Extension("fp16", ("fphp", "asimdhp"), ("+fp16",), ("-march=armv8.2-a+fp16",),
              '__asm__ volatile("fadd v0.8h, v1.8h, v2.8h" ::: "v0");', arch_level="armv8.2-a"),
    Extension("sve", ("sve",), ("+sve",), ("-march=armv8.2-a+sve",),
              'long n; __asm__ volatile("cntb %0" : "=r"(n));', arch_level="armv8.2-a"),
    Extension("i8mm", ("i8mm",), ("+i8mm",), ("-march=armv8.6-a+i8mm",),
              '__asm__ volatile("smmla v0.4s, v1.16b, v2.16b" ::: "v0");', arch_level="armv8.6-a"),
    Extension("sve2", ("sve2",), ("+sve2",), ("-march=armv8.6-a+sve2",),
              '__asm__ volatile("ptrue p0.b\\n\\tsqrdmlah z0.b, z1.b, z2.b" ::: "p0", "z0");',
              requires=("sve",), arch_level="armv8.6-a"),
    Extension("sme", ("sme",), ("+sme",), ("-march=armv9.2-a+sme",),
              '__asm__ volatile("smstart\\n\\tsmstop");', arch_level="armv9.2-a"),
)  # fmt: skip

_ARM_LEVELS = ("armv8-a", "armv8.2-a", "armv8.6-a", "armv9.2-a")

# What x86-64 CPUs of the last decade run (x86-64-v3) and ARMv8.2's common extensions: kept when a built tool dies
# on an instruction that cannot be placed, while everything beyond them is left out.
PORTABLE_EXTENSIONS = frozenset({"sse42", "avx", "avx2", "fma", "f16c", "bmi2", "dotprod", "fp16"})

# What leaving an extension out costs, in words (the figures on this machine: `llamasys build --check`).
_COSTS = (
    ("amx", "quantized matrix products use the AVX-512 or AVX2 kernels instead of AMX tiles, so prompt processing "
            "is slower than on a CPU whose AMX works, while generation (bound by memory bandwidth) hardly changes"),
    ("avx512", "the AVX2 kernels are used instead: prompt processing is slower than with working AVX-512, "
               "generation hardly changes"),
    ("avx_vnni", "int8 dot products use plain AVX2: quantized prompt processing is a little slower"),
    ("", "the kernels of the extensions left are used instead"),
)  # fmt: skip


def extension_cost(names: Iterable[str]) -> str:
    """What building without `names` costs, one clause per family."""
    clauses = []
    for name in names:
        clause = next(text for prefix, text in _COSTS if name.startswith(prefix))
        if clause not in clauses:
            clauses.append(clause)
    return "; ".join(clauses)


def extensions_for(machine: str) -> tuple[Extension, ...]:
    """The extensions ggml can use on `machine` (platform.machine()); other architectures build native only."""
    if machine in ("x86_64", "AMD64", "amd64", "i686"):
        return X86_EXTENSIONS
    if machine in ("aarch64", "arm64"):
        return ARM_EXTENSIONS
    return ()


# ---------------------------------------------------------------- what the CPU says (pure, unit-tested)


@dataclass(frozen=True)
class CpuInfo:
    """What a machine's CPU says about itself: the flags every core advertises, its model, the architecture."""

    machine: str
    model: str
    flags: frozenset[str]
    source: Literal["cpuinfo", "setting"] = "cpuinfo"

    def fingerprint(self) -> str:
        """Identity of this CPU as far as a native build and the probes are concerned: its flags, its model, the
        kernel (which grants or refuses register state such as AMX's) and the probe programs themselves."""
        payload = {
            "machine": self.machine, "model": self.model, "flags": sorted(self.flags), "source": self.source,
            "kernel": platform.release(), "probes": _probe_table_digest(extensions_for(self.machine)),
        }  # fmt: skip
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """/proc/cpuinfo -> the flags every processor advertises (a core without one cannot be relied on) and the model."""
    flag_sets = [frozenset(m.group(2).split()) for m in _FLAG_LINE.finditer(text)]
    flags = frozenset.intersection(*flag_sets) if flag_sets else frozenset()
    model = next((m.group(2).strip() for m in _MODEL_LINE.finditer(text)), "") or platform.processor() or "unknown"
    return CpuInfo(machine=machine, model=model, flags=flags)


def this_cpu(features: Sequence[str] | None = None) -> CpuInfo:
    """This machine's CPU; `features` (llamacpp.cpu_features) replaces what it advertises."""
    machine = platform.machine()
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"), machine)
    except OSError:
        info = CpuInfo(machine=machine, model=platform.processor() or "unknown", flags=frozenset())
    if features is not None:
        return CpuInfo(machine=machine, model=info.model, flags=frozenset(features), source="setting")
    return info


def advertised(cpu: CpuInfo) -> list[Extension]:
    """The extensions ggml uses whose every flag the CPU advertises."""
    return [e for e in extensions_for(cpu.machine) if all(f in cpu.flags for f in e.flags)]


def tree_options(tree: Path) -> set[str]:
    """The GGML_* options a llama.cpp tree's CMake declares (the b3661 era has no SSE42, BMI2, AVX_VNNI or AMX)."""
    found: set[str] = set()
    for cmake in (tree / "ggml" / "CMakeLists.txt", tree / "CMakeLists.txt"):
        if cmake.is_file():
            text = cmake.read_text(encoding="utf-8", errors="replace")
            found |= set(re.findall(r"option\s*\(\s*(GGML_\w+)", text))
            found |= set(re.findall(r"set\s*\(\s*(GGML_CPU_ARM_ARCH)\b", text))
    return found


# ---------------------------------------------------------------- the decision (pure, unit-tested)


class ProbeOutcome(Record):
    """What one extension's probe program did: ran (ok), died (why), or could not be compiled."""

    ok: bool
    detail: str = ""


class IsaDecision(Record):
    """The instruction sets a CPU build uses, and why: stored in the build record, the manifest and the report."""

    machine: str
    cpu: str
    source: Literal["cpuinfo", "setting", "backend"]
    fingerprint: str = ""  # of the CPU a native build is for (part of its cache key)
    native: bool
    enabled: list[str] = Field(default_factory=list)
    disabled: dict[str, str] = Field(default_factory=dict)  # extension -> why it is off
    probes: dict[str, ProbeOutcome] = Field(default_factory=dict)
    cmake_args: list[str] = Field(default_factory=list)
    # The disabled extensions this llama.cpp tree could have used: what the build lacks because of this CPU.
    turned_off: dict[str, str] = Field(default_factory=dict)

    def summary(self) -> str:
        """One line for people: what the build uses and, when something is off, why."""
        if self.source == "backend":
            return "CPU part at ggml's portable defaults (a GPU build is for another machine's CPU)"
        line = self.uses()
        if self.disabled:
            line += "; off: " + reasons_once(self.disabled)
        return line

    def uses(self) -> str:
        """How the build is made and the extensions it uses (the summary without what is off and why)."""
        how = "native (-march=native)" if self.native else "explicit (GGML_NATIVE=OFF)"
        return f"{how}: {' '.join(self.enabled) or 'no extensions'}"

    def without(self, names: Iterable[str]) -> set[str]:
        """The enabled extensions to turn off for `names`: those, and every enabled one that needs one of them."""
        requires = {e.name: e.requires for e in extensions_for(self.machine)}
        off = set(names) & set(self.enabled)
        grew = True
        while grew:
            needing = {n for n in self.enabled if n not in off and any(r in off for r in requires.get(n, ()))}
            off |= needing
            grew = bool(needing)
        return off


def reasons_once(why: Mapping[str, str]) -> str:
    """Extensions and why each is off, every reason said once: `amx_tile, amx_int8, amx_bf16 (llama-perplexity ...
    was killed by SIGILL ...)`, not the same sentence three times."""
    names: dict[str, list[str]] = {}
    for name, reason in why.items():
        names.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(group)} ({reason})" for reason, group in names.items())


def decide_isa(
    cpu: CpuInfo,
    probes: Mapping[str, ProbeOutcome],
    *,
    options: set[str],
    excluded: Mapping[str, str] | None = None,
) -> IsaDecision:
    """Which extensions the build uses: every advertised one whose probe ran, whose requirements are on, and that no
    earlier probe of built tools excluded (`excluded`: name -> why). The build is native when nothing that this tree
    can use is off and the features were not given by hand; otherwise every option is set explicitly."""
    excluded = excluded or {}
    table = advertised(cpu)
    enabled: list[str] = []
    disabled: dict[str, str] = {}
    for ext in table:
        outcome = probes.get(ext.name)
        missing = [r for r in ext.requires if r not in enabled]
        if ext.name in excluded:
            disabled[ext.name] = excluded[ext.name]
        elif outcome is not None and not outcome.ok:
            disabled[ext.name] = outcome.detail
        elif missing:
            disabled[ext.name] = f"needs {', '.join(missing)}"
        else:
            enabled.append(ext.name)
    turned_off = {n: why for n, why in disabled.items() if _usable(cpu.machine, n, options)}
    native = cpu.source == "cpuinfo" and not turned_off
    return IsaDecision(
        machine=cpu.machine, cpu=cpu.model, source=cpu.source, native=native, enabled=enabled, disabled=disabled,
        probes=dict(probes), fingerprint=cpu.fingerprint() if native else "", turned_off=turned_off,
        cmake_args=["-DGGML_NATIVE=ON"] if native else explicit_cmake_args(cpu.machine, enabled, options),
    )  # fmt: skip


def _usable(machine: str, name: str, options: set[str]) -> bool:
    ext = next((e for e in extensions_for(machine) if e.name == name), None)
    if ext is None:
        return False
    if extensions_for(machine) is ARM_EXTENSIONS:
        return "GGML_CPU_ARM_ARCH" in options
    return any(o in options for o in ext.options)


def explicit_cmake_args(machine: str, enabled: Sequence[str], options: set[str]) -> list[str]:
    """GGML_NATIVE=OFF and each extension's option ON or OFF (x86), or the -march string (ARM)."""
    table = extensions_for(machine)
    if table is X86_EXTENSIONS:
        args = ["-DGGML_NATIVE=OFF"]
        for ext in table:
            args += [f"-D{o}={'ON' if ext.name in enabled else 'OFF'}" for o in ext.options if o in options]
        return args
    if table is ARM_EXTENSIONS and "GGML_CPU_ARM_ARCH" in options:
        return ["-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={arm_march(enabled)}"]
    raise BuildError(
        f"this llama.cpp tree cannot be built for a chosen instruction set on {machine} (only -march=native); "
        "set llamacpp.cmake_args to the compiler flags this CPU runs"
    )


def arm_march(enabled: Sequence[str]) -> str:
    """`armv8.6-a+dotprod+fp16+sve+i8mm` from the enabled ARM extensions (the lowest level that has them all)."""
    chosen = [e for e in ARM_EXTENSIONS if e.name in enabled]
    level = max((_ARM_LEVELS.index(e.arch_level) for e in chosen), default=0)
    return _ARM_LEVELS[level] + "".join(e.options[0] for e in chosen)


# ---------------------------------------------------------------- the probe programs (run in child processes)


def _probe_table_digest(table: Sequence[Extension]) -> str:
    text = json.dumps([(e.name, e.cflags, e.probe) for e in table])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def probe_source(ext: Extension) -> str:
    return f"#include <unistd.h>\n#include <sys/syscall.h>\nint main(void) {{\n{ext.probe}\n    return 0;\n}}\n"


def c_compiler(environ: Mapping[str, str] | None = None) -> str:
    """The C compiler CMake would use: $CC, else cc, gcc or clang on PATH."""
    env = os.environ if environ is None else environ
    for name in (env.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name, path=env.get("PATH")):
            return name
    raise ToolMissingError("no C compiler found; install one (e.g. apt-get install gcc) to build llama.cpp")


def probe_extensions(
    extensions: Sequence[Extension], *, compiler: str, timeout_s: float = 20.0
) -> dict[str, ProbeOutcome]:
    """Compile and run each extension's probe program in a child process: a few seconds in all."""
    results: dict[str, ProbeOutcome] = {}
    with tempfile.TemporaryDirectory(prefix="llamasys-isa-") as scratch:
        for ext in extensions:
            source = Path(scratch) / f"{ext.name}.c"
            exe = Path(scratch) / ext.name
            source.write_text(probe_source(ext), encoding="utf-8")
            built = subprocess.run(
                [compiler, "-O0", *ext.cflags, "-o", str(exe), str(source)], capture_output=True, text=True,
                timeout=120, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if built.returncode != 0:
                why = (built.stderr.strip().splitlines() or ["no output"])[-1][:160]
                results[ext.name] = ProbeOutcome(ok=False, detail=f"the compiler cannot build it ({why})")
                continue
            try:
                ran = subprocess.run([str(exe)], capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                results[ext.name] = ProbeOutcome(ok=False, detail=f"its probe did not finish in {timeout_s:.0f} s")
                continue
            results[ext.name] = _outcome(ran.returncode)
    return results


def _outcome(code: int) -> ProbeOutcome:
    if code == 0:
        return ProbeOutcome(ok=True)
    if code == 3:
        return ProbeOutcome(ok=False, detail="the kernel does not grant its register state (arch_prctl refused)")
    return ProbeOutcome(ok=False, detail=f"its probe program was {exit_reason(code)}")


# ---------------------------------------------------------------- what is known of this CPU (cached per fingerprint)


class CpuRecord(Record):
    """<cache>/cpu/<fingerprint>.json: the probe programs' outcomes, and the extensions a built tool died on."""

    machine: str
    cpu: str
    source: Literal["cpuinfo", "setting"]
    flags: list[str]
    probed: bool = False
    probes: dict[str, ProbeOutcome] = Field(default_factory=dict)
    excluded: dict[str, str] = Field(default_factory=dict)  # name -> why (found by the post-build check)


def cpu_record_path(cache_root: Path, cpu: CpuInfo) -> Path:
    return cache_root / "cpu" / f"{cpu.fingerprint()}.json"


def known_cpu(cpu: CpuInfo, cache_root: Path, *, probe: bool) -> CpuRecord:
    """What is known of `cpu`: its extensions' probe programs run once (a few seconds) and remembered, so that a
    warm build decides without a compiler."""
    path = cpu_record_path(cache_root, cpu)
    try:
        record = read_record(path, CpuRecord)
    except (FileNotFoundError, RecordError):
        record = CpuRecord(machine=cpu.machine, cpu=cpu.model, source=cpu.source, flags=sorted(cpu.flags))
    if probe and not record.probed:
        record.probes = probe_extensions(advertised(cpu), compiler=c_compiler())
        record.probed = True
        write_record(path, record)
    return record


def exclude_extensions(cpu: CpuInfo, cache_root: Path, reasons: Mapping[str, str]) -> None:
    """Remember that a built tool could not run these extensions on `cpu`, so the next decision leaves them out."""
    path = cpu_record_path(cache_root, cpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        record = known_cpu(cpu, cache_root, probe=False)
        record.excluded.update(reasons)
        write_record(path, record)
