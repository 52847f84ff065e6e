"""Numerical properties of one loss program over its margin rho, for a sweep of beta, computed in a sandboxed child.

Usage (child side): python -m sandbox.analysis JOB_DIR

The child reads JOB_DIR/analysis_job.json, loads the program with the same
static check and RestrictedPython loader as the worker, and writes
JOB_DIR/analysis.json. As in sandbox/curves.py, the program receives one pair
whose first input (policy_chosen_logps) is rho and whose other inputs are 0, so
the margin of a preference loss is rho. Everything runs in float64. For each
beta the child records:

- f(rho) and df/drho on a uniform grid over [-rho_max, rho_max] that includes
  rho = 0, and the rho ranges where the second difference
  f(r - h) - 2 f(r) + f(r + h) is negative, that is where f'' < 0;
- f and df/drho at rho = 0, and at rho = +-(10 / beta) * 2**k for k = 0..5,
  from which the behaviour as rho -> +inf and -inf is classified;
- whether the loss of a pair changes when other pairs share its batch.

`analyze_program` is the engine side. It starts the child through
`run_isolated_job` of sandbox/curves.py, so candidate code never runs in the engine.
"""

from __future__ import annotations

import enum
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.protocol import write_json_atomic

JOB_FILE = "analysis_job.json"
RESULT_FILE = "analysis.json"

# Largest grid step in x = beta * rho. The discovered losses of the DiscoPOP study change shape over
# x / 0.05 (their tau), and LRML's region of negative curvature is only about 0.25 wide in x.
X_STEP = 0.01
MAX_POINTS = 20001

# x = beta * |rho| of the tail points that classify the limits; each point doubles the last.
TAIL_X = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

# A second difference counts as negative below -CURVATURE_RTOL * max(1, |f|) over its three points.
# float64 rounds f at about 1e-16 relative, so this leaves a wide margin above rounding noise.
CURVATURE_RTOL = 1e-10

# Below this magnitude a tail value counts as 0.
ZERO_ATOL = 1e-8

# Probe pairs (policy_chosen, policy_rejected, reference_chosen, reference_rejected), margins 7, -2.5
# and -15, each evaluated alone and inside two batches of other pairs.
PROBE_PAIRS = ((-40.0, -55.0, -42.0, -50.0), (-12.0, -9.0, -11.0, -10.5), (-80.0, -80.0, -75.0, -90.0))
COMPANION_BATCHES = (
    ((-20.0, -30.0, -25.0, -25.0), (-60.0, -20.0, -50.0, -40.0), (-5.0, -45.0, -8.0, -12.0)),
    ((-100.0, -10.0, -90.0, -30.0), (-33.0, -33.5, -30.0, -31.0), (-7.0, -70.0, -9.0, -60.0)),
)


class Trend(str, enum.Enum):
    """Behaviour of f or df/drho as rho tends to +inf or -inf."""

    EXACTLY_ZERO = "exactly_zero"
    TO_ZERO = "to_zero"
    CONSTANT = "constant"
    LINEAR = "linear"
    QUADRATIC = "quadratic"
    POWER = "power"
    EXPONENTIAL = "exponential"
    OVERFLOW = "overflow"
    NAN = "nan"
    UNCLEAR = "unclear"


@dataclass(frozen=True)
class Limit:
    """A classified tail.

    Attributes:
        trend: the kind of behaviour.
        value: the limit (CONSTANT), the slope df/drho (LINEAR), the exponent of |rho| (POWER) or the
            rate of log|f| per nat of |rho| (EXPONENTIAL); None otherwise.
        sign: +1 or -1, the direction of growth; 0 when the values do not grow.
    """

    trend: Trend
    value: float | None = None
    sign: int = 0

    def describe(self) -> str:
        to = "+inf" if self.sign >= 0 else "-inf"
        texts = {
            Trend.EXACTLY_ZERO: "exactly 0",
            Trend.TO_ZERO: "tends to 0",
            Trend.CONSTANT: f"tends to {self.value:.4g}" if self.value is not None else "",
            Trend.LINEAR: f"grows linearly to {to} (slope {self.value:.3g})" if self.value is not None else "",
            Trend.QUADRATIC: f"grows quadratically to {to}",
            Trend.POWER: f"grows like |rho|^{self.value:.2g} to {to}" if self.value is not None else "",
            Trend.EXPONENTIAL: f"grows exponentially to {to} (rate {self.value:.3g} per nat)"
            if self.value is not None
            else "",
            Trend.OVERFLOW: f"overflows to {to} in float64",
            Trend.NAN: "NaN",
            Trend.UNCLEAR: "no clear limit",
        }
        return texts[self.trend]

    def to_dict(self) -> dict[str, Any]:
        return {"trend": self.trend.value, "value": self.value, "sign": self.sign, "text": self.describe()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Limit:
        return cls(Trend(values["trend"]), values.get("value"), int(values.get("sign", 0)))


@dataclass(frozen=True)
class BatchDependence:
    """Whether the loss of a pair depends on the other pairs in its batch.

    Attributes:
        dependent: some probe pair got a different loss inside a batch than alone.
        max_difference: the largest |loss inside a batch - loss alone| over finite values.
        alone_nan: some probe pair's loss is NaN alone but finite inside a batch, as for a loss
            that uses the batch's std or var.
        error: why the probe failed; the other fields are then meaningless.
    """

    dependent: bool
    max_difference: float | None
    alone_nan: bool
    error: str = ""

    def describe(self) -> str:
        if self.error:
            return f"unknown ({self.error})"
        if not self.dependent:
            return "no: each pair gets the same loss alone as inside two other batches"
        if self.alone_nan:
            return "yes: the loss of a pair alone is NaN but finite inside a batch (a batch std or var?)"
        return f"yes: the loss of a pair changes with the other pairs of its batch (by up to {self.max_difference:.3g})"


@dataclass(frozen=True)
class BetaAnalysis:
    """The curves and properties of one loss at one beta; lists hold None where a value is not finite."""

    beta: float
    rho: list[float]
    loss: list[float | None]
    grad: list[float | None]
    evaluation: str
    nonconvex_ranges: list[tuple[float, float]]
    nonfinite_ranges: list[tuple[float, float]]
    loss_at_zero: float | None
    grad_at_zero: float | None
    limits: dict[str, dict[str, Limit]]
    batch: BatchDependence
    error: str = ""

    @property
    def convex(self) -> bool | None:
        """Whether no negative second difference was found; None when the loss failed or was not finite."""
        if self.error or self.nonfinite_ranges:
            return None
        return not self.nonconvex_ranges

    def summary(self) -> dict[str, Any]:
        """Return the properties without the curves, as JSON-ready values."""
        return {
            "beta": self.beta,
            "error": self.error,
            "convex": self.convex,
            "nonconvex_ranges": [list(r) for r in self.nonconvex_ranges],
            "nonfinite_ranges": [list(r) for r in self.nonfinite_ranges],
            "loss_at_zero": self.loss_at_zero,
            "grad_at_zero": self.grad_at_zero,
            "limits": {
                side: {name: limit.to_dict() for name, limit in limits.items()} for side, limits in self.limits.items()
            },
            "batch_dependent": self.batch.dependent,
            "evaluation": self.evaluation,
            "points": len(self.rho),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BetaAnalysis:
        limits = {
            side: {name: Limit.from_dict(limit) for name, limit in entries.items()}
            for side, entries in values["limits"].items()
        }
        return cls(
            beta=values["beta"],
            rho=values["rho"],
            loss=values["loss"],
            grad=values["grad"],
            evaluation=values["evaluation"],
            nonconvex_ranges=[tuple(r) for r in values["nonconvex_ranges"]],
            nonfinite_ranges=[tuple(r) for r in values["nonfinite_ranges"]],
            loss_at_zero=values["loss_at_zero"],
            grad_at_zero=values["grad_at_zero"],
            limits=limits,
            batch=BatchDependence(**values["batch"]),
            error=values["error"],
        )


# engine side


def analyze_program(
    code: str,
    params: tuple[str, ...],
    betas: list[float],
    rho_max: float,
    points: int,
    job_dir: Path,
    timeout_s: float = 120.0,
    memory_mb: int = 4096,
    allow_network: bool = False,
) -> list[BetaAnalysis]:
    """Analyse one program at each beta in a sandboxed child; return one BetaAnalysis per beta, in order.

    Raises SandboxUnavailable when the network cannot be isolated and
    `allow_network` is false, and CurvesFailed when the child crashed or timed out.
    """
    from sandbox.curves import run_isolated_job

    job = {"code": code, "params": list(params), "betas": list(betas), "rho_max": rho_max, "points": points}
    payload = run_isolated_job(
        "sandbox.analysis", "analysis", job, JOB_FILE, RESULT_FILE, job_dir, timeout_s, memory_mb, allow_network
    )
    return [BetaAnalysis.from_dict(entry) for entry in payload["sweep"]]


# properties of sampled values, computed from numbers alone


def rho_grid(beta: float, rho_max: float, points: int) -> list[float]:
    """Return a symmetric uniform grid over [-rho_max, rho_max] with 0 at its centre.

    It has at least `points` values, more where beta is large, so that its step in x = beta * rho is at
    most X_STEP, up to MAX_POINTS values.
    """
    needed = max(points, math.ceil(2 * rho_max * beta / X_STEP) + 1)
    half = min(needed, MAX_POINTS) // 2
    step = rho_max / half
    return [index * step for index in range(-half, half + 1)]


def _runs(mask: list[bool], positions: list[float]) -> list[tuple[float, float]]:
    """Return (first, last) position of every run of True values in `mask`."""
    runs: list[tuple[float, float]] = []
    start: int | None = None
    for index, flag in enumerate([*mask, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((positions[start], positions[index - 1]))
            start = None
    return runs


def negative_curvature_ranges(rho: list[float], loss: list[float | None]) -> list[tuple[float, float]]:
    """Return the rho ranges of a uniform grid where the second difference of f is negative (f'' < 0).

    A range is reported by the centres of its second differences, so a kink or jump at one grid
    point gives a range of one point.
    """
    negative = []
    for index in range(1, len(rho) - 1):
        window = loss[index - 1 : index + 2]
        if any(value is None for value in window):
            negative.append(False)
            continue
        before, centre, after = window
        scale = max(1.0, abs(before), abs(centre), abs(after))
        negative.append(before - 2 * centre + after < -CURVATURE_RTOL * scale)
    return _runs(negative, rho[1:-1])


def nonfinite_ranges(rho: list[float], values: list[float | None]) -> list[tuple[float, float]]:
    """Return the rho ranges where a value is missing (NaN or infinite)."""
    return _runs([value is None for value in values], rho)


def classify_tail(rho: list[float], values: list[float | None]) -> Limit:
    """Classify the behaviour of values at |rho| doubling from point to point, by their last three values.

    A magnitude that shrinks or settles gives its limit, extrapolated with Aitken's delta-squared
    rule; one that grows gives the local exponent p = log2(|y_k| / |y_k-1|), which is 1 for linear
    growth, 2 for quadratic growth, and itself doubles from point to point for exponential growth.
    """
    last = values[-1]
    if last is None or (isinstance(last, float) and math.isnan(last)):
        return Limit(Trend.NAN)
    if math.isinf(last):
        return Limit(Trend.OVERFLOW, sign=1 if last > 0 else -1)
    tail = values[-3:]
    if any(value is None or not math.isfinite(value) for value in tail):
        return Limit(Trend.UNCLEAR)
    y3, y4, y5 = tail
    r4, r5 = rho[-2], rho[-1]
    if y3 == y4 == y5 == 0.0:
        return Limit(Trend.EXACTLY_ZERO, 0.0)
    a3, a4, a5 = abs(y3), abs(y4), abs(y5)
    if a5 <= ZERO_ATOL and a5 <= a4:
        return Limit(Trend.TO_ZERO, 0.0)

    # settling: the steps shrink (growth would double them at least), so extrapolate the limit
    step4, step5 = abs(y4 - y3), abs(y5 - y4)
    if step5 <= 1e-6 * max(1.0, a5) or step5 < step4:
        denominator = (y5 - y4) - (y4 - y3)
        limit = y5 - (y5 - y4) ** 2 / denominator if denominator != 0 else y5
        if abs(limit) <= max(ZERO_ATOL, 1e-3 * max(a3, a4, a5)):
            return Limit(Trend.TO_ZERO, 0.0)
        return Limit(Trend.CONSTANT, limit)

    # growth: the magnitude rises at every point with one sign
    if a3 < a4 < a5 and (y3 > 0) == (y4 > 0) == (y5 > 0):
        sign = 1 if y5 > 0 else -1
        exponent4, exponent5 = math.log2(a4 / a3), math.log2(a5 / a4)
        if exponent5 > 3 and exponent5 > exponent4 + 0.5:
            return Limit(Trend.EXPONENTIAL, math.log(a5 / a4) / abs(r5 - r4), sign)
        if abs(exponent5 - 1) < 0.1:
            return Limit(Trend.LINEAR, (y5 - y4) / (r5 - r4), sign)
        if abs(exponent5 - 2) < 0.1:
            return Limit(Trend.QUADRATIC, None, sign)
        return Limit(Trend.POWER, exponent5, sign)
    return Limit(Trend.UNCLEAR)


# child side


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _load(code: str, params: tuple[str, ...], beta: float):
    from sandbox.loader import load_candidate

    return load_candidate(code, params, {"beta": beta})


def _batch_losses(function, pairs, dtype) -> list[float]:
    """Return the per-pair losses of one batch; raise ValueError for a result that is not one loss per pair."""
    import torch

    columns = [torch.tensor([pair[i] for pair in pairs], dtype=dtype) for i in range(4)]  # 4 x (B,)
    out = function(*columns)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(pairs),):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"returned {shape} for a batch of {len(pairs)} pairs, expected ({len(pairs)},)")
    return [float(v) for v in out.detach()]


def probe_batch_dependence(function) -> BatchDependence:
    """Compare the loss of each probe pair alone with its loss inside two batches of other pairs."""
    import torch

    largest = 0.0
    dependent = alone_nan = False
    try:
        for pair in PROBE_PAIRS:
            (alone,) = _batch_losses(function, [pair], torch.float64)
            inside = [
                _batch_losses(function, [pair, *COMPANION_BATCHES[0]], torch.float64)[0],
                _batch_losses(function, [*COMPANION_BATCHES[1], pair], torch.float64)[-1],
            ]
            for value in inside:
                if math.isnan(alone) and math.isnan(value):
                    continue
                if math.isnan(alone) or math.isnan(value):
                    dependent = True
                    alone_nan = alone_nan or (math.isnan(alone) and math.isfinite(value))
                    continue
                if not math.isclose(alone, value, rel_tol=1e-9, abs_tol=1e-12):
                    dependent = True
                if math.isfinite(alone) and math.isfinite(value):
                    largest = max(largest, abs(alone - value))
    except Exception as error:  # noqa: BLE001 - candidate faults are reported, not raised
        return BatchDependence(False, None, False, error=f"{type(error).__name__}: {error}")
    return BatchDependence(dependent, largest, alone_nan)


def _batched_curve(function, grid: list[float]) -> tuple[list[float], list[float]] | None:
    """Evaluate the whole grid as one batch, each pair on its own row; None when that fails."""
    import torch

    margin = torch.tensor(grid, dtype=torch.float64, requires_grad=True)  # (N,)
    zero = torch.zeros(len(grid), dtype=torch.float64)
    try:
        out = function(margin, zero.clone(), zero.clone(), zero.clone())
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(grid),):
            return None
        if out.requires_grad:
            (grad,) = torch.autograd.grad(out.sum(), margin, allow_unused=True)
        else:
            grad = None
    except Exception:  # noqa: BLE001 - the caller falls back to one pair at a time
        return None
    grads = grad.tolist() if grad is not None else [0.0] * len(grid)
    return out.detach().tolist(), grads


def _close(a: list[float], b: list[float]) -> bool:
    for x, y in zip(a, b):
        if math.isnan(x) and math.isnan(y):
            continue
        if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
            return False
    return True


def _failed(beta: float, batch: BatchDependence, error: str) -> dict[str, Any]:
    """Return the JSON form of a BetaAnalysis whose program failed with `error`."""
    return {
        "beta": beta,
        "rho": [],
        "loss": [],
        "grad": [],
        "evaluation": "",
        "nonconvex_ranges": [],
        "nonfinite_ranges": [],
        "loss_at_zero": None,
        "grad_at_zero": None,
        "limits": {},
        "batch": batch.__dict__,
        "error": error,
    }


def analyze_beta(code: str, params: tuple[str, ...], beta: float, rho_max: float, points: int) -> dict[str, Any]:
    """Evaluate one program at one beta and return the JSON form of its BetaAnalysis."""
    from sandbox.curves import evaluate_program
    from sandbox.static_check import StaticCheckError

    grid = rho_grid(beta, rho_max, points)
    tails = {side: [sign * x / beta for x in TAIL_X] for side, sign in (("+inf", 1.0), ("-inf", -1.0))}
    hyperparameters = {"beta": beta}
    try:
        function = _load(code, params, beta)
    except StaticCheckError as error:
        return _failed(beta, BatchDependence(False, None, False), f"static check failed: {error.reason}")
    batch = probe_batch_dependence(function)

    # The grid is one batch when the pairs are independent, and a sample of it is checked against
    # single pairs. Otherwise each pair is evaluated alone.
    curve = None if batch.dependent or batch.error else _batched_curve(function, grid)
    evaluation = "batched"
    if curve is not None:
        sample = grid[:: max(1, len(grid) // 20)]
        single = evaluate_program(code, params, hyperparameters, sample, dtype="float64")
        sampled = curve[0][:: max(1, len(grid) // 20)]
        if single.error or not _close(single.loss, sampled):
            curve = None
    if curve is None:
        evaluation = "one pair at a time"
        single = evaluate_program(code, params, hyperparameters, grid, dtype="float64")
        if single.error:
            return _failed(beta, batch, single.error)
        curve = (single.loss, single.grad)
    loss = [_finite_or_none(v) for v in curve[0]]
    grad = [_finite_or_none(v) for v in curve[1]]

    # rho = 0 and the tails, always one pair at a time
    probe_rho = [0.0, *tails["+inf"], *tails["-inf"]]
    probe = evaluate_program(code, params, hyperparameters, probe_rho, dtype="float64")
    if probe.error:
        return _failed(beta, batch, probe.error)
    count = len(TAIL_X)
    limits = {}
    for offset, side in ((1, "+inf"), (1 + count, "-inf")):
        side_rho = probe_rho[offset : offset + count]
        limits[side] = {
            "loss": classify_tail(side_rho, probe.loss[offset : offset + count]).to_dict(),
            "grad": classify_tail(side_rho, probe.grad[offset : offset + count]).to_dict(),
        }
    return {
        "beta": beta,
        "rho": grid,
        "loss": loss,
        "grad": grad,
        "evaluation": evaluation,
        "nonconvex_ranges": negative_curvature_ranges(grid, loss),
        "nonfinite_ranges": nonfinite_ranges(grid, loss),
        "loss_at_zero": _finite_or_none(probe.loss[0]),
        "grad_at_zero": _finite_or_none(probe.grad[0]),
        "limits": limits,
        "batch": batch.__dict__,
        "error": "",
    }


def main(argv: list[str] | None = None) -> int:
    import json

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sandbox.analysis JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    job = json.loads((job_dir / JOB_FILE).read_text())
    started = time.monotonic()
    sweep = [
        analyze_beta(job["code"], tuple(job["params"]), beta, job["rho_max"], job["points"]) for beta in job["betas"]
    ]
    write_json_atomic(job_dir / RESULT_FILE, {"sweep": sweep})
    print(f"analysis at {len(sweep)} beta value(s) computed in {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
