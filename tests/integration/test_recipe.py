"""The recipe search for real, on a tiny random checkpoint: measured sensitivities, an allocation that is optimal
(checked by enumeration) within the exact budget, a recipe file that plain llama-quantize accepts and that makes the
predicted size, measurements remembered for the next search.

The checkpoint's 64-wide tensors make llama-quantize fall back from the K-types (Q4_K -> Q5_0, Q5_K -> Q5_1), its
ffn_down (256 columns) keeps them: both kinds of tensor are in the search.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from harness.build import Build
from harness.config import (
    CorpusConfig,
    Experiment,
    ImatrixConfig,
    ModelConfig,
    SearchConfig,
    VariantConfig,
)
from harness.context import RunContext
from harness.models.pipeline import prepare_models
from harness.models.recipe import parse_recipe
from harness.models.search import SearchRecord
from harness.records import read_record
from harness.rundir import RunDir
from tests.integration.tiny_llama import corpus, write_checkpoint

pytestmark = pytest.mark.integration

VARIANTS = [
    VariantConfig(name="F16", type="F16"),
    VariantConfig(name="recipe", type="Q4_K_M", imatrix=True, recipe="search"),
    VariantConfig(name="Q4_K_M-imat", type="Q4_K_M", imatrix=True),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CorpusConfig]:
    root = tmp_path_factory.mktemp("recipe")
    checkpoint = write_checkpoint(root / "tiny-llama")
    (root / "calibration.txt").write_text(corpus(), encoding="utf-8")
    (root / "evaluation.txt").write_text(corpus(10), encoding="utf-8")
    return checkpoint, CorpusConfig(source="file", imatrix_path=root / "calibration.txt",
                                    kld_path=root / "evaluation.txt")  # fmt: skip


def experiment(root: Path, tiny: tuple[Path, CorpusConfig], **search: object) -> Experiment:
    checkpoint, corpus_cfg = tiny
    return Experiment(
        name="recipe", cache_dir=root / "cache", run_dir=root / "run",
        model=ModelConfig(source="dir", path=checkpoint, threads=2, pretokenizer="gpt-2"),
        variants=VARIANTS, corpus=corpus_cfg, imatrix=ImatrixConfig(chunks=2, ctx_size=64),
        search=SearchConfig(types=["Q4_K", "Q5_K", "Q8_0"], layer_blocks=1, chunks=4, ctx_size=64, **search),
    )  # fmt: skip


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, tiny, current_build: Build):
    root = tmp_path_factory.mktemp("searched")
    exp = experiment(root, tiny)
    artifacts = prepare_models(RunContext.of(exp, current_build, RunDir(root / "run")))
    record = read_record(artifacts["recipe"].path.parent / "search.json", SearchRecord)
    return root, exp, artifacts, record


def enumerate_best(record: SearchRecord) -> float:
    """The least summed KLD of any one-option-per-group choice within the record's tensor budget, by enumeration."""
    budget = record.budget_bytes - record.header_bytes - record.fixed_bytes
    options = [list(g.options.values()) for g in record.groups]
    best = float("inf")
    for choice in itertools.product(*options):
        if sum(o.bytes for o in choice) <= budget:
            best = min(best, sum(o.kld for o in choice))  # type: ignore[misc]
    return best


def test_the_recipe_is_the_best_measured_assignment_within_the_exact_budget(searched):
    _, _, artifacts, record = searched
    recipe, stock = artifacts["recipe"], artifacts["Q4_K_M-imat"]
    # The budget is the stock variant's file size (made first although listed after), met exactly as predicted.
    assert record.budget_bytes == stock.size_bytes and record.budget_from == "the size of Q4_K_M-imat"
    assert recipe.size_bytes == record.file_bytes == record.predicted_bytes <= record.budget_bytes
    # token_embd, output and the 7 layer kinds (2 layers in one block); Q4_K -> Q5_0 and Q5_K -> Q5_1 on 64 columns.
    assert len(record.groups) == 9 and record.measurements == sum(len(g.options) for g in record.groups)
    down = next(g for g in record.groups if g.name.endswith("ffn_down.weight"))
    assert sorted(down.options) == ["Q4_K", "Q5_K", "Q8_0"]
    q = next(g for g in record.groups if g.name.endswith("attn_q.weight"))
    assert sorted(q.options) == ["Q5_0", "Q5_1", "Q8_0"]
    # Measured, not guessed: every option has a KLD; at least some groups lose less at 8 bits than at 4-5.
    assert all(o.kld is not None and o.kld >= 0 for g in record.groups for o in g.options.values())
    assert sum(g.options["Q8_0"].kld <= min(o.kld for o in g.options.values()) + 1e-4 for g in record.groups) >= 5
    # Optimal: no assignment of the measured options within the budget has a smaller sum (enumerated: 3^9).
    assert record.predicted_kld == pytest.approx(enumerate_best(record), abs=1e-12) and record.gap == 0.0
    assert record.measured_kld is not None and record.measured_kld >= 0


def test_plain_llama_quantize_makes_the_same_file_from_the_recipe(searched, current_build: Build):
    root, exp, artifacts, record = searched
    recipe_file = RunDir(exp.resolved_run_dir()).recipe("recipe")
    wanted = parse_recipe(recipe_file.read_text())
    # Every tensor has the type the recipe names.
    made = {t.name: t.tensor_type.name for t in GGUFReader(artifacts["recipe"].path).tensors}
    assert wanted and all(made[name] == t for name, t in wanted.items())
    again = root / "again.gguf"
    run = current_build.tools.run(
        "llama-quantize",
        ["--imatrix", str(artifacts["recipe"].imatrix), "--tensor-type-file", str(recipe_file),
         str(artifacts["F16"].path), str(again), "Q4_K_M"],
        log_path=root / "again.log",
    )  # fmt: skip
    assert run.ok, run.why()
    assert again.stat().st_size == artifacts["recipe"].size_bytes


def test_another_budget_reuses_the_measurements(searched, tiny, current_build: Build):
    root, _, artifacts, first = searched
    exp = experiment(root, tiny, budget_bytes=first.budget_bytes - 8_000).model_copy(update={"run_dir": root / "run-2"})
    sensitivity_log = root / "run" / "models" / "logs" / "search-recipe" / "sensitivity.log"
    again = prepare_models(RunContext.of(exp, current_build, RunDir(root / "run-2")))
    second = read_record(again["recipe"].path.parent / "search.json", SearchRecord)
    assert [g.options for g in second.groups] == [g.options for g in first.groups]  # the same measurements
    assert not (root / "run-2" / "models" / "logs" / "search-recipe" / "sensitivity.log").exists()
    assert sensitivity_log.stat().st_size > 0
    # A tighter budget: a smaller file, no better prediction, still the best within it.
    assert again["recipe"].size_bytes <= second.budget_bytes < first.budget_bytes
    assert second.predicted_kld >= first.predicted_kld
    assert second.predicted_kld == pytest.approx(enumerate_best(second), abs=1e-12)


def test_excluded_types_are_never_chosen_and_stay_remembered(searched, tiny, current_build: Build):
    root, _, artifacts, first = searched
    exp = experiment(root, tiny, exclude_types=["q5_1"]).model_copy(update={"run_dir": root / "run-3"})
    again = prepare_models(RunContext.of(exp, current_build, RunDir(root / "run-3")))
    record = read_record(again["recipe"].path.parent / "search.json", SearchRecord)
    assert record.excluded == ["Q5_1"] and all("Q5_1" not in key for g in record.groups for key in g.options)
    assert "Q5_1" not in set(parse_recipe(RunDir(root / "run-3").recipe("recipe").read_text()).values())
    memo = json.loads(next((root / "cache" / "models").glob("sensitivity-*.json")).read_text())
    remembered = sum("Q5_1" in g["options"] for g in memo["groups"])
    assert remembered == sum("Q5_1" in g.options for g in first.groups) > 0  # still there for another search
    assert record.predicted_kld >= first.predicted_kld  # fewer options: no better
