"""The one way tools run: compute flags, the error line, logged runs with progress, the cached --help."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness import console
from harness.build import TOOLS, Build
from harness.errors import MMLUError
from harness.tools import Compute, LineProgress, error_line, run_logged


def test_compute_flags_per_tool_and_backend():
    assert Compute(threads=2).args("llama-perplexity") == ["-t", "2"]
    assert Compute().args("llama-server") == []
    assert Compute(threads=None, gpu_layers=40, backend="cuda").args("llama-imatrix") == ["-ngl", "40"]
    # llama-quantize takes its thread count as the last positional argument, and no GPU layers.
    assert Compute(threads=3, backend="cuda").args("llama-quantize") == ["3"]
    assert Compute(threads=None).args("llama-quantize") == []


def test_error_line_prefers_the_tools_own_reason():
    lines = ["llama_model_load: error loading model: tensor 'x' has wrong shape", "common_init: failed to init"]
    assert error_line(lines, prefer=("error loading model",)) == lines[0]
    assert error_line(lines) == lines[1]  # without a preference: the last line that says something went wrong
    assert error_line(["all good", "still fine"]) == "still fine"
    assert error_line([]) == "(no output)" and error_line([], empty="(empty log)") == "(empty log)"
    assert error_line(["terminate called after throwing an instance of 'std::bad_alloc'", "Aborted"]) == "Aborted"


def test_run_logged_keeps_lines_logs_them_and_drives_progress(tmp_path: Path):
    console.configure(progress=True)
    script = "import sys\nfor i in range(1, 6): print(f'[{i}/5] chunk', flush=True)\nsys.exit(3)"
    seen: list[str] = []
    run = run_logged(
        [sys.executable, "-c", script], log_path=tmp_path / "logs" / "tool.log", on_line=seen.append, tail=2,
        progress=LineProgress(5, "test", "chunk", lambda line: int(line[1]) if line.startswith("[") else None),
    )  # fmt: skip
    assert (run.code, run.ok, run.lines) == (3, False, ["[4/5] chunk", "[5/5] chunk"])
    assert len(seen) == 5 and run.seconds > 0
    log = (tmp_path / "logs" / "tool.log").read_text()
    assert log.startswith(f"$ {sys.executable} -c") and "[3/5] chunk" in log
    error = run.error(MMLUError, "llama-perplexity --kl-divergence")
    assert isinstance(error, MMLUError)
    assert str(error) == (
        f"llama-perplexity --kl-divergence failed (exit 3): [5/5] chunk (log: {tmp_path / 'logs' / 'tool.log'})"
    )


def test_supports_reads_the_tools_own_help_once(tmp_path: Path):
    for tool in TOOLS:
        path = tmp_path / tool
        path.write_text("#!/bin/sh\necho called >> \"$0.calls\"\necho '  -kvu, --kv-unified, --no-kv-unified'\n")
        path.chmod(0o755)
    build = Build(bin_dir=tmp_path, backend="cpu", era="current", build_number=1, commit="x", source="t", cache_key="k")
    assert build.tools.supports("llama-server", "--no-kv-unified")
    assert build.tools.supports("llama-server", "--kv-unified")
    assert not build.tools.supports("llama-server", "--no-kv")  # a prefix of a flag is not the flag
    assert (tmp_path / "llama-server.calls").read_text().count("called") == 1  # asked once, whatever asks
    assert not (Path.cwd() / "llama.log").exists()


@pytest.mark.parametrize("quiet", [False, True])
def test_console_messages_honour_quiet(capsys, quiet: bool):
    import logging

    console.configure(progress=True, quiet=quiet)
    logging.getLogger("harness.anything").info("a message")
    logging.getLogger("mmlu.stage").warning("a warning")
    err = capsys.readouterr().err
    assert ("a message" in err) is not quiet
    assert "warning: a warning" in err
    assert console.progress_enabled() is not quiet
    console.configure()
