"""Checks of the hostile corpus against the static check and the loader's runtime guards."""

from __future__ import annotations

import pytest
import torch

from sandbox.loader import RestrictedAccessError, _load_restricted, load_candidate
from sandbox.protocol import Stage
from sandbox.static_check import StaticCheckError, check_source
from tests.corpus.hostile import BENIGN, ENTRIES, HOSTILE, HYPERPARAMETERS, PARAMS, Group

STATIC_ONLY = [entry for entry in HOSTILE if entry.expected_stages == {Stage.STATIC.value}]
PASS_STATIC = [entry for entry in ENTRIES if Stage.STATIC.value not in entry.expected_stages]
# Entries that must be stopped by the runtime layer alone when the static check is skipped.
RUNTIME_BLOCKED = [entry for entry in STATIC_ONLY if entry.group in (Group.ESCAPE, Group.TAMPER)]


def ids(entries):
    return [entry.id for entry in entries]


def test_corpus_size_and_ids():
    assert len(HOSTILE) >= 45
    assert len({entry.id for entry in ENTRIES}) == len(ENTRIES)
    for group in Group:
        assert any(entry.group is group for entry in ENTRIES), f"no entry in group {group.value}"


def test_static_entries_never_mixed():
    # a hostile entry is either rejected statically or passes the static check; nothing in between
    for entry in HOSTILE:
        assert entry.expected_stages == {Stage.STATIC.value} or Stage.STATIC.value not in entry.expected_stages


@pytest.mark.parametrize("entry", STATIC_ONLY, ids=ids(STATIC_ONLY))
def test_static_entry_rejected(entry):
    with pytest.raises(StaticCheckError):
        check_source(entry.code, PARAMS, HYPERPARAMETERS)


@pytest.mark.parametrize("entry", PASS_STATIC, ids=ids(PASS_STATIC))
def test_entry_passes_static(entry):
    check_source(entry.code, PARAMS, HYPERPARAMETERS)


@pytest.mark.parametrize("entry", RUNTIME_BLOCKED, ids=ids(RUNTIME_BLOCKED))
def test_runtime_layer_blocks_entry(entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs = [torch.randn(3, requires_grad=True) for _ in PARAMS]
    with pytest.raises((StaticCheckError, RestrictedAccessError, ImportError, NameError)) as caught:
        _load_restricted(entry.code, PARAMS, {"beta": 0.1})(*inputs)
    if isinstance(caught.value, StaticCheckError):
        # RestrictedPython rejected it at compile time, or its top level hit a guard while loading
        assert caught.value.category in ("restricted_python", "load"), caught.value.reason
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry", BENIGN, ids=ids(BENIGN))
def test_benign_entry_trains(entry):
    inputs = [torch.randn(5, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(4)]
    losses = load_candidate(entry.code, PARAMS, {"beta": 0.1})(*inputs)
    losses.sum().backward()
    assert losses.shape == (5,)
    assert torch.isfinite(losses).all()
    assert inputs[0].grad.abs().sum() > 0
