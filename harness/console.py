"""What a run tells the person watching it: messages through `logging`, progress bars through `progress_bar`.

The command line calls `configure` once: a console handler on stderr (all messages, or warnings only with
--quiet), progress bars on or off (--no-progress, --quiet), and, for a pipeline run, a file handler writing every
message into the run directory's log. Code below the CLI only logs (`logging.getLogger(__name__)`) and asks for
bars; it never prints and never carries a progress flag.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

# The loggers of our packages; the third-party libraries keep their own levels and handlers.
PACKAGES = ("harness", "mmlu", "reports")
_FORMAT_FILE = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_state = {"progress": True}
_file_handlers: list[logging.Handler] = []


class _ConsoleHandler(logging.StreamHandler):
    """Messages as plain lines on stderr (the stream looked up per message, so tests capturing stderr see them)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        if record.levelno >= logging.WARNING:
            record = logging.makeLogRecord({**record.__dict__, "msg": f"{record.levelname.lower()}: {record.msg}"})
        # tqdm.write keeps an active progress bar intact below the message.
        tqdm.write(self.format(record), file=self.stream)


def configure(*, progress: bool = True, quiet: bool = False) -> None:
    """Console output for this process: messages at INFO (WARNING with `quiet`), progress bars unless disabled."""
    _state["progress"] = progress and not quiet
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
            logger.removeHandler(handler)
        console = _ConsoleHandler()
        console.setLevel(logging.WARNING if quiet else logging.INFO)
        logger.addHandler(console)
        logger.propagate = False


def log_to_file(path: Path) -> None:
    """Also write every message (whatever the console shows) to `path`, appending, until `close_file_log`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT_FILE))
    handler.setLevel(logging.DEBUG)
    _file_handlers.append(handler)
    for name in PACKAGES:
        logging.getLogger(name).addHandler(handler)


def close_file_log() -> None:
    while _file_handlers:
        handler = _file_handlers.pop()
        for name in PACKAGES:
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def progress_enabled() -> bool:
    return _state["progress"]


def progress_bar(total: float | None, desc: str, unit: str, *, leave: bool = True) -> tqdm:
    """The one way to draw a progress bar: on stderr, and disabled by --no-progress / --quiet."""
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=not _state["progress"], file=sys.stderr)


def advance(bar: tqdm, position: float) -> None:
    """Move `bar` forward to `position` (never back, never past its total)."""
    target = min(position, bar.total) if bar.total else position
    if target > bar.n:
        bar.update(target - bar.n)
