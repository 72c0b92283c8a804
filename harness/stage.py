"""What a stage is, and the one place that decides what is fresh, writes the outputs and records the failures.

A stage declares its units (the models stage: one; MMLU and KL divergence: one per variant; the load: one per
target and variant), the inputs that determine each unit's output (digested), where that output lives and its
record type, and how to make the outputs of the stale units. `Stage.run` does the rest for every stage alike:
units whose output holds its inputs' digest are kept as they are, the others are made; each made record is written
stamped with its digest, and a unit that failed is recorded beside its missing output (the report shows it) while
the other units go on; the stage then ends with one error naming the failures, marked partial so the pipeline goes
on with the next stages. `run` returns every unit's record, fresh or new.
"""

from __future__ import annotations

import datetime as dt
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from harness.errors import HarnessError
from harness.records import RecordError, StageRecord, UnitFailure, inputs_digest, is_fresh, read_record, write_record

if TYPE_CHECKING:
    from harness.context import RunContext

log = logging.getLogger(__name__)

R = TypeVar("R", bound=StageRecord)


@dataclass(frozen=True)
class Unit:
    """One unit of a stage's work: the whole stage, a variant, or one target's measurement of a variant."""

    key: str  # unique within the stage: "models", "Q4_0", "llama-server/Q4_0"
    variant: str | None = None
    target: str | None = None
    label: str = ""  # for people ("Q4_0 on llama-server"); the key when empty

    def __str__(self) -> str:
        return self.label or self.key


class Stage(ABC, Generic[R]):
    """One step of the pipeline (see the module docstring)."""

    name: ClassVar[str]
    what: ClassVar[str]  # what a unit's output is, for people: "MMLU", "KL divergence", "load"
    record: ClassVar[type[StageRecord]]
    error: ClassVar[type[HarnessError]] = HarnessError

    def enabled(self, ctx: RunContext) -> bool:
        return True

    @abstractmethod
    def units(self, ctx: RunContext) -> list[Unit]:
        """What this stage produces an output for."""

    @abstractmethod
    def inputs(self, ctx: RunContext, unit: Unit) -> Any:
        """A JSON-able description of everything that determines `unit`'s output."""

    @abstractmethod
    def output(self, ctx: RunContext, unit: Unit) -> Path:
        """Where `unit`'s record lives in the run directory."""

    @abstractmethod
    def make(self, ctx: RunContext, units: list[Unit]) -> Iterator[tuple[Unit, R | HarnessError]]:
        """Make the outputs of `units` (the stale ones), yielding each unit's record, or the error that stopped it
        (the other units go on), as it is done."""

    def digest(self, ctx: RunContext, unit: Unit) -> str:
        return inputs_digest(self.inputs(ctx, unit))

    def usable(self, ctx: RunContext, unit: Unit, record: R) -> bool:
        """Whether a fresh record can be used as it is (the models stage checks its files are still there)."""
        return True

    def run(self, ctx: RunContext) -> dict[Unit, R]:
        """Keep the fresh outputs, make the stale ones, write them and record the failures; every unit's record."""
        results: dict[Unit, R] = {}
        digests: dict[Unit, str] = {}
        for unit in self.units(ctx):
            digests[unit] = digest = self.digest(ctx, unit)
            path = self.output(ctx, unit)
            if is_fresh(path, digest):
                try:
                    record: R = read_record(path, self.record)  # type: ignore[assignment]
                except (FileNotFoundError, RecordError):
                    continue
                if self.usable(ctx, unit, record):
                    results[unit] = record
        stale = [unit for unit in digests if unit not in results]
        failures = []
        if stale:
            for unit, outcome in self.make(ctx, stale):
                path = self.output(ctx, unit)
                failure = ctx.run.failure(path)
                if isinstance(outcome, HarnessError):
                    write_record(failure, UnitFailure(unit=unit.key, what=self.what, error=str(outcome), at=_now()))
                    log.error("%s: %s failed: %s", self.what, unit, outcome)
                    failures.append(f"{self.what} failed for {unit}: {outcome}")
                    continue
                write_record(path, outcome, digest=digests[unit])
                failure.unlink(missing_ok=True)
                results[unit] = read_record(path, self.record)  # type: ignore[assignment]
        if failures:
            more = f" (and {len(failures) - 1} more; see llamasys.log)" if len(failures) > 1 else ""
            raise self.error(f"{failures[0]}{more}", partial=True)
        return results


def by_variant(results: Iterable[tuple[Unit, Any]] | dict[Unit, Any]) -> dict[str, Any]:
    """A stage's records by variant name."""
    items = results.items() if isinstance(results, dict) else results
    return {unit.variant or unit.key: record for unit, record in items}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
