"""llama.cpp's multiple-choice task file: writer/reader round trip, byte layout, rendering, errors."""

from __future__ import annotations

import struct

import pytest

from harness.cache import CacheDir
from harness.errors import MMLUError
from mmlu.dataset import Question
from mmlu.tasks import (
    MultipleChoiceTask,
    decode_tasks,
    encode_tasks,
    read_task_file,
    render_task,
    render_tasks,
    write_task_file,
)

TASKS = [
    MultipleChoiceTask("The colour of a clear daytime sky is", ("blue", "green", "plaid", "loud"), 0),
    MultipleChoiceTask("Zwei plus zwei ergibt", ("drei", "vier", "fünf"), 1),  # non-ASCII, 3 answers
    MultipleChoiceTask("Pick the last one:", ("a", "b", "c", "d", "e"), 4),
]


def test_round_trip() -> None:
    assert decode_tasks(encode_tasks(TASKS)) == TASKS


def test_byte_layout_matches_llama_cpp_reader() -> None:
    data = encode_tasks(TASKS[:1])
    n_task, pos0 = struct.unpack_from("<II", data, 0)
    assert (n_task, pos0) == (1, 8)
    offset = pos0
    (qlen,) = struct.unpack_from("<I", data, offset)
    assert data[offset + 4 : offset + 4 + qlen].decode() == TASKS[0].question
    offset += 4 + qlen
    (n_answers,) = struct.unpack_from("<I", data, offset)
    offset += 4
    assert n_answers == 4
    for answer in TASKS[0].answers:  # all strings first ...
        (alen,) = struct.unpack_from("<I", data, offset)
        assert data[offset + 4 : offset + 4 + alen].decode() == answer
        offset += 4 + alen
    assert struct.unpack_from("<4i", data, offset) == (1, 0, 0, 0)  # ... then all labels
    offset += 16
    assert struct.unpack_from("<I", data, offset) == (0,)  # multiple_correct: empty
    assert offset + 4 == len(data)


def test_task_offsets_point_at_each_task() -> None:
    data = encode_tasks(TASKS)
    positions = struct.unpack_from(f"<{len(TASKS)}I", data, 4)
    for pos, task in zip(positions, TASKS, strict=True):
        (qlen,) = struct.unpack_from("<I", data, pos)
        assert data[pos + 4 : pos + 4 + qlen].decode() == task.question


def test_write_is_cached_by_content(tmp_path) -> None:
    first = write_task_file(TASKS, CacheDir(tmp_path))
    assert first.parent == tmp_path / "mmlu" and first.suffix == ".bin"
    mtime = first.stat().st_mtime_ns
    again = write_task_file(TASKS, CacheDir(tmp_path))
    assert again == first and again.stat().st_mtime_ns == mtime
    assert write_task_file(TASKS[:2], CacheDir(tmp_path)) != first
    assert read_task_file(first) == TASKS


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (MultipleChoiceTask("", ("a", "b"), 0), "question is empty"),
        (MultipleChoiceTask("q", ("a", ""), 0), "answer is empty"),
        (MultipleChoiceTask("q", ("a",), 0), "1 answers"),
        (MultipleChoiceTask("q", ("a", "b"), 2), "out of range"),
        (MultipleChoiceTask("q", tuple("x" * (i + 1) for i in range(101)), 0), "101 answers"),
    ],
)
def test_writer_rejects_what_llama_perplexity_would_stop_on(task, message) -> None:
    with pytest.raises(MMLUError, match=message):
        encode_tasks([TASKS[0], task])


def test_writer_rejects_empty_selection() -> None:
    with pytest.raises(MMLUError, match="empty"):
        encode_tasks([])


def test_reader_rejects_truncated_and_trailing_bytes() -> None:
    data = encode_tasks(TASKS)
    with pytest.raises(MMLUError, match="truncated"):
        decode_tasks(data[:-3])
    with pytest.raises(MMLUError, match="unexpected bytes"):
        decode_tasks(data + b"\0")


def test_reader_rejects_wrong_offsets() -> None:
    data = bytearray(encode_tasks(TASKS))
    struct.pack_into("<I", data, 8, 12345)
    with pytest.raises(MMLUError, match="offset"):
        decode_tasks(bytes(data))


def test_cloze_rendering_is_question_then_choices() -> None:
    q = Question(
        "astronomy", "  Which planet is known as the red planet? ", (" Mars", "Venus ", "Jupiter", "Saturn"), 0, 7
    )
    task = render_task(q)
    assert task == MultipleChoiceTask(
        "Which planet is known as the red planet?", ("Mars", "Venus", "Jupiter", "Saturn"), 0
    )
    qa = render_task(q, "qa")
    assert qa.question == "Question: Which planet is known as the red planet?\nAnswer:"
    assert qa.answers == task.answers
    assert render_tasks([q, q]) == [task, task]
    with pytest.raises(MMLUError, match="rendering"):
        render_task(q, "letters")  # type: ignore[arg-type]
