"""The load plan from Locust's custom arguments or a plan file, and the Locust command lines the harness builds."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.plan import DEFAULT_PROMPT_TEXT, LoadPlan, add_arguments
from harness.config import LoadConfig, load_experiment
from harness.errors import ConfigError, LoadTestError
from harness.loadtest.runner import headless_command, load_arguments, stop_timeout, user_for
from harness.loadtest.serverplan import deadline_s as _deadline_s
from harness.loadtest.webui import ssh_tunnel_hint, web_ui_command


def parse(*argv: str) -> LoadPlan:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return LoadPlan.from_options(parser.parse_args(list(argv)))


def test_defaults_are_the_studys_lengths_and_steps():
    options = parse()
    assert (options.prompt_tokens, options.output_tokens, options.steps) == (2560, 768, (1, 2, 4, 8))
    assert (options.requests_per_user, options.step_duration_s) == (3, None)
    assert options.prompt_text == DEFAULT_PROMPT_TEXT and options.prompt_text.is_file()
    assert options.length_options == ("ignore_eos", "min_tokens")


def test_a_step_duration_replaces_requests_per_user():
    options = parse("--step-duration", "30", "--steps", "2,4")
    assert (options.requests_per_user, options.step_duration_s, options.steps) == (None, 30.0, (2, 4))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--output-tokens", "1"], "output_tokens: Input should be greater than or equal to 2"),
        (["--prompt-format", "tokens"], "prompt format must be one of auto, ids, text"),
        (["--length-options", "ignore_eos,max_new"], "unknown max_new"),
        (["--steps", "4,2"], "increasing order"),
        (["--prompt-text", "/nonexistent.txt"], "file not found"),
    ],
)
def test_bad_options_say_which(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_headless_command_for_each_api_hands_locust_the_plan_whole(tmp_path: Path):
    cfg = LoadConfig(api="chat", prompt_tokens=128, output_tokens=32, steps=[1, 2], step_duration_s=20, processes=2)
    plan = cfg.plan(records=str(tmp_path / "requests.jsonl"))
    cmd = headless_command(cfg, plan, "http://127.0.0.1:1234", tmp_path)
    assert cmd[cmd.index("-f") + 1].endswith("locustfiles/openai_compat.py") and "OpenAIChatUser" in cmd
    pairs = dict(zip(cmd, cmd[1:], strict=False))
    assert pairs["--host"] == "http://127.0.0.1:1234" and pairs["--processes"] == "2"
    # Stopping gives in-flight requests load.drain_grace_s (default 10 s), not the request timeout.
    assert pairs["--stop-timeout"] == "10s" and "--headless" in cmd
    assert LoadPlan.read(Path(pairs["--plan"])) == plan and "--steps" not in cmd
    resumed = cfg.plan(records="r.jsonl", run_id="a2-x", done=((1, True), (2, None)))
    assert LoadPlan.read(Path(headless_command(cfg, resumed, "http://h", tmp_path)[-1])).done == ((1, True), (2, None))
    with pytest.raises(LoadTestError, match="unknown load api 'grpc'"):
        user_for("grpc")


def test_the_custom_arguments_build_the_same_plan_as_the_plan_file(tmp_path: Path):
    # The web UI and a plain `locust -f` run take custom arguments: they must say exactly what the plan says.
    for settings in (
        {"steps": [1, 2, 4], "search": True, "max_users": 16, "min_requests": 4, "requests_per_user": 2},
        {"steps": [0.5, 1, 2], "arrival": {"kind": "gamma", "burstiness": 0.5, "max_in_flight": 4},
         "requests_per_step": 20, "search": True, "max_users": 8, "search_resolution": 0.25},
        {"steps": [2], "arrival": {"kind": "poisson"}, "step_duration_s": 30},
    ):  # fmt: skip
        from harness.config import Experiment

        exp = Experiment.model_validate({"load": settings})
        plan = exp.plan(records=str(tmp_path / "r.jsonl"), run_id="x", done=((1, True),), model_name="m")
        assert parse(*load_arguments(plan)) == plan


def test_web_ui_command_offers_what_the_server_serves_and_binds_loopback(tmp_path: Path):
    plan = LoadConfig().plan(records=str(tmp_path / "r.jsonl"))
    cmd = web_ui_command(LoadConfig(), plan, "http://127.0.0.1:9", web_host="127.0.0.1", web_port=8089)
    files = cmd[cmd.index("-f") + 1].split(",")
    assert [Path(f).name for f in files] == ["native.py", "openai_compat.py"]  # no embeddings user: it would 501
    embeddings = web_ui_command(LoadConfig(), plan, "http://h:9", web_host="127.0.0.1", web_port=1, embeddings=True)
    assert [Path(f).name for f in embeddings[embeddings.index("-f") + 1].split(",")] == ["embeddings.py"]
    assert "--class-picker" in cmd and cmd[cmd.index("--web-host") + 1] == "127.0.0.1"
    assert ssh_tunnel_hint(8089).startswith("ssh -L 8089:127.0.0.1:8089 ")


def test_server_sized_for_the_largest_step_and_a_bounded_run():
    exp = load_experiment(overrides=["load.steps=[1, 2, 4, 8]", "load.prompt_tokens=2560", "load.output_tokens=768"],
                          environ={})  # fmt: skip
    sizing = exp.sizing()
    assert (sizing.parallel, sizing.ctx_size) == (8, 8 * (2560 + 768 + exp.server.margin_tokens))
    assert stop_timeout(exp.load) == "10s"
    assert 0 < _deadline_s(exp.plan()) < 24 * 3600
    searching = exp.plan().model_copy(update={"search": True, "max_level": 16})
    assert _deadline_s(searching) > _deadline_s(exp.plan())  # room for the probes


def test_toml_can_choose_a_duration_without_unsetting_requests(tmp_path: Path):
    path = tmp_path / "exp.toml"
    path.write_text("[load]\nstep_duration_s = 45\n")
    plan = load_experiment(path, environ={}).plan()
    assert (plan.step_duration_s, plan.requests_per_user) == (45.0, None)
    assert LoadConfig().plan().requests_per_user == 3
    path.write_text("[load]\nstep_duration_s = 45\nrequests_per_user = 2\n")
    with pytest.raises(ConfigError, match="load: set only one of the requests per step and step_duration_s"):
        load_experiment(path, environ={})
