"""Re-capture the llama-perplexity outputs the MMLU/KLD parser tests read (run by hand, not by pytest).

    .venv/bin/python tests/data/mmlu/capture.py --era current --bin-dir DIR --model SmolLM2.gguf

Writes, for the era: mc-<era>.txt (8 invented tasks, mixed right and wrong), mc-too-long-<era>.txt (a context
too small for a task), kld-base-<era>.txt (--kl-divergence-base) and kld-<era>.txt (--kl-divergence of a Q4_0
re-quantization against the model). Each file is the merged stdout+stderr exactly as the harness reads it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from harness.tools import run_logged  # noqa: E402
from mmlu.tasks import MultipleChoiceTask, encode_tasks  # noqa: E402

# Invented tasks; in four of them the labelled answer is noise, so the model gets those "wrong".
TASKS = [
    MultipleChoiceTask("The capital of France is", ("Paris", "qzx vvk", "###!!", "blorf glurp"), 0),
    MultipleChoiceTask("One, two, three, four,", ("zzqx", "five", "%%%%", "kkkk jjjj"), 0),
    MultipleChoiceTask("The sun rises in the", ("xqj", "@@@ ###", "east", "vvvvv"), 2),
    MultipleChoiceTask("Monday, Tuesday,", ("qqq ppp", "~~~~", "zxcv", "Wednesday"), 1),
    MultipleChoiceTask("Water is made of hydrogen and", ("oxygen", "&&&", "pfft zzk", "qwqwqw"), 0),
    MultipleChoiceTask("The opposite of hot is", ("xkcd vv", "cold", "^^^ ^^^", "jjjjq"), 3),
    MultipleChoiceTask("Cats say", ("meow", "zzzv", "!!!!", "pq pq"), 2),
    MultipleChoiceTask("Red, green and", ("kkxk", "blue", "$$$", "wvwv"), 1),
]


def _run(cmd: list[str], out: Path, scratch: Path) -> None:
    run = run_logged(cmd, log_path=scratch / "capture.log")
    out.write_text("\n".join(run.lines) + "\n", encoding="utf-8")
    print(f"{out.name}: exit {run.code}, {len(run.lines)} lines")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--era", choices=("current", "legacy"), required=True)
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True, help="plain text for the KLD runs")
    args = parser.parse_args()
    perplexity = str(args.bin_dir / "llama-perplexity")
    escape = ["--no-escape"] if args.era == "legacy" else []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        tasks = scratch / "tasks.bin"
        tasks.write_bytes(encode_tasks(TASKS))
        common = ["-m", str(args.model), "-t", "1"]
        ctx = ["-c", "32"] if args.era == "current" else ["-c", "128"]
        _run([perplexity, *common, "--multiple-choice", "-bf", str(tasks), *ctx, *escape],
             HERE / f"mc-{args.era}.txt", scratch)  # fmt: skip
        # ~1000 tokens of question: more than the 256-token context either era ends up with here.
        long_task = MultipleChoiceTask("The quick brown fox jumps over the lazy dog. " * 100, ("yes", "no"), 0)
        too_long = scratch / "too-long.bin"
        too_long.write_bytes(encode_tasks([TASKS[0], long_task]))
        small = ["-c", "64"] if args.era == "current" else ["-c", "256"]
        _run([perplexity, *common, "--multiple-choice", "-bf", str(too_long), *small, *escape],
             HERE / f"mc-too-long-{args.era}.txt", scratch)  # fmt: skip
        base = scratch / "base.logits"
        kld = ["-c", "128", "--chunks", "3"]
        _run([perplexity, *common, "-f", str(args.corpus), "--kl-divergence-base", str(base), *kld],
             HERE / f"kld-base-{args.era}.txt", scratch)  # fmt: skip
        quantized = scratch / "q4_0.gguf"
        run_logged([str(args.bin_dir / "llama-quantize"), "--allow-requantize", str(args.model), str(quantized),
                    "Q4_0"], log_path=scratch / "quantize.log")  # fmt: skip
        _run([perplexity, "-m", str(quantized), "-t", "1", "--kl-divergence-base", str(base), "--kl-divergence",
              "-c", "128"], HERE / f"kld-{args.era}.txt", scratch)  # fmt: skip


if __name__ == "__main__":
    main()
