"""The classification task: evolve a supervised classification loss, scored by validation accuracy.

This is the small case study of the DiscoPOP study (Lu et al. 2024,
arXiv:2406.08414), which searched for classification losses by training
ResNet-18 on CIFAR-10 for 5 epochs. The default preset runs the same search
at CPU scale on scikit-learn's 8x8 digits; the "cifar10-resnet18" preset
runs the study's setting on a GPU.

Importing this module does not import torch, so `evolve tasks` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from evaluators.classification.settings import PRESETS, ClassificationSettings
from evaluators.task import EvaluationOutcome, FunctionInterface, ProgressFn, SeedProgram, Task

# Seed programs by group; each name is a file seeds/classification/<name>.py.
SEED_GROUPS: dict[str, tuple[str, ...]] = {
    "baselines": ("cross_entropy", "label_smoothing", "focal"),
}

_DATASET_WORDS = {
    "digits": "scikit-learn's 8x8 handwritten digits (10 classes)",
    "cifar10": "CIFAR-10 (32x32 colour images, 10 classes)",
}
_MODEL_WORDS = {
    "mlp": "an MLP with one hidden layer of {hidden_size} ReLU units",
    "resnet18": "ResNet-18",
}


class ClassificationTask(Task):
    name = "classification"
    description = "supervised classification loss; fitness is validation accuracy (digits MLP, or CIFAR-10 ResNet-18)"
    interface = FunctionInterface(
        params=("logits", "targets"),
        returns=(
            "a float tensor of shape (B,) with one loss per example, where logits has shape (B, C) "
            "and targets holds int64 class indices of shape (B,)"
        ),
    )
    settings_class = ClassificationSettings
    warm_imports = ("evaluators.classification.checks", "evaluators.classification.data", "evaluators.classification.trainer")
    default_preset = "cpu"

    def presets(self) -> dict[str, Any]:
        return dict(PRESETS)

    def prompt_text(self, settings: Any) -> str:
        dataset = _DATASET_WORDS[settings.dataset]
        model = _MODEL_WORDS[settings.model].format(hidden_size=settings.hidden_size)
        return (
            "Design a loss function for supervised image classification. Each candidate loss is used to "
            f"train {model} from scratch on {dataset} for {settings.epochs} epochs with "
            f"{settings.optimizer.upper()} at learning rate {settings.learning_rate:g}, batch size "
            f"{settings.batch_size}. The fitness is the accuracy on held-out validation images, averaged "
            f"over {settings.num_runs} training run(s); higher is better.\n\n"
            "The function receives `logits`, the network's unnormalised scores of shape (B, C) with C = 10, "
            "and `targets`, the true class of each example as int64 indices of shape (B,). It returns one "
            "loss per example, shape (B,); the trainer averages them and minimises the mean with gradient "
            "descent. Cross-entropy, F.cross_entropy(logits, targets, reduction='none'), is the baseline "
            "to beat. The loss must stay finite, with finite gradients, for logits as large as +-50 and "
            "for bfloat16 logits."
        )

    def seeds(self, group: str = "baselines") -> list[SeedProgram]:
        from seeds import SEEDS_DIR, read_seed

        if group not in SEED_GROUPS:
            raise ValueError(f"unknown seed group {group!r} for task 'classification'; groups: {sorted(SEED_GROUPS)}")
        sources = [read_seed(SEEDS_DIR / "classification" / f"{name}.py") for name in SEED_GROUPS[group]]
        return [SeedProgram(name=s.name, thought=s.thought, code=s.code) for s in sources]

    def prepare(self, settings: Any, cache_dir: Path, progress: ProgressFn) -> None:
        from evaluators.classification.data import prepare_dataset

        progress(0, 1, f"preparing {settings.dataset}")
        path = prepare_dataset(settings, cache_dir)
        progress(1, 1, f"{settings.dataset} ready in {path}")

    def unit_test(self, candidate: Callable[..., Any], settings: Any) -> dict[str, Any]:
        from evaluators.classification.checks import run_unit_tests

        return run_unit_tests(candidate)

    def evaluate(
        self,
        candidate: Callable[..., Any],
        settings: Any,
        cache_dir: Path,
        work_dir: Path,
        progress: ProgressFn,
        seed: int,
    ) -> EvaluationOutcome:
        from evaluators.classification.data import load_splits
        from evaluators.classification.trainer import train_and_score

        splits = load_splits(settings, cache_dir)
        return train_and_score(candidate, settings, splits, progress, seed)

    def loss_grammar(self):
        """Return the building blocks an offline proposer needs to write classification losses."""
        from evaluators.classification.grammar import ClassificationLossGrammar

        return ClassificationLossGrammar()
