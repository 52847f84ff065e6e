"""Real TRL training of SmolLM2-135M on the "tiny" preset: prepare, train, score and fail fast."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoTokenizer

from evaluators.preference import PreferenceTask
from evaluators.preference.data import data_cache_path, load_preference_data, load_prompts, split_prompts
from evaluators.preference.fitness import kl_per_sample, penalized_fitness, sample_heldout
from evaluators.preference.model import freeze_lower_layers, load_model, model_cache_path
from evaluators.preference.trainer import CandidateDPOTrainer, dpo_config, train_candidate
from evaluators.task import CandidateRejected

TINY = PreferenceTask().presets()["tiny"]


def dpo_loss(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def nan_loss(pc, pr, rc, rr, beta):
    return (pc - pr) * float("nan")


def sqrt_margin_loss(pc, pr, rc, rr, beta):
    # finite at margin 0, but its backward is 0 / 0 there, and every margin is 0 at step 0
    margin = (pc - rc) - (pr - rr)
    return 0.01 * torch.sqrt(margin**2) + dpo_loss(pc, pr, rc, rr, beta)


def mean_loss(pc, pr, rc, rr, beta):
    return dpo_loss(pc, pr, rc, rr, beta).mean()


class ProgressLog:
    """Records progress events."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, str]] = []

    def __call__(self, step: int, total: int, message: str) -> None:
        self.events.append((step, total, message))


@pytest.fixture(scope="module")
def tiny_data(preference_tiny_cache):
    return load_preference_data(TINY, preference_tiny_cache)


def _train(loss, cache_dir, pairs, output_dir, progress=None):
    policy, tokenizer = load_model(TINY.model, cache_dir)
    reference, _ = load_model(TINY.model, cache_dir)
    before = {name: value.detach().clone() for name, value in policy.named_parameters()}
    result = train_candidate(
        functools.partial(loss, beta=TINY.beta),
        policy,
        reference,
        tokenizer,
        pairs,
        TINY,
        output_dir,
        seed=0,
        progress=progress or ProgressLog(),
    )
    return policy, before, result


@pytest.mark.slow
def test_prepare_caches_model_and_pairs(preference_tiny_cache, tiny_data):
    model_dir = model_cache_path(TINY.model, preference_tiny_cache)
    config = json.loads((model_dir / "config.json").read_text())

    assert (model_dir / "model.safetensors").is_file()
    assert "quantization_config" not in config
    assert 1 <= len(tiny_data.pairs) <= TINY.num_train_prompts
    for pair in tiny_data.pairs:
        assert pair["chosen_reward"] > pair["rejected_reward"]
        assert 1 <= len(pair["chosen_ids"]) <= TINY.max_completion_length
        assert 1 <= len(pair["rejected_ids"]) <= TINY.max_completion_length
        assert pair["ref_chosen_logps"] < 0
        assert pair["ref_rejected_logps"] < 0
    assert len(tiny_data.heldout_prompt_ids) == TINY.num_heldout_prompts * TINY.heldout_samples_per_prompt
    assert -1.0 <= tiny_data.reference_reward <= 1.0


@pytest.mark.slow
def test_prepare_again_reuses_cache(preference_tiny_cache):
    model_file = model_cache_path(TINY.model, preference_tiny_cache) / "model.safetensors"
    data_file = data_cache_path(TINY, preference_tiny_cache)
    before = (model_file.stat().st_mtime_ns, data_file.stat().st_mtime_ns)

    PreferenceTask().prepare(TINY, preference_tiny_cache, ProgressLog())

    assert (model_file.stat().st_mtime_ns, data_file.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_heldout_prompts_never_trained(preference_tiny_cache, tiny_data):
    split = split_prompts(load_prompts(), TINY.num_train_prompts, TINY.num_heldout_prompts, TINY.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_cache_path(TINY.model, preference_tiny_cache))
    heldout_texts = {tokenizer.decode(ids) for ids in tiny_data.heldout_prompt_ids}
    trained_texts = {pair["prompt"] for pair in tiny_data.pairs}

    assert trained_texts <= set(split.train)
    assert heldout_texts <= set(split.heldout)
    assert not heldout_texts & trained_texts


@pytest.mark.slow
def test_reference_draw_is_reproducible(preference_tiny_cache, tiny_data):
    reference, tokenizer = load_model(TINY.model, preference_tiny_cache)
    samples = sample_heldout(reference, tokenizer, tiny_data.heldout_prompt_ids, TINY, ProgressLog())
    kl = kl_per_sample(
        reference, reference, samples, pad_token_id=tokenizer.pad_token_id, batch_size=TINY.generation_batch_size
    )

    # the fixed seed reproduces the draw that prepare scored
    assert sum(samples.rewards) / len(samples.rewards) == pytest.approx(tiny_data.reference_reward)
    # a model compared with itself has log-ratio 0 on every sample
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.slow
def test_dpo_training_updates_top_layers_only(preference_tiny_cache, tiny_data, tmp_path):
    progress = ProgressLog()
    policy, before, result = _train(dpo_loss, preference_tiny_cache, tiny_data.pairs, tmp_path, progress)
    after = dict(policy.named_parameters())
    layers = len(policy.base_model.layers)
    top = f"model.layers.{layers - 1}."
    bottom = f"model.layers.{layers - 1 - TINY.trainable_layers}."

    assert result.steps == 2
    assert len(result.loss_curve) == 2
    # at step 0 the policy equals the reference, so every margin is 0 and the
    # DPO loss is -logsigmoid(0) = log 2
    assert result.loss_curve[0] == pytest.approx(math.log(2), abs=1e-4)
    assert any(not torch.equal(before[name], after[name]) for name in before if name.startswith(top))
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith(bottom))
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert [event[:2] for event in progress.events] == [(1, 2), (2, 2)]


@pytest.mark.slow
def test_evaluate_reports_fitness_and_metrics(preference_tiny_cache, tiny_data, tmp_path):
    outcome = PreferenceTask().evaluate(
        functools.partial(dpo_loss, beta=TINY.beta), TINY, preference_tiny_cache, tmp_path, ProgressLog(), seed=0
    )
    metrics = outcome.metrics

    assert math.isfinite(outcome.fitness)
    assert outcome.fitness == pytest.approx(penalized_fitness(metrics["reward"], metrics["kl"], TINY))
    assert -1.0 <= metrics["reward"] <= 1.0
    assert metrics["reward_reference"] == tiny_data.reference_reward
    assert metrics["steps"] == 2
    assert len(metrics["train_loss"]) == 2
    assert math.isfinite(metrics["kl"])
    assert metrics["train_s"] > 0
    assert metrics["eval_s"] > 0
    assert {"prompt", "completion", "reward"} <= set(metrics["samples"][0])
    # the worker writes metrics to result.json
    json.dumps(metrics)


@pytest.mark.slow
def test_nan_loss_stops_training(preference_tiny_cache, tiny_data, tmp_path):
    with pytest.raises(CandidateRejected) as caught:
        _train(nan_loss, preference_tiny_cache, tiny_data.pairs, tmp_path)

    assert caught.value.category == "nan"
    assert caught.value.stage == "train"
    assert "loss is nan at training step 1" in caught.value.reason


@pytest.mark.slow
def test_nan_gradient_stops_training(preference_tiny_cache, tiny_data, tmp_path):
    with pytest.raises(CandidateRejected) as caught:
        _train(sqrt_margin_loss, preference_tiny_cache, tiny_data.pairs, tmp_path)

    assert caught.value.category == "nan"
    assert caught.value.stage == "train"
    assert "gradient norm is nan at training step 1" in caught.value.reason


@pytest.mark.slow
def test_reduced_loss_rejected_in_training(preference_tiny_cache, tiny_data, tmp_path):
    with pytest.raises(CandidateRejected) as caught:
        _train(mean_loss, preference_tiny_cache, tiny_data.pairs, tmp_path)

    assert caught.value.category == "shape"
    assert caught.value.stage == "train"
    assert "returned ()" in caught.value.reason


@pytest.mark.slow
def test_trainer_runs_reference_model(preference_tiny_cache, tiny_data, tmp_path):
    policy, tokenizer = load_model(TINY.model, preference_tiny_cache)
    reference, _ = load_model(TINY.model, preference_tiny_cache)
    freeze_lower_layers(policy, TINY.trainable_layers, TINY.freeze_embeddings)
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    dataset = Dataset.from_list([{column: pair[column] for column in columns} for pair in tiny_data.pairs])
    trainer = CandidateDPOTrainer(
        model=policy,
        ref_model=reference,
        args=dpo_config(TINY, tmp_path, seed=0),
        train_dataset=dataset,
        processing_class=tokenizer,
        loss_fn=functools.partial(dpo_loss, beta=TINY.beta),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    # the reference model gives the same log-probs as the policy at step 0: loss log 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert trainer.state.global_step == 2


def test_trainer_rejects_unsupported_options(tmp_path):
    config = dpo_config(TINY, tmp_path, seed=0)
    config.ld_alpha = 0.5
    config.use_weighting = True

    with pytest.raises(ValueError, match=r"does not support ld_alpha=0.5, use_weighting=True"):
        CandidateDPOTrainer(model=None, args=config, train_dataset=None, loss_fn=dpo_loss)
