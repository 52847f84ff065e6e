"""Settings, presets and the task description of the preference task."""

from __future__ import annotations

import dataclasses

import pytest

from evaluators.preference import PreferenceSettings, PreferenceTask
from evaluators.preference.fitness import penalized_fitness
from evaluators.registry import get_task


def test_registry_returns_preference_task():
    task = get_task("preference")

    assert isinstance(task, PreferenceTask)
    assert task.name == "preference"
    assert task.interface.params == (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "reference_chosen_logps",
        "reference_rejected_logps",
    )
    assert task.interface.hyperparameters == ("beta",)


def test_presets_are_settings():
    presets = PreferenceTask().presets()

    assert set(presets) == {"cpu", "tiny"}
    assert PreferenceTask.default_preset == "cpu"
    assert all(isinstance(settings, PreferenceSettings) for settings in presets.values())


def test_tiny_preset_trains_two_steps():
    tiny = PreferenceTask().presets()["tiny"]
    cpu = PreferenceTask().presets()["cpu"]

    assert tiny.max_steps == 2
    assert tiny.num_train_prompts < cpu.num_train_prompts
    assert tiny.num_heldout_prompts < cpu.num_heldout_prompts


def test_settings_round_trip_through_dict():
    task = PreferenceTask()
    settings = task.presets()["cpu"]

    assert task.settings_from_dict(task.settings_to_dict(settings)) == settings


def test_unknown_setting_rejected():
    with pytest.raises(ValueError, match="unknown setting"):
        PreferenceTask().settings_from_dict({"learning_rat": 1e-5})


def test_invalid_settings_reported_together():
    with pytest.raises(ValueError) as caught:
        PreferenceSettings(beta=0.0, max_steps=0, top_k=-1, kl_penalty=-1.0, model=" ")

    message = str(caught.value)
    assert "beta=0.0 is invalid" in message
    assert "max_steps=0 is invalid" in message
    assert "top_k=-1 is invalid" in message
    assert "kl_penalty=-1.0 is invalid" in message
    assert "model is empty" in message


def test_boolean_settings_reject_numbers():
    with pytest.raises(ValueError) as caught:
        PreferenceTask().settings_from_dict({"gradient_checkpointing": 1, "freeze_embeddings": "yes"})

    message = str(caught.value)
    assert "gradient_checkpointing=1 is invalid; expected true or false" in message
    assert "freeze_embeddings='yes' is invalid" in message


def test_checkpointing_setting_reaches_config(tmp_path):
    from evaluators.preference.trainer import dpo_config

    cpu = PreferenceTask().presets()["cpu"]
    # TRL turns checkpointing on by default, but the CPU preset's short sequences do not need it
    assert dpo_config(cpu, tmp_path, seed=0).activation_checkpointing is False
    on = dataclasses.replace(cpu, gradient_checkpointing=True)
    assert dpo_config(on, tmp_path, seed=0).activation_checkpointing is True


def test_hyperparameter_values_bind_beta():
    task = PreferenceTask()
    settings = dataclasses.replace(task.presets()["cpu"], beta=0.25)

    assert task.hyperparameter_values(settings) == {"beta": 0.25}


def test_prompt_text_states_contract():
    settings = PreferenceTask().presets()["cpu"]
    text = PreferenceTask().prompt_text(settings)

    assert f"beta = {settings.beta}" in text
    assert "shape (B,)" in text
    assert "dtype=x.dtype, device=x.device" in text


def test_seeds_start_with_dpo():
    seeds = PreferenceTask().seeds()

    assert [seed.name for seed in seeds] == ["dpo", "slic", "ipo", "kto_pair"]
    assert all(seed.thought and seed.code for seed in seeds)


def test_penalized_fitness_formula():
    settings = PreferenceSettings(kl_limit=10.0, kl_penalty=0.05)

    # below the limit the reward is the fitness
    assert penalized_fitness(0.5, 9.0, settings) == 0.5
    # 12 nats is 2 above the limit: 0.5 - 0.05 * 2 = 0.4
    assert penalized_fitness(0.5, 12.0, settings) == pytest.approx(0.4)
