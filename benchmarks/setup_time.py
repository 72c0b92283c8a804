"""What a new user waits for: `make demo` (or `make test`) in a fresh clone, with empty caches, timed per step.

    python benchmarks/setup_time.py                  # cold `make demo`: pip, then every stage of the demo
    python benchmarks/setup_time.py --target test    # cold `make test` (what CI runs on a clean clone)
    python benchmarks/setup_time.py --caches DIR     # caches kept in DIR: a second run with the same DIR is warm

The clone is of this checkout's HEAD (committed work only), into a temporary directory, and every cache the set-up
fills lives under one directory of its own (pip's, the harness's, Hugging Face's, ccache's and XDG's), empty unless
--caches names one that a previous run filled. The figures: the pip install (`make install`), the command's wall
time, and for the demo each stage's seconds from the run's manifest.json, the build's compiles and checks named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_VARIABLES = {
    "PIP_CACHE_DIR": "pip",
    "LLAMASYS_CACHE_DIR": "llamasys",
    "XDG_CACHE_HOME": "xdg",
    "HF_HOME": "huggingface",
    "CCACHE_DIR": "ccache",
}


def cpu_facts() -> dict[str, object]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "amx": sorted(f for f in flags if f.startswith("amx"))}


def timed(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> float:
    started = time.monotonic()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}) after {seconds:.0f} s; log {log}:\n{tail}")
    return seconds


def demo_stages(clone: Path) -> list[dict[str, object]]:
    sys.path.insert(0, str(REPO))
    from harness.manifest import ManifestRecord, stage_times
    from harness.records import read_record

    manifest = read_record(clone / "runs" / "demo" / "manifest.json", ManifestRecord)
    return [row.model_dump(mode="json") for row in stage_times(manifest)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("demo", "test"), default="demo", help="the make target (default: demo)")
    parser.add_argument("--caches", type=Path, help="where the caches live (default: a fresh empty directory)")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its runs/demo) after the run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="llamasys-setup-"))
    caches = (args.caches or root / "caches").absolute()
    warm = caches.is_dir() and any(caches.iterdir())
    env = {**os.environ, **{var: str(caches / sub) for var, sub in CACHE_VARIABLES.items()}}
    env.pop("VIRTUAL_ENV", None)
    clone, log = root / "clone", root / "setup.log"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    print(f"{args.target} of {commit} in {clone}, caches {'warm' if warm else 'empty'} in {caches}; log {log}",
          flush=True)  # fmt: skip

    started = time.monotonic()
    pip_s = timed(["make", "install"], cwd=clone, env=env, log=log)
    print(f"  make install (pip)  {pip_s:8.1f} s", flush=True)
    command_s = timed(["make", args.target], cwd=clone, env=env, log=log)
    total_s = time.monotonic() - started
    figures: dict[str, object] = {
        "commit": commit, "target": args.target, "caches": "warm" if warm else "cold", **cpu_facts(),
        "pip_install_s": round(pip_s, 1), f"make_{args.target}_s": round(command_s, 1), "total_s": round(total_s, 1),
    }  # fmt: skip
    if args.target == "demo":
        figures["stages"] = demo_stages(clone)
        for row in figures["stages"]:  # type: ignore[attr-defined]
            seconds = row["seconds"] if row["seconds"] is not None else float("nan")
            print(f"  {row['stage']:<19} {seconds:8.1f} s  {row['detail']}", flush=True)
    print(f"  make {args.target:<14} {command_s:8.1f} s")
    print(f"  total (with pip)    {total_s:8.1f} s = {total_s / 60:.1f} min")
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(clone)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
