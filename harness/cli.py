"""The `llamasys` command line: parses options into an `Experiment` and runs one stage or all of them.

Errors raised below become one line on stderr and an exit code here, and nowhere else.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness import console
from harness.build import Build
from harness.config import Experiment, load_experiment
from harness.cpu import CpuInfo
from harness.errors import ConfigError, HarnessError
from harness.pipeline import STAGES
from harness.storage import disk_error, sole_writer

DEMO_EXPERIMENT = Path(__file__).parent / "experiments" / "demo.toml"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-e", "--experiment", type=Path, metavar="TOML",
                        help="experiment file (default: built-in defaults, the original study's settings)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set llamacpp.backend=cuda (repeatable)")  # fmt: skip
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<experiment name>)")
    parser.add_argument(
        "--cache-dir", type=Path, help="cache for builds, sources and models (default: ~/.cache/llamasys)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (messages only)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors (no bars, no messages)")


def _build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("pypi", "git", "local", "prebuilt"), help="where llama.cpp comes from")
    parser.add_argument("--ref", help="git tag/commit, or llama-cpp-python version for --source pypi")
    parser.add_argument("--path", type=Path, help="local source tree or prebuilt binary directory")
    parser.add_argument("--backend", choices=("cpu", "cuda"), help="compute backend to build for")
    parser.add_argument("--cuda-architectures", metavar="LIST", help="e.g. 90 (H100), '80;86', native")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamasys",
        description="Measure what 4-bit quantization costs in quality and buys in speed on llama.cpp.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="build llama.cpp (cached) and print where the binaries are")
    _common(p)
    _build_options(p)
    p.add_argument(
        "--install-to",
        type=Path,
        metavar="DIR",
        help="also copy the binaries and source tree to DIR (then usable as --source prebuilt --path DIR)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="probe the build again on this machine and print the CPU's features, the instruction sets the build "
        "uses, and each weight type's result and llama-bench rates (the first thing to run when something is "
        "slow or crashes)",
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="llama-server for a model plus the Locust web UI on 127.0.0.1 (until Ctrl-C)")
    _common(p)
    _build_options(p)
    p.add_argument("--model", type=Path, required=True, help="GGUF file to serve")
    p.add_argument("--port", type=int, help="llama-server port (default: 8080 if free, else any free port)")
    p.add_argument("--web-port", type=int, default=8089, help="Locust web UI port (default: 8089)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="the whole pipeline: build, models, MMLU + KLD, load, report")
    _common(p)
    p.add_argument("experiment_file", nargs="?", type=Path, metavar="EXPERIMENT.toml", help="same as -e")
    p.set_defaults(func=cmd_run, stages=STAGES)

    for stage, text in (
        ("models", "convert the model to F16 GGUF and make the quantized variants"),
        ("mmlu", "MMLU and KL divergence of every variant against the baseline"),
        ("load", "Locust load on llama-server for every variant at each concurrency step"),
        ("tune", "llama-server settings for the most users within [slo], quality guarded (needs [tune])"),
    ):
        p = sub.add_parser(stage, help=f"one stage: {text} (earlier stages reused or run as needed)")
        _common(p)
        # `llamasys mmlu` is MMLU and KL divergence (two stages of the pipeline); `tune` starts from the load's.
        more = {"mmlu": ("kld",), "tune": ("load",)}.get(stage, ())
        chosen = ("build", "models", stage, *more, "report")
        p.set_defaults(func=cmd_run, stages=tuple(s for s in STAGES if s in chosen))

    p = sub.add_parser("report", help="re-render report.html from results.json; several run dirs go side by side")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="offline end-to-end run on the small demo model (CPU), then print the report path")
    _common(p)
    p.set_defaults(func=cmd_run, stages=STAGES, default_experiment=DEMO_EXPERIMENT)
    return parser


def experiment_from_args(args: argparse.Namespace, *, default: Path | None = None) -> Experiment:
    """The experiment file (or `default`) under the environment, `--set` and this command's own options."""
    values: dict[str, object] = {}
    for option, key in (("source", "llamacpp.source"), ("ref", "llamacpp.ref"), ("backend", "llamacpp.backend"),
                        ("cuda_architectures", "llamacpp.cuda_architectures")):  # fmt: skip
        if getattr(args, option, None) is not None:
            values[key] = getattr(args, option)
    if getattr(args, "path", None) is not None:
        values["llamacpp.path"] = args.path.resolve()
    if args.run_dir is not None:
        values["run_dir"] = args.run_dir
    if args.cache_dir is not None:
        values["cache_dir"] = args.cache_dir.resolve()
    return load_experiment(args.experiment or default, overrides=args.overrides, values=values)


def cmd_build(args: argparse.Namespace) -> int:
    from harness.llamacpp import ensure_build

    exp = experiment_from_args(args)
    started = time.monotonic()
    build = ensure_build(exp.llamacpp, exp.resolved_cache_dir(), exp.weight_types, recheck=args.check)
    print(f"llama.cpp build {build.build_number} ({build.commit}), {build.backend}, from {build.source}")
    print(f"binaries: {build.bin_dir}  ({time.monotonic() - started:.1f} s)")
    if args.check:
        from harness.cpu import this_cpu

        print(check_report(build, this_cpu(exp.llamacpp.cpu_features)))
    if args.install_to is not None:
        from harness.llamacpp import install_build

        installed = install_build(build, args.install_to)
        print(f"installed: {installed.bin_dir} (use --source prebuilt --path {args.install_to.resolve()})")
    return 0


def check_report(build: Build, cpu: CpuInfo) -> str:
    """`llamasys build --check`: the CPU, the instruction sets and why, and every weight type's probe result."""
    from harness.cpu import advertised

    isa = build.isa
    origin = "/proc/cpuinfo" if cpu.source == "cpuinfo" else "llamacpp.cpu_features"
    lines = [f"CPU: {cpu.model} ({cpu.machine}; features from {origin})",
             f"  advertises, of what ggml uses: {' '.join(e.name for e in advertised(cpu)) or 'none'}"]  # fmt: skip
    if isa is not None:
        for name, outcome in isa.probes.items():
            lines.append(f"  probe {name}: {'runs' if outcome.ok else outcome.detail}")
        lines.append(f"instruction sets of the build: {isa.summary()}")
        lines.append(f"  CMake: {' '.join(isa.cmake_args) or '(ggml defaults)'}")
    else:
        lines.append("instruction sets of the build: not recorded (a prebuilt build)")
    if not build.repack:
        lines.append("  run time: weight repacking off (--no-repack): this CPU cannot run the repacked kernels")
    if build.check is None:
        lines.append("check: not run here (a GPU build on a machine without a GPU)")
        return "\n".join(lines)
    lines.append(f"check on this machine ({build.check.checked_at}): {'passed' if build.check.ok else 'FAILED'}")
    lines.append(f"  {'type':<8} {'result':<10} {'pp64 tok/s':>12} {'tg8 tok/s':>10}   (the probe model's rates)")
    for t in build.check.types.values():
        pp = f"{t.prompt_tps:,.0f}" if t.prompt_tps else "-"
        tg = f"{t.generation_tps:,.0f}" if t.generation_tps else "-"
        lines.append(f"  {t.type:<8} {'ok' if t.ok else 'failed':<10} {pp:>12} {tg:>10}")
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    from harness.context import RunContext
    from harness.llamacpp import ensure_build
    from harness.loadtest import serve_with_web_ui
    from harness.server import free_port

    exp = experiment_from_args(args)
    if args.run_dir is None and args.experiment is None:
        # Named after what is served, not after the default experiment: runs/serve-<model>.
        exp = exp.model_copy(update={"run_dir": Path("runs") / f"serve-{args.model.stem}"})
    port = args.port or exp.server.port
    if port is None:
        port = 8080 if _port_free(exp.server.host, 8080) else free_port(exp.server.host)
    build = ensure_build(exp.llamacpp, exp.resolved_cache_dir())
    print(f"llama-server: {max(exp.load.steps)} slots of {exp.load.prompt_tokens} + {exp.load.output_tokens} tokens")
    ctx = RunContext.of(exp, build)
    with sole_writer(ctx.run.root):
        serve_with_web_ui(ctx, args.model.absolute(), port=port, web_port=args.web_port, echo=_echo)
    return 0


def _echo(text: str) -> None:
    print(text, flush=True)


def _port_free(host: str, port: int) -> bool:
    from harness.errors import ServerError
    from harness.server import check_port_free

    try:
        check_port_free(host, port)
    except ServerError:
        return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    from harness.manifest import ManifestRecord, stage_times, time_table
    from harness.pipeline import run_pipeline
    from harness.records import read_record

    if getattr(args, "experiment_file", None) is not None:
        if args.experiment is not None:
            raise ConfigError("give the experiment file once: either -e FILE or the positional argument")
        args.experiment = args.experiment_file
    exp = experiment_from_args(args, default=getattr(args, "default_experiment", None))
    run = run_pipeline(exp, stages_to_run=args.stages)
    print(time_table(stage_times(read_record(run.manifest, ManifestRecord))))
    if "report" in args.stages and run.report.is_file():
        print(f"open the report: {run.report.resolve()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.pipeline import rerender

    print(f"report: {rerender(args.run_dirs).resolve()}")
    return 0


def _raise_on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM/SIGHUP into an exception so every context manager stops the servers it started.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    console.configure(progress=not getattr(args, "no_progress", False), quiet=getattr(args, "quiet", False))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_sigterm)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except HarnessError as exc:
        print(f"llamasys: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        disk = disk_error(exc)
        if disk is None:
            raise
        print(f"llamasys: error: {disk}", file=sys.stderr)
        return disk.exit_code
    except KeyboardInterrupt:
        print("llamasys: interrupted; finished work is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
