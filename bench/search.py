"""Which load level to measure next: the configured levels, then (with a search) probes towards the capacity.

A level is a number of users (closed loop) or an offered rate in requests/s (open loop). The capacity search
doubles from the highest passing level until one fails or the bound, then bisects between the highest pass and the
lowest fail above it until they are `resolution` apart (GuideLLM's goodput profile and vLLM's SLA sweep do the same).
Pure, fed each finished level's verdict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence


def check_levels(levels: Sequence[float], *, integer: bool) -> None:
    """The one rule for load levels: distinct positive values in increasing order (whole numbers of users)."""
    if not levels or any(v <= 0 for v in levels) or list(levels) != sorted(set(levels)):
        raise ValueError(
            f"steps must be distinct positive load levels in increasing order, e.g. [1, 2, 4, 8]; got {list(levels)}"
        )
    if integer and any(float(v) != int(v) for v in levels):
        raise ValueError(f"closed-loop steps are numbers of users (whole numbers); got {list(levels)}")


class CapacitySearch:
    """Where the next probe goes (see the module docstring). `add` each measured level's (level, passed);
    `interval` is the capacity as [last pass, first fail] (0 when even the smallest level failed; first fail None
    when no level failed up to the bound)."""

    def __init__(self, bound: float, resolution: float = 1, *, integer: bool = True) -> None:
        self.bound = bound
        self.resolution = resolution
        self.integer = integer
        self.results: dict[float, bool] = {}
        self.stopped_by: str | None = None

    def add(self, level: float, passed: bool) -> None:
        self.results[level] = passed

    @property
    def first_fail(self) -> float | None:
        return min((lv for lv, ok in self.results.items() if not ok), default=None)

    @property
    def last_pass(self) -> float:
        fail = self.first_fail
        return max((lv for lv, ok in self.results.items() if ok and (fail is None or lv < fail)), default=0)

    @property
    def interval(self) -> tuple[float, float | None]:
        return self.last_pass, self.first_fail

    def next_level(self) -> float | None:
        """The next probe, or None when the search is done (and `stopped_by` says why)."""
        low, high = self.interval
        if high is None:
            if low >= self.bound:
                self.stopped_by = "bound"
                return None
            return min(max(2 * low, 1 if self.integer else self.resolution), self.bound)
        if self.integer and low == 0 and high <= 1:
            self.stopped_by = "fails at 1 user"
            return None
        if high - low <= self.resolution:
            self.stopped_by = "resolution"
            return None
        middle = (low + high) / 2
        return math.floor(middle) if self.integer else round(middle, 6)


def level_sequence(
    levels: Sequence[float], search: CapacitySearch | None, *, probing: bool, done: dict[float, bool | None]
) -> Iterator[tuple[int, float, bool]]:
    """The levels to run, in order, as (index, level, probe): the configured levels, then (with `probing`) the
    search's probes. The caller adds each measured level's verdict to `search` before asking for the next. Levels in
    `done` (measured by an earlier attempt) are skipped, their verdicts added to `search` as if just measured, so a
    resumed run continues the same search where it stopped."""
    index = 0
    for level in levels:
        if level in done:
            if search is not None and done[level] is not None:
                search.add(level, bool(done[level]))
        else:
            yield index, level, False
        index += 1
    if search is None or not probing:
        return
    while (probe := search.next_level()) is not None:
        if done.get(probe) is not None:
            search.add(probe, bool(done[probe]))
        else:
            yield index, probe, True
        index += 1
