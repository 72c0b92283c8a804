"""Locustfile: OpenAI-compatible `/v1/embeddings`, inputs of an exact token length, not streamed.

llama-server (started with --embeddings and a pooling type) takes token ids, so each input has exactly
--prompt-tokens tokens; llama-cpp-python (--embedding) and other servers take text, fitted with the server's own
tokenizer (/extras/tokenize/count) or its reported usage. Every response's `usage.prompt_tokens` is checked against
the length asked; a response without it cannot be verified and fails. Reported per step: requests/s, input
tokens/s and latency (the whole request: E2E).

    locust -f locustfiles/embeddings.py --host http://127.0.0.1:8080 --headless --prompt-tokens 512
"""

from __future__ import annotations

import locust  # noqa: F401 - first: Locust's import applies gevent's monkey patching

# isort: split
import json
import time
from typing import Any

from locust.contrib.fasthttp import FAILURE_EXCEPTIONS

from bench.records import RequestRecord
from bench.timing import count_mismatch
from locustfiles import USER_KINDS
from locustfiles._events import as_int
from locustfiles._prompts import CountedTextPrompts, TextPrompts, TokenPrompts, fit_text_length
from locustfiles._shape import StepShape
from locustfiles._steps import Ticket
from locustfiles._users import JSON_HEADERS, StreamingUser

__all__ = ["EmbeddingsUser", "StepShape"]

COUNTED_POOL = 8


class EmbeddingsUser(StreamingUser):
    """Embeds inputs of exactly --prompt-tokens tokens; one request at a time, closed-loop like the others."""

    kind = USER_KINDS["embeddings"]

    def prepare(self) -> None:
        self.check_model()
        props = self.llama_server_props()
        if props is not None:
            self.check_fits(props)
            self.prompts: TokenPrompts | TextPrompts | CountedTextPrompts = TokenPrompts(
                self.text_tokens(), self.options.prompt_tokens, self.rng
            )
            return
        count = self.tokenizer_count if self.server_tokenizes() else self.usage_count
        key = ("fit-embeddings", self.host, self.options.prompt_tokens, str(self.options.prompt_text))
        fitter = TextPrompts(self.prompt_text(), self.rng)
        n_words, pad = self.session.shared(
            key,
            lambda: fit_text_length(
                lambda n, p: count(fitter.compose(self.rng.getrandbits(48), n, p)), self.options.prompt_tokens
            ),
        )
        self.prompts = CountedTextPrompts(
            fitter, self.options.prompt_tokens, count, size=COUNTED_POOL, n_words=n_words, pad=pad
        )

    def usage_count(self, text: str) -> int:
        reply = self.post_json(self.route, self.request_body(text))
        return self.reported_tokens(reply) or 0

    def next_prompt(self) -> Any:
        return self.prompts.next()

    def request_body(self, prompt: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"input": prompt}
        if self.options.model_name:
            body["model"] = self.options.model_name
        return body

    @staticmethod
    def reported_tokens(reply: Any) -> int | None:
        usage = reply.get("usage") if isinstance(reply, dict) else None
        return as_int(usage.get("prompt_tokens")) if isinstance(usage, dict) else None

    def _stream(self, record: RequestRecord, ticket: Ticket) -> None:
        """One embeddings request (not streamed): its latency is the whole request; the count is the server's."""
        record.output_tokens_asked = 0
        payload = json.dumps(self.request_body(self.next_prompt()), separators=(",", ":"))
        name = f"{self.route} ({ticket.users} users)" if ticket.users else self.route
        record.sent_at = time.time()
        sent = time.perf_counter()
        self._announce(record, ticket)
        with self.client.request(
            "POST", self.route, data=payload, headers=JSON_HEADERS, catch_response=True, name=name
        ) as resp:
            error = None
            try:
                content = resp.content
            except FAILURE_EXCEPTIONS as exc:
                content, error = b"", f"connection lost: {exc!r}"
            ended = time.perf_counter()
            record.ended_at = record.sent_at + (ended - sent)
            record.status = resp.status_code
            record.e2e_s = ended - sent + (record.queue_s or 0.0)  # open loop: from its arrival
            if error is None:
                error = self._check(record, resp.status_code, content)
            resp.request_meta["response_length"] = record.prompt_tokens or 0
            if error:
                record.ok, record.error = False, error
                resp.failure(error)
            else:
                record.ok = True
                resp.success()

    def _check(self, record: RequestRecord, status: int, content: bytes | None) -> str | None:
        if status != 200:
            return f"HTTP {status}: {(content or b'')[:300].decode('utf-8', errors='replace')}"
        try:
            reply = json.loads(content or b"")
        except ValueError:
            return "the server did not answer JSON"
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, list) or not data:
            return "the server returned no embedding"
        record.prompt_tokens, record.output_tokens, record.counts = self.reported_tokens(reply), 0, "usage"
        if record.prompt_tokens is None:
            return "the server did not report usage.prompt_tokens; the input length cannot be verified"
        return count_mismatch(
            asked_prompt=record.prompt_tokens_asked, asked_output=0, prompt_tokens=record.prompt_tokens, output_tokens=0
        )
