"""The per-tensor recipe search of a `recipe = "search"` variant (the `[search]` section).

1. Which tensors llama-quantize quantizes and what each candidate type really becomes for each of them: one
   `--dry-run` per candidate type (fallbacks included, as the tool decides them).
2. Sensitivity, measured: for each tensor group and each distinct type it can take, the group alone is quantized
   (with the importance matrix; every other tensor kept at the baseline's 16 bits) and its KL divergence against
   the baseline is measured by llama-perplexity on the *calibration* text (the importance matrix's text, never the
   held-out text the KLD stage judges on). Each measurement is remembered as soon as it is made, so an interrupted
   search resumes where it stopped.
3. Allocation: one type per group minimising the summed measured KLD with the file within the budget (exact bytes,
   harness.models.recipe.allocate: scipy's milp).
4. The recipe is written as a `--tensor-type-file` naming each tensor's type, quantized like any variant and checked
   to have exactly the predicted size; its own calibration KLD is measured beside the additive prediction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gguf import GGUFReader
from pydantic import Field

from harness.cache import atomic_dir, file_sha256
from harness.config import SearchConfig, VariantConfig
from harness.corpus import corpus_text
from harness.errors import ConfigError, ModelError
from harness.kld import base_logits, run_kld
from harness.models.recipe import (
    Allocation,
    Group,
    allocate,
    dry_run_types,
    make_groups,
    padded,
    recipe_text,
    tensor_bytes,
)
from harness.records import Record, RecordError, inputs_digest, read_record, write_record
from harness.tools import strip_log_prefix

if TYPE_CHECKING:
    from harness.context import RunContext

log = logging.getLogger(__name__)

SEARCH_VERSION = 1
RECIPE_FILE = "tensor-types.txt"


class Option(Record):
    """One way a group can be quantized: the type each of its tensors takes, what it costs and adds."""

    requested: list[str]  # the candidate types that give these tensor types (several when fallbacks coincide)
    types: list[str]  # per tensor of the group, as llama-quantize makes it
    bytes: int  # the group's padded tensor bytes
    kld: float | None = None  # measured on the calibration text: mean KLD with this group alone quantized
    seconds: float = 0.0


class GroupRecord(Record):
    name: str
    tensors: list[str]
    options: dict[str, Option]  # by "+".join(types)


class Sensitivity(Record):
    """Every measurement of one search (remembered as it is made: a resumed search skips what is here)."""

    groups: list[GroupRecord] = Field(default_factory=list)
    header_bytes: int | None = None  # where a quantized file's tensor data starts (the same for every one)


class SearchRecord(Record):
    """search.json beside a recipe: what was measured, what was chosen, what it predicted and what it gave."""

    budget_bytes: int
    budget_from: str
    header_bytes: int
    fixed_bytes: int  # tensors no type of the search changes (norms), padded
    types: list[str]
    excluded: list[str] = []
    granularity: str
    groups: list[GroupRecord]
    chosen: dict[str, str]  # group -> option key
    predicted_kld: float  # summed measured KLD of the chosen options (calibration text)
    measured_kld: float | None  # the recipe's own calibration KLD (how additive the groups were)
    predicted_bytes: int
    file_bytes: int
    gap: float
    measurements: int
    seconds: float
    calibration: str


@dataclass(frozen=True)
class RecipeModel:
    """What the models stage needs of a searched recipe."""

    path: Path  # the quantized GGUF
    recipe: Path  # its --tensor-type-file
    record: SearchRecord
    key: str


def search_key(baseline_key: str, imatrix_key: str, text: Path, cfg: SearchConfig, tool: str) -> str:
    """What decides the sensitivity measurements: the baseline, the importance matrix, the calibration text, the
    groups and candidate types, the measurement's context and chunks, the tool (not the budget: one measurement
    serves every budget)."""
    return inputs_digest({
        "kind": "sensitivity", "v": SEARCH_VERSION, "baseline": baseline_key, "imatrix": imatrix_key,
        "text": file_sha256(text), "types": cfg.types, "granularity": cfg.granularity,
        "blocks": cfg.layer_blocks, "chunks": cfg.chunks, "ctx": cfg.ctx_size, "tool": tool,
    })  # fmt: skip


def make_recipe(
    ctx: RunContext, variant: VariantConfig, *, baseline: Path, baseline_key: str, imatrix: Path, imatrix_key: str,
    budget: tuple[int, str], tool: str, step: str = "",
) -> RecipeModel:  # fmt: skip
    """The searched recipe's GGUF for `variant` within `budget` (bytes, and where it came from), cached by the
    measurements' key, the budget and the variant's file type."""
    if ctx.build.era != "current":
        raise ConfigError(f"variant {variant.name}: a recipe search needs llama-quantize --tensor-type-file "
                          f"(current llama.cpp builds); this build is b{ctx.build.build_number}")  # fmt: skip
    cfg = ctx.experiment.search
    text = corpus_text(ctx.experiment.corpus, "imatrix", cache=ctx.cache, llamacpp_tree=ctx.build.tree)
    skey = search_key(baseline_key, imatrix_key, text, cfg, tool)
    key = inputs_digest({
        "kind": "recipe", "sensitivity": skey, "budget": budget[0], "type": variant.type, "exclude": cfg.exclude_types,
    })  # fmt: skip
    entry = ctx.cache.models / f"recipe-{key}"

    def fill(tmp: Path) -> None:
        search = _Search(ctx, variant, baseline, imatrix, text, ctx.cache.models / f"sensitivity-{skey}.json", step)
        search.run(budget, tmp)

    atomic_dir(entry, fill)
    try:
        record = read_record(entry / "search.json", SearchRecord)
    except (FileNotFoundError, RecordError) as exc:
        raise ModelError(f"the recipe cache entry {entry} is damaged ({exc}); delete it and run again") from None
    return RecipeModel(path=entry / f"model-{variant.type}-recipe.gguf", recipe=entry / RECIPE_FILE, record=record,
                       key=f"recipe-{key}")  # fmt: skip


class _Search:
    def __init__(
        self, ctx: RunContext, variant: VariantConfig, baseline: Path, imatrix: Path, text: Path, memo: Path,
        step: str,
    ) -> None:  # fmt: skip
        self.ctx, self.variant, self.baseline, self.imatrix, self.text, self.memo = (
            ctx, variant, baseline, imatrix, text, memo
        )  # fmt: skip
        self.cfg = ctx.experiment.search
        self.step = step
        self.logs = ctx.run.logs("models") / f"search-{variant.name}"
        self.compute = ctx.compute(ctx.experiment.model.threads)
        self._memo_header: int | None = None

    def run(self, budget: tuple[int, str], out: Path) -> None:
        started = time.monotonic()
        reader = GGUFReader(self.baseline)
        elements = {t.name: int(t.n_elements) for t in reader.tensors}
        source_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
        alignment = int(reader.alignment)
        as_type = {t: self._dry_run(t) for t in self.cfg.types}
        searched = [name for name in elements if all(name in types for types in as_type.values())]
        if not searched:
            raise ModelError(f"variant {self.variant.name}: llama-quantize quantizes no tensor of {self.baseline}")
        groups = make_groups(searched, self.cfg.granularity, self.cfg.layer_blocks)
        sensitivity = self._options(groups, as_type, elements, alignment)
        base_file = self._base_logits()
        header = self._measure(sensitivity, base_file, started)
        fixed = sum(padded(source_bytes[n], alignment) for n in elements if n not in searched)
        tensor_budget = budget[0] - header - fixed
        kld = {g.name: {k: o.kld for k, o in g.options.items() if o.kld is not None} for g in sensitivity.groups}
        size = {g.name: {k: o.bytes for k, o in g.options.items()} for g in sensitivity.groups}
        allocation = allocate(kld, size, tensor_budget)  # type: ignore[arg-type]
        per_tensor = self._per_tensor(sensitivity, allocation)
        (out / RECIPE_FILE).write_text(recipe_text(per_tensor), encoding="utf-8")
        model = out / f"model-{self.variant.type}-recipe.gguf"
        self._quantize(out / RECIPE_FILE, model, f"quantize-{self.variant.name}.log", self.variant.type)
        predicted = header + fixed + allocation.bytes
        actual = model.stat().st_size
        if actual != predicted or actual > budget[0]:
            raise ModelError(f"variant {self.variant.name}: the recipe's file has {actual:,} bytes, predicted "
                             f"{predicted:,} within a budget of {budget[0]:,} (log: {self.logs})")  # fmt: skip
        measured = self._kld(model, base_file, "recipe")
        log.info("models: %s %s recipe: predicted calibration KLD %.5f, measured %.5f, %s of %s bytes (gap %.2g)",
                 self.step, self.variant.name, allocation.predicted_kld, measured, f"{actual:,}",
                 f"{budget[0]:,}", allocation.gap)  # fmt: skip
        write_record(out / "search.json", SearchRecord(
            budget_bytes=budget[0], budget_from=budget[1], header_bytes=header, fixed_bytes=fixed,
            types=self.cfg.types, excluded=self.cfg.exclude_types, granularity=self.cfg.granularity,
            groups=sensitivity.groups,
            chosen=allocation.types, predicted_kld=allocation.predicted_kld, measured_kld=measured,
            predicted_bytes=predicted, file_bytes=actual, gap=allocation.gap,
            measurements=sum(o.kld is not None for g in sensitivity.groups for o in g.options.values()),
            seconds=round(time.monotonic() - started, 2), calibration=str(self.text),
        ))  # fmt: skip

    # ------------------------------------------------------------ steps

    def _dry_run(self, type_name: str) -> dict[str, str]:
        """Tensor -> the type llama-quantize makes of `type_name` for it (the tensors it quantizes)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        pattern = self.logs / f"all-{type_name.lower()}.txt"
        pattern.write_text(f".={type_name.lower()}\n", encoding="utf-8")
        args = ["--dry-run", "--imatrix", str(self.imatrix), "--tensor-type-file", str(pattern),
                str(self.baseline), "Q8_0"]  # fmt: skip
        run = self.ctx.tools.run("llama-quantize", args, log_path=self.logs / "dry-run.log", compute=self.compute)
        types = dry_run_types([strip_log_prefix(line) for line in run.lines])
        if not run.ok or not types:
            raise run.error(ModelError, f"variant {self.variant.name}: llama-quantize --dry-run {type_name}")
        return types

    def _options(
        self, groups: list[Group], as_type: dict[str, dict[str, str]], elements: dict[str, int], alignment: int
    ) -> Sensitivity:
        """Each group's distinct options (candidate types whose tensor types coincide are one), with what the
        memo already measured."""
        known = self._memo()
        out = Sensitivity()
        for group in groups:
            old = known.get(group.name)
            options: dict[str, Option] = {}
            for requested, types in as_type.items():
                per_tensor = [types[t] for t in group.tensors]
                if set(per_tensor) & set(self.cfg.exclude_types):
                    continue
                key = "+".join(dict.fromkeys(per_tensor))
                if key in options:
                    options[key].requested.append(requested)
                    continue
                pairs = zip(group.tensors, per_tensor, strict=True)
                size = sum(padded(tensor_bytes(ty, elements[t]), alignment) for t, ty in pairs)
                previous = old.options.get(key) if old and old.tensors == list(group.tensors) else None
                options[key] = Option(requested=[requested], types=per_tensor, bytes=size,
                                      kld=previous.kld if previous else None,
                                      seconds=previous.seconds if previous else 0.0)  # fmt: skip
            if not options:
                raise ConfigError(f"search: every type of search.types becomes one of search.exclude_types for "
                                  f"{group.name}; allow more types")  # fmt: skip
            out.groups.append(GroupRecord(name=group.name, tensors=list(group.tensors), options=options))
        out.header_bytes = self._memo_header
        return out

    def _measure(self, sensitivity: Sensitivity, base_file: Path, started: float) -> int:
        """Measure every option not yet measured (remembering each at once); the quantized files' header size."""
        todo = [(g, k) for g in sensitivity.groups for k, o in g.options.items() if o.kld is None]
        total = sum(len(g.options) for g in sensitivity.groups)
        log.info("models: %s %s: sensitivity of %d groups, %d measurements (%d remembered)", self.step,
                 self.variant.name, len(sensitivity.groups), total, total - len(todo))  # fmt: skip
        spent: list[float] = []
        for n, (group, key) in enumerate(todo, 1):
            self._check_time(started, spent, len(todo) - n + 1)
            option = group.options[key]
            t0 = time.monotonic()
            with _scratch(self.logs) as model:
                self._quantize_group(group, option, model)
                sensitivity.header_bytes = sensitivity.header_bytes or _header_bytes(model)
                option.kld = self._kld(model, base_file, f"{group.name}={key}")
            option.seconds = round(time.monotonic() - t0, 2)
            spent.append(option.seconds)
            self._remember(sensitivity)
            log.info("models: %s %s [%d/%d] %s as %s: KLD %.5f", self.step, self.variant.name, n, len(todo),
                     group.name, key, option.kld)  # fmt: skip
        if sensitivity.header_bytes is None:  # a memo of an older version: one group quantized for the header
            group = sensitivity.groups[0]
            with _scratch(self.logs) as model:
                self._quantize_group(group, next(iter(group.options.values())), model)
                sensitivity.header_bytes = _header_bytes(model)
        return sensitivity.header_bytes

    def _quantize_group(self, group: GroupRecord, option: Option, model: Path) -> None:
        """`group` alone quantized to `option` (every other tensor kept at 16 bits: `.=f16` after its lines)."""
        recipe = self.logs / "group.txt"
        recipe.write_text(recipe_text(dict(zip(group.tensors, option.types, strict=True))) + ".=f16\n")
        self._quantize(recipe, model, "sensitivity.log", "Q8_0")

    def _check_time(self, started: float, spent: list[float], left: int) -> None:
        elapsed = time.monotonic() - started
        if len(spent) >= 2:
            expected = elapsed + left * sum(spent) / len(spent)
            if expected > self.cfg.time_budget_s:
                raise ModelError(
                    f"variant {self.variant.name}: the recipe search would take about {expected / 60:.0f} min, over "
                    f"search.time_budget_s = {self.cfg.time_budget_s:g} s ({left} measurements left at "
                    f"{sum(spent) / len(spent):.1f} s each; those made are remembered): raise it, or use fewer "
                    "search.types or search.layer_blocks"
                )

    def _per_tensor(self, sensitivity: Sensitivity, allocation: Allocation) -> dict[str, str]:
        chosen: dict[str, str] = {}
        for group in sensitivity.groups:
            option = group.options[allocation.types[group.name]]
            chosen.update(zip(group.tensors, option.types, strict=True))
        return chosen

    def _quantize(self, recipe: Path, output: Path, log_name: str, file_type: str) -> None:
        """llama-quantize with a tensor-type file naming every tensor it sets (the file type then only labels the
        GGUF; per-tensor types apply only under a quantized file type, so a sensitivity run uses Q8_0 with `.=f16`
        for every tensor but its group)."""
        args = ["--imatrix", str(self.imatrix), "--tensor-type-file", str(recipe), str(self.baseline), str(output),
                file_type]  # fmt: skip
        run = self.ctx.tools.run("llama-quantize", args, log_path=self.logs / log_name, compute=self.compute, tail=40)
        if not run.ok or not output.is_file():
            raise run.error(ModelError, f"variant {self.variant.name}: llama-quantize --tensor-type-file {recipe}")

    def _base_logits(self) -> Path:
        cfg = self.cfg
        path, _ppl = base_logits(
            self.ctx.tools, self.baseline, self.text, ctx_size=cfg.ctx_size, chunks=cfg.chunks, cache=self.ctx.cache,
            log_path=self.logs / "base.log", compute=self.compute,
        )  # fmt: skip
        return path

    def _kld(self, model: Path, base_file: Path, what: str) -> float:
        stats = run_kld(
            self.ctx.tools, model, base_file, ctx_size=self.cfg.ctx_size, chunks=self.cfg.chunks,
            log_path=self.logs / "kld.log", compute=self.compute, desc=f"KLD {what}",
        )  # fmt: skip
        return stats.mean_kld

    def _remember(self, sensitivity: Sensitivity) -> None:
        """Write the measurements made so far into the memo, keeping what it holds beside them (options that
        search.exclude_types leaves out of this search stay remembered for another)."""
        known = self._memo()
        merged = sensitivity.model_copy(deep=True)
        for group in merged.groups:
            old = known.get(group.name)
            if old is not None and old.tensors == group.tensors:
                group.options = {**old.options, **group.options}
        write_record(self.memo, merged)

    def _memo(self) -> dict[str, GroupRecord]:
        try:
            memo = read_record(self.memo, Sensitivity)
        except (FileNotFoundError, RecordError):
            return {}
        self._memo_header = memo.header_bytes
        return {g.name: g for g in memo.groups}


class _scratch:  # noqa: N801 - used as a context manager like a function
    """A temporary GGUF path beside the search's logs, removed on every exit."""

    def __init__(self, where: Path) -> None:
        self.path = where / "scratch.gguf"

    def __enter__(self) -> Path:
        self.path.unlink(missing_ok=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _header_bytes(model: Path) -> int:
    """Where a GGUF's tensor data starts: its header, metadata and tensor table, padded."""
    reader = GGUFReader(model)
    return min(int(t.data_offset) for t in reader.tensors)


def budget_of(ctx: RunContext, variant: VariantConfig, n_params: int, sizes: dict[str, int]) -> tuple[int, str]:
    """A recipe's budget in bytes and where it came from: its own `match`, search.budget_bytes, budget_bpw, or the
    file size of the stock variant it must match (`sizes`: the stock variants made, by name)."""
    cfg = ctx.experiment.search
    if not variant.match and cfg.budget_bytes is not None:
        return cfg.budget_bytes, f"search.budget_bytes = {cfg.budget_bytes:,}"
    if not variant.match and cfg.budget_bpw is not None:
        return int(cfg.budget_bpw * n_params / 8), f"search.budget_bpw = {cfg.budget_bpw:g}"
    stock = ctx.experiment.budget_variant(variant)
    assert stock is not None and stock.name in sizes  # Experiment validation; the stage makes stock ones first
    return sizes[stock.name], f"the size of {stock.name}"
