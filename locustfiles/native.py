"""Locustfile: llama-server's native `/completion`, streamed, with exact prompt and output lengths.

The prompt is an array of token ids (the only exact way to set its length), `n_predict` with `ignore_eos`
forces the output length, `cache_prompt: false` keeps prefill honest. Counts come from the final event's
`timings` (predicted_n, prompt_n) and `tokens_evaluated`.

    locust -f locustfiles/native.py --host http://127.0.0.1:8080 --headless --prompt-tokens 2560 --output-tokens 768
"""

from __future__ import annotations

import locust  # noqa: F401 - first: Locust's import applies gevent's monkey patching

# isort: split
from typing import Any

from locustfiles import USER_KINDS
from locustfiles._events import StreamState, read_native_event
from locustfiles._prompts import TokenPrompts
from locustfiles._shape import StepShape
from locustfiles._sse import SSEEvent
from locustfiles._users import StreamingUser

__all__ = ["NativeCompletionUser", "StepShape"]


class NativeCompletionUser(StreamingUser):
    """Streams llama-server's native /completion with a token-id prompt."""

    kind = USER_KINDS["native"]

    def prepare(self) -> None:
        self.check_fits(self.llama_server_props())
        self.prompts = TokenPrompts(self.text_tokens(), self.options.prompt_tokens, self.rng)

    def next_prompt(self) -> list[int]:
        return self.prompts.next()

    def request_body(self, prompt: list[int]) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "n_predict": self.options.output_tokens,
            "ignore_eos": True,
            "cache_prompt": False,
            "stream": True,
        }

    def read_event(self, event: SSEEvent, state: StreamState) -> int:
        return read_native_event(event, state)
