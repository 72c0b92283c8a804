"""The CPU a build is for: /proc/cpuinfo -> ggml's CMake options, the decision when a probe dies, signal names."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from harness.build import TypeCheck
from harness.buildcheck import fault_bytes, first_instruction, instruction_extension
from harness.cpu import (
    ARM_EXTENSIONS,
    CpuInfo,
    ProbeOutcome,
    advertised,
    arm_march,
    decide_isa,
    extension_cost,
    parse_cpuinfo,
    tree_options,
)
from harness.errors import BuildError
from harness.llamacpp import cache_key, cmake_configure_args, culprits, fallback_warning, rejection
from harness.process import died_by_signal, exit_reason

DATA = Path(__file__).parent / "data"
SIGILL = ProbeOutcome(ok=False, detail="its probe program was killed by SIGILL: an instruction this CPU cannot execute")


def cpuinfo(name: str, machine: str = "x86_64") -> CpuInfo:
    return parse_cpuinfo((DATA / "cpuinfo" / name).read_text(), machine)


def options(era: str, tmp_path: Path) -> set[str]:
    """The GGML_* options a tree declares, read from its CMakeLists (captured from the b11312 and b3661 trees)."""
    tree = tmp_path / era
    (tree / "ggml").mkdir(parents=True, exist_ok=True)
    (tree / "ggml" / "CMakeLists.txt").write_text((DATA / "ggml" / f"options-{era}.cmake").read_text())
    return tree_options(tree)


# ---------------------------------------------------------------- what the CPU advertises


def test_each_machine_advertises_what_its_flags_say():
    # The AMX machine's flag line is the one the issue reports (an Intel Xeon VM advertising AMX), the AVX2 one is
    # this project's AMD EPYC VM, the ARM one a Graviton3 (Neoverse V1).
    assert [e.name for e in advertised(cpuinfo("xeon-amx.txt"))] == [
        "sse42", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512", "avx512_vbmi", "avx512_vnni",
        "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
    ]  # fmt: skip
    assert [e.name for e in advertised(cpuinfo("epyc-avx2.txt"))] == ["sse42", "avx", "avx2", "fma", "f16c", "bmi2"]
    arm = cpuinfo("graviton3-arm.txt", "aarch64")
    assert [e.name for e in advertised(arm)] == ["dotprod", "fp16", "sve", "i8mm"]
    assert cpuinfo("xeon-amx.txt").model == "Intel(R) Xeon(R) Processor"


def test_a_flag_missing_on_one_core_is_not_advertised():
    text = "processor\t: 0\nflags\t\t: sse4_2 avx avx2\n\nprocessor\t: 1\nflags\t\t: sse4_2 avx\n"
    assert parse_cpuinfo(text, "x86_64").flags == frozenset({"sse4_2", "avx"})


def test_avx512_needs_all_five_of_its_flags():
    partial = CpuInfo("x86_64", "x", frozenset({"avx", "avx2", "avx512f", "avx512bw"}))
    assert "avx512" not in [e.name for e in advertised(partial)]


# ---------------------------------------------------------------- the decision -> CMake options


def test_the_amx_machine_whose_tile_probe_dies_builds_explicitly_without_amx(tmp_path):
    cpu = cpuinfo("xeon-amx.txt")
    probes = {e.name: ProbeOutcome(ok=True) for e in advertised(cpu)} | {"amx_tile": SIGILL, "amx_int8": SIGILL}
    isa = decide_isa(cpu, probes, options=options("b11312", tmp_path))
    assert not isa.native and isa.fingerprint == ""
    assert set(isa.turned_off) == {"amx_tile", "amx_int8", "amx_bf16"}
    assert isa.turned_off["amx_bf16"] == "needs amx_tile"
    args = isa.cmake_args
    assert args[0] == "-DGGML_NATIVE=OFF"
    for on in ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
               "AVX512_BF16"):  # fmt: skip
        assert f"-DGGML_{on}=ON" in args
    for off in ("AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{off}=OFF" in args
    assert "amx_tile" in isa.summary() and "explicit (GGML_NATIVE=OFF)" in isa.summary()


def test_an_amx_machine_whose_probes_all_run_builds_native(tmp_path):
    cpu = cpuinfo("xeon-amx.txt")
    isa = decide_isa(cpu, {e.name: ProbeOutcome(ok=True) for e in advertised(cpu)}, options=options("b11312", tmp_path))
    assert isa.native and isa.cmake_args == ["-DGGML_NATIVE=ON"] and isa.fingerprint == cpu.fingerprint()
    assert "amx_int8" in isa.enabled and not isa.disabled


def test_the_b3661_tree_has_no_amx_so_the_same_machine_builds_it_native(tmp_path):
    cpu = cpuinfo("xeon-amx.txt")
    probes = {e.name: ProbeOutcome(ok=True) for e in advertised(cpu)} | {"amx_tile": SIGILL}
    opts = options("b3661", tmp_path)
    assert "GGML_AMX_TILE" not in opts and "GGML_AVX512_BF16" in opts
    isa = decide_isa(cpu, probes, options=opts)
    assert isa.native and "amx_tile" in isa.disabled and not isa.turned_off
    # Told to build explicitly, it sets only the options that tree knows.
    forced = decide_isa(CpuInfo(cpu.machine, cpu.model, cpu.flags, "setting"), probes, options=opts)
    assert not forced.native and "-DGGML_AVX512=ON" in forced.cmake_args
    assert not any("AMX" in a or "SSE42" in a or "BMI2" in a for a in forced.cmake_args)


def test_an_avx2_machine_builds_native_and_a_fake_avx512_claim_is_caught_by_its_probe(tmp_path):
    cpu = cpuinfo("epyc-avx2.txt")
    ok = {e.name: ProbeOutcome(ok=True) for e in advertised(cpu)}
    assert decide_isa(cpu, ok, options=options("b11312", tmp_path)).native
    # The same CPU given a feature list that claims AVX-512 (llamacpp.cpu_features): the probe of AVX-512 dies.
    fake = CpuInfo(cpu.machine, cpu.model, cpu.flags | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw",
                                                        "avx512_vnni"}, "setting")  # fmt: skip
    isa = decide_isa(fake, ok | {"avx512": SIGILL}, options=options("b11312", tmp_path))
    assert set(isa.turned_off) == {"avx512", "avx512_vnni"} and isa.turned_off["avx512_vnni"] == "needs avx512"
    assert "-DGGML_AVX512=OFF" in isa.cmake_args and "-DGGML_AVX2=ON" in isa.cmake_args


def test_an_extension_a_built_tool_died_on_is_left_out_next_time(tmp_path):
    cpu = cpuinfo("xeon-amx.txt")
    ok = {e.name: ProbeOutcome(ok=True) for e in advertised(cpu)}
    isa = decide_isa(cpu, ok, options=options("b11312", tmp_path), excluded={"avx512_bf16": "llama-bench died"})
    assert not isa.native and isa.turned_off == {"avx512_bf16": "llama-bench died"}
    assert "-DGGML_AVX512_BF16=OFF" in isa.cmake_args


def test_arm_builds_one_march_string():
    assert arm_march(["dotprod", "fp16", "sve", "i8mm"]) == "armv8.6-a+dotprod+fp16+sve+i8mm"
    assert arm_march(["dotprod"]) == "armv8.2-a+dotprod"
    assert arm_march([]) == "armv8-a"
    assert [e.name for e in ARM_EXTENSIONS][-1] == "sme"


def test_arm_machine_with_a_dead_sve_probe(tmp_path):
    cpu = cpuinfo("graviton3-arm.txt", "aarch64")
    probes = {"dotprod": ProbeOutcome(ok=True), "fp16": ProbeOutcome(ok=True), "sve": SIGILL,
              "i8mm": ProbeOutcome(ok=True)}  # fmt: skip
    isa = decide_isa(cpu, probes, options=options("b11312", tmp_path))
    assert isa.cmake_args == ["-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.6-a+dotprod+fp16+i8mm"]


def test_another_architecture_can_only_build_native(tmp_path):
    cpu = CpuInfo("riscv64", "x", frozenset({"v"}), "setting")
    with pytest.raises(BuildError, match="llamacpp.cmake_args"):
        decide_isa(cpu, {}, options=options("b11312", tmp_path))


def test_without_turns_off_what_needs_it_too(tmp_path):
    cpu = cpuinfo("xeon-amx.txt")
    isa = decide_isa(cpu, {}, options=options("b11312", tmp_path))
    assert isa.without(["avx512"]) == {"avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16", "amx_tile",
                                       "amx_int8", "amx_bf16"}  # fmt: skip
    assert isa.without(["amx_tile"]) == {"amx_tile", "amx_int8", "amx_bf16"}


def test_the_native_cache_key_changes_with_the_cpu(tmp_path):
    # A cache copied to another CPU must build again: the native build's key carries the CPU's fingerprint.
    args = cmake_configure_args(era="current", backend="cpu", cuda_architectures="90", build_number=1, commit="c",
                                extra=[], isa=["-DGGML_NATIVE=ON"])  # fmt: skip
    amx, epyc = cpuinfo("xeon-amx.txt"), cpuinfo("epyc-avx2.txt")
    assert amx.fingerprint() != epyc.fingerprint()
    less = CpuInfo(amx.machine, amx.model, amx.flags - {"amx_bf16"})
    assert less.fingerprint() != amx.fingerprint()
    keys = {cache_key("pypi:x", "cpu", "90", args, cpu=c.fingerprint()) for c in (amx, epyc, less)}
    assert len(keys) == 3
    assert cache_key("pypi:x", "cpu", "90", args, cpu=amx.fingerprint()) == cache_key(
        "pypi:x", "cpu", "90", args, cpu=cpuinfo("xeon-amx.txt").fingerprint()
    )


# ---------------------------------------------------------------- after a built tool died


def _died(extension: str | None, instruction: str | None = "tileloadd (%rsi,%rcx,1),%tmm0") -> TypeCheck:
    return TypeCheck(type="Q4_0", ok=False, tool="llama-perplexity", extension=extension, instruction=instruction,
                     reason="killed by SIGILL: an instruction this CPU cannot execute", command="llama-perplexity -m x",
                     log="/tmp/x.log")  # fmt: skip


def test_the_extension_of_the_faulting_instruction_is_left_out_with_what_needs_it(tmp_path):
    cpu = cpuinfo("xeon-amx.txt")
    isa = decide_isa(cpu, {}, options=options("b11312", tmp_path))
    assert culprits(isa, _died("amx_tile")) == {"amx_tile", "amx_int8", "amx_bf16"}
    # An instruction that cannot be placed: everything beyond x86-64-v3 goes.
    assert culprits(isa, _died(None, instruction="bytes 0f 0b")) == set(isa.enabled) - {
        "sse42",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "bmi2",
    }
    avx2 = decide_isa(cpuinfo("epyc-avx2.txt"), {}, options=options("b11312", tmp_path))
    assert culprits(avx2, _died(None)) == set()  # nothing left to leave out: an error, not a loop


def test_the_messages_say_what_was_turned_off_why_and_what_overrides_it(tmp_path):
    cpu = cpuinfo("xeon-amx.txt")
    probes = {"amx_tile": SIGILL}
    isa = decide_isa(cpu, probes, options=options("b11312", tmp_path))
    warning = fallback_warning(isa, (1200.0, 900.0))
    assert "built without amx_tile, amx_int8, amx_bf16" in warning and "killed by SIGILL" in warning
    assert "AMX tiles" in warning and "1,200 tokens/s against 900" in warning and "llamacpp.cpu_features" in warning
    error = rejection(isa, _died("avx512_bf16", "vdpbf16ps %zmm1,%zmm2,%zmm3"))
    assert "the instruction set avx512_bf16" in error and "llamacpp.cpu_features" in error
    assert "llamacpp.cmake_args" in error and "even without amx_tile" in error and "/tmp/x.log" in error


def test_a_reason_shared_by_several_extensions_is_said_once(tmp_path):
    # The AMX machine: the build's own check found llama-perplexity killed by SIGILL in a tile instruction, and
    # every AMX extension was left out for it. The summary the report prints says that sentence once.
    cpu = cpuinfo("xeon-amx.txt")
    ok = {e.name: ProbeOutcome(ok=True) for e in advertised(cpu)}
    why = "llama-perplexity on the Q4_K_M probe model was killed by SIGILL at `tilezero %tmm4`"
    isa = decide_isa(cpu, ok, options=options("b11312", tmp_path),
                     excluded=dict.fromkeys(("amx_tile", "amx_int8", "amx_bf16"), why))  # fmt: skip
    summary = isa.summary()
    assert summary.count("killed by SIGILL") == 1
    assert summary.endswith(f"; off: amx_tile, amx_int8, amx_bf16 ({why})")
    assert fallback_warning(isa).count("killed by SIGILL") == 1


def test_extension_costs_are_one_clause_per_family():
    assert extension_cost(["amx_tile", "amx_int8"]).count("AMX tiles") == 1
    assert "AVX2 kernels" in extension_cost(["avx512"])


# ---------------------------------------------------------------- reading the fault


def _objdump_lines() -> list[tuple[str, str | None]]:
    rows = []
    for line in (DATA / "objdump-x86.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        text, expected = line.rsplit("\t", 1)
        rows.append((text, None if expected == "-" else expected))
    return rows


@pytest.mark.parametrize(("line", "expected"), _objdump_lines())
def test_each_captured_instruction_is_placed_in_its_extension(line, expected):
    # objdump numbers the instruction at offset 0 of the bytes it is given; the captured lines are renumbered to 0.
    renumbered = "   0:" + line.split(":", 1)[1]
    instruction = first_instruction(renumbered)
    assert instruction is not None and "#" not in instruction
    assert instruction_extension(instruction, "x86_64") == expected


def test_arm_instructions_are_placed():
    assert instruction_extension("sdot v0.4s, v1.16b, v2.16b", "aarch64") == "dotprod"
    assert instruction_extension("smmla v0.4s, v1.16b, v2.16b", "aarch64") == "i8mm"
    assert instruction_extension("ld1b {z0.b}, p0/z, [x0]", "aarch64") == "sve"
    assert instruction_extension("smstart", "aarch64") == "sme"
    assert instruction_extension("fadd v0.8h, v1.8h, v2.8h", "aarch64") == "fp16"


def test_the_reporters_line_gives_the_bytes():
    lines = ["0.00.1 I llama threadpool init", "", "llamasys-sigill pc=0x55d0c1a2b3c4 bytes=c4e27b4b040e0000"]
    assert fault_bytes(lines) == bytes.fromhex("c4e27b4b040e0000")
    assert fault_bytes(["no fault here"]) is None


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (-signal.SIGILL, "killed by SIGILL: an instruction this CPU cannot execute"),
        (-signal.SIGKILL, "killed by SIGKILL: out of memory?"),
        (-signal.SIGSEGV, "killed by SIGSEGV: an invalid memory access"),
        (-signal.SIGBUS, "killed by SIGBUS: a bad memory access"),
        (-signal.SIGABRT, "killed by SIGABRT: the tool aborted"),
        (-signal.SIGFPE, "killed by SIGFPE: an arithmetic error"),
        (-signal.SIGTERM, "killed by SIGTERM: asked to stop"),
        (128 + signal.SIGILL, "killed by SIGILL"),  # as a shell reports it (make: Error 132)
        (1, "exit 1"),
        (0, "exit 0"),
        (-signal.SIGUSR1, "killed by SIGUSR1"),
    ],
)
def test_a_death_by_signal_is_named_with_its_meaning(code, text):
    assert exit_reason(code).startswith(text)


def test_died_by_signal_reads_both_conventions():
    assert died_by_signal(-4, signal.SIGILL) and died_by_signal(132, signal.SIGILL)
    assert not died_by_signal(4, signal.SIGILL) and not died_by_signal(None, signal.SIGILL)
