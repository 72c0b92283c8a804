"""Stepped concurrency without Locust: the plan, the controller that runs it, and the gate users pass through.

A step at concurrency k goes: ramp (spawn users, hold them at the gate until all k have built their prompts),
run (release them together; each runs closed-loop), drain (no new requests; wait until every in-flight request
has finished and been recorded), then the next step. A request counts for step k only if it was sent and finished
while the step was running, i.e. entirely at concurrency k; the drain tail and anything sent outside a step is
recorded but not measured.

The controller runs where the load shape runs (the local runner or the master); the gate runs in every process
that has users (the local runner or each worker). They talk in small dict messages. Both are pure objects with
an injected clock and wait primitive, so they are tested without Locust, gevent or real time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from locustfiles._records import StepRecord
from locustfiles._slo import Objective, StepVerdict, add_sample, evaluate

EXIT_ABORTED = 3  # Locust's exit code when the step shape aborts the run

# Phases in the order they happen within one epoch; a message for an earlier (epoch, phase) is stale.
PHASES = ("ramp", "run", "drain", "done")


def check_steps(users: tuple[int, ...] | list[int]) -> None:
    """The one rule for concurrency steps: distinct positive user counts in increasing order."""
    if not users or any(u < 1 for u in users) or list(users) != sorted(set(users)):
        raise ValueError(
            f"steps must be distinct positive user counts in increasing order, e.g. [1, 2, 4, 8]; got {list(users)}"
        )


@dataclass(frozen=True)
class StepPlan:
    """Concurrency steps and how long each one measures: `requests_per_user` or `duration_s` (exactly one)."""

    users: tuple[int, ...] = (1, 2, 4, 8)
    requests_per_user: int | None = 3
    duration_s: float | None = None
    ready_timeout_s: float = 300.0  # users must build their prompts (tokenize, probe) within this
    drain_timeout_s: float = 660.0  # in-flight requests must end within this (the request timeout bounds them)
    objectives: tuple[Objective, ...] = ()  # each step is judged against them
    search: bool = False  # after `users`, probe higher (doubling), then bisect to the highest passing concurrency
    max_users: int | None = None  # the search's bound; None = the largest step
    search_resolution: int = 1
    min_requests: int | None = None  # a step may end early from this many measured requests, once decided
    max_requests: int | None = None  # a step ends at this many measured requests
    # Steps an earlier attempt measured (a resumed run): (users, passed or None without objectives). They are not
    # run again; their verdicts steer the search as if just measured.
    done: tuple[tuple[int, bool | None], ...] = ()

    def __post_init__(self) -> None:
        check_steps(self.users)
        if any(users < 1 for users, _ in self.done):
            raise ValueError(f"done steps must be positive user counts, got {[u for u, _ in self.done]}")
        if self.search and not self.objectives:
            raise ValueError("the capacity search needs latency objectives (--slo) to judge its steps")
        if self.max_users is not None and self.max_users < max(self.users):
            raise ValueError(f"max-users {self.max_users} is below the largest step {max(self.users)}")
        if self.search_resolution < 1:
            raise ValueError(f"search-resolution must be at least 1, got {self.search_resolution}")
        if self.min_requests is not None and not self.objectives:
            raise ValueError("ending a step early (min-requests) needs latency objectives (--slo) to decide")
        if self.min_requests and self.max_requests and self.min_requests > self.max_requests:
            raise ValueError(f"min-requests {self.min_requests} is above max-requests {self.max_requests}")
        if (self.requests_per_user is None) == (self.duration_s is None):
            raise ValueError("a step needs exactly one of requests-per-user and step-duration")
        if self.requests_per_user is not None and self.requests_per_user < 1:
            raise ValueError(f"requests-per-user must be at least 1, got {self.requests_per_user}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"step-duration must be positive, got {self.duration_s}")

    @staticmethod
    def parse_done(text: str) -> tuple[tuple[int, bool | None], ...]:
        """'1:pass,2:miss,4:done' -> ((1, True), (2, False), (4, None)); the inverse of `format_done`."""
        verdicts = {"pass": True, "miss": False, "done": None}
        done = []
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            users, _, verdict = part.partition(":")
            if not users.isdigit() or verdict not in verdicts:
                raise ValueError(f"done steps look like 1:pass,2:miss,4:done; got {part!r}")
            done.append((int(users), verdicts[verdict]))
        return tuple(done)

    @staticmethod
    def format_done(done: Collection[tuple[int, bool | None]]) -> str:
        return ",".join(f"{u}:{'done' if v is None else 'pass' if v else 'miss'}" for u, v in done)

    @staticmethod
    def parse_users(text: str) -> tuple[int, ...]:
        """'1,2,4,8' -> (1, 2, 4, 8)."""
        try:
            return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
        except ValueError:
            raise ValueError(f"steps must be comma-separated user counts like 1,2,4,8, got {text!r}") from None

    @property
    def bound(self) -> int:
        """The most users any step may have (the server is sized for it)."""
        return self.max_users or max(self.users)

    @staticmethod
    def spawn_rate(users: int) -> float:
        # Spawn fast: nobody starts before the whole step is ready, so the ramp's speed does not bias anything,
        # but Locust warns above 100 users/s.
        return float(min(100, max(1, 10 * users)))


class CapacitySearch:
    """Where the next probe goes: double from the highest pass until a step fails or the bound, then bisect
    between the highest pass and the lowest fail above it until they are `resolution` users apart.

    Fed every finished step's (users, passed); `interval` is the capacity as [last pass, first fail] (0 when even
    the smallest step failed; first fail None when no step failed up to the bound)."""

    def __init__(self, bound: int, resolution: int = 1) -> None:
        self.bound = bound
        self.resolution = resolution
        self.results: dict[int, bool] = {}
        self.stopped_by: str | None = None

    def add(self, users: int, passed: bool) -> None:
        self.results[users] = passed

    @property
    def first_fail(self) -> int | None:
        return min((u for u, ok in self.results.items() if not ok), default=None)

    @property
    def last_pass(self) -> int:
        fail = self.first_fail
        return max((u for u, ok in self.results.items() if ok and (fail is None or u < fail)), default=0)

    @property
    def interval(self) -> tuple[int, int | None]:
        return self.last_pass, self.first_fail

    def next_users(self) -> int | None:
        """The next probe, or None when the search is done (and `stopped_by` says why)."""
        low, high = self.interval
        if high is None:
            if low >= self.bound:
                self.stopped_by = "bound"
                return None
            return min(max(2 * low, 1), self.bound)
        if low == 0 and high <= 1:
            self.stopped_by = "fails at 1 user"
            return None
        if high - low <= self.resolution:
            self.stopped_by = "resolution"
            return None
        return (low + high) // 2


def step_sequence(plan: StepPlan, search: CapacitySearch | None) -> Iterator[tuple[int, int, bool]]:
    """The steps to run, in order, as (index, users, probe): the configured steps, then (with `plan.search`) the
    search's probes. The caller adds each measured step's verdict to `search` before asking for the next. Steps
    in `plan.done` are skipped, their verdicts added to `search` as if just measured, so a resumed run continues
    the same search where it stopped."""
    known = dict(plan.done)
    index = 0
    for users in plan.users:
        if users in known:
            if search is not None and known[users] is not None:
                search.add(users, bool(known[users]))
        else:
            yield index, users, False
        index += 1
    if search is None or not plan.search:
        return
    while (probe := search.next_users()) is not None:
        if known.get(probe) is not None:
            search.add(probe, bool(known[probe]))
        else:
            yield index, probe, True
        index += 1


def steps_pending(plan: StepPlan) -> bool:
    """Whether `plan` has any step left to run after its `done` steps."""
    search = CapacitySearch(plan.bound, plan.search_resolution) if plan.objectives else None
    return next(step_sequence(plan, search), None) is not None


class StepController:
    """Runs a `StepPlan`: decides the user count, opens and drains steps, and emits one `StepRecord` per step.

    Inputs are method calls (`tick`, `poll`, `on_ready`, `on_record`, `on_drained`); outputs go to `outbox` as
    (kind, payload) pairs: ("phase", message for every gate), ("step", StepRecord), ("abort", reason).
    `nodes()` names the processes whose gates must confirm a drain ("local" for a single process).

    With latency objectives every step is judged (its record says whether it passed, and may end early once that
    is certain); with `search`, the configured steps are followed by probes (`CapacitySearch`) up to the bound.
    """

    def __init__(
        self, plan: StepPlan, *, clock: Callable[[], float], nodes: Callable[[], Collection[str]], run: str = ""
    ) -> None:
        self.plan = plan
        self.clock = clock
        self.nodes = nodes
        self.run = run or uuid.uuid4().hex[:12]
        self.outbox: list[tuple[str, Any]] = []
        self.index = -1
        self.epoch = 0
        self.phase = "idle"
        self.error: str | None = None
        self.search = CapacitySearch(plan.bound, plan.search_resolution) if plan.objectives else None
        self._sequence = step_sequence(plan, self.search)
        self._users = plan.users[0]
        self._probe = False
        self._early = False
        self._samples: dict[str, list[float]] = {}
        self._ready: set[str] = set()
        self._ramp_started = 0.0
        self._window_start = 0.0
        self._window_end = 0.0
        self._drain_started = 0.0
        self._per_user: dict[str, int] = {}
        self._measured = 0
        self._unmeasured = 0
        self._acked: set[str] = set()

    @property
    def users(self) -> int:
        return self._users

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "aborted")

    def phase_message(self) -> dict[str, Any]:
        return {"run": self.run, "epoch": self.epoch, "step": self.index, "users": self.users, "phase": self.phase}

    # ------------------------------------------------------------------ inputs

    def tick(self) -> tuple[int, float] | None:
        """Locust's shape tick: the user count to run now, or None to end the test."""
        if self.phase == "idle":
            self._next_step()
        elif self.phase in ("ramp", "run", "drain"):
            # Repeated every tick for workers that connected late; gates ignore what they already know.
            self.outbox.append(("phase", self.phase_message()))
        self.poll()
        if self.finished:
            return None
        return self.users, StepPlan.spawn_rate(self.users)

    def poll(self) -> None:
        """Time-driven transitions: ready timeout, the end of a timed step, drain completion or timeout."""
        now = self.clock()
        if self.phase == "ramp" and now - self._ramp_started > self.plan.ready_timeout_s:
            self.abort(
                f"only {len(self._ready)} of {self.users} users were ready "
                f"{self.plan.ready_timeout_s:.0f} s after step {self.index} ({self.users} users) began"
            )
        elif self.phase == "run" and self.plan.duration_s is not None:
            if now - self._window_start >= self.plan.duration_s:
                self._enter_drain()
        elif self.phase == "drain":
            if self._acked >= set(self.nodes()):
                self._finish_step(timed_out=False)
            elif now - self._drain_started > self.plan.drain_timeout_s:
                self._finish_step(timed_out=True)

    def on_ready(self, user_id: str, error: str | None = None) -> None:
        """A user built its prompts (or could not: the load cannot start)."""
        if self.finished:
            return
        if error:
            self.abort(f"a user could not prepare its requests: {error}")
            return
        self._ready.add(user_id)
        self._maybe_run()

    def on_gone(self, user_id: str) -> None:
        """A user stopped (Locust removed it when a probe needs fewer users)."""
        self._ready.discard(user_id)
        self._maybe_run()

    def _maybe_run(self) -> None:
        # Exactly `users` live and ready: a step with fewer users than the last waits for the others to stop.
        if self.phase == "ramp" and len(self._ready) == self.users:
            self._enter_run()

    def on_record(self, record: dict[str, Any]) -> None:
        """A request finished (its record arrived here)."""
        if record.get("run") != self.run or record.get("epoch") != self.epoch:
            return
        if not record.get("measured"):
            self._unmeasured += 1
            return
        self._measured += 1
        user = str(record.get("user_id"))
        self._per_user[user] = self._per_user.get(user, 0) + 1
        add_sample(self._samples, record)
        if self.phase != "run":
            return
        need = self.plan.requests_per_user
        enough = need is not None and len(self._per_user) >= self.users and min(self._per_user.values()) >= need
        capped = bool(self.plan.max_requests) and self._measured >= (self.plan.max_requests or 0)
        if enough or capped:
            self._enter_drain()
        elif self.plan.min_requests and self._measured >= self.plan.min_requests and self.verdict().certain:
            self._early = True  # more requests would not change this step's pass or fail
            self._enter_drain()

    def verdict(self) -> StepVerdict:
        """This step's objectives against its measured successful requests so far."""
        return evaluate(self._samples, self.plan.objectives)

    def on_drained(self, node: str, message: dict[str, Any]) -> None:
        """A process's gate has no request in flight any more after the drain of `message['epoch']`."""
        if message.get("run") != self.run or message.get("epoch") != self.epoch or self.phase != "drain":
            return
        self._acked.add(node)
        self.poll()

    def abort(self, reason: str) -> None:
        if self.finished:
            return
        self.error = reason
        now = self.clock()
        self.outbox.append(("step", self._step_record(now, now, timed_out=False, error=reason)))
        self.phase = "aborted"
        self.outbox.append(("phase", {**self.phase_message(), "phase": "done"}))
        self.outbox.append(("abort", reason))

    # ------------------------------------------------------------------ transitions

    def _enter_ramp(self, index: int, users: int, *, probe: bool = False) -> None:
        self.index = index
        self._users = users
        self._probe = probe
        self._early = False
        self._samples = {}
        self.epoch += 1
        self.phase = "ramp"
        self._ramp_started = self.clock()
        self._per_user = {}
        self._measured = self._unmeasured = 0
        self._acked = set()
        self.outbox.append(("phase", self.phase_message()))
        self._maybe_run()  # a step with as many users as the last needs no new one

    def _enter_run(self) -> None:
        self.phase = "run"
        self._window_start = self.clock()
        self.outbox.append(("phase", self.phase_message()))

    def _enter_drain(self) -> None:
        self.phase = "drain"
        self._window_end = self._drain_started = self.clock()
        self.outbox.append(("phase", self.phase_message()))

    def _finish_step(self, *, timed_out: bool) -> None:
        now = self.clock()
        record = self._step_record(self._window_end, now, timed_out=timed_out)
        self.outbox.append(("step", record))
        if self.search is not None and record.slo_passed is not None:
            self.search.add(record.users, record.slo_passed)
        self._next_step()

    def _next_step(self) -> None:
        step = next(self._sequence, None)
        if step is None:
            self.phase = "done"
            self.outbox.append(("phase", self.phase_message()))
            return
        index, users, probe = step
        self._enter_ramp(index, users, probe=probe)

    def _step_record(self, ended_at: float, drained_at: float, *, timed_out: bool, error: str | None = None):
        started = self._window_start if self.phase in ("run", "drain") else self._ramp_started
        verdict = self.verdict() if self.plan.objectives and error is None else None
        return StepRecord(
            step=self.index,
            users=self.users,
            epoch=self.epoch,
            run=self.run,
            started_at=started,
            ended_at=ended_at,
            drained_at=drained_at,
            measured_requests=self._measured,
            unmeasured_requests=self._unmeasured,
            requests_per_user=self.plan.requests_per_user,
            duration_s=self.plan.duration_s,
            drain_timed_out=timed_out,
            error=error,
            probe=self._probe,
            early_stop=self._early,
            slo_passed=verdict.passed if verdict else None,
            slo_detail=verdict.describe() if verdict else None,
        )


class Signal(Protocol):
    """The wait primitive of the gate: gevent.event.Event under Locust, threading.Event in tests."""

    def set(self) -> None: ...
    def clear(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True, slots=True)
class Ticket:
    """Handed to a request when it is sent; decides at its end whether it counted for its step."""

    run: str
    epoch: int
    step: int | None
    users: int | None
    in_step: bool


class StepGate:
    """Per process with users: whether a user may send now, and which step a finished request counts for.

    Free-running (no step shape, e.g. a plain `locust -u 4` run) until the first phase message arrives, and
    again after a test stops.
    """

    def __init__(self, signal: Signal) -> None:
        self.signal = signal
        self.run = ""
        self.epoch = 0
        self.phase = "free"
        self.step: int | None = None
        self.users: int | None = None
        self.in_flight = 0
        self._acked: tuple[str, int] | None = None
        self.signal.set()

    @property
    def open(self) -> bool:
        return self.phase in ("free", "run")

    def reset(self) -> None:
        """Back to free-running (the test stopped); the run id stays, so late messages of it stay stale."""
        self.phase = "free"
        self.step = self.users = None
        self.signal.set()

    def on_phase(self, message: dict[str, Any]) -> bool:
        """Apply a controller message. Returns True when this process must confirm the drain now."""
        run, epoch, phase = message["run"], int(message["epoch"]), message["phase"]
        if phase not in PHASES:
            raise ValueError(f"unknown step phase {phase!r}")
        if run == self.run and self.phase != "free":
            if (epoch, PHASES.index(phase)) <= (self.epoch, PHASES.index(self.phase)):
                return False  # a repeat or a late message
        elif run == self.run and epoch <= self.epoch:
            return False  # a message of a run that has stopped
        self.run, self.epoch, self.phase = run, epoch, phase
        self.step, self.users = message.get("step"), message.get("users")
        if phase == "run":
            self.signal.set()
        else:
            self.signal.clear()
        return self._should_ack()

    def wait_open(self, timeout: float | None = None) -> bool:
        return self.signal.wait(timeout)

    def begin(self) -> Ticket | None:
        """Register a request about to be sent; None when the gate is closed (the user must wait)."""
        if not self.open:
            return None
        self.in_flight += 1
        in_step = self.phase == "run"
        return Ticket(self.run, self.epoch, self.step if in_step else None, self.users if in_step else None, in_step)

    def end(self, ticket: Ticket) -> tuple[bool, bool]:
        """The request finished. Returns (measured, confirm_drain_now)."""
        self.in_flight -= 1
        measured = ticket.in_step and (ticket.run, ticket.epoch) == (self.run, self.epoch) and self.phase == "run"
        return measured, self._should_ack()

    def _should_ack(self) -> bool:
        if self.phase == "drain" and self.in_flight == 0 and self._acked != (self.run, self.epoch):
            self._acked = (self.run, self.epoch)
            return True
        return False
