"""Benchmark: what weight repacking is worth on this CPU, i.e. what the run-time switch `--no-repack` would cost.

A CPU that advertises AMX it cannot execute can be served two ways: tools run with `--no-repack` (no extra buffer
types at all: no AMX, but no repacked kernels either), or llama.cpp built without AMX (what the harness does: the
repacked kernels stay). This measures the difference between those on the model the demo serves: llama-bench on a
Q4_0 model with repacking on and off, prompt processing and generation, alternating the order.

    .venv/bin/python benchmarks/repack.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_output_arguments, report  # noqa: E402
from harness.buildcheck import probe_models  # noqa: E402
from harness.cache import CacheDir  # noqa: E402
from harness.config import LlamaCppConfig  # noqa: E402
from harness.cpu import this_cpu  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.llamacpp import ensure_build  # noqa: E402
from harness.models.sources import smollm2_gguf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Q4_0 GGUF (default: SmolLM2-135M's Q4_1 requantized to Q4_0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="llama-bench -p")
    parser.add_argument("--generate", type=int, default=64, help="llama-bench -n")
    parser.add_argument("--repetitions", type=int, default=5, help="llama-bench -r")
    parser.add_argument("--rounds", type=int, default=2, help="on/off pairs, alternating which goes first")
    add_output_arguments(parser)
    return report(parser.parse_args(argv), run)


def run(args: argparse.Namespace) -> dict:
    build = ensure_build(LlamaCppConfig(source="pypi", ref="0.3.36"), args.cache_dir, ["F16", "Q4_0"])
    cache = CacheDir(args.cache_dir)
    logs = Path(tempfile.mkdtemp(prefix="repack-bench-"))
    model = args.model or _demo_q4_0(build, cache, logs)
    models = {"demo Q4_0": model, "probe Q4_0": probe_models(build, ["Q4_0"], cache)["Q4_0"]}
    compute = build.compute(threads=args.threads)
    figures: dict = {"cpu": this_cpu().model, "isa": build.isa.summary() if build.isa else None,
                     "threads": args.threads, "llama_cpp": f"b{build.build_number}", "models": {}}  # fmt: skip
    for label, path in models.items():
        rates: dict[str, list[dict]] = {"on": [], "off": []}
        for round_ in range(args.rounds):
            for flag in ("1", "0") if round_ % 2 == 0 else ("0", "1"):
                bench = [
                    "-m", str(path), "-p", str(args.prompt), "-n", str(args.generate), "-r", str(args.repetitions),
                    "-o", "json", "--repack", flag,
                ]  # fmt: skip
                run_ = build.tools.run("llama-bench", bench, log_path=logs / f"{label}-{flag}.log", compute=compute)
                if not run_.ok:
                    raise run_.error(HarnessError, "llama-bench")
                rates["on" if flag == "1" else "off"].append(_rows(run_.lines))
        figures["models"][label] = {"path": str(path), **_summary(rates)}
    return figures


def _rows(lines: list[str]) -> dict:
    text = "\n".join(lines)
    rows = json.loads(text[text.find("[") : text.rfind("]") + 1])
    out = {}
    for row in rows:
        kind = "tg" if row.get("n_gen") else "pp"
        out[kind] = (float(row["avg_ts"]), float(row.get("stddev_ts", 0.0)))
    return out


def _summary(rates: dict[str, list[dict]]) -> dict:
    out = {}
    for kind in ("pp", "tg"):
        on = sum(r[kind][0] for r in rates["on"]) / len(rates["on"])
        off = sum(r[kind][0] for r in rates["off"]) / len(rates["off"])
        out[kind] = {"repack_tokens_per_s": round(on, 1), "no_repack_tokens_per_s": round(off, 1),
                     "no_repack_costs_pct": round(100 * (1 - off / on), 1),
                     "each_run": {k: [round(r[kind][0], 1) for r in v] for k, v in rates.items()}}  # fmt: skip
    return out


def _demo_q4_0(build, cache: CacheDir, logs: Path) -> Path:
    """SmolLM2-135M's Q4_1 from PyPI requantized to Q4_0: the demo's shapes and type (its quality is not measured)."""
    target = cache.probe / "bench-smollm2-Q4_0.gguf"
    if not target.is_file():
        args = ["--allow-requantize", str(smollm2_gguf(cache)), str(target), "Q4_0"]
        run_ = build.tools.run("llama-quantize", args, log_path=logs / "quantize.log")
        if not run_.ok:
            raise run_.error(HarnessError, "llama-quantize")
    return target


if __name__ == "__main__":
    sys.exit(main())
