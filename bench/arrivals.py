"""How requests arrive: closed-loop users, or open-loop request rates; a registry keyed by `kind`.

Closed loop (`users`): a load level is a number of users, each sending its next request as soon as its previous
one ended. The server sets the pace: under overload latency grows, but so does the time between requests.
Open loop (`constant`, `poisson`, `gamma`): a load level is an offered rate in requests per second; requests arrive
on their own schedule whatever the server does (as traffic from many independent clients does), and at most
`max_in_flight` are in flight at once. A request that arrives while all of those are busy waits for one (its
latency is counted from its arrival, so the wait is in it: it is *late*); one that would wait longer than
`max_wait_s` is *dropped* (recorded as a failed request). Offered rate = the level; achieved rate = requests
sent per second of the step.

Adding a kind is one class with `@register("name")` (the ARRIVALS registry's decorator) in any module imported
before plans are read; an unknown kind's error lists the known ones.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.registry import Registry

ARRIVALS: Registry[type[Arrival]] = Registry("arrival kind")
# A request that waited longer than this for a free user after arriving counts as late (timer jitter stays below).
LATE_S = 0.05


register = ARRIVALS.add  # `@register("poisson")`: an arrival process available as `arrival.kind = "poisson"`


def arrival_from(data: Any) -> Arrival:
    """The arrival process `data` describes (a dict with `kind`, a kind name, or an Arrival)."""
    if isinstance(data, Arrival):
        return data
    if isinstance(data, str):
        data = {"kind": data}
    if not isinstance(data, dict):
        raise ValueError(f"an arrival process is a table with a kind, e.g. {{kind = 'poisson'}}; got {data!r}")
    return ARRIVALS[data.get("kind", "users")].model_validate(data)


class Arrival(BaseModel):
    """Base of the arrival processes: what a load level means and, when open, when requests arrive."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    open_loop: ClassVar[bool] = False
    unit: ClassVar[str] = "users"  # what a level counts

    def describe_level(self, level: float) -> str:
        return f"{level:g} {self.unit}"

    def intervals(self, rate: float, rng: random.Random) -> Iterator[float]:
        """Seconds between consecutive arrivals at `rate` requests/s (open loop only)."""
        raise NotImplementedError(f"{self.kind} arrivals have no schedule: each user sends when it is free")


@register("users")
class ClosedLoop(Arrival):
    """Closed loop: `level` users, each waiting for its previous response before sending again."""

    kind: Literal["users"] = "users"


class OpenLoop(Arrival):
    """Open loop at a rate: requests arrive on schedule; at most `max_in_flight` are in flight at once."""

    open_loop: ClassVar[bool] = True
    unit: ClassVar[str] = "requests/s"
    max_in_flight: int = Field(default=16, ge=1, le=4096, description="requests in flight at once (Locust users)")
    max_wait_s: float = Field(default=60.0, ge=0, description="a request waiting longer for a free slot is dropped")
    seed: int | None = Field(default=None, description="seed of the arrival times (None: a fresh one per run)")


@register("constant")
class Constant(OpenLoop):
    """One request every 1 / rate seconds."""

    kind: Literal["constant"] = "constant"

    def intervals(self, rate: float, rng: random.Random) -> Iterator[float]:
        while True:
            yield 1.0 / rate


@register("poisson")
class Poisson(OpenLoop):
    """A Poisson process: exponential gaps of mean 1 / rate (many independent clients)."""

    kind: Literal["poisson"] = "poisson"

    def intervals(self, rate: float, rng: random.Random) -> Iterator[float]:
        while True:
            yield rng.expovariate(rate)


@register("gamma")
class Gamma(OpenLoop):
    """Gamma-distributed gaps of mean 1 / rate with shape `burstiness` (vLLM's --burstiness): 1 is Poisson, below 1
    burstier (clumps and lulls), above 1 more even, towards constant."""

    kind: Literal["gamma"] = "gamma"
    burstiness: float = Field(default=1.0, gt=0)

    def intervals(self, rate: float, rng: random.Random) -> Iterator[float]:
        shape = self.burstiness
        scale = 1.0 / (rate * shape)
        while True:
            yield rng.gammavariate(shape, scale)


def expected_gap_cv(arrival: Arrival) -> float:
    """The coefficient of variation of the gaps (0 constant, 1 Poisson, 1/sqrt(k) gamma): for tests and reports."""
    if isinstance(arrival, Gamma):
        return 1 / math.sqrt(arrival.burstiness)
    return 1.0 if isinstance(arrival, Poisson) else 0.0
