"""A per-tensor quantization recipe: tensor groups, their exact sizes, the allocation under a size budget, the file.

Pure functions, tested without binaries; harness.models.search runs the tools that measure what they need.

- Which tensors llama-quantize quantizes, and to which type a requested type really becomes (a row length that the
  type's block does not divide falls back, e.g. Q4_K -> Q5_0 for 576 columns), is read from the tool's own
  `--dry-run` output (`dry_run_types`), not re-derived here.
- A tensor's bytes at a type are ggml's: rows x row size, from gguf-py's block table (`tensor_bytes`); a GGUF file is
  its header plus every tensor padded to the file's alignment (`padded`), which the tests check against real
  files.
- The allocation (`allocate`) chooses one type per group to minimise the summed measured KL divergence with the
  file within the budget: a multiple-choice knapsack, solved exactly by scipy's `milp` (HiGHS, branch and bound; the
  reported gap is HiGHS's own bound on how far from optimal the answer can be, 0 when proven optimal).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from scipy.optimize import Bounds, LinearConstraint, milp

from harness.errors import ModelError

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# "[  34/ 272]            blk.3.attn_v.weight - [   576,    192,      1,      1], type =    f16, size = ..."
_DRY_RUN_RE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*\w+,\s*(?P<rest>.*)$")
_TO_TYPE_RE = re.compile(r"->\s*[\d.]+\s*MiB\s*\((?P<type>\w+)\)")


@dataclass(frozen=True)
class Group:
    """Tensors that take one type together: one tensor, or one tensor kind over a run of layers."""

    name: str
    tensors: tuple[str, ...]


def dry_run_types(lines: Sequence[str]) -> dict[str, str]:
    """Tensor name -> the type llama-quantize --dry-run would give it, for the tensors it quantizes (upper case)."""
    types: dict[str, str] = {}
    for line in lines:
        match = _DRY_RUN_RE.match(line.strip())
        if match and (to := _TO_TYPE_RE.search(match["rest"])):
            types[match["name"]] = to["type"].upper()
    return types


def tensor_bytes(type_name: str, n_elements: int) -> int:
    """ggml's size of a tensor of `n_elements` at a type: whole blocks of the type's block size."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    if n_elements % block:
        raise ModelError(f"{n_elements} elements are not whole {type_name} blocks of {block}")
    return n_elements // block * size


def padded(n_bytes: int, alignment: int) -> int:
    return -(-n_bytes // alignment) * alignment


def make_groups(tensors: Sequence[str], granularity: str, layer_blocks: int) -> list[Group]:
    """The searched tensors in groups: each on its own ("tensor"), or ("block") each kind of layer tensor over
    `layer_blocks` contiguous runs of layers, and each tensor outside the layers on its own. Ordered as given."""
    if granularity == "tensor":
        return [Group(t, (t,)) for t in tensors]
    layers = sorted({int(m[1]) for t in tensors if (m := _LAYER_RE.match(t))})
    blocks = max(1, min(layer_blocks, len(layers)))
    edges = np.array_split(np.array(layers, dtype=int), blocks) if layers else []
    block_of = {layer: (int(run[0]), int(run[-1])) for run in edges for layer in run}
    members: dict[str, list[str]] = {}
    for t in tensors:
        if m := _LAYER_RE.match(t):
            first, last = block_of[int(m[1])]
            key = f"blk.{first}-{last}.{m[2]}" if first != last else f"blk.{first}.{m[2]}"
        else:
            key = t
        members.setdefault(key, []).append(t)
    return [Group(name, tuple(ts)) for name, ts in members.items()]


@dataclass(frozen=True)
class Allocation:
    types: dict[str, str]  # group -> chosen candidate type
    predicted_kld: float  # the sum of the chosen options' measured KLD
    bytes: int  # the chosen options' padded tensor bytes
    gap: float  # HiGHS's bound on the relative distance to the optimum (0: proven optimal)


def allocate(kld: Mapping[str, Mapping[str, float]], size: Mapping[str, Mapping[str, int]], budget: int) -> Allocation:
    """One option per group (kld[group][option], size[group][option] in bytes) minimising the summed KLD with the
    summed size at most `budget`: a 0/1 programme (each group's options sum to 1; sizes within the budget)."""
    options = [(g, o) for g in kld for o in kld[g]]
    if not options:
        raise ModelError("the recipe search measured no option to choose from")
    cost = np.array([kld[g][o] for g, o in options], dtype=float)
    weight = np.array([size[g][o] for g, o in options], dtype=float)
    groups = list(kld)
    one_each = np.array([[1.0 if g == group else 0.0 for g, _ in options] for group in groups])
    smallest = sum(min(size[g][o] for o in kld[g]) for g in groups)
    if smallest > budget:
        raise ModelError(
            f"no recipe fits the budget: the smallest types take {smallest:,} bytes of tensors, "
            f"{smallest - budget:,} more than the {budget:,} the budget leaves; raise it or add smaller types"
        )
    # KLDs are small numbers (1e-4 and below): scaled to order 1 so that HiGHS's absolute gap tolerance does not
    # end the search early, and asked for no relative gap at all.
    scale = float(np.max(np.abs(cost))) or 1.0
    result = milp(
        cost / scale,
        integrality=np.ones(len(options)),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(weight[np.newaxis, :], -np.inf, budget)],
        options={"mip_rel_gap": 0.0},
    )
    if not result.success or result.x is None:
        raise ModelError(f"the recipe allocation found no solution: {result.message}")
    chosen = {g: o for (g, o), x in zip(options, result.x, strict=True) if x > 0.5}
    gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
    return Allocation(
        types=chosen,
        predicted_kld=float(sum(kld[g][o] for g, o in chosen.items())),
        bytes=int(sum(size[g][o] for g, o in chosen.items())),
        gap=0.0 if math.isclose(gap, 0.0, abs_tol=1e-12) else gap,
    )


def recipe_text(types: Mapping[str, str]) -> str:
    """A `--tensor-type-file` naming every tensor (anchored, so blk.3 never matches blk.30): `^NAME$=type` lines."""
    return "".join(f"^{re.escape(name)}$={t.lower()}\n" for name, t in types.items())


def parse_recipe(text: str) -> dict[str, str]:
    """The tensor -> type lines recipe_text writes (for reading a recipe back)."""
    types = {}
    for line in text.split():
        pattern, _, t = line.rpartition("=")
        name = pattern.removeprefix("^").removesuffix("$").replace("\\", "")
        types[name] = t.upper()
    return types
