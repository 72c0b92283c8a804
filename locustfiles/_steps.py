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

import random
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from bench.arrivals import LATE_S, Arrival, arrival_from
from bench.plan import LoadPlan
from bench.records import StepRecord
from bench.slo import SentRequests, StepVerdict, add_sample, evaluate, sample_values

EXIT_ABORTED = 3  # Locust's exit code when the step shape aborts the run

# Phases in the order they happen within one epoch; a message for an earlier (epoch, phase) is stale.
PHASES = ("ramp", "run", "settle", "drain", "done")


def spawn_rate(users: int) -> float:
    # Spawn fast: nobody starts before the whole step is ready, so the ramp's speed does not bias anything, but
    # Locust warns above 100 users/s.
    return float(min(100, max(1, 10 * users)))


class StepController:
    """Runs a `LoadPlan`: decides the user count, opens and drains levels, and emits one `StepRecord` per level.

    Inputs are method calls (`tick`, `poll`, `on_ready`, `on_record`, `on_drained`); outputs go to `outbox` as
    (kind, payload) pairs: ("phase", message for every gate), ("step", StepRecord), ("abort", reason).
    `nodes()` names the processes whose gates must confirm a drain ("local" for a single process).

    A closed-loop level of k users runs k Locust users; an open-loop level (a rate) runs the arrival process's
    `max_in_flight` users, and each process's gate hands them arrivals on its share of the schedule. With latency
    objectives every level is judged (its record says whether it passed, and may end early once that is certain);
    with `search`, the configured levels are followed by probes up to the bound.
    """

    def __init__(
        self, plan: LoadPlan, *, clock: Callable[[], float], nodes: Callable[[], Collection[str]], run: str = ""
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
        self.search = plan.new_search()
        self._sequence = plan.levels(self.search)
        self._level: float = plan.steps[0]
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
        # This level's requests in the order they were sent (open loop: arrived, dropped ones included): the early
        # stop's sample, each in flight until its record arrives.
        self._requests = SentRequests()
        self._after_window = 0  # of them, those that finished after the window ended
        self._late = 0
        self._dropped = 0
        self._acked: set[str] = set()

    @property
    def level(self) -> float:
        """This level: users (closed loop) or the offered rate in requests/s (open loop)."""
        return self._level

    def level_seed(self) -> int:
        """The seed of this open-loop level's arrival times: from the arrival's `seed` when one is set (the same
        schedule at a given rate for every variant, target and rerun: their levels are compared on the same
        arrivals), else from this run; and from the rate, so each level draws its own gaps (one unlucky draw does
        not scale into every level of a run)."""
        base = self.plan.arrival.seed if self.plan.arrival.seed is not None else self.run  # type: ignore[attr-defined]
        return random.Random(f"{base}/{self._level:g}").randrange(2**31)

    @property
    def users(self) -> int:
        """Locust users this level runs: the users, or the open loop's bound on requests in flight."""
        return self.plan.concurrency if self.plan.open_loop else int(self._level)

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "aborted")

    def phase_message(self) -> dict[str, Any]:
        message = {"run": self.run, "epoch": self.epoch, "step": self.index, "users": self.users, "phase": self.phase}
        if self.plan.open_loop:
            nodes = sorted(self.nodes()) or ["local"]
            quota = self.plan.requests_per_step
            message["open"] = {
                "arrival": self.plan.arrival.model_dump(mode="json"), "rate": self._level, "seed": self.level_seed(),
                "share": {node: i for i, node in enumerate(nodes)}, "nodes": len(nodes),
                "quota": quota if self.plan.step_duration_s is None else None,
            }  # fmt: skip
        return message

    # ------------------------------------------------------------------ inputs

    def tick(self) -> tuple[int, float] | None:
        """Locust's shape tick: the user count to run now, or None to end the test."""
        if self.phase == "idle":
            self._next_step()
        elif self.phase in ("ramp", "run", "settle", "drain"):
            # Repeated every tick for workers that connected late; gates ignore what they already know.
            self.outbox.append(("phase", self.phase_message()))
        self.poll()
        if self.finished:
            return None
        return self.users, spawn_rate(self.users)

    def poll(self) -> None:
        """Time-driven transitions: ready timeout, the end of a timed level, drain completion or timeout."""
        now = self.clock()
        if self.phase == "ramp" and now - self._ramp_started > self.plan.ready_timeout_s:
            self.abort(
                f"only {len(self._ready)} of {self.users} users were ready "
                f"{self.plan.ready_timeout_s:.0f} s after step {self.index} ({self._describe()}) began"
            )
        elif self.phase == "run":
            timed_out = self.plan.step_duration_s is not None and now - self._window_start >= self.plan.step_duration_s
            # Requests in flight past an E2E limit have missed it: time alone can decide a level.
            if timed_out or self._decided_early():
                self._end_window()
        elif self.phase == "settle":
            if self._requests.in_flight == 0 or now - self._window_end > self.plan.drain_s:
                self._enter_drain()
        elif self.phase == "drain":
            if self._acked >= set(self.nodes()):
                self._finish_step(timed_out=False)
            elif now - self._drain_started > self.plan.drain_s:
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

    def on_sent(self, message: dict[str, Any]) -> None:
        """A request of this level was sent: it takes its place in the level's sample now, before its outcome is
        known, and is in flight until its record arrives (a slow request cannot be left out by finishing late)."""
        if message.get("run") == self.run and message.get("epoch") == self.epoch:
            self._requests.sent(_request_key(message), self.clock())

    def on_record(self, record: dict[str, Any]) -> None:
        """A request finished (its record arrived here)."""
        if record.get("run") != self.run or record.get("epoch") != self.epoch:
            return
        if not record.get("measured"):
            self._unmeasured += 1
            self._requests.forget(_request_key(record))  # interrupted as the test stopped: never measured
            return
        if self.phase in ("settle", "drain"):
            self._measured += 1  # a request of the window that finished after it: counted (and settling on)
            self._after_window += 1
            self._count(record)
            self.poll()
            return
        self._measured += 1
        self._count(record)
        if self.phase != "run":
            return
        if self.plan.open_loop:
            need = self.plan.requests_per_step if self.plan.step_duration_s is None else None
            enough = need is not None and self._measured >= need
        else:
            need = self.plan.requests_per_user if self.plan.step_duration_s is None else None
            enough = need is not None and len(self._per_user) >= self.users and min(self._per_user.values()) >= need
        capped = bool(self.plan.max_requests) and self._measured >= (self.plan.max_requests or 0)
        if enough or capped or self._decided_early():
            self._end_window()

    def _decided_early(self) -> bool:
        """From min_requests measured requests on, whether the anytime-valid test has decided (the claim then holds
        whenever the level stops)."""
        if not self.plan.min_requests or self._measured < self.plan.min_requests or not self.verdict().certain:
            return False
        self._early = True
        return True

    def _count(self, record: dict[str, Any]) -> None:
        self._late += (record.get("queue_s") or 0.0) > LATE_S
        self._dropped += bool(record.get("dropped"))
        user = str(record.get("user_id"))
        self._per_user[user] = self._per_user.get(user, 0) + 1
        add_sample(self._samples, record)
        self._requests.finished(_request_key(record), sample_values(record), self.clock())

    def verdict(self) -> StepVerdict:
        """This level's objectives against its measured requests so far; what the anytime-valid test has decided
        over every request sent (arrived) in it, in that order, those still in flight censored."""
        return evaluate(self._samples, self.plan.objectives, sent=self._requests, now=self.clock())

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

    def _describe(self) -> str:
        return self.plan.arrival.describe_level(self._level)

    def _enter_ramp(self, index: int, level: float, *, probe: bool = False) -> None:
        self.index = index
        self._level = level
        self._probe = probe
        self._early = False
        self._samples = {}
        self.epoch += 1
        self.phase = "ramp"
        self._ramp_started = self.clock()
        self._per_user = {}
        self._measured = self._unmeasured = self._late = self._dropped = self._after_window = 0
        self._requests = SentRequests()
        self._acked = set()
        self.outbox.append(("phase", self.phase_message()))
        self._maybe_run()  # a step with as many users as the last needs no new one

    def _enter_run(self) -> None:
        self.phase = "run"
        self._window_start = self.clock()
        self.outbox.append(("phase", self.phase_message()))

    def _end_window(self) -> None:
        """The level has measured enough. Closed loop: settle first: every user keeps sending (unmeasured filler
        that holds the concurrency at the level) until every request sent inside the window has finished, so each
        measured request ran entirely at the level and the slow ones are not left out; then drain. Open loop: the
        arrivals stop and the in-flight requests drain (they are measured wherever they finish)."""
        self._window_end = self.clock()
        if self.plan.open_loop or self._requests.in_flight == 0:
            self._enter_drain()
            return
        self.phase = "settle"
        self.outbox.append(("phase", self.phase_message()))

    def _enter_drain(self) -> None:
        self.phase = "drain"
        self._drain_started = self.clock()
        self.outbox.append(("phase", self.phase_message()))

    def _finish_step(self, *, timed_out: bool) -> None:
        now = self.clock()
        record = self._step_record(self._window_end, now, timed_out=timed_out)
        self.outbox.append(("step", record))
        if self.search is not None and record.slo_passed is not None:
            self.search.add(record.level, record.slo_passed)
        self._next_step()

    def _next_step(self) -> None:
        step = next(self._sequence, None)
        if step is None:
            self.phase = "done"
            self.outbox.append(("phase", self.phase_message()))
            return
        index, level, probe = step
        self._enter_ramp(index, level, probe=probe)

    def _step_record(self, ended_at: float, drained_at: float, *, timed_out: bool, error: str | None = None):
        started = self._window_start if self.phase in ("run", "settle", "drain") else self._ramp_started
        verdict = self.verdict() if self.plan.objectives and error is None else None
        open_loop = self.plan.open_loop
        return StepRecord(
            step=self.index,
            users=self.users,
            rate=self._level if open_loop else None,
            arrival=self.plan.arrival.kind,
            epoch=self.epoch,
            run=self.run,
            started_at=started,
            ended_at=ended_at,
            drained_at=drained_at,
            measured_requests=self._measured,
            unmeasured_requests=self._unmeasured,
            after_window_requests=self._after_window,
            late_requests=self._late,
            dropped_requests=self._dropped,
            requests_per_user=None if open_loop else self.plan.requests_per_user,
            requests_per_step=self.plan.requests_per_step if open_loop else None,
            duration_s=self.plan.step_duration_s,
            drain_timed_out=timed_out,
            error=error,
            probe=self._probe,
            early_stop=self._early,
            # A decided verdict (the early stop's claim) stands; otherwise the estimate over every measured request.
            slo_passed=(verdict.decided == "within" if verdict.decided else verdict.passed) if verdict else None,
            slo_decided=verdict.decided if verdict else None,
            slo_detail=verdict.describe() if verdict else None,
        )


def _request_key(message: dict[str, Any]) -> tuple[str, int | None]:
    """A request's identity in its sent message and its record: its user and that user's request number."""
    return str(message.get("user_id")), message.get("seq")


class Signal(Protocol):
    """The wait primitive of the gate: gevent.event.Event under Locust, threading.Event in tests."""

    def set(self) -> None: ...
    def clear(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True, slots=True)
class Ticket:
    """Handed to a request when it is sent; decides at its end whether it counted for its step.

    Open loop: `scheduled_at` is its arrival time (its latency is counted from it), `queue_s` how long it waited
    for a free user, and `dropped` that it waited longer than the arrival process allows (it is not sent)."""

    run: str
    epoch: int
    step: int | None
    users: int | None
    in_step: bool
    rate: float | None = None
    scheduled_at: float | None = None
    queue_s: float = 0.0
    dropped: bool = False


class ArrivalSchedule:
    """One process's share of an open-loop level: arrival times from `start`, at most `quota` of them."""

    def __init__(self, arrival: Arrival, rate: float, *, start: float, seed: int, quota: int | None) -> None:
        self.arrival = arrival
        self.rate = rate
        self._gaps: Iterator[float] = arrival.intervals(rate, random.Random(seed))
        self.next_at = start + next(self._gaps)
        self.left = quota

    def take(self, now: float) -> tuple[float, bool] | None:
        """The next arrival if it is due at `now`: (its time, dropped); None when none is due (or none is left)."""
        if self.left == 0 or now < self.next_at:
            return None
        due = self.next_at
        self.next_at += next(self._gaps)
        if self.left is not None:
            self.left -= 1
        return due, now - due > self.arrival.max_wait_s  # type: ignore[attr-defined]

    @property
    def exhausted(self) -> bool:
        return self.left == 0


class StepGate:
    """Per process with users: whether a user may send now, and which step a finished request counts for.

    Free-running (no step shape, e.g. a plain `locust -u 4` run) until the first phase message arrives, and
    again after a test stops. In an open-loop level, a user may send only when its process's next arrival is due
    (`begin` returns None until then; `next_arrival` says when).
    """

    def __init__(self, signal: Signal, *, clock: Callable[[], float] | None = None, node: str = "local") -> None:
        import time

        self.signal = signal
        self.clock = clock or time.time
        self.node = node
        self.run = ""
        self.epoch = 0
        self.phase = "free"
        self.step: int | None = None
        self.users: int | None = None
        self.in_flight = 0
        self.schedule: ArrivalSchedule | None = None
        self._acked: tuple[str, int] | None = None
        self.signal.set()

    @property
    def open(self) -> bool:
        """Users may send: free-running, in a level's window, or settling (unmeasured filler at the level)."""
        return self.phase in ("free", "run", "settle")

    def reset(self) -> None:
        """Back to free-running (the test stopped); the run id stays, so late messages of it stay stale."""
        self.phase = "free"
        self.step = self.users = None
        self.schedule = None
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
        self.schedule = self._schedule(message.get("open")) if phase == "run" else None
        if phase in ("run", "settle"):
            self.signal.set()
        else:
            self.signal.clear()
        return self._should_ack()

    def _schedule(self, spec: dict[str, Any] | None) -> ArrivalSchedule | None:
        if not spec:
            return None
        share, nodes = spec["share"].get(self.node, 0), max(1, int(spec["nodes"]))
        quota = spec.get("quota")
        mine = None if quota is None else quota // nodes + (1 if share < quota % nodes else 0)
        return ArrivalSchedule(
            arrival_from(spec["arrival"]), float(spec["rate"]) / nodes, start=self.clock(),
            seed=int(spec["seed"]) * 1009 + share, quota=mine,
        )  # fmt: skip

    def wait_open(self, timeout: float | None = None) -> bool:
        return self.signal.wait(timeout)

    def next_arrival(self) -> float | None:
        """When this process's next open-loop arrival is due (None: not an open-loop level, or none left)."""
        if self.schedule is None or self.schedule.exhausted:
            return None
        return self.schedule.next_at

    def begin(self) -> Ticket | None:
        """Register a request about to be sent; None when the gate is closed or, in an open-loop level, when no
        arrival is due yet (the user waits for `next_arrival`) or this process's arrivals are all out."""
        if not self.open:
            return None
        in_step = self.phase == "run"
        if self.schedule is not None:
            now = self.clock()
            taken = self.schedule.take(now)
            if taken is None:
                if self.schedule.exhausted:
                    self.signal.clear()  # this process's arrivals are all out: its users wait for the next level
                return None
            due, dropped = taken
            self.in_flight += 0 if dropped else 1
            return Ticket(self.run, self.epoch, self.step, self.users, True, rate=self.schedule.rate,
                          scheduled_at=due, queue_s=max(0.0, now - due), dropped=dropped)  # fmt: skip
        self.in_flight += 1
        return Ticket(self.run, self.epoch, self.step if in_step else None, self.users if in_step else None, in_step)

    def end(self, ticket: Ticket) -> tuple[bool, bool]:
        """The request finished (or was dropped). Returns (measured, confirm_drain_now).

        Measured when it was sent (closed loop) or arrived (open loop) inside its level's window, however late it
        finished: the slowest requests are the ones a rule that dropped the in-flight tail would leave out."""
        if not ticket.dropped:
            self.in_flight -= 1
        measured = ticket.in_step and (ticket.run, ticket.epoch) == (self.run, self.epoch)
        return measured, self._should_ack()

    def _should_ack(self) -> bool:
        if self.phase == "drain" and self.in_flight == 0 and self._acked != (self.run, self.epoch):
            self._acked = (self.run, self.epoch)
            return True
        return False
