"""Prompts file, train/held-out split and the data cache key of the preference task."""

from __future__ import annotations

import dataclasses

import pytest

from evaluators.preference.data import data_cache_key, load_prompts, split_prompts
from evaluators.preference.settings import PreferenceSettings


def test_prompts_file_has_distinct_openings():
    prompts = load_prompts()

    assert len(prompts) >= 160
    assert len(set(prompts)) == len(prompts)
    assert all(prompt == prompt.strip() and prompt for prompt in prompts)


def test_cpu_preset_fits_prompts_file():
    settings = PreferenceSettings()

    assert settings.num_train_prompts + settings.num_heldout_prompts <= len(load_prompts())


def test_split_is_disjoint():
    split = split_prompts(load_prompts(), num_train=100, num_heldout=48, seed=0)

    assert len(split.train) == 100
    assert len(split.heldout) == 48
    assert not set(split.train) & set(split.heldout)


def test_split_depends_on_seed_only():
    prompts = load_prompts()

    assert split_prompts(prompts, 10, 5, seed=3) == split_prompts(prompts, 10, 5, seed=3)
    assert split_prompts(prompts, 10, 5, seed=3) != split_prompts(prompts, 10, 5, seed=4)


def test_heldout_split_ignores_train_count():
    prompts = load_prompts()

    assert split_prompts(prompts, 10, 5, seed=0).heldout == split_prompts(prompts, 50, 5, seed=0).heldout


def test_split_rejects_too_many_prompts():
    prompts = ["a", "b", "c"]

    with pytest.raises(ValueError, match="exceeds the 3 distinct prompts"):
        split_prompts(prompts, num_train=2, num_heldout=2, seed=0)


def test_cache_key_ignores_training_settings():
    prompts = load_prompts()
    settings = PreferenceSettings()
    retrained = dataclasses.replace(settings, learning_rate=1e-3, beta=0.5, max_steps=3)

    assert data_cache_key(settings, prompts) == data_cache_key(retrained, prompts)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gguf:/elsewhere/model.gguf"},
        {"seed": 1},
        {"max_completion_length": 16},
        {"temperature": 0.7},
        {"num_heldout_prompts": 20},
    ],
)
def test_cache_key_covers_data_settings(change):
    prompts = load_prompts()
    settings = PreferenceSettings()

    assert data_cache_key(settings, prompts) != data_cache_key(dataclasses.replace(settings, **change), prompts)


def test_cache_key_covers_prompts():
    prompts = load_prompts()

    assert data_cache_key(PreferenceSettings(), prompts) != data_cache_key(PreferenceSettings(), prompts[1:])
