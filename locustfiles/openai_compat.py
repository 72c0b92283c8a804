"""Locustfile: OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, streamed, exact lengths.

Works against llama-server's own OpenAI routes and other servers (llama-cpp-python's server, vLLM): sends
`max_tokens`, the length-forcing fields the server takes (--length-options: `ignore_eos`, `min_tokens`) and
`stream_options.include_usage`; counts come from the server, never from counting chunks:

- llama-server: token-id prompts (completions) and the stream's `usage`;
- llama-cpp-python (it answers `/extras/tokenize/count` and streams no usage): prompts each counted by that
  tokenizer before any step (BOS included as it adds it; for chat, plus the template's tokens, measured from the
  server's usage on two probes that must agree), and outputs counted from the per-token data it streams when
  asked (`logprobs`);
- other servers: text prompts fitted once against the reported usage, and each request's own streamed usage.

Chat always sends text: its length, chat template included, is fitted and then verified on every request.

    locust -f locustfiles/openai_compat.py OpenAIChatUser --host http://127.0.0.1:8080 --headless
"""

from __future__ import annotations

import locust  # noqa: F401 - first: Locust's import applies gevent's monkey patching

# isort: split
from typing import Any

from locustfiles import USER_KINDS
from locustfiles._events import StreamState, as_int, read_openai_event
from locustfiles._prompts import CountedTextPrompts, TextPrompts, TokenPrompts, fit_text_length
from locustfiles._shape import StepShape
from locustfiles._sse import SSEEvent
from locustfiles._users import PrepareError, StreamingUser

__all__ = ["OpenAIChatUser", "OpenAICompletionUser", "StepShape"]

COUNTED_POOL = 8  # prompts each llama-cpp-python user builds and counts before its first step (used in turn)


class OpenAIUser(StreamingUser):
    abstract = True

    def prepare(self) -> None:
        props = self.llama_server_props()
        self.is_llama_server = props is not None
        self.check_fits(props)
        self.check_model()
        self.per_token_counts = not self.is_llama_server and self.server_tokenizes()
        if self.per_token_counts:
            self.prompts: TokenPrompts | TextPrompts | CountedTextPrompts = self.counted_prompts()
        elif self.token_id_prompts():
            self.prompts = TokenPrompts(self.text_tokens(), self.options.prompt_tokens, self.rng)
        else:
            key = ("fit", self.host, self.route, self.options.prompt_tokens, str(self.options.prompt_text))
            n_words, pad = self.session.shared(key, lambda: self._fit_text(self.usage_prompt_tokens))
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
        if self.per_token_counts:
            body.update(self.per_token_fields())
        return body

    def prompt_fields(self, prompt: Any) -> dict[str, Any]:
        raise NotImplementedError

    def per_token_fields(self) -> dict[str, Any]:
        """What makes the server list each generated token in the stream."""
        raise NotImplementedError

    def read_event(self, event: SSEEvent, state: StreamState) -> int:
        return read_openai_event(event, state, chat=self.api == "chat")

    # ---------------------------------------------------------------- prompt lengths

    def usage_prompt_tokens(self, text: str) -> int:
        """The prompt tokens the server reports in the usage of a 1-token, non-streamed request for `text`."""
        body: dict[str, Any] = {**self.prompt_fields(text), "max_tokens": 1, "stream": False}
        if self.options.model_name:
            body["model"] = self.options.model_name
        reply = self.post_json(self.route, body)
        usage = reply.get("usage") if isinstance(reply, dict) else None
        tokens = as_int(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        if tokens is None:
            raise PrepareError(f"{self.host}{self.route} reports no usage.prompt_tokens; cannot fit the prompt")
        return tokens

    def _fit_text(self, count) -> tuple[int, int]:
        fitter = TextPrompts(self.prompt_text(), self.rng)
        return fit_text_length(
            lambda n_words, pad: count(fitter.compose(self.rng.getrandbits(48), n_words, pad)), self.target_length()
        )

    def target_length(self) -> int:
        """Tokens the text itself must count as (the chat template's are added by the server)."""
        return self.options.prompt_tokens

    def counted_prompts(self) -> CountedTextPrompts:
        """Prompts each counted by the server's tokenizer: exact before any step, verified by construction."""
        text = TextPrompts(self.prompt_text(), self.rng)
        key = ("fit-counted", self.host, self.route, self.options.prompt_tokens, str(self.options.prompt_text))
        n_words, pad = self.session.shared(key, lambda: self._fit_text(self.tokenizer_count))
        self.verified_prompt_tokens = self.options.prompt_tokens
        return CountedTextPrompts(
            text, self.target_length(), self.tokenizer_count, size=COUNTED_POOL, n_words=n_words, pad=pad
        )


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

    def per_token_fields(self) -> dict[str, Any]:
        return {"logprobs": 1}


class OpenAIChatUser(OpenAIUser):
    """Streams /v1/chat/completions with one user message, fitted so the templated prompt has the exact length."""

    kind = USER_KINDS["chat"]

    def prompt_fields(self, prompt: Any) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": prompt}]}

    def per_token_fields(self) -> dict[str, Any]:
        return {"logprobs": True, "top_logprobs": 1}

    def target_length(self) -> int:
        if not self.per_token_counts:
            return self.options.prompt_tokens
        overhead = self.session.shared(("template", self.host, self.options.model_name), self._template_tokens)
        if self.options.prompt_tokens - overhead < 1:
            raise PrepareError(f"the chat template alone is {overhead} tokens, not fewer than the prompt's length")
        return self.options.prompt_tokens - overhead

    def _template_tokens(self) -> int:
        """Tokens the chat template adds to a message: the server's usage minus its tokenizer's count of the
        message, on two different messages that must agree (else the lengths cannot be verified)."""
        words = self.prompt_text().split()
        probes = [" ".join(words[:24]), " ".join(words[40:90])]
        overheads = {self.usage_prompt_tokens(p) - self.tokenizer_count(p) for p in probes}
        if len(overheads) != 1:
            raise PrepareError(
                f"{self.host}: the chat template adds {sorted(overheads)} tokens to different messages; "
                "the prompt lengths cannot be verified"
            )
        return overheads.pop()
