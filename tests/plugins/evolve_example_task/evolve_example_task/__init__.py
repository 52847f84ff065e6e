"""An example evolve task: evolve a regression loss that fits a line through data with outliers.

Each candidate is a loss of the residuals (prediction minus target). The
evaluation fits a slope and an intercept to points on the line y = 2x + 1,
a fifth of which were shifted far upwards, by gradient descent on the mean
candidate loss. The fitness is minus the distance of the fitted parameters
from the true ones, so a loss that ignores the outliers scores higher.

docs/writing-a-task.md in the evolve repository explains this file step by step.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evaluators.task import CandidateRejected, EvaluationOutcome, FunctionInterface, ProgressFn, SeedProgram, Task

SEEDS_DIR = Path(__file__).resolve().parent / "seeds"
TRUE_SLOPE = 2.0
TRUE_INTERCEPT = 1.0


@dataclass(frozen=True)
class LineFitSettings:
    """Settings of one line fit.

    Attributes:
        delta: the hyperparameter passed to every candidate, as `self.delta`
            or as a keyword parameter `delta`.
        num_points: points drawn on the line.
        outlier_fraction: share of the points shifted upwards by 5 to 10.
        steps: gradient steps of the fit.
        learning_rate: Adam's learning rate.
    """

    delta: float = 1.0
    num_points: int = 256
    outlier_fraction: float = 0.2
    steps: int = 300
    learning_rate: float = 0.05

    def __post_init__(self) -> None:
        errors = []
        if not self.delta > 0:
            errors.append(f"delta={self.delta!r} is invalid; expected a number > 0")
        if self.num_points < 8:
            errors.append(f"num_points={self.num_points!r} is invalid; expected an integer >= 8")
        if not 0 <= self.outlier_fraction < 0.5:
            errors.append(f"outlier_fraction={self.outlier_fraction!r} is invalid; expected a number in [0, 0.5)")
        if self.steps < 1:
            errors.append(f"steps={self.steps!r} is invalid; expected an integer >= 1")
        if not self.learning_rate > 0:
            errors.append(f"learning_rate={self.learning_rate!r} is invalid; expected a number > 0")
        if errors:
            raise ValueError("invalid line-fit settings:\n  " + "\n  ".join(errors))


class LineFitTask(Task):
    name = "example"
    description = "regression loss that fits a line through data with outliers (the plugin example)"
    interface = FunctionInterface(
        params=("residuals",),
        hyperparameters=("delta",),
        returns="a tensor of shape (B,) with one loss per residual",
    )
    settings_class = LineFitSettings
    default_preset = "default"

    def presets(self) -> dict[str, Any]:
        return {"default": LineFitSettings(), "quick": LineFitSettings(num_points=64, steps=50)}

    def prompt_text(self, settings: Any) -> str:
        return (
            "Design a regression loss. It receives `residuals`, prediction minus target, of shape (B,), "
            f"and returns one loss per residual. A line is fitted to {settings.num_points} points by gradient "
            f"descent on the mean loss; {settings.outlier_fraction:.0%} of the points are outliers shifted "
            "far upwards. The fitness is minus the distance of the fitted slope and intercept from the "
            "true ones, so higher is better."
        )

    def seeds(self, group: str = "baselines") -> list[SeedProgram]:
        if group != "baselines":
            raise ValueError(f"unknown seed group {group!r} for task 'example'; the only group is 'baselines'")
        programs = []
        for path in sorted(SEEDS_DIR.glob("*.py")):
            # the file is read as text, never imported: seeds run only in the sandbox
            text = path.read_text()
            module = ast.parse(text)
            thought = ast.get_docstring(module).splitlines()[0]
            code = "\n".join(text.splitlines()[module.body[0].end_lineno :]).lstrip("\n")
            programs.append(SeedProgram(name=path.stem, thought=thought, code=code + "\n"))
        return programs

    def prepare(self, settings: Any, cache_dir: Path, progress: ProgressFn) -> None:
        import torch

        path = _points_path(settings, cache_dir)
        if path.exists():
            return
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(settings.num_points, generator=generator) * 2 - 1  # (N,) in [-1, 1)
        y = TRUE_SLOPE * x + TRUE_INTERCEPT + 0.1 * torch.randn(settings.num_points, generator=generator)
        num_outliers = int(settings.outlier_fraction * settings.num_points)
        y[:num_outliers] += 5 + 5 * torch.rand(num_outliers, generator=generator)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"x": x, "y": y}, path)
        progress(1, 1, f"wrote {path}")

    def unit_test(self, candidate: Callable[..., Any], settings: Any) -> dict[str, Any]:
        import torch

        for batch in (1, 5, 64):
            residuals = torch.randn(batch, requires_grad=True)
            losses = candidate(residuals)
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch,):
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                message = f"the loss returned {shape} for {batch} residuals; expected ({batch},)"
                raise CandidateRejected(message, "shape")
            if not torch.isfinite(losses).all():
                raise CandidateRejected("the loss is not finite on standard-normal residuals", "nan")
            (gradient,) = torch.autograd.grad(losses.sum(), residuals, allow_unused=True)
            if gradient is None or not gradient.abs().sum() > 0:
                raise CandidateRejected("the loss has no gradient with respect to the residuals", "zero_gradient")

        # the probe: losses on a fixed grid, which the engine uses to spot behavioural duplicates
        grid = torch.linspace(-4, 4, 17)
        with torch.no_grad():
            probe = candidate(grid).float().tolist()
        return {"probe": probe}

    def evaluate(
        self,
        candidate: Callable[..., Any],
        settings: Any,
        cache_dir: Path,
        work_dir: Path,
        progress: ProgressFn,
        seed: int,
    ) -> EvaluationOutcome:
        import torch

        points = torch.load(_points_path(settings, cache_dir), weights_only=True)
        slope = torch.zeros((), requires_grad=True)
        intercept = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.Adam([slope, intercept], lr=settings.learning_rate)
        for step in range(settings.steps):
            residuals = slope * points["x"] + intercept - points["y"]  # (N,)
            loss = candidate(residuals).mean()
            if not torch.isfinite(loss):
                message = f"the mean loss became {float(loss.detach())} at step {step}"
                raise CandidateRejected(message, "nan", stage="train")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (step + 1) % 50 == 0:
                progress(step + 1, settings.steps, f"loss {float(loss.detach()):.4f}")

        fitted_slope, fitted_intercept = float(slope.detach()), float(intercept.detach())
        error = abs(fitted_slope - TRUE_SLOPE) + abs(fitted_intercept - TRUE_INTERCEPT)
        metrics = {"fitted_slope": fitted_slope, "fitted_intercept": fitted_intercept, "parameter_error": error}
        return EvaluationOutcome(fitness=-error, metrics=metrics)


def _points_path(settings: LineFitSettings, cache_dir: Path) -> Path:
    return Path(cache_dir) / "example" / f"points-{settings.num_points}-{settings.outlier_fraction}.pt"
