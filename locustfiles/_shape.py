"""`StepShape`: Locust's load shape for the concurrency steps (the logic is `StepController`, tested on its own)."""

from __future__ import annotations

import locust  # noqa: F401 - first: Locust's import applies gevent's monkey patching

# isort: split
import logging
import time

import gevent
from locust import LoadTestShape
from locust.runners import STATE_MISSING, LocalRunner

from locustfiles._session import session_of
from locustfiles._steps import EXIT_ABORTED, StepController

logger = logging.getLogger("llamasys.load")

POLL_INTERVAL_S = 0.05  # Locust ticks a shape once a second; timed steps and drains end sooner than that


class StepShape(LoadTestShape):
    """Concurrency steps (--steps, default 1,2,4,8), each measured for --requests-per-user or --step-duration.

    Each step: spawn the users, hold them until all have built their prompts, release them together, stop
    them starting new requests once the step has measured enough, wait for in-flight requests to finish and
    be recorded, then ramp to the next step. The load is closed-loop: each user waits for its previous
    response before sending again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.controller: StepController | None = None

    def tick(self) -> tuple[int, float] | None:
        if self.runner is None:  # Locust sets the runner before it ticks; nothing to drive without one
            return None
        session = session_of(self.runner.environment)
        # A new run of the plan when none is attached: the first tick of a test, or after a test stopped (the
        # session detaches it then). Not on reset_time(): a master calls that from inside the first tick.
        if self.controller is None or session.controller is not self.controller:
            try:
                plan = session.refresh_options()
            except ValueError as exc:
                logger.error("load test not started: %s", exc)
                self.runner.environment.process_exit_code = EXIT_ABORTED
                return None
            self.controller = StepController(plan, clock=time.time, nodes=self._nodes, run=session.next_run_id())
            session.attach(self.controller)
            gevent.spawn(self._poll, self.controller)
        result = self.controller.tick()
        session.flush()
        return result

    def _nodes(self) -> set[str]:
        runner = self.runner
        if isinstance(runner, LocalRunner) or runner is None:
            return {"local"}
        return {node.id for node in runner.clients.values() if node.state != STATE_MISSING}

    def _poll(self, controller: StepController) -> None:
        if self.runner is None:
            return
        session = session_of(self.runner.environment)
        while not controller.finished and session.controller is controller:
            gevent.sleep(POLL_INTERVAL_S)
            controller.poll()
            session.flush()
