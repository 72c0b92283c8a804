"""The load test's own command-line options (Locust custom arguments, so they also appear in the web UI).

Pure: `add_arguments` takes any argparse-style parser and `LoadOptions.from_namespace` validates what came back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locustfiles._steps import StepPlan

DEFAULT_PROMPT_TEXT = Path(__file__).with_name("prompt_text.txt")
LENGTH_OPTIONS = ("ignore_eos", "min_tokens")
PROMPT_FORMATS = ("auto", "ids", "text")


def add_arguments(parser: Any) -> None:
    """Register the options on Locust's parser (`events.init_command_line_parser`)."""
    parser.add_argument("--prompt-tokens", type=int, default=2560, help="exact prompt length in tokens")
    parser.add_argument("--output-tokens", type=int, default=768, help="exact generated length in tokens")
    parser.add_argument("--steps", type=str, default="1,2,4,8", help="StepShape: concurrency steps, e.g. 1,2,4,8")
    parser.add_argument(
        "--requests-per-user", type=int, default=3, help="StepShape: requests each user completes per step"
    )
    parser.add_argument(
        "--step-duration", type=float, default=0.0, help="StepShape: seconds per step instead (0 = use requests)"
    )
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="StepShape: seconds for users to build their prompts"
    )
    parser.add_argument(
        "--records", type=str, default="requests.jsonl", help="JSONL file of per-request and per-step records"
    )
    parser.add_argument(
        "--prompt-text", type=str, default="", help="UTF-8 text file prompts are cut from (default: bundled text)"
    )
    parser.add_argument(
        "--prompt-format",
        type=str,
        default="auto",
        help="OpenAI completions: ids (token-id prompt), text, or auto (ids when the server has /tokenize)",
    )
    parser.add_argument("--model-name", type=str, default="", help="OpenAI routes: the `model` field to send")
    parser.add_argument(
        "--length-options",
        type=str,
        default="ignore_eos,min_tokens",
        help="OpenAI routes: length-forcing fields to send (comma list of ignore_eos, min_tokens; empty = none)",
    )


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

    @classmethod
    def from_namespace(cls, ns: Any) -> LoadOptions:
        """Validated options from Locust's parsed options (or any object with the same attributes)."""
        if ns is None:
            return cls()
        duration = float(getattr(ns, "step_duration", 0.0) or 0.0)
        length_options = tuple(o.strip() for o in str(getattr(ns, "length_options", "")).split(",") if o.strip())
        options = cls(
            prompt_tokens=int(getattr(ns, "prompt_tokens", 2560)),
            output_tokens=int(getattr(ns, "output_tokens", 768)),
            steps=StepPlan.parse_users(str(getattr(ns, "steps", "1,2,4,8"))),
            requests_per_user=None if duration > 0 else int(getattr(ns, "requests_per_user", 3)),
            step_duration_s=duration if duration > 0 else None,
            request_timeout_s=float(getattr(ns, "request_timeout", 600.0)),
            ready_timeout_s=float(getattr(ns, "ready_timeout", 300.0)),
            records=str(getattr(ns, "records", "requests.jsonl") or ""),
            prompt_text=Path(getattr(ns, "prompt_text", "") or DEFAULT_PROMPT_TEXT),
            prompt_format=str(getattr(ns, "prompt_format", "auto")),
            model_name=str(getattr(ns, "model_name", "") or ""),
            length_options=length_options,
        )
        options.validate()
        return options

    def validate(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens must be at least 1, got {self.prompt_tokens}")
        if self.output_tokens < 2:
            raise ValueError(f"--output-tokens must be at least 2 (TPOT needs two tokens), got {self.output_tokens}")
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
            # A request cannot outlive its timeout; the margin covers recording and message delivery.
            drain_timeout_s=self.request_timeout_s + 60.0,
        )
