"""Model sources without network or binaries: hub-cache layout, hub errors as one line, checkpoint checks."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import errors as hf_errors

from harness.errors import ConfigError, ModelError
from harness.models.sources import (
    check_checkpoint_dir,
    dir_fingerprint,
    hub_error,
    hub_repo_folder,
    snapshot_commit,
)
from harness.server import check_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_cache_layout():
    assert hub_repo_folder("42dot/42dot_LLM-PLM-1.3B") == "models--42dot--42dot_LLM-PLM-1.3B"
    snap = Path("/hub") / "models--org--tiny" / "snapshots" / COMMIT
    assert snapshot_commit(snap) == COMMIT
    with pytest.raises(ModelError, match="not a Hugging Face cache snapshot"):
        snapshot_commit(Path("/some/dir"))


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))


def _error(exc: BaseException, *, offline: bool = False, revision: str | None = None) -> str:
    err = hub_error(exc, "org/x", revision, offline=offline, hub_cache="/hub")
    assert "\n" not in str(err)
    return str(err)


def test_repository_not_found():
    exc = hf_errors.RepositoryNotFoundError("404 Client Error. Repository Not Found for url", response=_response(404))
    msg = _error(exc)
    assert msg.startswith("Hugging Face repo org/x does not exist (or is private: set HF_TOKEN")
    assert "check model.repo" in msg


def test_gated_repo_asks_for_a_token():
    exc = hf_errors.GatedRepoError("403 Client Error. Cannot access gated repo", response=_response(403))
    assert "is gated" in _error(exc) and "HF_TOKEN" in _error(exc)


def test_revision_not_found():
    exc = hf_errors.RevisionNotFoundError("404 Client Error. Revision Not Found", response=_response(404))
    assert _error(exc, revision="v9") == (
        "revision 'v9' does not exist in Hugging Face repo org/x; check model.revision"
    )


def test_not_cached_and_offline_or_unreachable():
    exc = hf_errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    offline = _error(exc, offline=True, revision="main")
    assert offline.startswith(
        "Hugging Face repo org/x@main is not in the local hub cache (/hub) and HF_HUB_OFFLINE is set"
    )
    unreachable = _error(exc, offline=False)
    assert "and the Hugging Face Hub cannot be reached" in unreachable
    assert "model.source = 'dir'" in unreachable


def test_invalid_repo_id_is_a_config_error():
    err = hub_error(hf_errors.HFValidationError("Repo id must be in the form 'repo_name'"), "a/b/c", None,
                    offline=False, hub_cache="/hub")  # fmt: skip
    assert isinstance(err, ConfigError)
    assert str(err).startswith("model.repo: 'a/b/c' is not a valid Hugging Face repo id")


def test_other_http_errors_quote_the_hub():
    err = hub_error(hf_errors.HfHubHTTPError("500 Server Error", response=_response(500)), "org/x", None,
                    offline=False, hub_cache="/hub")  # fmt: skip
    assert str(err) == "downloading org/x from the Hugging Face Hub failed: 500 Server Error"


def _checkpoint(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config}))
    (path / "model.safetensors").write_bytes(b"\0" * 8)
    return path


def test_checkpoint_dir_checks(tmp_path: Path):
    good = _checkpoint(tmp_path / "good")
    check_checkpoint_dir(good)
    with pytest.raises(ModelError, match="model directory not found"):
        check_checkpoint_dir(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"has no config.json: not a Hugging Face checkpoint directory"):
        check_checkpoint_dir(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not valid JSON"):
        check_checkpoint_dir(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="names no model architecture"):
        check_checkpoint_dir(empty)
    (empty / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ModelError, match="holds no weights"):
        check_checkpoint_dir(empty)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF....")
    with pytest.raises(ModelError, match="use model.source = 'gguf'"):
        check_checkpoint_dir(gguf)


def test_gguf_file_checks(tmp_path: Path):
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    check_gguf(good, error=ModelError)
    with pytest.raises(ModelError, match="model file not found"):
        check_gguf(tmp_path / "none.gguf", error=ModelError)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        check_gguf(bad, error=ModelError)


def test_dir_fingerprint_changes_with_the_files(tmp_path: Path):
    ckpt = _checkpoint(tmp_path / "c")
    first = dir_fingerprint(ckpt)
    assert dir_fingerprint(ckpt) == first
    (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    assert dir_fingerprint(ckpt) != first
