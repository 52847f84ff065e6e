"""The preference task: evolve an offline preference-optimization loss (DPO family).

A candidate loss fine-tunes SmolLM2-135M-Instruct with TRL's DPOTrainer on
pairs of the model's own movie-review continuations, ranked by VADER
sentiment. Its fitness is the held-out sentiment reward of the trained model,
with a KL penalty. This is the IMDb setting of the DiscoPOP study
(Lu et al. 2024, "Discovering Preference Optimization Algorithms with and
for Large Language Models") scaled down to a CPU.

Importing this package imports no torch; the heavy modules load on first use.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from evaluators.preference.settings import PRESETS, PreferenceSettings
from evaluators.task import EvaluationOutcome, FunctionInterface, ProgressFn, SeedProgram, Task

logger = logging.getLogger(__name__)

__all__ = ["PreferenceSettings", "PreferenceTask"]


class PreferenceTask(Task):
    """Offline preference optimization: the candidate is the per-example loss of DPO-style training."""

    name = "preference"
    description = "Evolve a DPO-style preference loss that makes SmolLM2-135M write positive movie-review continuations."
    interface = FunctionInterface(
        params=("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"),
        hyperparameters=("beta",),
        returns="a tensor of shape (B,) with one loss per example",
    )
    settings_class = PreferenceSettings
    default_preset = "cpu"
    warm_imports = (
        "evaluators.preference.unit_tests",
        "evaluators.preference.data",
        "evaluators.preference.model",
        "evaluators.preference.fitness",
        "evaluators.preference.trainer",
    )

    def presets(self) -> dict[str, PreferenceSettings]:
        return dict(PRESETS)

    def prompt_text(self, settings: PreferenceSettings) -> str:
        return (
            "Write a loss function for offline preference optimization of a language model, in the family of "
            "DPO (Rafailov et al. 2023). The function receives four float tensors of shape (B,): "
            "policy_chosen_logps, policy_rejected_logps, reference_chosen_logps and reference_rejected_logps. "
            "Each value is the sum of the token log-probabilities of one completion (<= 0, typically -300 to -1) "
            "under the policy being trained or under the frozen reference model. The hyperparameter "
            f"beta = {settings.beta} is available as self.beta or as the keyword argument beta. Return a tensor "
            "of shape (B,) with one loss per example; the trainer minimizes their mean. For reference, DPO's "
            "loss is -logsigmoid(beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))).\n\n"
            f"Scoring: the model is fine-tuned for {settings.max_steps} optimizer steps of {settings.batch_size} "
            "pairs on its own continuations of movie-review openings, where the chosen completion of a pair has "
            "the more positive VADER sentiment score. The fitness is the mean VADER compound score (-1 to 1) of "
            f"its continuations of {settings.num_heldout_prompts} held-out openings, minus {settings.kl_penalty} "
            f"per nat of KL(policy || reference) above {settings.kl_limit} nats.\n\n"
            "The loss must stay finite, with finite non-zero gradients with respect to both policy inputs, for "
            "a batch of one, when the policy equals the reference (all margins 0, the state at the first step), "
            "for completions truncated to zero tokens (all four inputs 0.0), for tied reference log-probs and for "
            "margins up to 30/beta nats. It must work in bfloat16 and on a GPU, so build constants with "
            "dtype=x.dtype, device=x.device of an input x."
        )

    def seeds(self, group: str = "baselines") -> list[SeedProgram]:
        """Return a group of programs from seeds/preference/: "baselines" (the study's four) or "discovered"."""
        from seeds import load_seed_programs

        sources = load_seed_programs(self.name, group)
        return [SeedProgram(name=seed.name, thought=seed.thought, code=seed.code) for seed in sources]

    def prepare(self, settings: PreferenceSettings, cache_dir: Path, progress: ProgressFn) -> None:
        """Cache the model as safetensors, then the preference pairs and the reference model's held-out reward."""
        import torch

        from evaluators.preference.data import build_preference_data, data_cache_path, save_preference_data
        from evaluators.preference.model import build_model_cache, load_model

        start = time.monotonic()
        progress(0, 2, "caching the model")
        build_model_cache(settings.model, cache_dir)
        data_path = data_cache_path(settings, cache_dir)
        if not data_path.is_file():
            progress(1, 2, "building preference pairs")
            model, tokenizer = load_model(settings.model, cache_dir)
            # sample on the device that evaluate() trains on, so the reference
            # draw and the policy draws use the same random number generator
            model.to("cuda" if torch.cuda.is_available() else "cpu")
            data = build_preference_data(model, tokenizer, settings, progress)
            save_preference_data(data, data_path)
        progress(2, 2, "prepared")
        logger.info("preference task prepared in %.1f s (cache %s)", time.monotonic() - start, cache_dir)

    def unit_test(self, candidate: Callable[..., Any], settings: PreferenceSettings) -> dict[str, Any]:
        from evaluators.preference.unit_tests import check_candidate

        return check_candidate(candidate, settings.beta)

    def evaluate(
        self,
        candidate: Callable[..., Any],
        settings: PreferenceSettings,
        cache_dir: Path,
        work_dir: Path,
        progress: ProgressFn,
        seed: int,
    ) -> EvaluationOutcome:
        """Train with the candidate loss and score the policy on the held-out prompts.

        `seed` sets the training randomness (batch order). The held-out
        sampling always uses `settings.seed`, the draw the reference reward was
        measured on, so all candidates are compared on the same random numbers.
        """
        import torch

        from evaluators.preference.data import load_preference_data
        from evaluators.preference.fitness import score_policy
        from evaluators.preference.model import load_model
        from evaluators.preference.trainer import train_candidate

        start = time.monotonic()
        data = load_preference_data(settings, cache_dir)
        policy, tokenizer = load_model(settings.model, cache_dir)
        reference, _ = load_model(settings.model, cache_dir)
        reference.requires_grad_(False)
        load_s = time.monotonic() - start

        torch.manual_seed(seed)
        result = train_candidate(
            candidate, policy, reference, tokenizer, data.pairs, settings, work_dir, seed, progress
        )

        eval_start = time.monotonic()
        fitness, metrics = score_policy(policy, reference, tokenizer, data.heldout_prompt_ids, settings, progress)
        eval_s = time.monotonic() - eval_start
        metrics.update(
            {
                "reward_reference": data.reference_reward,
                "reward_gain": metrics["reward"] - data.reference_reward,
                "train_loss": result.loss_curve,
                "steps": result.steps,
                "pairs": len(data.pairs),
                "trainable_parameters": result.trainable_parameters,
                "train_metrics": result.final_metrics,
                "load_s": load_s,
                "train_s": result.train_s,
                "eval_s": eval_s,
            }
        )
        logger.info(
            "fitness %.4f: reward %.4f (reference %.4f), KL %.2f nats, train %.1f s, eval %.1f s",
            fitness,
            metrics["reward"],
            data.reference_reward,
            metrics["kl"],
            result.train_s,
            eval_s,
        )
        return EvaluationOutcome(fitness=fitness, metrics=metrics)
