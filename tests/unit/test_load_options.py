"""The load options (Locust custom arguments) and the Locust command lines the harness builds from the config."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from harness.config import LoadConfig, load_experiment
from harness.errors import ConfigError, LoadTestError
from harness.loadtest.runner import headless_command, stop_timeout, user_for
from harness.loadtest.stage import _deadline_s, ssh_tunnel_hint, web_ui_command
from harness.targets import sizing_for
from locustfiles._options import DEFAULT_PROMPT_TEXT, LoadOptions, add_arguments


def parse(*argv: str) -> LoadOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return LoadOptions.from_namespace(parser.parse_args(list(argv)))


def test_defaults_are_the_studys_lengths_and_steps():
    options = parse()
    assert (options.prompt_tokens, options.output_tokens, options.steps) == (2560, 768, (1, 2, 4, 8))
    assert (options.requests_per_user, options.step_duration_s) == (3, None)
    assert options.prompt_text == DEFAULT_PROMPT_TEXT and options.prompt_text.is_file()
    assert options.length_options == ("ignore_eos", "min_tokens")


def test_a_step_duration_replaces_requests_per_user():
    options = parse("--step-duration", "30", "--steps", "2,4")
    assert (options.requests_per_user, options.step_duration_s, options.plan().users) == (None, 30.0, (2, 4))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--output-tokens", "1"], "at least 2"),
        (["--prompt-format", "tokens"], "--prompt-format must be one of auto, ids, text"),
        (["--length-options", "ignore_eos,max_new"], "unknown max_new"),
        (["--steps", "4,2"], "increasing order"),
        (["--prompt-text", "/nonexistent.txt"], "file not found"),
    ],
)
def test_bad_options_say_which(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_headless_command_for_each_api(tmp_path: Path):
    cfg = LoadConfig(api="chat", prompt_tokens=128, output_tokens=32, steps=[1, 2], step_duration_s=20, processes=2)
    cmd = headless_command(cfg, "http://127.0.0.1:1234", tmp_path)
    assert cmd[cmd.index("-f") + 1].endswith("locustfiles/openai_compat.py") and "OpenAIChatUser" in cmd
    pairs = dict(zip(cmd, cmd[1:], strict=False))
    assert pairs["--host"] == "http://127.0.0.1:1234" and pairs["--processes"] == "2"
    # Stopping gives in-flight requests load.drain_grace_s (default 10 s), not the request timeout.
    assert (pairs["--steps"], pairs["--step-duration"], pairs["--stop-timeout"]) == ("1,2", "20.0", "10s")
    assert pairs["--records"] == str(tmp_path / "requests.jsonl") and "--requests-per-user" not in cmd
    assert "--run-id" not in cmd and "--done-steps" not in cmd
    pairs = headless_command(cfg, "http://h", tmp_path, run_id="a2-x", done=[(1, True), (2, None)])
    resumed = dict(zip(pairs, pairs[1:], strict=False))
    assert resumed["--run-id"] == "a2-x" and resumed["--done-steps"] == "1:pass,2:done"
    assert "--headless" in cmd and "--processes" in cmd
    with pytest.raises(LoadTestError, match="unknown load api 'grpc'"):
        user_for("grpc")


def test_web_ui_command_offers_every_user_and_binds_loopback(tmp_path: Path):
    cmd = web_ui_command(LoadConfig(), "http://127.0.0.1:9", tmp_path, web_host="127.0.0.1", web_port=8089)
    files = cmd[cmd.index("-f") + 1].split(",")
    assert [Path(f).name for f in files] == ["embeddings.py", "native.py", "openai_compat.py"]
    assert "--class-picker" in cmd and cmd[cmd.index("--web-host") + 1] == "127.0.0.1"
    assert ssh_tunnel_hint(8089).startswith("ssh -L 8089:127.0.0.1:8089 ")


def test_server_sized_for_the_largest_step_and_a_bounded_run():
    exp = load_experiment(overrides=["load.steps=[1, 2, 4, 8]", "load.prompt_tokens=2560", "load.output_tokens=768"],
                          environ={})  # fmt: skip
    sizing = sizing_for(exp)
    assert (sizing.parallel, sizing.ctx_size) == (8, 8 * (2560 + 768 + exp.server.margin_tokens))
    assert stop_timeout(exp.load) == "10s"
    assert 0 < _deadline_s(exp.load, 8) < 24 * 3600
    searching = exp.load.model_copy(update={"search": True})
    assert _deadline_s(searching, 16) > _deadline_s(exp.load, 8)  # room for the probes


def test_toml_can_choose_a_duration_without_unsetting_requests(tmp_path: Path):
    path = tmp_path / "exp.toml"
    path.write_text("[load]\nstep_duration_s = 45\n")
    load = load_experiment(path, environ={}).load
    assert (load.step_duration_s, load.requests_per_user) == (45.0, None)
    assert LoadConfig().requests_per_user == 3
    path.write_text("[load]\nstep_duration_s = 45\nrequests_per_user = 2\n")
    with pytest.raises(ConfigError, match="set only one of load.requests_per_user and load.step_duration_s"):
        load_experiment(path, environ={})
