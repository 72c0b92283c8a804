"""Server-sent events (`text/event-stream`) parsed line by line, the way llama-server and OpenAI servers stream.

Pure: fed the lines a streaming HTTP response yields, returns each complete event at its blank line.
"""

from __future__ import annotations

from dataclasses import dataclass

# OpenAI-style streams end with this data payload instead of closing with a JSON event.
DONE = "[DONE]"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str | None = None  # the `event:` field; llama-server uses `error` in some builds


class SSEParser:
    """Incremental parser (WHATWG event-stream rules, minus `id` and `retry`, which these servers do not use)."""

    __slots__ = ("_data", "_event")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None

    def feed_line(self, line: bytes) -> SSEEvent | None:
        """One line, with or without its terminator (LF, CRLF). Returns an event when `line` ends one."""
        line = line.rstrip(b"\n").rstrip(b"\r")
        if not line:
            return self._dispatch()
        if line[:1] == b":":  # comment: servers send these as keep-alives
            return None
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", errors="replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", errors="replace")
        return None

    def finish(self) -> SSEEvent | None:
        """The event left pending when a stream ends without a final blank line (some servers do that)."""
        return self._dispatch()

    def _dispatch(self) -> SSEEvent | None:
        if not self._data and self._event is None:
            return None
        event = SSEEvent("\n".join(self._data), self._event)
        self._data = []
        self._event = None
        return event
