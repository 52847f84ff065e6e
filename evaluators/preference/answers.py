"""A sandbox task that trains with a candidate loss, then answers chat questions for a judge to grade.

A judge model needs the network, which sandbox workers do not have, so a
judged fitness takes two steps. This task runs in the sandbox: it trains the
policy with one of two recipes and returns the policy's answers, and for
win rates the reference model's answers too, in its metrics. The engine
then grades them with `mtbench.grade_answers` or `winrate.compare_answers`.

Recipes:
- "sentiment": the preference task's training (PreferenceSettings, presets
  cpu and tiny). The job's fitness is that task's sentiment fitness.
- "study": the DiscoPOP study's setup (StudySettings, preset
  zephyr-7b-gemma). The job's fitness is the implicit-reward accuracy, the
  fraction of pairs where beta * log(pi / pi_ref) ranks the chosen
  completion higher (Rafailov et al. 2023, eq. 5), on the held-out split,
  or on the last training step when there is no held-out split.

The engine refers to this task as "evaluators.preference.answers:AnswerTask".
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from evaluators.preference import PreferenceTask
from evaluators.preference.mtbench import Question, generate_answers
from evaluators.preference.settings import PreferenceSettings
from evaluators.preference.study import StudySettings
from evaluators.task import EvaluationOutcome, ProgressFn, SeedProgram, Task

logger = logging.getLogger(__name__)

ANSWER_TASK_REF = "evaluators.preference.answers:AnswerTask"


class Recipe(str, Enum):
    """How the policy is trained before it answers."""

    SENTIMENT = "sentiment"
    STUDY = "study"


@dataclass(frozen=True)
class AnswerSettings:
    """Settings of one train-then-answer job.

    Attributes:
        recipe: a Recipe value.
        training: the recipe's settings as a dict (PreferenceSettings or StudySettings fields).
        questions: the questions to answer, as dicts in MT-Bench's question.jsonl format.
        max_new_tokens: tokens generated per answer.
        generation_batch_size: conversations answered per generate call.
        reference_answers: also answer with the untrained reference model, for win rates.
        seed: seed of answer sampling.
    """

    recipe: str
    training: dict[str, Any]
    questions: tuple[dict[str, Any], ...]
    max_new_tokens: int = 1024
    generation_batch_size: int = 16
    reference_answers: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        errors = []
        if self.recipe not in {recipe.value for recipe in Recipe}:
            errors.append(f"recipe={self.recipe!r} is invalid; expected one of {[r.value for r in Recipe]}")
        if not self.questions:
            errors.append("questions is empty; pass at least one question")
        for name in ("max_new_tokens", "generation_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name}={value!r} is invalid; expected an integer >= 1")
        if errors:
            raise ValueError("invalid answer settings:\n  " + "\n  ".join(errors))

    def training_settings(self) -> PreferenceSettings | StudySettings:
        """Return the recipe's settings object."""
        settings_class = StudySettings if self.recipe == Recipe.STUDY.value else PreferenceSettings
        return settings_class(**self.training)

    def question_list(self) -> list[Question]:
        return [Question.from_dict(values) for values in self.questions]


class AnswerTask(Task):
    """Train with the candidate loss by a recipe, then answer questions; the engine judges the answers."""

    name = "preference-answers"
    description = "Train with a preference loss, then answer chat questions for an LLM judge (run by `evolve heldout`)."
    interface = PreferenceTask.interface
    settings_class = AnswerSettings
    default_preset = ""

    def presets(self) -> dict[str, Any]:
        # `evolve heldout` builds the settings from a preference or study preset
        return {}

    def prompt_text(self, settings: AnswerSettings) -> str:
        training = settings.training_settings()
        if isinstance(training, PreferenceSettings):
            return PreferenceTask().prompt_text(training)
        return (
            "Write a loss function for offline preference optimization of a language model, in the family of DPO. "
            f"It receives four tensors of shape (B,) of summed log-probs and beta = {training.beta}, and returns "
            "one loss per example. The policy is fine-tuned on argilla/dpo-mix-7k and scored on MT-Bench."
        )

    def seeds(self, group: str = "baselines") -> list[SeedProgram]:
        return PreferenceTask().seeds(group)

    def hyperparameter_values(self, settings: AnswerSettings) -> dict[str, float]:
        return {"beta": settings.training_settings().beta}

    def settings_from_dict(self, values: dict[str, Any]) -> AnswerSettings:
        known = {f.name for f in dataclasses.fields(AnswerSettings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for task {self.name!r}; known settings: {sorted(known)}")
        values = dict(values)
        values["questions"] = tuple(dict(question) for question in values.get("questions", ()))
        return AnswerSettings(**values)

    def prepare(self, settings: AnswerSettings, cache_dir: Path, progress: ProgressFn) -> None:
        training = settings.training_settings()
        if isinstance(training, StudySettings):
            from evaluators.preference.study_sources import prepare_study

            prepare_study(training, cache_dir, progress)
        else:
            PreferenceTask().prepare(training, cache_dir, progress)

    def unit_test(self, candidate: Callable[..., Any], settings: AnswerSettings) -> dict[str, Any]:
        from evaluators.preference.unit_tests import check_candidate

        return check_candidate(candidate, settings.training_settings().beta)

    def evaluate(
        self,
        candidate: Callable[..., Any],
        settings: AnswerSettings,
        cache_dir: Path,
        work_dir: Path,
        progress: ProgressFn,
        seed: int,
    ) -> EvaluationOutcome:
        """Train the policy with the candidate, then answer every question; answers go into the metrics."""
        training = settings.training_settings()
        if isinstance(training, StudySettings):
            trained = _train_study(candidate, training, cache_dir, work_dir, progress, seed)
        else:
            trained = _train_sentiment(candidate, training, cache_dir, work_dir, progress, seed)

        questions = settings.question_list()
        start = time.monotonic()
        generation = {"max_new_tokens": settings.max_new_tokens, "batch_size": settings.generation_batch_size,
                      "seed": settings.seed}
        progress(0, 2, "answering questions")
        answers = generate_answers(trained.policy, trained.tokenizer, questions, **generation)
        metrics = dict(trained.metrics)
        metrics["answers"] = [answer.to_dict() for answer in answers]
        if settings.reference_answers:
            reference = trained.load_reference()
            progress(1, 2, "answering questions with the reference model")
            reference_answers = generate_answers(reference, trained.tokenizer, questions, **generation)
            metrics["reference_answers"] = [answer.to_dict() for answer in reference_answers]
        metrics["answer_s"] = time.monotonic() - start
        logger.info("answered %d questions in %.1f s", len(questions), metrics["answer_s"])
        return EvaluationOutcome(fitness=trained.fitness, metrics=metrics)


@dataclass
class _Trained:
    """A trained policy ready to answer, the job's fitness and a way to get the reference model."""

    policy: Any
    tokenizer: Any
    fitness: float
    load_reference: Callable[[], Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def _train_sentiment(candidate, training: PreferenceSettings, cache_dir: Path, work_dir: Path, progress: ProgressFn,
                     seed: int) -> _Trained:
    """Train and score as PreferenceTask.evaluate does, keeping the trained policy for answering."""
    import torch

    from evaluators.preference.data import load_preference_data
    from evaluators.preference.fitness import score_policy
    from evaluators.preference.model import load_model
    from evaluators.preference.trainer import train_candidate

    data = load_preference_data(training, cache_dir)
    policy, tokenizer = load_model(training.model, cache_dir)
    reference, _ = load_model(training.model, cache_dir)
    reference.requires_grad_(False)
    torch.manual_seed(seed)
    result = train_candidate(candidate, policy, reference, tokenizer, data.pairs, training, work_dir, seed, progress)
    fitness, scored = score_policy(policy, reference, tokenizer, data.heldout_prompt_ids, training, progress)
    metrics = {
        "training_fitness": fitness,
        "training_fitness_kind": "sentiment reward with KL penalty (preference task)",
        "reward": scored["reward"],
        "kl": scored["kl"],
        "reward_reference": data.reference_reward,
        "train_loss": result.loss_curve,
        "steps": result.steps,
        "train_s": result.train_s,
    }
    return _Trained(policy, tokenizer, fitness, lambda: reference, metrics)


def _train_study(candidate, training: StudySettings, cache_dir: Path, work_dir: Path, progress: ProgressFn,
                 seed: int) -> _Trained:
    """Train in the study's setup, on this process or across the container's GPUs, and load the policy to answer."""
    import torch

    from evaluators.preference.study_sources import load_causal_lm, study_cache
    from evaluators.preference.study_training import POLICY_DIR, candidate_code, launch_training, train_study_policy
    from sandbox.protocol import PROGRESS_FILE

    cuda = torch.cuda.is_available()
    world_size = training.gpus or max(torch.cuda.device_count(), 1)
    cache = study_cache(training, cache_dir)
    dtype = torch.bfloat16 if cuda and training.bf16 else torch.float32
    device = "cuda" if cuda else "cpu"

    if world_size > 1:
        result = launch_training(candidate_code(work_dir), training, cache_dir, work_dir, seed, world_size,
                                 progress_file=Path(work_dir).parent / PROGRESS_FILE)
        policy, tokenizer = load_causal_lm(str(Path(work_dir) / POLICY_DIR), dtype=dtype)
        reference = None
    else:
        trainer, result = train_study_policy(candidate, training, cache, Path(work_dir) / "trainer", seed, progress)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer, reference = trainer.processing_class, trainer.ref_model
        # AdamW's two moments take twice the policy's memory and are not needed to answer
        trainer.optimizer = trainer.lr_scheduler = None
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if hasattr(policy, "gradient_checkpointing_disable"):
        policy.gradient_checkpointing_disable()
    policy.config.use_cache = True
    policy.to(device)

    def load_reference():
        model = reference
        if model is None:
            model, _ = load_causal_lm(str(cache.reference), dtype=dtype)
        return model.to(device)

    accuracy = result.eval_metrics.get("eval_rewards/accuracies")
    source = f"held-out split {training.eval_split!r}"
    if accuracy is None:
        accuracy, source = result.final_metrics.get("rewards/accuracies"), "last training step"
    if accuracy is None:
        raise RuntimeError(f"training logged no reward accuracy after {result.steps} steps; check the training log")
    metrics = {
        "training_fitness": accuracy,
        "training_fitness_kind": f"implicit-reward accuracy on the {source}",
        "eval_metrics": result.eval_metrics,
        "train_metrics": result.final_metrics,
        "train_loss": result.loss_curve,
        "steps": result.steps,
        "pairs": result.pairs,
        "eval_pairs": result.eval_pairs,
        "world_size": result.world_size,
        "train_s": result.train_s,
    }
    return _Trained(policy, tokenizer, float(accuracy), load_reference, metrics)
