"""Questions rendered as multiple-choice tasks, and llama.cpp's binary task file (`llama-perplexity -bf`).

Rendering. The default, "cloze", is the original study's form: the task's context is the question text alone and
each of the four choices is a continuation. llama-perplexity scores a choice as the mean log-probability of its
tokens after `question + " " + choice` (the prefix shared by all four excluded) and picks the highest; no letters,
no few-shot examples, no prompt template. "qa" wraps the question as "Question: ...\\nAnswer:" with the same
continuations. The same rendering is used for every variant, so accuracies compare like for like.

Binary format (llama.cpp's tools/perplexity/perplexity.cpp reads it), little-endian:

    u32 n_task; u32 task_pos[n_task]              absolute byte offset of each task
    task    := str question, answers single_correct, answers multiple_correct
    answers := u32 n (<= 100), str answer[n], i32 label[n]     (strings first, then labels; 1 = correct)
    str     := u32 nbytes, UTF-8 bytes

llama-perplexity reads `multiple_correct` and ignores it: we write an empty list.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harness.cache import CacheDir, atomic_file
from harness.errors import MMLUError
from mmlu.dataset import Question

Render = Literal["cloze", "qa"]
MAX_ANSWERS = 100  # llama-perplexity refuses more answers per task


@dataclass(frozen=True)
class MultipleChoiceTask:
    """One task as llama-perplexity sees it: a context, its candidate continuations, the index of the right one."""

    question: str
    answers: tuple[str, ...]
    correct: int


def render_task(q: Question, style: Render = "cloze") -> MultipleChoiceTask:
    """A question as a task in the given style (see the module docstring)."""
    text = q.question.strip()
    if style == "qa":
        text = f"Question: {text}\nAnswer:"
    elif style != "cloze":
        raise MMLUError(f"unknown MMLU rendering {style!r}; choose cloze or qa")
    return MultipleChoiceTask(text, tuple(c.strip() for c in q.choices), q.answer)


def render_tasks(questions: Sequence[Question], style: Render = "cloze") -> list[MultipleChoiceTask]:
    return [render_task(q, style) for q in questions]


def _check(task: MultipleChoiceTask, number: int) -> None:
    # llama-perplexity stops at the first empty question or answer ("found bad task"), after loading the model:
    # say which task it is before running anything.
    if not task.question:
        raise MMLUError(f"task {number}: the question is empty")
    if not 2 <= len(task.answers) <= MAX_ANSWERS:
        raise MMLUError(f"task {number}: {len(task.answers)} answers; llama-perplexity takes 2 to {MAX_ANSWERS}")
    if any(not a for a in task.answers):
        raise MMLUError(f"task {number}: an answer is empty; llama-perplexity rejects empty answers")
    if not 0 <= task.correct < len(task.answers):
        raise MMLUError(f"task {number}: correct answer index {task.correct} out of range")


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<I", len(data)) + data


def encode_tasks(tasks: Sequence[MultipleChoiceTask]) -> bytes:
    """The task file's bytes."""
    if not tasks:
        raise MMLUError("no tasks to write: the MMLU selection is empty")
    bodies = []
    for number, task in enumerate(tasks, start=1):
        _check(task, number)
        labels = [1 if i == task.correct else 0 for i in range(len(task.answers))]
        body = _str(task.question)
        body += struct.pack("<I", len(task.answers)) + b"".join(_str(a) for a in task.answers)
        body += struct.pack(f"<{len(labels)}i", *labels)
        body += struct.pack("<I", 0)  # multiple_correct: none
        bodies.append(body)
    offset = 4 + 4 * len(tasks)
    positions = []
    for body in bodies:
        positions.append(offset)
        offset += len(body)
    if offset >= 1 << 32:
        raise MMLUError("the task file would exceed 4 GiB, beyond the format's 32-bit offsets")
    return struct.pack(f"<I{len(tasks)}I", len(tasks), *positions) + b"".join(bodies)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MMLUError(f"task file truncated at byte {self.pos} (wanted {n} more bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def text(self) -> str:
        raw = self.take(self.u32())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MMLUError(f"task file: string before byte {self.pos} is not UTF-8") from None

    def answers(self) -> tuple[list[str], list[int]]:
        n = self.u32()
        if n > MAX_ANSWERS:
            raise MMLUError(f"task file: {n} answers at byte {self.pos - 4}; the format allows {MAX_ANSWERS}")
        texts = [self.text() for _ in range(n)]
        labels = list(struct.unpack(f"<{n}i", self.take(4 * n)))
        return texts, labels


def decode_tasks(data: bytes) -> list[MultipleChoiceTask]:
    """Read a task file back (the inverse of `encode_tasks`), checking every task's recorded offset."""
    reader = _Reader(data)
    n_task = reader.u32()
    positions = [reader.u32() for _ in range(n_task)]
    tasks = []
    for number, expected in enumerate(positions, start=1):
        if reader.pos != expected:
            raise MMLUError(f"task file: task {number} starts at byte {reader.pos}, its offset says {expected}")
        question = reader.text()
        answers, labels = reader.answers()
        reader.answers()  # multiple_correct, ignored by llama-perplexity too
        correct = [i for i, label in enumerate(labels) if label == 1]
        if len(correct) != 1:
            raise MMLUError(f"task file: task {number} has {len(correct)} correct answers, expected exactly 1")
        tasks.append(MultipleChoiceTask(question, tuple(answers), correct[0]))
    if reader.pos != len(data):
        raise MMLUError(f"task file: {len(data) - reader.pos} unexpected bytes after the last task")
    return tasks


def write_task_file(tasks: Sequence[MultipleChoiceTask], cache: CacheDir) -> Path:
    """Write the tasks once to `<cache>/mmlu/<content hash>.bin` and return that path."""
    data = encode_tasks(tasks)
    digest = hashlib.sha256(data).hexdigest()[:20]
    return atomic_file(cache.mmlu / f"{digest}.bin", lambda tmp: tmp.write_bytes(data))


def read_task_file(path: Path) -> list[MultipleChoiceTask]:
    try:
        return decode_tasks(path.read_bytes())
    except FileNotFoundError:
        raise MMLUError(f"task file not found: {path}") from None
