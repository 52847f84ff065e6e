"""Training a classifier with a candidate loss and measuring its validation accuracy."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn import functional as F

from evaluators.classification.data import Splits
from evaluators.classification.models import build_model
from evaluators.classification.settings import ClassificationSettings
from evaluators.task import CandidateRejected, EvaluationOutcome, ProgressFn

LossFn = Callable[[torch.Tensor, torch.Tensor], Any]

_EVAL_BATCH = 1024
_WARMUP_FRACTION = 0.2
_CROP_PADDING = 4


@dataclass
class RunResult:
    """One training run: validation accuracy and the mean training loss of each epoch."""

    accuracy: float
    epoch_losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def resolve_device(name: str) -> torch.device:
    """Return the device for "auto", "cpu" or "cuda"; "cuda" without a GPU raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no GPU; use --set device=cpu or auto")
    return torch.device(name)


def train_and_score(
    candidate: LossFn,
    settings: ClassificationSettings,
    splits: Splits,
    progress: ProgressFn,
    seed: int,
) -> EvaluationOutcome:
    """Train `settings.num_runs` networks with the candidate loss; fitness is their mean validation accuracy."""
    started = time.monotonic()
    device = resolve_device(settings.device)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = splits.to(device)
    runs = []
    for run in range(settings.num_runs):
        # every candidate of a run starts from the same initialisations and batch orders
        runs.append(_train_once(candidate, settings, splits, device, seed * 1000 + run, run, progress))

    accuracies = [r.accuracy for r in runs]
    accuracy = sum(accuracies) / len(accuracies)
    curve = [sum(r.epoch_losses[e] for r in runs) / len(runs) for e in range(settings.epochs)]
    metrics = {
        "accuracy": accuracy,
        "accuracy_per_run": accuracies,
        "final_train_loss": curve[-1],
        "train_curve": curve,
        "train_s_per_run": [round(r.wall_s, 3) for r in runs],
        "time_s": round(time.monotonic() - started, 3),
        "device": str(device),
        "num_train": int(splits.train_labels.numel()),
        "num_validation": int(splits.val_labels.numel()),
    }
    return EvaluationOutcome(fitness=accuracy, metrics=metrics)


def _train_once(
    candidate: LossFn,
    settings: ClassificationSettings,
    splits: Splits,
    device: torch.device,
    run_seed: int,
    run: int,
    progress: ProgressFn,
) -> RunResult:
    started = time.monotonic()
    torch.manual_seed(run_seed)
    generator = torch.Generator().manual_seed(run_seed)
    image_shape = tuple(splits.train_images.shape[1:])
    model = build_model(settings.model, image_shape, settings.hidden_size, splits.num_classes).to(device)
    channels_last = device.type == "cuda" and settings.model == "resnet18"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, settings)
    num_train = splits.train_labels.numel()
    steps_per_epoch = math.ceil(num_train / settings.batch_size)
    scheduler = _scheduler(optimizer, settings, steps_per_epoch * settings.epochs)

    result = RunResult(accuracy=0.0)
    step = 0
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(num_train, generator=generator).to(device)
        epoch_loss = 0.0
        for start in range(0, num_train, settings.batch_size):
            index = order[start : start + settings.batch_size]
            images = splits.normalize(splits.train_images[index])  # (B, C, H, W)
            if settings.augment:
                images = augment_batch(images, generator)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = splits.train_labels[index]  # (B,)

            with _autocast(settings, device):
                logits = model(images)  # (B, num_classes)
                losses = candidate(logits, targets)
            loss = _batch_loss(losses, targets.shape[0], step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += float(loss.detach()) * index.numel()
            step += 1
        result.epoch_losses.append(epoch_loss / num_train)
        progress(run * settings.epochs + epoch + 1, settings.num_runs * settings.epochs,
                 f"run {run + 1} epoch {epoch + 1}: train loss {result.epoch_losses[-1]:.4f}")

    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CandidateRejected(
            f"the network's weights became non-finite during training (run {run + 1}) although every "
            "batch loss was finite; the loss's gradients are too large. Bound the loss or its slope.",
            "diverged",
            stage="train",
        )
    result.accuracy = accuracy(model, splits, settings, device, channels_last)
    result.wall_s = time.monotonic() - started
    return result


def _batch_loss(losses: Any, batch_size: int, step: int) -> torch.Tensor:
    """Check the candidate's per-example losses and return their float32 mean."""
    if not isinstance(losses, torch.Tensor):
        raise CandidateRejected(
            f"the loss returned a {type(losses).__name__}; expected a tensor of shape ({batch_size},)", "shape",
            stage="train",
        )
    if tuple(losses.shape) != (batch_size,):
        raise CandidateRejected(
            f"the loss returned shape {tuple(losses.shape)} for a batch of {batch_size}; expected ({batch_size},), "
            "one loss per example, not reduced",
            "shape",
            stage="train",
        )
    loss = losses.float().mean()
    if not torch.isfinite(loss):
        raise CandidateRejected(
            f"the mean training loss became {float(loss.detach())} at step {step}", "nan", stage="train"
        )
    return loss


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, splits: Splits, settings: ClassificationSettings, device: torch.device, channels_last: bool
) -> float:
    """Return the share of validation images whose highest logit is their label."""
    model.eval()
    correct = 0
    total = splits.val_labels.numel()
    for start in range(0, total, _EVAL_BATCH):
        images = splits.normalize(splits.val_images[start : start + _EVAL_BATCH])
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(settings, device):
            logits = model(images)
        correct += int((logits.argmax(dim=1) == splits.val_labels[start : start + _EVAL_BATCH]).sum())
    return correct / total


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return each image randomly shifted by up to 4 pixels (zero-padded crop) and flipped half the time."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (_CROP_PADDING,) * 4)  # (B, C, H+8, W+8)
    shifts = torch.randint(0, 2 * _CROP_PADDING + 1, (2, batch), generator=generator).to(images.device)
    rows = shifts[0][:, None] + torch.arange(height, device=images.device)[None, :]  # (B, H)
    cols = shifts[1][:, None] + torch.arange(width, device=images.device)[None, :]  # (B, W)
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=images.device)[None, :, None, None]
    cropped = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)[:, None, None, None]
    return torch.where(flip, cropped.flip(3), cropped)


def _optimizer(model: torch.nn.Module, settings: ClassificationSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=0.9, nesterov=True,
            weight_decay=settings.weight_decay,
        )
    return torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, settings: ClassificationSettings, total_steps: int):
    if settings.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = max(1, round(total_steps * _WARMUP_FRACTION))

    def one_cycle(step: int) -> float:
        # linear rise to the peak over the warm-up, then linear decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle)


def _autocast(settings: ClassificationSettings, device: torch.device):
    if settings.precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
