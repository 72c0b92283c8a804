"""What one Locust process of a load test holds, and the event listeners that wire it into Locust.

Every process gets a `LoadSession` at Locust's `init` event. Where users run (the local runner or a worker) it
holds the `StepGate`; where the shape runs (the local runner or the master) it holds the JSONL sink and the
active `StepController`. Records, readiness and drain confirmations travel as Locust custom messages
(`runner.send_message`), which a local runner delivers to itself, so one code path serves a single process,
`--processes N` and `--master`/`--worker` alike, and the master's JSONL file holds every worker's requests.
"""

from __future__ import annotations

import locust  # noqa: F401 - first: Locust's import applies gevent's monkey patching

# isort: split
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gevent.event
import gevent.lock
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from bench.plan import LoadPlan, add_arguments
from bench.records import RequestRecord, StepRecord
from locustfiles._steps import EXIT_ABORTED, StepController, StepGate

logger = logging.getLogger("llamasys.load")

MSG_PHASE = "llamasys_phase"  # controller -> gates
MSG_READY = "llamasys_ready"  # user -> controller: prompts built (or the error that prevented it)
MSG_RECORD = "llamasys_record"  # user -> sink and controller: one finished request
MSG_DRAINED = "llamasys_drained"  # gate -> controller: no request in flight after a drain
MSG_GONE = "llamasys_gone"  # user -> controller: stopped (a probe with fewer users)
MSG_SENT = "llamasys_sent"  # user -> controller: a request of the level was sent (in flight until its record)

_SESSION_ATTR = "llamasys_session"
T = TypeVar("T")


class SloMissed(Exception):
    """A step missed its latency objectives (shown in Locust's failures)."""


class RecordSink:
    """The JSONL file of records, appended one flushed line at a time so a killed run keeps what it measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None

    def write(self, data: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        self._fh.write(json.dumps(data, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class LoadSession:
    """Per-process state of a load test (see the module docstring)."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.gate = StepGate(gevent.event.Event())
        self.controller: StepController | None = None
        self._sink: RecordSink | None = None
        self._options: LoadPlan | None = None
        self._shared: dict[tuple, Any] = {}
        self._shared_lock = gevent.lock.RLock()
        self._flushing = False
        self._tests = 0  # tests this process has run (the web UI may run several)

    # ---------------------------------------------------------------- options and shared prompt material

    @property
    def options(self) -> LoadPlan:
        """The load plan: --plan FILE whole, or built from the custom arguments (the web UI may edit them)."""
        if self._options is None:
            self._options = LoadPlan.from_options(self.environment.parsed_options)
        return self._options

    def refresh_options(self) -> LoadPlan:
        """Re-read the options: the web UI may have changed them since the last test."""
        self._options = None
        return self.options

    def shared(self, key: tuple, build: Callable[[], T]) -> T:
        """Built once per process and shared by its users (the tokenized text, a fitted text length)."""
        with self._shared_lock:
            if key not in self._shared:
                self._shared[key] = build()
            return self._shared[key]

    # ---------------------------------------------------------------- user side

    def send_ready(self, user_id: str, error: str | None = None) -> None:
        self._send(MSG_READY, {"user_id": user_id, "error": error})

    def send_record(self, record: RequestRecord) -> None:
        self._send(MSG_RECORD, record.model_dump())

    def send_sent(self, run: str, epoch: int, user_id: str, seq: int) -> None:
        self._send(MSG_SENT, {"run": run, "epoch": epoch, "user_id": user_id, "seq": seq})

    def send_gone(self, user_id: str) -> None:
        self._send(MSG_GONE, {"user_id": user_id})

    def send_drained(self) -> None:
        self._send(MSG_DRAINED, {"run": self.gate.run, "epoch": self.gate.epoch})

    def _send(self, msg_type: str, data: dict[str, Any]) -> None:
        runner = self.environment.runner
        if runner is not None:
            runner.send_message(msg_type, data)

    # ---------------------------------------------------------------- shape side

    def next_run_id(self) -> str:
        """The id of a new test's records: --run-id for the first test of this process (the harness names its
        attempts), a random one (empty: the controller draws it) for any later test of the web UI."""
        self._tests += 1
        return self.options.run_id if self._tests == 1 else ""

    def attach(self, controller: StepController | None) -> None:
        self.controller = controller

    def flush(self) -> None:
        """Carry out what the controller decided. Re-entrant calls (a local gate confirming at once) queue up."""
        if self._flushing or self.controller is None:
            return
        self._flushing = True
        try:
            outbox = self.controller.outbox
            while outbox:
                kind, payload = outbox.pop(0)
                if kind == "phase":
                    self._send(MSG_PHASE, payload)
                elif kind == "step":
                    self.write(payload.model_dump())
                    self.report_slo(payload)
                    logger.info(
                        "step %d (%d users): %d requests measured, %d outside the window%s",
                        payload.step, payload.users, payload.measured_requests, payload.unmeasured_requests,
                        f"; {payload.error}" if payload.error else "",
                    )  # fmt: skip
                elif kind == "abort":
                    logger.error("load test aborted: %s", payload)
                    self.environment.process_exit_code = EXIT_ABORTED
        finally:
            self._flushing = False

    def report_slo(self, step: StepRecord) -> None:
        """A step's verdict against the latency objectives as a Locust request entry ("SLO", "step k (n users)"):
        the web UI's statistics and failures show pass or miss per step, with what was missed."""
        if step.slo_passed is None:
            return
        self.environment.events.request.fire(
            request_type="SLO", name=f"step {step.step} ({step.users} users)", response_time=0, response_length=0,
            exception=None if step.slo_passed else SloMissed(step.slo_detail or "missed"), context={},
            start_time=step.started_at, url=None, response=None,
        )  # fmt: skip

    def write(self, data: dict[str, Any]) -> None:
        if self._sink is None:
            path = self.options.records
            if not path:
                return
            self._sink = RecordSink(Path(path))
        self._sink.write(data)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    # ---------------------------------------------------------------- message handlers

    def on_phase(self, environment: Environment, msg: Any, **_: Any) -> None:
        if self.gate.on_phase(msg.data):
            self.send_drained()

    def on_ready(self, environment: Environment, msg: Any, **_: Any) -> None:
        if self.controller is not None:
            self.controller.on_ready(msg.data["user_id"], msg.data.get("error"))
            self.flush()
        elif msg.data.get("error"):
            logger.error("a user could not prepare its requests: %s", msg.data["error"])

    def on_record(self, environment: Environment, msg: Any, **_: Any) -> None:
        self.write(msg.data)
        if self.controller is not None:
            self.controller.on_record(msg.data)
            self.flush()

    def on_sent(self, environment: Environment, msg: Any, **_: Any) -> None:
        if self.controller is not None:
            self.controller.on_sent(msg.data)
            self.flush()

    def on_gone(self, environment: Environment, msg: Any, **_: Any) -> None:
        if self.controller is not None:
            self.controller.on_gone(msg.data["user_id"])
            self.flush()

    def on_drained(self, environment: Environment, msg: Any, **_: Any) -> None:
        if self.controller is not None:
            self.controller.on_drained(msg.node_id, msg.data)
            self.flush()


def session_of(environment: Environment) -> LoadSession:
    session = getattr(environment, _SESSION_ATTR, None)
    if session is None:
        # Environments built without Locust's init event (tests, library use) get theirs on first use.
        session = LoadSession(environment)
        setattr(environment, _SESSION_ATTR, session)
    return session


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any, **_: Any) -> None:
    add_arguments(parser)


@events.init.add_listener
def _install(environment: Environment, **_: Any) -> None:
    session = session_of(environment)
    runner = environment.runner
    if runner is None:
        return
    if not isinstance(runner, WorkerRunner) and environment.parsed_options is not None:
        try:
            session.refresh_options()
        except ValueError as exc:
            raise SystemExit(f"llamasys load options: {exc}") from None
    if isinstance(runner, WorkerRunner):
        session.gate.node = runner.client_id  # the controller shares an open-loop level out by node id
    registered = runner.custom_messages
    handlers = {
        MSG_PHASE: session.on_phase,
        MSG_READY: session.on_ready,
        MSG_RECORD: session.on_record,
        MSG_DRAINED: session.on_drained,
        MSG_GONE: session.on_gone,
        MSG_SENT: session.on_sent,
    }
    # A master has no users and a worker has no shape: each registers what reaches it (a local runner: all).
    wanted = {
        "WorkerRunner": (MSG_PHASE,),
        "MasterRunner": (MSG_READY, MSG_RECORD, MSG_DRAINED, MSG_GONE, MSG_SENT),
    }.get(type(runner).__name__, tuple(handlers))
    for msg_type in wanted:
        if msg_type not in registered:
            runner.register_message(msg_type, handlers[msg_type])


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    # Every process re-reads the options: the web UI may have changed them, and a worker has just received
    # the master's values with the test's first spawn message.
    try:
        session_of(environment).refresh_options()
    except ValueError as exc:  # options edited in the web UI; the step shape reports it and stops the run
        logger.error("llamasys load options: %s", exc)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    session = session_of(environment)
    session.gate.reset()
    session.attach(None)  # the next test (web UI) runs the plan afresh


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    session_of(environment).close()
