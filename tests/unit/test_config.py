"""Experiment loading: layering (defaults < file < env < CLI) and one clear error per bad key or value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from harness.config import Experiment, load_experiment, parse_override
from harness.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_defaults_reproduce_the_original_study():
    exp = load_experiment(None, environ={})
    assert exp.model.repo == "42dot/42dot_LLM-PLM-1.3B"
    assert exp.model.pretokenizer == "gpt-2"
    assert (exp.load.prompt_tokens, exp.load.output_tokens, exp.load.steps) == (2560, 768, [1, 2, 4, 8])
    names = [v.name for v in exp.variants]
    assert names[0] == "F16" and {"Q4_0", "Q4_K_M", "Q4_K_M-imat", "IQ4_XS-imat"} <= set(names)
    assert exp.mmlu.split == "test"


def test_shipped_experiments_load():
    root = Path(__file__).parents[2] / "harness" / "experiments"
    study = load_experiment(root / "original-study.toml", environ={})
    assert (study.llamacpp.source, study.llamacpp.ref) == ("git", "b3661")
    demo = load_experiment(root / "demo.toml", environ={})
    assert demo.llamacpp.source == "pypi" and demo.model.source == "demo"
    assert demo.load.steps == [1, 2] and demo.load.search  # the search finds the capacity beyond the steps
    assert [t.variants for t in demo.targets] == [[], ["Q4_K_M-imat"]]  # llama-cpp-python on one variant


def test_layers_file_then_env_then_cli(tmp_path):
    path = write(tmp_path, '[llamacpp]\nbackend = "cuda"\nref = "0.2.90"\n[load]\nsteps = [1, 2]\n')
    exp = load_experiment(
        path,
        environ={"LLAMASYS_LLAMACPP__REF": "0.3.36", "LLAMASYS_LOAD__STEPS": "[1, 2, 4]", "HOME": "/x"},
        overrides=["load.steps=[1, 8]"],
    )
    assert exp.llamacpp.backend == "cuda"  # file
    assert exp.llamacpp.ref == "0.3.36"  # environment beats file
    assert exp.load.steps == [1, 8]  # CLI beats environment


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path):
    path = write(tmp_path, '[model]\nsource = "gguf"\npath = "m/x.gguf"\n')
    assert load_experiment(path, environ={}).model.path == tmp_path / "m" / "x.gguf"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[llamacpp]\nbakend = 'cpu'\n", "llamacpp.bakend: unknown key 'bakend'; allowed keys: backend,"),
        ("[llamacpp]\nbackend = 'rocm'\n", "llamacpp.backend: 'rocm' is not allowed; choose 'cpu' or 'cuda'"),
        ("[[variants]]\nname = 'x'\ntype = 'Q9_9'\n", "variants[0].type: unknown quant type 'Q9_9'; allowed: F32"),
        ("[load]\nsteps = [4, 2]\n", "load: steps must be distinct positive load levels"),
        ("[load]\nstep_duration_s = 10\nrequests_per_user = 2\n", "load: set only one of the requests per step and"),
        ("[llamacpp]\nsource = 'local'\n", "source 'local' needs llamacpp.path"),
        ("colour = 'blue'\n", "colour: unknown key 'colour'; allowed keys:"),
        ("[[variants]]\nname='a'\ntype='F16'\n[[variants]]\nname='a'\ntype='Q4_0'\n", "repeated: a"),
        ("[tune]\ngpu_layers = [20, 999]\n", "tune.gpu_layers: only a GPU build offloads layers"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, text), environ={})
    assert expected in str(err.value)


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(write(tmp_path, "[llamacpp\n"), environ={})
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.toml", environ={})


def test_env_typo_is_an_error_naming_the_variable():
    with pytest.raises(ConfigError, match="unknown key 'bakend'"):
        load_experiment(None, environ={"LLAMASYS_LLAMACPP__BAKEND": "cpu"})
    # pydantic-settings itself reads only variables naming a field; a top-level typo must not pass silently.
    with pytest.raises(ConfigError, match="environment variable LLAMASYS_COLOUR: unknown key 'colour'"):
        load_experiment(None, environ={"LLAMASYS_COLOUR": "blue"})
    with pytest.raises(ConfigError, match='environment: error parsing value for field "load"'):
        load_experiment(None, environ={"LLAMASYS_LOAD__STEPS": "[1,"})


def test_env_values_keep_their_text_and_tables_merge_key_by_key(tmp_path):
    path = write(tmp_path, '[llamacpp]\nbackend = "cuda"\n[load]\nsteps = [1, 2]\nprompt_tokens = 512\n')
    exp = load_experiment(path, environ={"LLAMASYS_LLAMACPP__REF": "3661", "llamasys_load__steps": "[4]"})
    assert exp.llamacpp.ref == "3661"  # a string field given digits stays the text given (not the number)
    assert (exp.llamacpp.backend, exp.load.steps, exp.load.prompt_tokens) == ("cuda", [4], 512)


def test_a_commands_own_options_beat_set(tmp_path):
    exp = load_experiment(
        None, environ={}, overrides=['llamacpp.ref="b1"', "run_dir='a'"],
        values={"llamacpp.ref": "b3661", "cache_dir": tmp_path / "c"},
    )  # fmt: skip
    assert (exp.llamacpp.ref, exp.run_dir, exp.cache_dir) == ("b3661", Path("a"), tmp_path / "c")


def test_override_syntax():
    assert parse_override("load.steps=[1,2]") == ("load.steps", [1, 2])
    assert parse_override("llamacpp.ref=b3661") == ("llamacpp.ref", "b3661")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("no-equals-sign")


def test_resolved_experiment_round_trips_through_toml(tmp_path):
    exp = load_experiment(None, environ={}, overrides=["cache_dir='/c'", "mmlu.per_subject=3"])
    again = Experiment.model_validate(tomllib.loads(exp.to_toml()))
    assert again == exp


def test_targets_default_to_llama_server_and_take_the_others():
    assert [(t.kind, t.label) for t in load_experiment(None, environ={}).targets] == [("llama-server", "llama-server")]
    exp = load_experiment(
        None,
        overrides=[
            'targets=[{kind="llama-server"}, {kind="llama-cpp-python", multi_model=true}, '
            '{kind="external", name="vllm", url="http://127.0.0.1:8000", model_name="m", api="chat"}]'
        ],
        environ={},
    )
    server, lcp, ext = exp.targets
    assert (lcp.label, lcp.multi_model, lcp.route_api("native"), server.route_api("native")) == (
        "llama-cpp-python", True, "openai", "native",
    )  # fmt: skip
    assert (ext.label, ext.url, ext.route_api("native")) == ("vllm", "http://127.0.0.1:8000", "chat")


def test_a_target_may_measure_some_variants_but_the_primary_measures_all():
    pair = 'variants=[{name="F16", type="F16"}, {name="Q4_0", type="Q4_0"}]'
    exp = load_experiment(
        None, overrides=[pair, 'targets=[{kind="llama-server"}, {kind="llama-cpp-python", variants=["Q4_0"]}]'],
        environ={},
    )  # fmt: skip
    server, lcp = exp.targets
    assert (server.measures("F16"), lcp.measures("F16"), lcp.measures("Q4_0")) == (True, False, True)
    with pytest.raises(ConfigError, match=r"targets\[1\] \(llama-cpp-python\): no variant named 'Q4_K'; variants: F16"):
        load_experiment(None, overrides=[pair, 'targets=[{kind="llama-server"}, {kind="llama-cpp-python", '
                                               'variants=["Q4_K"]}]'], environ={})  # fmt: skip
    with pytest.raises(ConfigError, match=r"targets\[0\] \(llama-server\) is the primary target"):
        load_experiment(None, overrides=[pair, 'targets=[{kind="llama-server", variants=["Q4_0"]}]'], environ={})


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ('{kind="external"}', "targets: entry 1: url: Field required"),
        ('{kind="external", url="http://10.1.2.3:8000"}', "is not on this machine"),
        ('{kind="external", url="ftp://127.0.0.1"}', r"not an http\(s\) URL"),
        (
            '{kind="llama-server", url="http://127.0.0.1:1"}',
            "url: unknown key for a llama-server target; its keys: kind",
        ),
        ('{kind="llama-server", multi_model=true}', "multi_model: unknown key for a llama-server target"),
        ('{kind="llama-cpp-python", api="native"}', "has no native /completion route; use api openai, chat"),
        ('{kind="vllm"}', "unknown target kind 'vllm'; known kinds: external, llama-cpp-python, llama-server"),
    ],
)
def test_bad_targets_are_one_clear_error(target: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, overrides=[f"targets=[{target}]"], environ={})
    with pytest.raises(ConfigError, match="target names must be unique; repeated: llama-server"):
        load_experiment(None, overrides=['targets=[{kind="llama-server"}, {kind="llama-server"}]'], environ={})
    remote = load_experiment(
        None, overrides=['targets=[{kind="external", url="http://10.1.2.3:8000", allow_remote=true}]'], environ={}
    )
    assert remote.targets[0].url == "http://10.1.2.3:8000"
