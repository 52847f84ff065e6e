"""The study's models and data: loading them from a local path or the Hugging Face Hub, and caching copies.

The task's prepare step (trusted code, network allowed) copies the models
and data splits into the cache directory with `prepare_study`. Training
reads only that copy, because sandboxed evaluations have no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evaluators.preference.study import StudySettings
from evaluators.task import ProgressFn

_PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class SourceUnavailable(ValueError):
    """Raised when a model or data set is neither a readable local path nor loadable from the Hub; the message names the fix."""


def hub_offline() -> bool:
    """Return whether HF_HUB_OFFLINE forbids Hub downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300].rstrip(".") if text else type(error).__name__


def _hub_failure(what: str, error: BaseException, download: str, setting: str) -> SourceUnavailable:
    offline = " HF_HUB_OFFLINE is set, so the Hub was not contacted." if hub_offline() else ""
    return SourceUnavailable(
        f"{what} is not a local path and could not be loaded from the Hugging Face Hub: {_first_line(error)}."
        f"{offline} To fix it, run `{download}` where the Hub is reachable and pass --set {setting}=DIR, or run "
        "the prepare step with network access (HF_HUB_OFFLINE unset), which caches it."
    )


def load_causal_lm(source: str, dtype: Any = "auto", setting: str = "model"):
    """Load a causal language model and its tokenizer from a local directory or a Hub id.

    Raises:
        SourceUnavailable: naming the path or id and the fix.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    if _looks_local(source) and not path.is_dir():
        raise SourceUnavailable(
            f"{setting} {source!r} is not an existing directory; pass a directory written by save_pretrained "
            "or a Hugging Face Hub id"
        )
    location = str(path) if path.is_dir() else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except OSError as error:
        if path.is_dir():
            raise SourceUnavailable(f"{setting} directory {source} cannot be loaded: {_first_line(error)}") from error
        raise _hub_failure(f"{setting} {source!r}", error, f"hf download {source} --local-dir DIR", setting) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_pairs(source: str, split: str, limit: int = 0, setting: str = "dataset"):
    """Load preference pairs (prompt, chosen, rejected) from a local path or a Hub id.

    A local path is a directory written by `save_to_disk`, a directory of data
    files, or one .jsonl, .json or .parquet file (whose only split is "train").

    Raises:
        SourceUnavailable: naming the path or id, the split and the fix.
    """
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise SourceUnavailable(f"{setting} {source!r} has no split {split!r}; splits: {sorted(loaded)}")
                loaded = loaded[split]
        elif path.is_file():
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
            if builder is None:
                raise SourceUnavailable(f"{setting} file {source} is not .jsonl, .json or .parquet")
            if split != "train":
                raise SourceUnavailable(f"{setting} file {source} has only a 'train' split, not {split!r}")
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), split=split)
        elif _looks_local(source):
            raise SourceUnavailable(f"{setting} {source!r} is not an existing file or directory")
        else:
            loaded = datasets.load_dataset(source, split=split)
    except SourceUnavailable:
        raise
    except (OSError, ConnectionError, ValueError) as error:
        if _looks_local(source):
            raise SourceUnavailable(f"{setting} {source}, split {split!r}, cannot be read: {_first_line(error)}") from error
        download = f"hf download {source} --repo-type dataset --local-dir DIR"
        raise _hub_failure(f"{setting} {source!r} (split {split!r})", error, download, setting) from error

    missing = [column for column in ("chosen", "rejected") if column not in loaded.column_names]
    if missing:
        raise SourceUnavailable(
            f"{setting} {source!r} has no column(s) {missing}; its columns are {loaded.column_names}. "
            "Preference pairs need 'chosen' and 'rejected', and optionally 'prompt'"
        )
    loaded = loaded.select_columns([column for column in _PAIR_COLUMNS if column in loaded.column_names])
    if limit:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return loaded


@dataclass(frozen=True)
class StudyCache:
    """Cache paths of the copies that `prepare_study` writes and training reads."""

    policy: Path
    reference: Path
    train_data: Path
    eval_data: Path | None


def _slug(text: str) -> str:
    readable = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[-48:]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def study_cache(settings: StudySettings, cache_dir: Path) -> StudyCache:
    """Return the cache paths of these settings' models and data splits."""
    root = Path(cache_dir) / "study"

    def data(split: str, limit: int) -> Path:
        return root / "data" / _slug(f"{settings.dataset}|{split}|{limit}")

    return StudyCache(
        policy=root / "models" / _slug(settings.model),
        reference=root / "models" / _slug(settings.reference),
        train_data=data(settings.train_split, settings.max_train_pairs),
        eval_data=data(settings.eval_split, settings.max_eval_pairs) if settings.eval_split else None,
    )


def prepare_study(settings: StudySettings, cache_dir: Path, progress: ProgressFn) -> StudyCache:
    """Copy the models (in their stored dtype) and the data splits into the cache, once; return the paths."""
    cache = study_cache(settings, cache_dir)
    models = dict.fromkeys([(settings.model, cache.policy), (settings.reference, cache.reference)])
    for index, (source, target) in enumerate(models):
        progress(index, len(models) + 2, f"caching model {source}")
        if not (target / "config.json").is_file():
            model, tokenizer = load_causal_lm(source, dtype="auto")
            _save_atomically(target, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)))
            del model
    splits = [(settings.train_split, settings.max_train_pairs, cache.train_data)]
    if cache.eval_data is not None:
        splits.append((settings.eval_split, settings.max_eval_pairs, cache.eval_data))
    for split, limit, target in splits:
        progress(len(models), len(models) + 2, f"caching {settings.dataset} split {split}")
        if not (target / "dataset_info.json").is_file():
            pairs = load_pairs(settings.dataset, split, limit)
            _save_atomically(target, lambda staging: pairs.save_to_disk(str(staging)))
    return cache


def _save_atomically(target: Path, write: Callable[[Path], Any]) -> None:
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    write(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
