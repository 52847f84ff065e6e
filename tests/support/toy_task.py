"""A small but real task for engine tests: learn pairwise preferences of a linear scorer.

Each "prompt" has a chosen and a rejected response described by feature
vectors; the policy's log-probability of a response is a linear score, and the
reference is the untrained policy. Training with the candidate loss for a few
dozen steps and measuring held-out preference accuracy takes about a second,
so the engine's loop can be tested end to end with real sandbox processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evaluators.task import CandidateRejected, EvaluationOutcome, FunctionInterface, SeedProgram, Task

_DPO = '''import torch.nn.functional as F


def dpo(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(self.beta * rho)
'''

_HINGE = '''import torch


def hinge(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return torch.relu(1 - self.beta * rho)
'''


@dataclass(frozen=True)
class ToySettings:
    """Settings of the toy task.

    Attributes:
        beta: preference temperature passed to the candidate.
        steps: optimizer steps per evaluation.
        sleep_s: extra seconds each evaluation sleeps, to test deadlines and kills.
    """

    beta: float = 1.0
    steps: int = 40
    sleep_s: float = 0.0


class ToyTask(Task):
    name = "toy"
    description = "linear preference scorer on synthetic pairs (engine tests)"
    interface = FunctionInterface(
        params=("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"),
        hyperparameters=("beta",),
        returns="a tensor of shape (B,) with one loss per example",
    )
    settings_class = ToySettings
    default_preset = "default"

    def presets(self) -> dict[str, Any]:
        return {"default": ToySettings(), "slow": ToySettings(sleep_s=8.0)}

    def prompt_text(self, settings: Any) -> str:
        return "Design a pairwise preference loss for a linear scorer."

    def seeds(self, group: str = "baselines") -> list[SeedProgram]:
        return [
            SeedProgram("dpo", "Logistic loss on the log-ratio margin.", _DPO),
            SeedProgram("hinge", "Hinge loss on the log-ratio margin.", _HINGE),
        ]

    def unit_test(self, candidate: Callable[..., Any], settings: Any) -> dict[str, Any]:
        import torch

        for batch in (1, 3):
            inputs = [torch.randn(batch, requires_grad=True) for _ in range(4)]
            out = candidate(*inputs)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch,):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise CandidateRejected(f"output shape {shape} != (B,)=({batch},)", "shape")
            if not torch.isfinite(out).all():
                raise CandidateRejected("non-finite loss on random inputs", "nan")
        grid = torch.linspace(-3, 3, 7)
        zeros = torch.zeros(7)
        probe = candidate(grid, zeros, zeros, zeros).detach().tolist()
        return {"probe": probe}

    def evaluate(self, candidate, settings, cache_dir: Path, work_dir: Path, progress, seed: int) -> EvaluationOutcome:
        import torch

        generator = torch.Generator().manual_seed(1234)
        true_w = torch.randn(8, generator=generator)
        features = torch.randn(256, 2, 8, generator=generator)
        scores = features @ true_w
        chosen_first = scores[:, 0] >= scores[:, 1]
        chosen = torch.where(chosen_first[:, None], features[:, 0], features[:, 1])
        rejected = torch.where(chosen_first[:, None], features[:, 1], features[:, 0])
        train, held_out = slice(0, 192), slice(192, 256)

        torch.manual_seed(seed)
        weights = torch.zeros(8, requires_grad=True)
        optimizer = torch.optim.SGD([weights], lr=0.5)
        losses = []
        for step in range(settings.steps):
            loss = candidate(chosen[train] @ weights, rejected[train] @ weights,
                             torch.zeros(192), torch.zeros(192)).mean()
            if not torch.isfinite(loss):
                raise CandidateRejected(f"loss became non-finite at step {step}", "nan", stage="train")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            progress(step + 1, settings.steps, "train")
            if settings.sleep_s:
                time.sleep(settings.sleep_s / settings.steps)
        with torch.no_grad():
            accuracy = float(((chosen[held_out] - rejected[held_out]) @ weights > 0).float().mean())
        return EvaluationOutcome(fitness=accuracy, metrics={"accuracy": accuracy, "train_loss": losses})
