"""How many tokens each multiple-choice task needs, counted by the model's own tokenizer (llama-server /tokenize).

llama-perplexity tokenizes `question + " " + answer` for every answer (special tokens added, special-token text
not parsed), keeps the prefix all answers share once, and needs `prefix + every answer's remaining tokens` of
context for the task. Counting with the model itself (not a re-implemented tokenizer, not a bound from bytes)
lets the runner size the context exactly and refuse an impossible task before anything runs. Only the six tools
are built, so the tokenizer is reached through a short-lived llama-server. Counts are cached per task file and
model, and are shared by all variants of one model (quantization never changes the vocabulary).

b3661-era servers ignore `parse_special` and parse special-token text (e.g. "<|endoftext|>") as one token, so
a task containing such text may count a few tokens short there; MMLU holds none.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.build import Build
from harness.cache import CacheDir, atomic_file, file_identity
from harness.errors import HarnessError, MMLUError
from harness.records import Record, RecordError, inputs_digest, read_record, write_record
from harness.server import LlamaServer, ServerConfig, ServerSizing
from mmlu.tasks import MultipleChoiceTask

_CONCURRENT_REQUESTS = 4


class TaskTokens(Record):
    """Tokens each task needs, and the two model facts sizing needs."""

    required: list[int]
    n_vocab: int
    n_ctx_train: int


def sequences(task: MultipleChoiceTask) -> list[str]:
    """The texts llama-perplexity tokenizes for one task."""
    return [f"{task.question} {answer}" for answer in task.answers]


def required_tokens(token_lists: Sequence[Sequence[int]]) -> int:
    """Context one task needs: the prefix shared by all its sequences once, plus each sequence's remainder."""
    if not token_lists:
        raise MMLUError("a task needs at least one answer")
    shortest = min(len(t) for t in token_lists)
    prefix = 0
    while prefix < shortest and all(t[prefix] == token_lists[0][prefix] for t in token_lists):
        prefix += 1
    return prefix + sum(len(t) - prefix for t in token_lists)


def count_task_tokens(
    build: Build,
    model: Path,
    tasks: Sequence[MultipleChoiceTask],
    *,
    task_file: Path,
    cache: CacheDir,
    log_path: Path,
    threads: int | None = None,
) -> TaskTokens:
    """Tokens needed by every task (cached in `<cache>/mmlu` per task file, model and build)."""
    key = inputs_digest({"tasks": task_file.name, "model": file_identity(model), "build": build.cache_key})
    cached = cache.mmlu / f"{task_file.stem}.tokens-{key}.json"

    def count(tmp: Path) -> None:
        write_record(tmp, _count_with_server(build, model, tasks, log_path=log_path, threads=threads))

    try:
        counted = read_record(atomic_file(cached, count), TaskTokens)
    except RecordError:
        counted = None
    if counted is None or len(counted.required) != len(tasks):  # written by another version: count again
        cached.unlink(missing_ok=True)
        counted = read_record(atomic_file(cached, count), TaskTokens)
    return counted


def _count_with_server(
    build: Build, model: Path, tasks: Sequence[MultipleChoiceTask], *, log_path: Path, threads: int | None
) -> TaskTokens:
    # One small slot is enough: /tokenize never touches the KV cache. No GPU offload: only the vocabulary is used.
    sizing = ServerSizing(parallel=1, prompt_tokens=256, output_tokens=1, margin_tokens=0)
    settings = ServerConfig(gpu_layers=0, threads=threads)
    try:
        with LlamaServer(build, model, sizing, log_path=log_path, settings=settings) as server:
            meta = _model_meta(server.get_json("/v1/models"))
            texts = [text for task in tasks for text in sequences(task)]

            def tokenize(text: str) -> list[int]:
                body = {"content": text, "add_special": True, "parse_special": False}
                return server.post_json("/tokenize", body)["tokens"]

            with ThreadPoolExecutor(max_workers=_CONCURRENT_REQUESTS) as pool:
                tokens = list(pool.map(tokenize, texts))
    except HarnessError as exc:
        raise MMLUError(f"cannot count task tokens with llama-server: {exc}") from None
    except OSError as exc:  # urllib's connection errors
        raise MMLUError(f"cannot count task tokens with llama-server: {exc} (log: {log_path})") from None
    required = []
    pos = 0
    for task in tasks:
        required.append(required_tokens(tokens[pos : pos + len(task.answers)]))
        pos += len(task.answers)
    return TaskTokens(required=required, **meta)


def _model_meta(models: dict) -> dict[str, int]:
    """n_vocab and n_ctx_train from /v1/models (both eras report them under data[0].meta)."""
    try:
        meta = models["data"][0]["meta"]
        return {"n_vocab": int(meta["n_vocab"]), "n_ctx_train": int(meta["n_ctx_train"])}
    except (KeyError, IndexError, TypeError, ValueError):
        raise MMLUError(f"llama-server /v1/models does not report n_vocab and n_ctx_train: {models!r:.200}") from None
