"""Locustfile: OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, streamed, exact lengths.

Works against llama-server's own OpenAI routes and other servers (llama-cpp-python's server, vLLM): sends
`max_tokens`, the length-forcing fields the server takes (--length-options: `ignore_eos`, `min_tokens`) and
`stream_options.include_usage`; counts come from the stream's `usage` (never from counting chunks).

Completions send token ids when the server can tokenize (--prompt-format auto|ids), else text. Chat always sends
text: its length, chat template included, is fitted once against the server's reported usage and then
verified on every request.

    locust -f locustfiles/openai_compat.py OpenAIChatUser --host http://127.0.0.1:8080 --headless
"""

from __future__ import annotations

import locust  # noqa: F401 - first: Locust's import applies gevent's monkey patching

# isort: split
from typing import Any

from locustfiles import USER_KINDS
from locustfiles._events import StreamState, as_int, read_openai_event
from locustfiles._prompts import TextPrompts, TokenPrompts, fit_text_length
from locustfiles._shape import StepShape
from locustfiles._sse import SSEEvent
from locustfiles._users import PrepareError, StreamingUser

__all__ = ["OpenAIChatUser", "OpenAICompletionUser", "StepShape"]


class OpenAIUser(StreamingUser):
    abstract = True

    def prepare(self) -> None:
        props = self.llama_server_props()
        self.is_llama_server = props is not None
        self.check_fits(props)
        if self.token_id_prompts():
            self.prompts: TokenPrompts | TextPrompts = TokenPrompts(
                self.text_tokens(), self.options.prompt_tokens, self.rng
            )
        else:
            key = ("fit", self.host, self.route, self.options.prompt_tokens, str(self.options.prompt_text))
            n_words, pad = self.session.shared(key, self._fit_text)
            self.prompts = TextPrompts(self.prompt_text(), self.rng, n_words=n_words, pad=pad)

    def token_id_prompts(self) -> bool:
        return False

    def next_prompt(self) -> Any:
        return self.prompts.next()

    def request_body(self, prompt: Any) -> dict[str, Any]:
        out = self.options.output_tokens
        body: dict[str, Any] = {
            **self.prompt_fields(prompt),
            "max_tokens": out,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.model_name:
            body["model"] = self.options.model_name
        if "ignore_eos" in self.options.length_options:
            body["ignore_eos"] = True
        if "min_tokens" in self.options.length_options:
            body["min_tokens"] = out
        if self.is_llama_server:
            body["cache_prompt"] = False  # llama-server's own field; other servers may reject unknown ones
        return body

    def prompt_fields(self, prompt: Any) -> dict[str, Any]:
        raise NotImplementedError

    def read_event(self, event: SSEEvent, state: StreamState) -> int:
        return read_openai_event(event, state, chat=self.api == "chat")

    def _fit_text(self) -> tuple[int, int]:
        fitter = TextPrompts(self.prompt_text(), self.rng)

        def count(n_words: int, pad: int) -> int:
            text = fitter.compose(self.rng.getrandbits(48), n_words, pad)
            body: dict[str, Any] = {**self.prompt_fields(text), "max_tokens": 1, "stream": False}
            if self.options.model_name:
                body["model"] = self.options.model_name
            reply = self.post_json(self.route, body)
            usage = reply.get("usage") if isinstance(reply, dict) else None
            tokens = as_int(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
            if tokens is None:
                raise PrepareError(f"{self.host}{self.route} reports no usage.prompt_tokens; cannot fit the prompt")
            return tokens

        return fit_text_length(count, self.options.prompt_tokens)


class OpenAICompletionUser(OpenAIUser):
    """Streams /v1/completions; a token-id prompt when the server tokenizes, else fitted text."""

    kind = USER_KINDS["openai"]

    def token_id_prompts(self) -> bool:
        fmt = self.options.prompt_format
        if fmt == "ids":
            return True
        if fmt == "text":
            return False
        try:
            self.text_tokens()
        except PrepareError:
            return False
        return True

    def prompt_fields(self, prompt: Any) -> dict[str, Any]:
        return {"prompt": prompt}


class OpenAIChatUser(OpenAIUser):
    """Streams /v1/chat/completions with one user message, fitted so the templated prompt has the exact length."""

    kind = USER_KINDS["chat"]

    def prompt_fields(self, prompt: Any) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": prompt}]}
