"""The step shape with a fake clock: the controller, the gate, and which requests count for which step.

`Simulation` plays Locust's part deterministically: a shape tick every second, users spawned to the tick's count,
each user preparing for a while and then sending back-to-back requests of a fixed duration whenever its gate is
open, and every message delivered in order.
"""

from __future__ import annotations

import threading

import pytest

from bench.plan import LoadPlan, format_done, parse_done, parse_levels
from bench.slo import Objective
from locustfiles._steps import StepController, StepGate, Ticket

DT = 0.01


def StepPlan(users=(1, 2, 4, 8), duration_s=None, max_users=None, **kwargs) -> LoadPlan:  # noqa: N802
    """A closed-loop plan in the words these tests use (users, duration_s, max_users)."""
    return LoadPlan(steps=tuple(users), step_duration_s=duration_s, max_level=max_users, **kwargs)


def steps_pending(plan: LoadPlan) -> bool:
    return plan.pending()


class Simulation:
    def __init__(self, plan: StepPlan, *, request_s=1.0, prepare_s: float = 0.3, nodes=("local",)):
        self.now = 0.0
        self.controller = StepController(plan, clock=lambda: self.now, nodes=lambda: set(nodes), run="run-1")
        self.gates = {node: StepGate(threading.Event(), clock=lambda: self.now, node=node) for node in nodes}
        self.request_s = request_s
        self.prepare_s = prepare_s
        self.users: list[dict] = []
        self.records: list[dict] = []
        self.steps = []
        self.aborted: list[str] = []
        self.in_flight_log: list[tuple[float, int]] = []
        self.frozen_nodes: set[str] = set()  # nodes whose drain confirmation never arrives

    def deliver(self) -> None:
        while self.controller.outbox:
            kind, payload = self.controller.outbox.pop(0)
            if kind == "phase":
                for node, gate in self.gates.items():
                    if gate.on_phase(payload) and node not in self.frozen_nodes:
                        self.controller.on_drained(node, {"run": gate.run, "epoch": gate.epoch})
            elif kind == "step":
                self.steps.append(payload)
            else:
                self.aborted.append(payload)

    def run(self, limit_s: float = 600.0) -> None:
        next_tick = 0.0
        while self.now < limit_s:
            if self.now >= next_tick:
                next_tick += 1.0
                target = self.controller.tick()
                self.deliver()
                if target is None:
                    return
                nodes = list(self.gates)
                while len(self.users) > target[0]:  # Locust stops the extra users (all wait at the gate)
                    gone = self.users.pop()
                    assert "ticket" not in gone, "a user was stopped with a request in flight"
                    self.controller.on_gone(gone["id"])
                    self.deliver()
                while len(self.users) < target[0]:
                    node = nodes[len(self.users) % len(nodes)]
                    user = {"id": f"u{len(self.users)}", "node": node, "ready_at": self.now + self.prepare_s}
                    self.users.append(user)
            self.now = round(self.now + DT, 6)
            self._step_users()
            self.controller.poll()
            self.deliver()
            self.in_flight_log.append((self.now, sum(g.in_flight for g in self.gates.values())))

    def _step_users(self) -> None:
        for user in self.users:
            gate = self.gates[user["node"]]
            if "ready_at" in user and self.now >= user["ready_at"]:
                del user["ready_at"]
                self.controller.on_ready(user["id"])
                self.deliver()
            if "ready_at" in user:
                continue
            if "ticket" in user and self.now >= user["ends"]:
                ticket: Ticket = user.pop("ticket")
                measured, ack = gate.end(ticket)
                sent = user.pop("sent")
                waited = ticket.queue_s if ticket.scheduled_at is not None else 0.0  # latency counts from arrival
                record = {
                    "user_id": user["id"], "seq": user.pop("seq"), "run": ticket.run,
                    "epoch": ticket.epoch if ticket.run else None,
                    "step": ticket.step, "users": ticket.users, "measured": measured,
                    "sent": sent, "ended": self.now, "node": user["node"],
                    "ok": True, "ttft_s": (self.now - sent) / 2 + waited, "e2e_s": self.now - sent + waited,
                    "queue_s": ticket.queue_s if ticket.scheduled_at is not None else None,
                    "scheduled_at": ticket.scheduled_at,
                }  # fmt: skip
                self.records.append(record)
                self.controller.on_record(record)
                self.deliver()
                if ack and user["node"] not in self.frozen_nodes:
                    self.controller.on_drained(user["node"], {"run": gate.run, "epoch": gate.epoch})
                    self.deliver()
            while "ticket" not in user and gate.open:
                ticket = gate.begin()
                if ticket is None:
                    break
                seq = user["sent_count"] = user.get("sent_count", 0) + 1
                if ticket.dropped:  # an open-loop arrival that waited too long: recorded as failed, never sent
                    measured, _ = gate.end(ticket)
                    record = {"user_id": user["id"], "seq": seq, "run": ticket.run, "epoch": ticket.epoch,
                              "step": ticket.step, "users": ticket.users, "measured": measured, "sent": self.now,
                              "ended": self.now, "node": user["node"], "ok": False, "dropped": True,
                              "queue_s": ticket.queue_s, "scheduled_at": ticket.scheduled_at}  # fmt: skip
                    self.records.append(record)
                    self.controller.on_record(record)
                    self.deliver()
                    continue
                if ticket.in_step:
                    self.controller.on_sent({"run": ticket.run, "epoch": ticket.epoch, "user_id": user["id"],
                                             "seq": seq})  # fmt: skip
                    self.deliver()
                in_flight = sum(g.in_flight for g in self.gates.values())
                duration = self.request_s(ticket.users or 1, in_flight) if callable(self.request_s) else self.request_s
                user.update(ticket=ticket, sent=self.now, ends=self.now + duration, seq=seq)

    def in_flight_between(self, start: float, end: float) -> set[int]:
        return {n for t, n in self.in_flight_log if start < t < end}


def test_requests_mode_runs_every_step_and_attributes_requests_to_it():
    sim = Simulation(StepPlan(users=(1, 2, 4), requests_per_user=2))
    sim.run()
    assert sim.controller.phase == "done" and not sim.aborted
    assert [(s.step, s.users) for s in sim.steps] == [(0, 1), (1, 2), (2, 4)]
    for step in sim.steps:
        mine = [r for r in sim.records if r["epoch"] == step.epoch and r["measured"]]
        assert step.measured_requests == len(mine)
        per_user: dict[str, int] = {}
        for r in mine:
            # Sent inside the window, and the load was exactly `users` in flight the whole time it ran (also when it
            # finished after the window: the step settles at its concurrency before it drains).
            assert step.started_at <= r["sent"] <= step.ended_at and r["ended"] <= step.drained_at
            assert sim.in_flight_between(r["sent"], r["ended"]) == {step.users}
            assert r["step"] == step.step and r["users"] == step.users
            per_user[r["user_id"]] = per_user.get(r["user_id"], 0) + 1
        assert len(per_user) == step.users and min(per_user.values()) >= 2


def test_steps_do_not_overlap_and_in_flight_requests_finish_before_the_ramp():
    sim = Simulation(StepPlan(users=(1, 2, 4), requests_per_user=1), request_s=0.7)
    sim.run()
    for before, after in zip(sim.steps, sim.steps[1:], strict=False):
        assert before.ended_at <= before.drained_at <= after.started_at
        # Nothing sent in the earlier step was still running when the later one opened.
        assert all(r["ended"] <= before.drained_at for r in sim.records if r["epoch"] == before.epoch)
    # Every request that was sent got recorded, none cut: requests are only ever sent while a gate is open.
    assert all(r["ended"] - r["sent"] == pytest.approx(0.7) for r in sim.records)


def test_a_request_still_running_when_the_window_ends_is_measured_at_the_steps_concurrency():
    # The slowest requests are the ones still in flight when a window ends: they are measured, and the step settles
    # (unmeasured filler keeps every user busy) until they finish, so they too ran at the step's concurrency.
    sim = Simulation(StepPlan(users=(2,), requests_per_user=None, duration_s=2.5), request_s=1.0)
    sim.run()
    (step,) = sim.steps
    mine = [r for r in sim.records if r["epoch"] == step.epoch and r["measured"]]
    tail = [r for r in mine if r["ended"] > step.ended_at]
    assert tail, "the timed step ended with requests in flight"
    assert all(r["sent"] <= step.ended_at for r in mine) and step.measured_requests == len(mine)
    assert all(sim.in_flight_between(r["sent"], r["ended"]) == {2} for r in tail)
    filler = [r for r in sim.records if r["epoch"] == step.epoch and not r["measured"]]
    assert filler and step.unmeasured_requests == len(filler)  # sent while settling: recorded, not measured
    assert step.ended_at - step.started_at == pytest.approx(2.5, abs=2 * DT)


def test_nobody_sends_before_every_user_of_the_step_is_ready():
    sim = Simulation(StepPlan(users=(1, 4), requests_per_user=1), prepare_s=2.0)
    sim.run()
    step = sim.steps[1]
    first = min(r["sent"] for r in sim.records if r["epoch"] == step.epoch)
    assert first >= step.started_at
    assert step.measured_requests >= 4


def test_drain_waits_for_every_process_and_times_out_on_a_silent_one():
    plan = StepPlan(users=(2,), requests_per_user=1, drain_timeout_s=5.0)
    sim = Simulation(plan, nodes=("a", "b"))
    sim.run()
    assert sim.steps[0].drain_timed_out is False
    sim = Simulation(plan, nodes=("a", "b"))
    sim.frozen_nodes = {"b"}
    sim.run()
    (step,) = sim.steps
    assert step.drain_timed_out is True
    # Settling (at most one request's time) then 5 s of waiting for the silent process.
    assert 5.0 <= step.drained_at - step.ended_at <= 5.0 + 1.0 + 2 * DT


def test_ready_timeout_aborts_with_the_reason():
    sim = Simulation(StepPlan(users=(2,), requests_per_user=1, ready_timeout_s=3.0), prepare_s=100.0)
    sim.run()
    assert sim.controller.phase == "aborted"
    assert sim.aborted == [sim.controller.error]
    assert "only 0 of 2 users were ready 3 s after step 0" in sim.aborted[0]
    assert sim.steps[-1].error == sim.aborted[0]


def test_a_user_that_cannot_prepare_aborts_before_any_load():
    clock = [0.0]
    controller = StepController(StepPlan(users=(1,)), clock=lambda: clock[0], nodes=lambda: {"local"})
    assert controller.tick() == (1, 10.0)
    controller.on_ready("u0", error="context 256 < 160 + 128")
    assert controller.tick() is None
    kinds = [kind for kind, _ in controller.outbox]
    assert kinds == ["phase", "step", "phase", "abort"]
    assert controller.outbox[-1][1] == "a user could not prepare its requests: context 256 < 160 + 128"


def test_tick_repeats_the_phase_for_late_workers():
    controller = StepController(StepPlan(users=(1,)), clock=lambda: 0.0, nodes=lambda: {"local"})
    controller.tick()
    controller.outbox.clear()
    controller.tick()
    assert controller.outbox == [("phase", controller.phase_message())]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"users": (2, 1)}, "increasing order"),
        ({"users": ()}, "increasing order"),
        ({"users": (1.5,)}, "whole numbers"),
        ({"requests_per_user": 3, "duration_s": 5.0}, "set only one"),
        ({"requests_per_user": 0}, "greater than or equal to 1"),
        ({"requests_per_step": 4}, "requests_per_step is for open-loop rates"),
    ],
)
def test_bad_plans_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepPlan(**kwargs)


def test_a_plan_with_no_step_length_measures_three_requests_per_user():
    assert (StepPlan().requests_per_user, StepPlan().step_duration_s) == (3, None)


def test_parse_users():
    assert parse_levels("1, 2,4,8") == (1, 2, 4, 8)
    assert parse_levels("0.5,1,2.5") == (0.5, 1, 2.5)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_levels("1;2")


# ------------------------------------------------------------------------------------------------ the gate


def message(phase: str, epoch: int = 1, run: str = "r", users: int = 2) -> dict:
    return {"run": run, "epoch": epoch, "step": epoch - 1, "users": users, "phase": phase}


def test_free_running_gate_measures_nothing():
    gate = StepGate(threading.Event())
    ticket = gate.begin()
    assert ticket is not None and ticket.step is None and not ticket.in_step
    assert gate.end(ticket) == (False, False)


def test_attribution_inside_and_across_the_window():
    gate = StepGate(threading.Event())
    gate.on_phase(message("ramp"))
    assert gate.begin() is None and not gate.signal.is_set()
    gate.on_phase(message("run"))
    inside, across = gate.begin(), gate.begin()
    assert inside is not None and across is not None and (inside.step, inside.users) == (0, 2)
    assert gate.end(inside) == (True, False)
    gate.on_phase(message("settle"))  # the window has ended: what is sent now is filler
    filler = gate.begin()
    assert filler is not None and not filler.in_step and filler.step is None
    assert gate.end(filler) == (False, False)
    assert gate.on_phase(message("drain")) is False  # one request of the window still in flight
    assert gate.end(across) == (True, True)  # sent in the window: measured, however late; the drain is confirmed


def test_drain_with_nothing_in_flight_confirms_once():
    gate = StepGate(threading.Event())
    gate.on_phase(message("run"))
    assert gate.on_phase(message("drain")) is True
    assert gate.on_phase(message("drain")) is False


def test_stale_and_repeated_messages_are_ignored_but_a_new_run_is_not():
    gate = StepGate(threading.Event())
    gate.on_phase(message("run", epoch=2))
    gate.on_phase(message("ramp", epoch=2))  # late
    gate.on_phase(message("drain", epoch=1))  # older epoch
    assert (gate.epoch, gate.phase) == (2, "run")
    gate.on_phase(message("ramp", epoch=1, run="next"))
    assert (gate.run, gate.epoch, gate.phase) == ("next", 1, "ramp")


def test_reset_frees_the_gate_and_keeps_the_old_run_stale():
    gate = StepGate(threading.Event())
    gate.on_phase(message("drain", epoch=3))
    gate.reset()
    assert gate.open and gate.signal.is_set()
    gate.on_phase(message("run", epoch=3))
    assert gate.phase == "free"


# ---------------------------------------------------------------- objectives, the capacity search, early stop

TTFT_2S = (Objective("ttft_s", 2.0, 0.9),)


def slower_with_users(users: int, in_flight: int = 0) -> float:
    """A request takes 0.9 s per concurrent user: TTFT (half of it) is 0.45 s per user, <= 2 s up to 4 users."""
    return 0.9 * users


def test_every_step_is_judged_against_the_objectives():
    sim = Simulation(StepPlan(users=(1, 2, 8), requests_per_user=2, objectives=TTFT_2S), request_s=slower_with_users)
    sim.run()
    assert [(s.users, s.slo_passed) for s in sim.steps] == [(1, True), (2, True), (8, False)]
    assert "TTFT p90 <= 2 s: 3.6 s (missed; " in sim.steps[2].slo_detail
    assert not any(s.probe for s in sim.steps)  # no search asked: the configured steps only


def test_the_search_doubles_then_bisects_to_the_highest_passing_concurrency():
    plan = StepPlan(users=(1, 2), requests_per_user=2, objectives=TTFT_2S, search=True, max_users=16)
    sim = Simulation(plan, request_s=slower_with_users)
    sim.run()
    assert not sim.aborted and sim.controller.phase == "done"
    # Configured 1, 2 pass; doubling probes 4 (pass), 8 (fail); bisection probes 6 (fail), then 5 (fail).
    assert [(s.users, s.slo_passed, s.probe) for s in sim.steps] == [
        (1, True, False), (2, True, False), (4, True, True), (8, False, True), (6, False, True), (5, False, True),
    ]  # fmt: skip
    assert sim.controller.search.interval == (4, 5) and sim.controller.search.stopped_by == "resolution"
    # Every probe, fewer users included, ran at exactly its concurrency.
    for step in sim.steps:
        for r in (r for r in sim.records if r["epoch"] == step.epoch and r["measured"]):
            assert sim.in_flight_between(r["sent"], r["ended"]) == {step.users}


def test_the_search_stops_at_its_bound_and_when_one_user_fails():
    fast = Simulation(
        StepPlan(users=(1,), requests_per_user=1, objectives=TTFT_2S, search=True, max_users=3), request_s=0.5
    )
    fast.run()
    assert [s.users for s in fast.steps] == [1, 2, 3]
    assert fast.controller.search.interval == (3, None) and fast.controller.search.stopped_by == "bound"
    slow = Simulation(StepPlan(users=(1,), requests_per_user=1, objectives=TTFT_2S, search=True, max_users=8),
                      request_s=10.0)  # fmt: skip
    slow.run()
    assert [s.users for s in slow.steps] == [1] and slow.controller.search.stopped_by == "fails at 1 user"


def test_a_step_ends_early_only_when_its_verdict_is_certain():
    # 8 users at 7.2 s per request: TTFT 3.6 s, far over 2 s. With 8 measured the interval of p90 is x(5)..inf:
    # its low end (3.6 s) is over the limit, so the step certainly fails and ends at 8 requests instead of 40.
    plan = StepPlan(users=(8,), requests_per_user=5, objectives=TTFT_2S, min_requests=8)
    sim = Simulation(plan, request_s=slower_with_users)
    sim.run()
    (step,) = sim.steps
    assert step.early_stop and step.slo_passed is False and step.measured_requests < 8 * 5
    # A passing step cannot be certain from a handful of requests (the top of the interval is beyond the sample):
    # it runs its full requests_per_user.
    sim = Simulation(StepPlan(users=(2,), requests_per_user=5, objectives=TTFT_2S, min_requests=2), request_s=1.0)
    sim.run()
    (step,) = sim.steps
    assert not step.early_stop and step.slo_passed and step.measured_requests >= 2 * 5


def test_plans_that_cannot_be_judged_are_refused():
    with pytest.raises(ValueError, match="needs latency objectives"):
        StepPlan(users=(1,), search=True)
    with pytest.raises(ValueError, match="below the largest step"):
        StepPlan(users=(1, 8), objectives=TTFT_2S, max_users=4)
    with pytest.raises(ValueError, match="min_requests"):
        StepPlan(users=(1,), min_requests=4)


# ---------------------------------------------------------------- a resumed run: steps an earlier attempt measured


def test_a_resumed_run_measures_only_the_steps_still_missing():
    sim = Simulation(StepPlan(users=(1, 2, 4), requests_per_user=1, done=((1, None), (4, None))))
    sim.run()
    assert [(s.users, s.step) for s in sim.steps] == [(2, 1)]  # the configured index is kept
    assert sim.controller.phase == "done"
    assert steps_pending(StepPlan(users=(1, 2), done=((1, None),)))
    assert not steps_pending(StepPlan(users=(1, 2), done=((1, None), (2, None))))


def test_a_resumed_search_continues_from_the_verdicts_it_was_given():
    # The first attempt measured 1, 2 (pass) and the probe 4 (pass), then stopped during the probe at 8.
    done = ((1, True), (2, True), (4, True))
    plan = StepPlan(users=(1, 2), requests_per_user=2, objectives=TTFT_2S, search=True, max_users=16, done=done)
    sim = Simulation(plan, request_s=slower_with_users)
    sim.run()
    # The same probes the uninterrupted search runs after 4 (see above): 8, 6, 5, none of them again.
    assert [(s.users, s.probe) for s in sim.steps] == [(8, True), (6, True), (5, True)]
    assert sim.controller.search.interval == (4, 5)
    everything = done + ((8, False), (6, False), (5, False))
    finished = StepPlan(users=(1, 2), objectives=TTFT_2S, search=True, max_users=16, done=everything)
    assert not steps_pending(finished)
    controller = StepController(finished, clock=lambda: 0.0, nodes=lambda: {"local"})
    assert controller.tick() is None and controller.phase == "done"  # nothing to run: the test ends at once


def test_done_steps_round_trip_and_bad_ones_are_refused():
    done = ((1, True), (2, False), (4, None))
    assert parse_done(format_done(done)) == done
    assert parse_done(format_done(((0.5, True),))) == ((0.5, True),)
    with pytest.raises(ValueError, match="done steps look like"):
        parse_done("1:maybe")


def test_requests_in_flight_under_concurrency_are_censored_not_counted_as_misses():
    # 8 users, every request 1 s (TTFT 0.5 s, within 2 s). At every look 7 requests are in flight: counted as misses
    # (the rule this replaced) they held a pass off until about 179 requests; in the order sent they are the last
    # ones, not over the limit yet, so the known ones before them decide: from 48 within, plus the 7 in flight.
    plan = StepPlan(users=(8,), requests_per_user=40, objectives=TTFT_2S, min_requests=8)
    sim = Simulation(plan, request_s=1.0)
    sim.run()
    (step,) = sim.steps
    assert step.early_stop and step.slo_decided == "within" and step.slo_passed
    assert 48 <= step.measured_requests <= 64
