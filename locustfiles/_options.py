"""The load test's own command-line options (Locust custom arguments, so they also appear in the web UI).

`LoadOptions` is the one home of the load defaults (the experiment's `[load]` section takes them from here).
Pure: `add_arguments` takes any argparse-style parser and `LoadOptions.from_namespace` validates what came back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locustfiles._slo import Objective, parse_objectives
from locustfiles._steps import StepPlan

DEFAULT_PROMPT_TEXT = Path(__file__).with_name("prompt_text.txt")
LENGTH_OPTIONS = ("ignore_eos", "min_tokens")
PROMPT_FORMATS = ("auto", "ids", "text")
MIN_PROMPT_TOKENS = 1
MIN_OUTPUT_TOKENS = 2  # TPOT needs two tokens
# A request cannot outlive its timeout; the margin covers recording and message delivery.
DRAIN_MARGIN_S = 60.0


@dataclass(frozen=True)
class LoadOptions:
    prompt_tokens: int = 2560
    output_tokens: int = 768
    steps: tuple[int, ...] = (1, 2, 4, 8)
    requests_per_user: int | None = 3
    step_duration_s: float | None = None
    request_timeout_s: float = 600.0
    ready_timeout_s: float = 300.0
    records: str = "requests.jsonl"
    prompt_text: Path = DEFAULT_PROMPT_TEXT
    prompt_format: str = "auto"
    model_name: str = ""
    length_options: tuple[str, ...] = LENGTH_OPTIONS
    # Latency objectives (each step is judged against them; empty: none) and the capacity search they drive.
    objectives: tuple[Objective, ...] = ()
    search: bool = False  # after the steps, probe higher (doubling) then bisect to the highest passing concurrency
    max_users: int | None = None  # the search's bound (the server's slots); None = the largest step
    search_resolution: int = 1  # stop bisecting when the last pass and the first fail are this close
    # Early stop: once a step has min_requests measured requests, end it when its pass/fail is certain; end it at
    # max_requests in any case.
    min_requests: int | None = None
    max_requests: int | None = None
    # A resumed run: the steps an earlier attempt measured (not run again), and the id this run's records carry.
    done_steps: tuple[tuple[int, bool | None], ...] = ()
    run_id: str = ""

    @classmethod
    def from_namespace(cls, ns: Any) -> LoadOptions:
        """Validated options from Locust's parsed options (or any object with the same attributes)."""
        if ns is None:
            return cls()
        d = cls()
        duration = float(getattr(ns, "step_duration", 0.0) or 0.0)
        length_options = tuple(o.strip() for o in str(getattr(ns, "length_options", "")).split(",") if o.strip())
        options = cls(
            prompt_tokens=int(getattr(ns, "prompt_tokens", d.prompt_tokens)),
            output_tokens=int(getattr(ns, "output_tokens", d.output_tokens)),
            steps=StepPlan.parse_users(str(getattr(ns, "steps", ",".join(map(str, d.steps))))),
            requests_per_user=None if duration > 0 else int(getattr(ns, "requests_per_user", d.requests_per_user)),
            step_duration_s=duration if duration > 0 else None,
            request_timeout_s=float(getattr(ns, "request_timeout", d.request_timeout_s)),
            ready_timeout_s=float(getattr(ns, "ready_timeout", d.ready_timeout_s)),
            records=str(getattr(ns, "records", d.records) or ""),
            prompt_text=Path(getattr(ns, "prompt_text", "") or DEFAULT_PROMPT_TEXT),
            prompt_format=str(getattr(ns, "prompt_format", d.prompt_format)),
            model_name=str(getattr(ns, "model_name", "") or ""),
            length_options=length_options,
            objectives=parse_objectives(str(getattr(ns, "slo", "") or "")),
            search=bool(getattr(ns, "search", False)),
            max_users=int(getattr(ns, "max_users", 0) or 0) or None,
            search_resolution=int(getattr(ns, "search_resolution", 1) or 1),
            min_requests=int(getattr(ns, "min_requests", 0) or 0) or None,
            max_requests=int(getattr(ns, "max_requests", 0) or 0) or None,
            done_steps=StepPlan.parse_done(str(getattr(ns, "done_steps", "") or "")),
            run_id=str(getattr(ns, "run_id", "") or ""),
        )
        options.validate()
        return options

    def validate(self) -> None:
        if self.prompt_tokens < MIN_PROMPT_TOKENS:
            raise ValueError(f"--prompt-tokens must be at least {MIN_PROMPT_TOKENS}, got {self.prompt_tokens}")
        if self.output_tokens < MIN_OUTPUT_TOKENS:
            raise ValueError(
                f"--output-tokens must be at least {MIN_OUTPUT_TOKENS} (TPOT needs two tokens), "
                f"got {self.output_tokens}"
            )
        if self.request_timeout_s <= 0:
            raise ValueError(f"--request-timeout must be positive, got {self.request_timeout_s}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        unknown = sorted(set(self.length_options) - set(LENGTH_OPTIONS))
        if unknown:
            raise ValueError(f"--length-options: unknown {', '.join(unknown)}; allowed: {', '.join(LENGTH_OPTIONS)}")
        if not self.prompt_text.is_file():
            raise ValueError(f"--prompt-text: file not found: {self.prompt_text}")
        self.plan()  # validates the steps

    def plan(self) -> StepPlan:
        return StepPlan(
            users=self.steps,
            requests_per_user=self.requests_per_user,
            duration_s=self.step_duration_s,
            ready_timeout_s=self.ready_timeout_s,
            drain_timeout_s=self.request_timeout_s + DRAIN_MARGIN_S,
            objectives=self.objectives,
            search=self.search,
            max_users=self.max_users,
            search_resolution=self.search_resolution,
            min_requests=self.min_requests,
            max_requests=self.max_requests,
            done=self.done_steps,
        )


def add_arguments(parser: Any) -> None:
    """Register the options on Locust's parser (`events.init_command_line_parser`); defaults are LoadOptions'."""
    d = LoadOptions()
    parser.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="exact prompt length in tokens")
    parser.add_argument("--output-tokens", type=int, default=d.output_tokens, help="exact generated length in tokens")
    parser.add_argument(
        "--steps", type=str, default=",".join(map(str, d.steps)), help="StepShape: concurrency steps, e.g. 1,2,4,8"
    )
    parser.add_argument(
        "--requests-per-user", type=int, default=d.requests_per_user,
        help="StepShape: requests each user completes per step",
    )  # fmt: skip
    parser.add_argument(
        "--step-duration", type=float, default=0.0, help="StepShape: seconds per step instead (0 = use requests)"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=d.request_timeout_s, help="seconds before a request fails"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=d.ready_timeout_s,
        help="StepShape: seconds for users to build their prompts",
    )  # fmt: skip
    parser.add_argument("--records", type=str, default=d.records, help="JSONL file of per-request and per-step records")
    parser.add_argument(
        "--prompt-text", type=str, default="", help="UTF-8 text file prompts are cut from (default: bundled text)"
    )
    parser.add_argument(
        "--prompt-format",
        type=str,
        default=d.prompt_format,
        help="OpenAI completions: ids (token-id prompt), text, or auto (ids when the server has /tokenize)",
    )
    parser.add_argument("--model-name", type=str, default="", help="OpenAI routes: the `model` field to send")
    parser.add_argument(
        "--slo", type=str, default="",
        help="latency objectives each step is judged against, e.g. ttft_s=2@0.9,tpot_s=0.1@0.9 (seconds@quantile)",
    )  # fmt: skip
    parser.add_argument(
        "--search", action="store_true", default=False,
        help="StepShape: after the steps, search the highest concurrency that meets --slo (doubling, then bisection)",
    )  # fmt: skip
    parser.add_argument("--max-users", type=int, default=0, help="StepShape: the search's bound (0 = largest step)")
    parser.add_argument("--search-resolution", type=int, default=1, help="StepShape: bisect to this many users")
    parser.add_argument(
        "--min-requests", type=int, default=0,
        help="StepShape: end a step early once it has this many requests and its --slo verdict is certain (0 = never)",
    )  # fmt: skip
    parser.add_argument(
        "--max-requests", type=int, default=0, help="StepShape: end a step at this many measured requests (0 = no cap)"
    )
    parser.add_argument(
        "--done-steps", type=str, default="",
        help="StepShape: steps an earlier attempt measured, not run again (users:pass|miss|done, comma-separated)",
    )  # fmt: skip
    parser.add_argument(
        "--run-id", type=str, default="", help="the id the first test's records carry (default: a random one)"
    )
    parser.add_argument(
        "--length-options",
        type=str,
        default=",".join(d.length_options),
        help="OpenAI routes: length-forcing fields to send (comma list of ignore_eos, min_tokens; empty = none)",
    )
