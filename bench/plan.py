"""The load plan: one validated model of what a load test does, read by the Locust users and written by the harness.

Lengths (exact prompt and output tokens), the arrival process (closed-loop users or an open-loop rate), the load
levels (`steps`: users, or requests/s), how long each level measures, the capacity search, the early stop, the
latency objectives each level is judged against, and what a resumed run already has. Every rule is checked here,
once. The harness writes the plan to `plan.json` and hands it to Locust whole (`--plan plan.json`); a plain
`locust -f locustfiles/...` run builds the same model from its custom arguments (`from_options`).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from bench.arrivals import ARRIVALS, Arrival, ClosedLoop, arrival_from
from bench.search import CapacitySearch, check_levels, level_sequence
from bench.slo import Objective, parse_objectives

DEFAULT_PROMPT_TEXT = Path(__file__).resolve().parents[1] / "locustfiles" / "prompt_text.txt"
LENGTH_OPTIONS = ("ignore_eos", "min_tokens")
PROMPT_FORMATS = ("auto", "ids", "text")
MIN_PROMPT_TOKENS = 1
MIN_OUTPUT_TOKENS = 2  # TPOT needs two tokens
# A request cannot outlive its timeout; the margin covers recording and message delivery.
DRAIN_MARGIN_S = 60.0
DEFAULT_REQUESTS_PER_USER = 3  # closed loop, when no step length is given
DEFAULT_REQUESTS_PER_STEP = 32  # open loop, when no step length is given

DoneLevel = tuple[int | float, bool | None]  # a level an earlier attempt measured: (level, passed or None)


class LoadPlan(BaseModel):
    """What a load test does (see the module docstring). Frozen; derive with `model_copy(update=...)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: int = Field(default=2560, ge=MIN_PROMPT_TOKENS)
    output_tokens: int = Field(default=768, ge=MIN_OUTPUT_TOKENS)
    arrival: SerializeAsAny[Arrival] = Field(default_factory=ClosedLoop)
    steps: tuple[int | float, ...] = (1, 2, 4, 8)  # load levels: users (closed loop) or requests/s (open loop)
    # How long a level measures: closed loop, requests per user or seconds; open loop, arrivals or seconds.
    requests_per_user: int | None = Field(default=None, ge=1)
    requests_per_step: int | None = Field(default=None, ge=1)
    step_duration_s: float | None = Field(default=None, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)
    ready_timeout_s: float = Field(default=300.0, gt=0)  # users must build their prompts within this
    drain_timeout_s: float | None = Field(default=None, gt=0)  # None: the request timeout + DRAIN_MARGIN_S
    objectives: tuple[Objective, ...] = ()
    # Capacity: after the steps, search the highest level that meets the objectives, up to max_level.
    search: bool = False
    max_level: int | float | None = Field(default=None, gt=0)  # None: the largest step
    search_resolution: int | float = Field(default=1, gt=0)
    # Early stop: from min_requests measured requests a level may end once its verdict is certain; max_requests caps.
    min_requests: int | None = Field(default=None, ge=1)
    max_requests: int | None = Field(default=None, ge=1)
    done: tuple[DoneLevel, ...] = ()  # levels an earlier attempt measured: not run again
    run_id: str = ""  # the id the first test's records carry (the harness names its attempts)
    records: str = "requests.jsonl"
    prompt_text: Path = DEFAULT_PROMPT_TEXT
    prompt_format: str = "auto"
    model_name: str = ""
    length_options: tuple[str, ...] = LENGTH_OPTIONS

    @field_validator("arrival", mode="before")
    @classmethod
    def _known_arrival(cls, value: Any) -> Arrival:
        return arrival_from(value)

    @model_validator(mode="before")
    @classmethod
    def _one_step_length(cls, data: Any) -> Any:
        """Exactly one of the step lengths (the arrival's own kind, or seconds); the default when none is given."""
        if not isinstance(data, dict):
            return data
        open_loop = arrival_from(data.get("arrival", "users")).open_loop
        per_user, per_step, duration = (data.get(k) for k in ("requests_per_user", "requests_per_step",
                                                              "step_duration_s"))  # fmt: skip
        if open_loop and per_user is not None:
            raise ValueError("requests_per_user is for closed-loop users; an open-loop level takes requests_per_step")
        if not open_loop and per_step is not None:
            raise ValueError("requests_per_step is for open-loop rates; closed-loop users take requests_per_user")
        requests = per_user if per_user is not None else per_step
        given = [k for k, v in (("requests", requests), ("step_duration_s", duration)) if v is not None]
        if len(given) > 1:
            raise ValueError("set only one of the requests per step and step_duration_s")
        if not given:
            key = "requests_per_step" if open_loop else "requests_per_user"
            data = {**data, key: DEFAULT_REQUESTS_PER_STEP if open_loop else DEFAULT_REQUESTS_PER_USER}
        return data

    @model_validator(mode="after")
    def _rules(self) -> LoadPlan:
        check_levels(self.steps, integer=not self.arrival.open_loop)
        if any(level <= 0 for level, _ in self.done):
            raise ValueError(f"done levels must be positive, got {[lv for lv, _ in self.done]}")
        if self.search and not self.objectives:
            raise ValueError("the capacity search needs latency objectives (--slo, [slo]) to judge its levels")
        if self.min_requests is not None and not self.objectives:
            raise ValueError("ending a level early (min_requests) needs latency objectives (--slo, [slo]) to decide")
        if self.max_level is not None and self.max_level < max(self.steps):
            raise ValueError(f"the search's bound {self.max_level:g} is below the largest step {max(self.steps):g}")
        if self.min_requests and self.max_requests and self.min_requests > self.max_requests:
            raise ValueError(f"min_requests {self.min_requests} is above max_requests {self.max_requests}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        unknown = sorted(set(self.length_options) - set(LENGTH_OPTIONS))
        if unknown:
            raise ValueError(f"length options: unknown {', '.join(unknown)}; allowed: {', '.join(LENGTH_OPTIONS)}")
        return self

    # ---------------------------------------------------------------- derived

    @property
    def open_loop(self) -> bool:
        return self.arrival.open_loop

    @property
    def bound(self) -> float:
        """The highest level any step may have (the search's bound, else the largest step)."""
        return self.max_level if self.search and self.max_level else max(self.steps)

    @property
    def concurrency(self) -> int:
        """The most requests in flight at once: the server is sized for it (users, or the open loop's bound)."""
        return self.arrival.max_in_flight if self.open_loop else int(self.bound)  # type: ignore[attr-defined]

    @property
    def drain_s(self) -> float:
        return self.drain_timeout_s or self.request_timeout_s + DRAIN_MARGIN_S

    def new_search(self) -> CapacitySearch | None:
        """The search over this plan's levels (None without objectives: nothing to judge levels by)."""
        if not self.objectives:
            return None
        return CapacitySearch(self.bound, self.search_resolution, integer=not self.open_loop)

    def levels(self, search: CapacitySearch | None) -> Any:
        """The levels to run (index, level, probe), skipping what `done` holds; see bench.search.level_sequence."""
        return level_sequence(self.steps, search, probing=self.search, done=dict(self.done))

    def pending(self) -> bool:
        """Whether any level is left to run after the `done` ones."""
        return next(self.levels(self.new_search()), None) is not None

    def check_prompt_text(self) -> None:
        if not self.prompt_text.is_file():
            raise ValueError(f"prompt text file not found: {self.prompt_text}")

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> LoadPlan:
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"plan file not found: {path}") from None
        except ValidationError as exc:
            raise ValueError(f"{path}: {plan_error(exc)}") from None

    # ---------------------------------------------------------------- the Locust command line

    @classmethod
    def from_options(cls, ns: Any) -> LoadPlan:
        """The plan from Locust's parsed options: `--plan FILE` whole, else the custom arguments (as `add_arguments`
        registers them), both validated by the same rules."""
        if ns is None:
            return cls()
        if getattr(ns, "plan", ""):
            plan = cls.read(Path(ns.plan))
            return plan.model_copy(update={"run_id": ns.run_id}) if getattr(ns, "run_id", "") else plan
        duration = float(getattr(ns, "step_duration", 0.0) or 0.0)
        kind = str(getattr(ns, "arrival", "users") or "users")
        fields = ARRIVALS[kind].model_fields
        arrival: dict[str, Any] = {"kind": kind}
        for option, cast in (("max_in_flight", int), ("burstiness", float)):  # the arrival options on the CLI
            if option in fields and getattr(ns, option, None) is not None:
                arrival[option] = cast(getattr(ns, option))
        open_loop = ARRIVALS[kind].open_loop
        count = int(getattr(ns, "requests_per_step", 0) or 0) if open_loop else None
        data: dict[str, Any] = {
            "prompt_tokens": int(ns.prompt_tokens), "output_tokens": int(ns.output_tokens), "arrival": arrival,
            "steps": parse_levels(str(ns.steps)), "step_duration_s": duration if duration > 0 else None,
            "requests_per_user": int(ns.requests_per_user) if not open_loop and duration <= 0 else None,
            "requests_per_step": (count or None) if duration <= 0 else None,
            "request_timeout_s": float(ns.request_timeout), "ready_timeout_s": float(ns.ready_timeout),
            "records": str(getattr(ns, "records", "") or ""),
            "prompt_format": str(getattr(ns, "prompt_format", "auto")), "model_name": str(ns.model_name or ""),
            "length_options": tuple(o.strip() for o in str(ns.length_options).split(",") if o.strip()),
            "objectives": parse_objectives(str(getattr(ns, "slo", "") or "")), "search": bool(ns.search),
            "max_level": float(ns.max_users) if float(getattr(ns, "max_users", 0) or 0) > 0 else None,
            "search_resolution": float(ns.search_resolution or 1),
            "min_requests": int(ns.min_requests or 0) or None, "max_requests": int(ns.max_requests or 0) or None,
            "done": parse_done(str(getattr(ns, "done_steps", "") or "")), "run_id": str(ns.run_id or ""),
        }  # fmt: skip
        if getattr(ns, "prompt_text", ""):
            data["prompt_text"] = Path(ns.prompt_text)
        try:
            plan = cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(plan_error(exc)) from None
        plan.check_prompt_text()
        return plan


def plan_error(exc: ValidationError) -> str:
    """A plan's validation errors in one line: `output_tokens: Input should be greater than or equal to 2`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def parse_levels(text: str) -> tuple[float, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); '0.5,1,2' for rates."""
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"steps must be comma-separated load levels like 1,2,4,8, got {text!r}") from None
    return tuple(int(v) if v.is_integer() else v for v in values)


def parse_done(text: str) -> tuple[DoneLevel, ...]:
    """'1:pass,2:miss,4:done' -> ((1, True), (2, False), (4, None)); the inverse of `format_done`."""
    verdicts = {"pass": True, "miss": False, "done": None}
    done = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        level, _, verdict = part.partition(":")
        try:
            value = float(level)
        except ValueError:
            value = -1.0
        if value <= 0 or verdict not in verdicts:
            raise ValueError(f"done steps look like 1:pass,2:miss,4:done; got {part!r}")
        done.append((int(value) if value.is_integer() else value, verdicts[verdict]))
    return tuple(done)


def format_done(done: Collection[DoneLevel]) -> str:
    return ",".join(f"{lv:g}:{'done' if v is None else 'pass' if v else 'miss'}" for lv, v in done)


def add_arguments(parser: Any) -> None:
    """Register the plan's options on Locust's parser (`events.init_command_line_parser`), so the web UI shows them
    and a plain `locust -f` run takes them; the defaults are LoadPlan's."""
    d = LoadPlan()
    add = parser.add_argument
    add("--plan", type=str, default="", help="a plan.json the harness wrote: every other load option is read from it")
    add("--prompt-tokens", type=int, default=d.prompt_tokens, help="exact prompt length in tokens")
    add("--output-tokens", type=int, default=d.output_tokens, help="exact generated length in tokens")
    add("--arrival", type=str, default="users",
        help="users (closed loop: --steps are user counts) or constant, poisson, gamma (open loop: --steps are "
             "requests/s)")  # fmt: skip
    add("--max-in-flight", type=int, default=16, help="open loop: requests in flight at once (Locust users)")
    add("--burstiness", type=float, default=1.0, help="gamma arrivals: the shape (1 = Poisson, < 1 burstier)")
    add("--steps", type=str, default="1,2,4,8", help="StepShape: load levels, e.g. 1,2,4,8 (users or requests/s)")
    add("--requests-per-user", type=int, default=DEFAULT_REQUESTS_PER_USER,
        help="StepShape: requests each user completes per step (closed loop)")  # fmt: skip
    add("--requests-per-step", type=int, default=DEFAULT_REQUESTS_PER_STEP,
        help="StepShape: arrivals per step (open loop)")  # fmt: skip
    add("--step-duration", type=float, default=0.0, help="StepShape: seconds per step instead (0 = use requests)")
    add("--request-timeout", type=float, default=d.request_timeout_s, help="seconds before a request fails")
    add("--ready-timeout", type=float, default=d.ready_timeout_s, help="StepShape: seconds for users to prepare")
    add("--records", type=str, default=d.records, help="JSONL file of per-request and per-step records")
    add("--prompt-text", type=str, default="", help="UTF-8 text file prompts are cut from (default: bundled text)")
    add(
        "--prompt-format",
        type=str,
        default=d.prompt_format,
        help="OpenAI completions: ids (token-id prompt), text, or auto (ids when the server has /tokenize)",
    )
    add("--model-name", type=str, default="", help="OpenAI routes: the `model` field to send")
    add(
        "--slo",
        type=str,
        default="",
        help="latency objectives each step is judged against, e.g. ttft_s=2@0.9,tpot_s=0.1@0.9 (seconds@quantile)",
    )
    add(
        "--search",
        action="store_true",
        default=False,
        help="StepShape: after the steps, search the highest level that meets --slo (doubling, then bisection)",
    )
    add("--max-users", type=float, default=0, help="StepShape: the search's bound, a level (0 = the largest step)")
    add("--search-resolution", type=float, default=1, help="StepShape: bisect to this close (users or requests/s)")
    add(
        "--min-requests",
        type=int,
        default=0,
        help="StepShape: end a step early once it has this many requests and its --slo verdict is certain",
    )
    add("--max-requests", type=int, default=0, help="StepShape: end a step at this many measured requests")
    add(
        "--done-steps",
        type=str,
        default="",
        help="StepShape: levels an earlier attempt measured, not run again (level:pass|miss|done, comma-separated)",
    )
    add("--run-id", type=str, default="", help="the id the first test's records carry (default: a random one)")
    add(
        "--length-options",
        type=str,
        default=",".join(d.length_options),
        help="OpenAI routes: length-forcing fields to send (comma list of ignore_eos, min_tokens; empty = none)",
    )
