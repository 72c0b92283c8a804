"""The recipe search's pure parts: llama-quantize --dry-run read, tensor sizes, groups, the allocation (checked by
brute force), the tensor-type file, the experiment's search settings."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from harness.config import Experiment, SearchConfig, VariantConfig
from harness.errors import ModelError
from harness.models.recipe import (
    allocate,
    dry_run_types,
    make_groups,
    padded,
    parse_recipe,
    recipe_text,
    tensor_bytes,
)

DATA = Path(__file__).parents[1] / "data" / "recipe"


def test_dry_run_gives_each_quantized_tensors_type_with_the_tools_fallbacks():
    # b11312 on SmolLM2-135M, every tensor asked for IQ4_XS: 576-column tensors fall back to IQ4_NL, ffn_down (1536
    # columns) keeps IQ4_XS; norms are not quantized and are not listed.
    types = dry_run_types((DATA / "dry-run-iq4_xs.txt").read_text().splitlines())
    assert types == {
        "token_embd.weight": "IQ4_NL", "blk.0.attn_k.weight": "IQ4_NL", "blk.0.attn_output.weight": "IQ4_NL",
        "blk.0.attn_q.weight": "IQ4_NL", "blk.0.attn_v.weight": "IQ4_NL", "blk.0.ffn_down.weight": "IQ4_XS",
        "blk.0.ffn_gate.weight": "IQ4_NL", "blk.0.ffn_up.weight": "IQ4_NL",
    }  # fmt: skip


def test_tensor_bytes_are_ggmls_block_sizes():
    # Q4_K: 144 bytes per 256 weights; Q8_0: 34 per 32; IQ4_NL: 18 per 32; F16: 2 per weight.
    assert tensor_bytes("Q4_K", 1536 * 576) == 1536 * 576 // 256 * 144
    assert tensor_bytes("q8_0", 576 * 192) == 576 * 192 // 32 * 34
    assert tensor_bytes("IQ4_NL", 576 * 49152) == 576 * 49152 // 32 * 18
    assert tensor_bytes("F16", 10) == 20
    with pytest.raises(ModelError, match="whole Q4_K blocks"):
        tensor_bytes("Q4_K", 576)
    assert padded(1, 32) == 32 and padded(64, 32) == 64 and padded(65, 32) == 96


def test_groups_by_kind_and_layer_block_or_per_tensor():
    tensors = ["token_embd.weight"] + [f"blk.{i}.{k}.weight" for i in range(5) for k in ("attn_q", "ffn_down")]
    groups = make_groups(tensors, "block", 2)
    assert [(g.name, len(g.tensors)) for g in groups] == [
        ("token_embd.weight", 1), ("blk.0-2.attn_q.weight", 3), ("blk.0-2.ffn_down.weight", 3),
        ("blk.3-4.attn_q.weight", 2), ("blk.3-4.ffn_down.weight", 2),
    ]  # fmt: skip
    assert sorted(t for g in groups for t in g.tensors) == sorted(tensors)  # every tensor in exactly one group
    assert [g.name for g in make_groups(tensors, "block", 10)][1] == "blk.0.attn_q.weight"  # more blocks than layers
    assert len(make_groups(tensors, "tensor", 2)) == len(tensors)


def brute_force(kld, size, budget):
    groups = list(kld)
    best = None
    for choice in itertools.product(*(list(kld[g]) for g in groups)):
        total = sum(size[g][o] for g, o in zip(groups, choice, strict=True))
        cost = sum(kld[g][o] for g, o in zip(groups, choice, strict=True))
        if total <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, dict(zip(groups, choice, strict=True)))
    return best


def test_allocation_is_optimal_within_the_exact_budget():
    # Random multiple-choice knapsacks small enough to enumerate: milp's answer fits the budget and its summed KLD
    # is the enumeration's minimum.
    rng = random.Random(7)
    for _ in range(40):
        kld, size = {}, {}
        for g in range(rng.randint(2, 5)):
            options = rng.sample(["Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"], rng.randint(2, 4))
            kld[f"g{g}"] = {o: rng.uniform(0, 0.05) for o in options}
            size[f"g{g}"] = {o: rng.randint(100, 1000) for o in options}
        smallest = sum(min(s.values()) for s in size.values())
        largest = sum(max(s.values()) for s in size.values())
        budget = rng.randint(smallest, largest)
        found = allocate(kld, size, budget)
        expected = brute_force(kld, size, budget)
        assert expected is not None and found.bytes <= budget
        assert found.predicted_kld == pytest.approx(expected[0], abs=1e-9) and found.gap == 0.0
        assert found.bytes == sum(size[g][o] for g, o in found.types.items())


def test_allocation_by_hand_and_an_impossible_budget():
    # Two groups: the budget affords one upgrade; it goes where it removes more KLD (b: 0.05 -> 0.01).
    kld = {"a": {"Q4_K": 0.02, "Q6_K": 0.005}, "b": {"Q4_K": 0.05, "Q6_K": 0.01}}
    size = {"a": {"Q4_K": 100, "Q6_K": 150}, "b": {"Q4_K": 100, "Q6_K": 150}}
    found = allocate(kld, size, 250)
    assert found.types == {"a": "Q4_K", "b": "Q6_K"} and found.predicted_kld == pytest.approx(0.03)
    assert allocate(kld, size, 300).types == {"a": "Q6_K", "b": "Q6_K"}
    with pytest.raises(ModelError, match="no recipe fits the budget: the smallest types take 200 bytes"):
        allocate(kld, size, 199)


def test_recipe_file_names_each_tensor_anchored_and_reads_back():
    text = recipe_text({"blk.3.attn_v.weight": "Q5_0", "token_embd.weight": "IQ4_NL"})
    # Anchored and escaped: llama-quantize matches with std::regex_search, so "blk.3." alone would also hit blk.30.
    assert text == "^blk\\.3\\.attn_v\\.weight$=q5_0\n^token_embd\\.weight$=iq4_nl\n"
    assert parse_recipe(text) == {"blk.3.attn_v.weight": "Q5_0", "token_embd.weight": "IQ4_NL"}


def test_a_recipe_variant_needs_an_imatrix_and_a_budget():
    with pytest.raises(ValueError, match="imatrix = true"):
        VariantConfig(name="r", type="Q4_K_M", recipe="search")
    base = [VariantConfig(name="F16", type="F16")]
    recipe = VariantConfig(name="r", type="Q4_K_M", imatrix=True, recipe="search")
    with pytest.raises(ValueError, match="no stock 4-bit imatrix variant to take the size budget from"):
        Experiment(variants=[*base, recipe])
    stock = VariantConfig(name="Q4_K_M-imat", type="Q4_K_M", imatrix=True)
    exp = Experiment(variants=[*base, recipe, stock])
    assert exp.budget_variant() == stock  # the recipe may come before the stock variant it matches
    assert Experiment(variants=[*base, recipe], search={"budget_bpw": 4.8}).budget_variant() is None
    with pytest.raises(ValueError, match="no stock variant named 'nope'"):
        Experiment(variants=[*base, recipe, stock], search={"match": "nope"})
    with pytest.raises(ValueError, match="unknown search type"):
        Experiment(variants=[*base, recipe, stock], search={"types": ["Q4_1"]})
    with pytest.raises(ValueError, match="fewer than the 100 tokens llama-perplexity needs"):
        SearchConfig(chunks=2, ctx_size=64)


def test_each_recipe_may_take_its_own_stock_variants_size():
    f16 = VariantConfig(name="F16", type="F16")
    big = VariantConfig(name="Q4_K_M-imat", type="Q4_K_M", imatrix=True)
    small = VariantConfig(name="IQ4_XS-imat", type="IQ4_XS", imatrix=True)
    at_big = VariantConfig(name="r1", type="Q4_K_M", imatrix=True, recipe="search")
    at_small = VariantConfig(name="r2", type="IQ4_XS", imatrix=True, recipe="search", match="IQ4_XS-imat")
    exp = Experiment(variants=[f16, big, small, at_big, at_small], search={"budget_bpw": 5.0})
    assert exp.budget_variant(at_small) == small and exp.budget_variant(at_big) == big
    with pytest.raises(ValueError, match="variant r2: no stock variant named 'Q3'"):
        Experiment(variants=[f16, big, at_small.model_copy(update={"match": "Q3"})])
    with pytest.raises(ValueError, match="match is the budget of a searched recipe"):
        VariantConfig(name="x", type="Q4_0", match="Q4_K_M-imat")
