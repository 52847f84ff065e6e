"""Scoring a trained policy: held-out sentiment reward with a KL penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from evaluators.preference.reward import sentiment_rewards
from evaluators.preference.sampling import completion_logps, sample_completions
from evaluators.preference.settings import PreferenceSettings
from evaluators.task import CandidateRejected, ProgressFn


@dataclass
class HeldoutSamples:
    """Completions of the held-out prompts and their rewards, in sampling order."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    rewards: list[float]

    def examples(self, tokenizer, count: int) -> list[dict[str, Any]]:
        """Return the first `count` samples as prompt, completion and reward, for reports."""
        return [
            {
                "prompt": tokenizer.decode(self.prompt_ids[index]),
                "completion": self.texts[index],
                "reward": self.rewards[index],
            }
            for index in range(min(count, len(self.texts)))
        ]


def sample_heldout(
    model, tokenizer, prompt_ids: list[list[int]], settings: PreferenceSettings, progress: ProgressFn
) -> HeldoutSamples:
    """Sample and score held-out completions with the fixed seed, so every model gets the same random draw."""
    completion_ids = sample_completions(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=settings.max_completion_length,
        temperature=settings.temperature,
        top_k=settings.top_k,
        batch_size=settings.generation_batch_size,
        seed=settings.seed,
        progress=progress,
        progress_message="sampling held-out completions",
    )
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return HeldoutSamples(
        prompt_ids=list(prompt_ids), completion_ids=completion_ids, texts=texts, rewards=sentiment_rewards(texts)
    )


def kl_per_sample(policy, reference, samples: HeldoutSamples, *, pad_token_id: int, batch_size: int) -> torch.Tensor:
    """Estimate KL(policy || reference) from the policy's own samples, shape (N,).

    For y sampled from the policy, log pi(y|x) - log pi_ref(y|x) is an
    unbiased single-sample Monte Carlo estimate of the sequence-level KL
    divergence, because KL is the expectation of that log-ratio under pi. A
    single value can be negative, and the mean over samples is the estimate.
    The samples come from pi only at temperature 1 with top_k 0.
    """
    policy_logps = completion_logps(
        policy, samples.prompt_ids, samples.completion_ids, pad_token_id=pad_token_id, batch_size=batch_size
    )
    reference_logps = completion_logps(
        reference, samples.prompt_ids, samples.completion_ids, pad_token_id=pad_token_id, batch_size=batch_size
    )
    return policy_logps - reference_logps


def penalized_fitness(reward: float, kl: float, settings: PreferenceSettings) -> float:
    """Return `reward - kl_penalty * max(0, kl - kl_limit)`, the fitness documented on the settings."""
    return reward - settings.kl_penalty * max(0.0, kl - settings.kl_limit)


def score_policy(
    policy,
    reference,
    tokenizer,
    heldout_prompt_ids: list[list[int]],
    settings: PreferenceSettings,
    progress: ProgressFn,
) -> tuple[float, dict[str, Any]]:
    """Sample the policy on the held-out prompts and return its fitness and the metrics behind it."""
    samples = sample_heldout(policy, tokenizer, heldout_prompt_ids, settings, progress)
    kls = kl_per_sample(
        policy, reference, samples, pad_token_id=tokenizer.pad_token_id, batch_size=settings.generation_batch_size
    )
    reward = sum(samples.rewards) / len(samples.rewards)
    kl = kls.mean().item()
    if not math.isfinite(kl):
        raise CandidateRejected(
            f"the KL estimate is {kl} after training: the trained policy gives non-finite log-probabilities "
            "to its own samples, so the loss drove the weights out of range",
            category="diverged",
            stage="evaluate",
        )
    fitness = penalized_fitness(reward, kl, settings)
    metrics = {
        "reward": reward,
        "reward_std": torch.tensor(samples.rewards).std().item() if len(samples.rewards) > 1 else 0.0,
        "kl": kl,
        "kl_max": kls.max().item(),
        "kl_exceeded": kl > settings.kl_limit,
        "samples": samples.examples(tokenizer, 4),
        "completion_tokens_mean": sum(len(ids) for ids in samples.completion_ids) / len(samples.completion_ids),
    }
    return fitness, metrics
