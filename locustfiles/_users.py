"""`StreamingUser`: one closed-loop user that streams fixed-length completions and records each one.

Subclasses say what to send (`request_body`), how to read one streamed event (`read_event`) and how to build
their prompts (`prepare`). This class times the stream, checks the server's counts, reports through Locust's
request event (the completion with response_length = output tokens, plus "TTFT" and "TPOT" entries whose
response_time is that metric) and sends the full `RequestRecord` to the JSONL sink.
"""

from __future__ import annotations

import locust  # noqa: F401 - first: Locust's import applies gevent's monkey patching

# isort: split
import json
import os
import random
import time
import uuid
from typing import Any, ClassVar

from gevent import GreenletExit
from locust import task
from locust.contrib.fasthttp import FAILURE_EXCEPTIONS, FastHttpUser
from locust.exception import StopUser

from bench.plan import LoadPlan
from bench.records import RequestRecord
from bench.timing import count_mismatch, stream_metrics
from locustfiles import UserKind
from locustfiles._events import StreamState
from locustfiles._prompts import PromptError
from locustfiles._session import LoadSession, session_of
from locustfiles._sse import SSEEvent, SSEParser
from locustfiles._steps import Ticket

# Compressed event streams would defeat per-event timing: ask for identity (Locust asks for gzip by default).
# One connection per request: llama-server (cpp-httplib) drops idle keep-alive connections after 5 s, and was
# seen to drop them after long streamed responses too; a pooled connection it has dropped fails the next request
# before it reaches the server. A loopback connect costs well under a millisecond of the measured TTFT.
STREAM_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "text/event-stream",
    "Accept-Encoding": "identity",
    "Connection": "close",
}
JSON_HEADERS = {**STREAM_HEADERS, "Accept": "application/json"}
FAILURE_PAUSE_S = 0.2  # after a failed request, so a dead server is not hammered in a tight loop


class PrepareError(Exception):
    """A user cannot build its requests (server unreachable, prompt does not fit, no token counts)."""


class StreamingUser(FastHttpUser):
    abstract = True
    kind: ClassVar[UserKind]  # from locustfiles.USER_KINDS: the api name and the route

    @property
    def api(self) -> str:
        return self.kind.api

    @property
    def route(self) -> str:
        return self.kind.route

    def __init__(self, environment: Any) -> None:
        self.session: LoadSession = session_of(environment)
        self.options: LoadPlan = self.session.options
        # FastHttpUser reads these when it builds its client: a request may legitimately stream for minutes.
        self.network_timeout = self.options.request_timeout_s
        self.connection_timeout = min(60.0, self.options.request_timeout_s)
        super().__init__(environment)
        self.user_id = uuid.uuid4().hex[:16]
        self.rng = random.Random(uuid.uuid4().int)
        self.seq = 0
        self._last_failed = False
        # Set when every prompt was counted by the server's tokenizer before the load (its streams report no count).
        self.verified_prompt_tokens: int | None = None

    # ---------------------------------------------------------------- what subclasses provide

    def prepare(self) -> None:
        """Build this user's prompts (tokenize, fit text); raise PrepareError or PromptError if impossible."""
        raise NotImplementedError

    def next_prompt(self) -> Any:
        raise NotImplementedError

    def request_body(self, prompt: Any) -> dict[str, Any]:
        raise NotImplementedError

    def read_event(self, event: SSEEvent, state: StreamState) -> int:
        """Update `state` from one event; return how many generated tokens it carried (0: none)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- Locust hooks

    def wait_time(self) -> float:
        # Waiting at the gate here, not inside the task, keeps the user in Locust's "waiting" state, where a
        # ramp-down or the end of the test stops it at once instead of in the middle of a request. In an open-loop
        # level the user then sleeps until its process's next arrival is due (another free user may take it first:
        # the task then finds none and the user waits for the one after).
        gate = self.session.gate
        gate.wait_open()
        due = gate.next_arrival()
        if due is not None:
            return max(0.0, due - time.time())
        return FAILURE_PAUSE_S if self._last_failed else 0.0

    def on_start(self) -> None:
        try:
            self.prepare()
        except (PrepareError, PromptError) as exc:
            self.session.send_ready(self.user_id, str(exc))
            raise StopUser() from None
        self.session.send_ready(self.user_id)

    def on_stop(self) -> None:
        # A probe with fewer users than the last step waits until the others have gone.
        self.session.send_gone(self.user_id)

    @task
    def complete(self) -> None:
        gate = self.session.gate
        ticket = gate.begin()
        if ticket is None:
            return  # the gate closed between waking and sending; wait_time waits for it to open
        record = self._new_record(ticket)
        interrupted: BaseException | None = None
        try:
            if ticket.dropped:
                record.ok, record.dropped, record.ended_at = False, True, record.sent_at
                record.error = (f"dropped: it waited {ticket.queue_s:.1f} s for a free user, more than the arrival "
                                "process allows (max_wait_s)")  # fmt: skip
            else:
                self._stream(record, ticket)
        except GreenletExit as exc:
            # The test is ending with this request in flight: record it rather than lose it silently.
            record.ok, record.error = False, "interrupted: the load test stopped while the request was streaming"
            interrupted = exc
        finally:
            measured, confirm_drain = gate.end(ticket)
            record.measured = measured and interrupted is None
            self._last_failed = not record.ok
            self.session.send_record(record)
            if confirm_drain:
                self.session.send_drained()
        if interrupted is not None:
            raise interrupted

    # ---------------------------------------------------------------- one request

    def _new_record(self, ticket: Ticket) -> RequestRecord:
        record = RequestRecord(
            user_id=self.user_id,
            seq=self.seq,
            api=self.api,
            route=self.route,
            sent_at=time.time(),
            ended_at=0.0,
            prompt_tokens_asked=self.options.prompt_tokens,
            output_tokens_asked=self.options.output_tokens,
            ok=False,
            step=ticket.step,
            users=ticket.users,
            epoch=ticket.epoch if ticket.run else None,  # a settling step's filler carries its epoch, unmeasured
            run=ticket.run or None,
            pid=os.getpid(),
            rate=ticket.rate,
            scheduled_at=ticket.scheduled_at,
            queue_s=ticket.queue_s if ticket.scheduled_at is not None else None,
        )
        self.seq += 1
        return record

    def _stream(self, record: RequestRecord, ticket: Ticket) -> None:
        payload = json.dumps(self.request_body(self.next_prompt()), separators=(",", ":"))
        name = f"{self.route} ({ticket.users} users)" if ticket.users else self.route
        state = StreamState()
        record.sent_at = time.time()
        sent = time.perf_counter()
        self._announce(record, ticket)
        with self.client.request(
            "POST", self.route, data=payload, headers=STREAM_HEADERS, stream=True, catch_response=True, name=name
        ) as resp:
            try:
                error = self._read_stream(resp, state)
            except FAILURE_EXCEPTIONS as exc:
                error = f"connection lost after {len(state.token_times)} token events: {exc!r}"
            ended = time.perf_counter()
            record.ended_at = record.sent_at + (ended - sent)
            record.status = resp.status_code
            error = self._finish(record, state, sent, error)
            resp.request_meta["response_time"] = (record.e2e_s if record.e2e_s is not None else ended - sent) * 1000
            resp.request_meta["response_length"] = record.output_tokens or 0
            if error:
                record.ok, record.error = False, error
                resp.failure(error)
            else:
                record.ok = True
                resp.success()
        if record.ok:
            self._fire("TTFT", name, record.ttft_s, record.prompt_tokens or 0)
            if record.tpot_s is not None:
                self._fire("TPOT", name, record.tpot_s, record.output_tokens or 0)

    def _announce(self, record: RequestRecord, ticket: Ticket) -> None:
        """Tell the step controller this request of its level is sent: it takes its place in the level's sample
        before its outcome is known. Called once its latency has started counting, so that the time the controller
        sees it in flight never exceeds its latency (a request in flight past an E2E limit has missed it)."""
        if ticket.in_step:
            self.session.send_sent(ticket.run, ticket.epoch, self.user_id, record.seq)

    def _read_stream(self, resp: Any, state: StreamState) -> str | None:
        """Consume the response; returns an error, or None with `state` filled in."""
        if resp.status_code == 0:
            return f"request failed: {resp.error!r}"
        if resp.status_code != 200:
            body = resp.content or b""
            return f"HTTP {resp.status_code}: {body[:300].decode('utf-8', errors='replace')}"
        stream = resp.stream
        parser = SSEParser()
        while True:
            line = stream.readline(b"\n")
            if not line:
                break
            event = parser.feed_line(line)
            if event is not None:
                state.arrived(self.read_event(event, state), time.perf_counter())
        last = parser.finish()
        if last is not None:
            state.arrived(self.read_event(last, state), time.perf_counter())
        return state.error

    def _finish(self, record: RequestRecord, state: StreamState, sent: float, error: str | None) -> str | None:
        """Fill the record from the stream; returns why the request failed, if it did."""
        if state.prompt_tokens is None and self.verified_prompt_tokens is not None:
            state.prompt_tokens = self.verified_prompt_tokens
            state.counts_from = f"{state.counts_from or 'no output count'}; prompt counted by the server's tokenizer"
        record.prompt_tokens, record.output_tokens = state.prompt_tokens, state.output_tokens
        record.counts = state.counts_from
        record.server_timings = state.timings
        record.token_events = len(state.token_times)
        if error:
            return error
        if not state.done:
            return f"the stream ended without its final event after {record.token_events} token events"
        if not state.token_times:
            return "the stream carried no generated token"
        metrics = stream_metrics(sent, state.token_times, state.output_tokens or sum(state.token_counts),
                                 token_counts=state.token_counts)  # fmt: skip
        # An open-loop request's latency counts from its arrival: the wait for a free user is part of it.
        waited = record.queue_s or 0.0
        record.ttft_s, record.e2e_s, record.tpot_s, record.itl_s = (
            metrics.ttft_s + waited, metrics.e2e_s + waited, metrics.tpot_s, metrics.itl_s
        )  # fmt: skip
        return count_mismatch(
            asked_prompt=record.prompt_tokens_asked,
            asked_output=record.output_tokens_asked,
            prompt_tokens=state.prompt_tokens,
            output_tokens=state.output_tokens,
            prompt_processed=state.prompt_processed,
        )

    def _fire(self, request_type: str, name: str, seconds: float | None, length: int) -> None:
        if seconds is None:
            return
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=seconds * 1000,
            response_length=length,
            exception=None,
            context={},
            start_time=time.time(),
            url=None,
            response=None,
        )

    # ---------------------------------------------------------------- helpers for prepare()

    def get_json(self, path: str) -> Any:
        """GET outside Locust's statistics (preparation is not load). Raises PrepareError."""
        return self._call("GET", path, None)

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        url = f"{self.host.rstrip('/')}{path}"
        try:
            # The session's own geventhttpclient user agent: same connection settings, no request event fired.
            resp = self.client.client.urlopen(
                url,
                method=method,
                payload=json.dumps(body) if body is not None else None,
                headers=JSON_HEADERS,
            )
            content = resp.content
        except FAILURE_EXCEPTIONS as exc:
            raise PrepareError(f"{method} {url} failed: {exc}") from None
        if resp.status_code != 200:
            text = (content or b"")[:300].decode("utf-8", errors="replace")
            raise PrepareError(f"{method} {url} answered HTTP {resp.status_code}: {text}")
        try:
            return json.loads(content)
        except ValueError:
            raise PrepareError(f"{method} {url} did not answer JSON") from None

    def prompt_text(self) -> str:
        path = self.options.prompt_text
        return self.session.shared(("text", str(path)), lambda: path.read_text(encoding="utf-8"))

    def text_tokens(self) -> list[int]:
        """The prompt text as the server under test tokenizes it (llama-server's /tokenize), once per process."""
        return self.session.shared(("tokens", self.host, str(self.options.prompt_text)), self._tokenize_text)

    def _tokenize_text(self) -> list[int]:
        reply = self.post_json("/tokenize", {"content": self.prompt_text(), "add_special": False})
        tokens = reply.get("tokens") if isinstance(reply, dict) else None
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise PrepareError(f"{self.host}/tokenize did not return token ids")
        return tokens

    def server_tokenizes(self) -> bool:
        """Whether the server counts tokens on request (llama-cpp-python's /extras/tokenize/count)."""
        try:
            self.tokenizer_count("hello")
        except PrepareError:
            return False
        return True

    def tokenizer_count(self, text: str) -> int:
        """Tokens the server's own tokenizer makes of `text`, special tokens (BOS) included as it adds them."""
        body: dict[str, Any] = {"input": text}
        if self.options.model_name:
            body["model"] = self.options.model_name
        reply = self.post_json("/extras/tokenize/count", body)
        count = reply.get("count") if isinstance(reply, dict) else None
        if not isinstance(count, int):
            raise PrepareError(f"{self.host}/extras/tokenize/count did not return a count")
        return count

    def check_model(self) -> None:
        """When the users name a model, the server must list it (a clear error before any load, not 404s)."""
        name = self.options.model_name
        if not name:
            return
        try:
            listed = self.get_json("/v1/models")
        except PrepareError:
            return  # a server without the listing route: its answers will say whether the name is right
        served = (
            [str(m.get("id")) for m in listed.get("data", []) if isinstance(m, dict)]
            if isinstance(listed, dict)
            else []
        )
        if served and name not in served:
            raise PrepareError(f"{self.host} does not serve model {name!r}; it serves: {', '.join(served)}")

    def check_fits(self, props: dict[str, Any] | None) -> None:
        """Fail before any load if the server's per-slot context cannot hold prompt + output (llama-server)."""
        if not props:
            return
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        need = self.options.prompt_tokens + self.options.output_tokens
        if isinstance(n_ctx, int) and n_ctx < need:
            raise PrepareError(
                f"the server gives each slot {n_ctx} tokens of context but a request needs {need} "
                f"({self.options.prompt_tokens} prompt + {self.options.output_tokens} output); "
                "restart it with a larger --ctx-size (or fewer --parallel slots)"
            )

    def llama_server_props(self) -> dict[str, Any] | None:
        """llama-server's /props, or None for servers that do not have it."""
        try:
            props = self.get_json("/props")
        except PrepareError:
            return None
        return props if isinstance(props, dict) and "default_generation_settings" in props else None
