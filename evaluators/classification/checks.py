"""Cheap checks of a candidate classification loss, and the probe values that fingerprint its behaviour.

Each check calls the candidate on small logits and int64 class targets, as
the trainer will, and raises CandidateRejected with the case that failed and
what to change.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

import torch

from evaluators.task import CandidateRejected

NUM_CLASSES = 10
BATCH_SIZES = (1, 2, 7, 64)
EXTREME_LOGIT = 50.0

# Target-logit values of the probe rows, with the other nine logits at zero.
PROBE_TARGET_LOGITS = tuple(float(v) for v in range(-6, 7))
PROBE_RANDOM_ROWS = 8
_PROBE_SEED = 20240612

LossFn = Callable[[torch.Tensor, torch.Tensor], Any]


def run_unit_tests(candidate: LossFn) -> dict[str, Any]:
    """Run every check; return the probe values and a few diagnostics.

    Raises:
        CandidateRejected: naming the case (dtype, batch size, logits) that failed.
    """
    generator = torch.Generator().manual_seed(0)

    # random logits: shape, finiteness and a gradient that reaches the logits
    for dtype in (torch.float32, torch.bfloat16):
        for batch in BATCH_SIZES:
            logits = torch.randn(batch, NUM_CLASSES, generator=generator) * 3.0
            targets = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
            case = f"{_dtype_name(dtype)} random logits, batch {batch}"
            check_case(candidate, logits.to(dtype), targets, case, require_nonzero_gradient=dtype == torch.float32)

    # extreme and saturated logits: values must stay finite where softmax saturates
    for case, logits, targets in extreme_cases(generator):
        for dtype in (torch.float32, torch.bfloat16):
            name = f"{_dtype_name(dtype)} {case}"
            check_case(candidate, logits.to(dtype), targets, name, require_nonzero_gradient=False)

    check_uses_targets(candidate, generator)
    probe = probe_values(candidate)
    uniform = _call(candidate, torch.zeros(1, NUM_CLASSES), torch.zeros(1, dtype=torch.int64), "uniform logits")
    return {"probe": probe, "uniform_logits_loss": float(uniform.detach().float()[0])}


def extreme_cases(generator: torch.Generator) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Return (case, logits, targets) triples with logits of magnitude 50 and one-hot-confident rows."""
    batch = 8
    targets = torch.arange(batch) % NUM_CLASSES
    signs = torch.randint(0, 2, (batch, NUM_CLASSES), generator=generator) * 2 - 1
    one_hot = torch.nn.functional.one_hot(targets, NUM_CLASSES).bool()
    confident = torch.full((batch, NUM_CLASSES), -EXTREME_LOGIT).masked_fill(one_hot, EXTREME_LOGIT)
    wrong_class = (targets + 1) % NUM_CLASSES
    wrong_one_hot = torch.nn.functional.one_hot(wrong_class, NUM_CLASSES).bool()
    confidently_wrong = torch.full((batch, NUM_CLASSES), -EXTREME_LOGIT).masked_fill(wrong_one_hot, EXTREME_LOGIT)
    return [
        (f"logits of random sign and magnitude {EXTREME_LOGIT:g}", signs.float() * EXTREME_LOGIT, targets),
        (f"confident correct logits (+{EXTREME_LOGIT:g} on the target, -{EXTREME_LOGIT:g} elsewhere)", confident,
         targets),
        (f"confident wrong logits (+{EXTREME_LOGIT:g} on another class)", confidently_wrong, targets),
        ("all-equal logits", torch.zeros(batch, NUM_CLASSES), targets),
    ]


def check_case(
    candidate: LossFn, logits: torch.Tensor, targets: torch.Tensor, case: str, require_nonzero_gradient: bool
) -> torch.Tensor:
    """Check one call: shape (B,), floating and finite values, and finite gradients w.r.t. the logits."""
    logits = logits.detach().requires_grad_(True)
    losses = _call(candidate, logits, targets, case)
    _check_values(losses, logits.shape[0], case)
    _check_gradient(losses, logits, case, require_nonzero_gradient)
    return losses


def _check_values(losses: Any, batch: int, case: str) -> None:
    if not isinstance(losses, torch.Tensor):
        raise CandidateRejected(
            f"{case}: the loss returned a {type(losses).__name__}; expected a tensor of shape ({batch},)", "shape"
        )
    if tuple(losses.shape) != (batch,):
        raise CandidateRejected(
            f"{case}: the loss returned shape {tuple(losses.shape)}; expected ({batch},), one loss per "
            "example. Do not reduce over the batch (no .mean() or .sum() at the end).",
            "shape",
        )
    if not losses.is_floating_point():
        raise CandidateRejected(
            f"{case}: the loss returned dtype {losses.dtype}; expected a floating-point tensor", "dtype_device"
        )

    values = losses.detach().float()
    if not torch.isfinite(values).all():
        bad = values[~torch.isfinite(values)][:3].tolist()
        raise CandidateRejected(
            f"{case}: the loss returned non-finite values such as {bad}. Compute log-probabilities with "
            "F.log_softmax or F.cross_entropy instead of log(softmax(...)), and clamp before log, pow or division.",
            "nan",
        )


def _check_gradient(losses: torch.Tensor, logits: torch.Tensor, case: str, require_nonzero: bool) -> None:
    if not losses.requires_grad:
        raise CandidateRejected(
            f"{case}: the returned loss does not depend on the logits through autograd (it is detached or built "
            "from integers), so training cannot change the network.",
            "zero_gradient",
        )
    try:
        (gradient,) = torch.autograd.grad(losses.float().sum(), logits, allow_unused=True)
    except RuntimeError as error:
        raise CandidateRejected(f"{case}: backward through the loss failed: {error}", "exception") from None

    if gradient is None:
        raise CandidateRejected(f"{case}: the loss has no gradient with respect to the logits", "zero_gradient")
    if not torch.isfinite(gradient).all():
        raise CandidateRejected(
            f"{case}: the loss is finite but its gradient with respect to the logits is not. A pow with an "
            "exponent below 1, sqrt, or log of a value that reaches 0 has an infinite slope there. Clamp its "
            "input away from 0 or compute it in log space.",
            "nan",
        )
    if require_nonzero and not gradient.abs().sum() > 0:
        raise CandidateRejected(
            f"{case}: the gradient with respect to the logits is zero everywhere, so training would not move",
            "zero_gradient",
        )


def check_uses_targets(candidate: LossFn, generator: torch.Generator) -> None:
    """Reject a loss whose values do not change when the targets do."""
    logits = torch.randn(16, NUM_CLASSES, generator=generator) * 3.0
    targets = torch.randint(0, NUM_CLASSES, (16,), generator=generator)
    shifted = (targets + 1) % NUM_CLASSES
    with torch.no_grad():
        first = _call(candidate, logits, targets, "targets check").float()
        second = _call(candidate, logits, shifted, "targets check").float()
    if torch.allclose(first, second):
        raise CandidateRejected(
            "the loss gives the same values when every target changes class, so training cannot learn "
            "the labels; use `targets` (int64 class indices of shape (B,))",
            "ignores_targets",
        )


def probe_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Return the fixed probe batch: a sweep of the target logit, then seeded random rows."""
    sweep = torch.zeros(len(PROBE_TARGET_LOGITS), NUM_CLASSES)
    sweep[:, 0] = torch.tensor(PROBE_TARGET_LOGITS)
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    random_rows = torch.randn(PROBE_RANDOM_ROWS, NUM_CLASSES, generator=generator) * 2.0
    logits = torch.cat([sweep, random_rows])  # (21, 10)
    targets = torch.cat([torch.zeros(len(PROBE_TARGET_LOGITS), dtype=torch.int64),
                         torch.arange(PROBE_RANDOM_ROWS) % NUM_CLASSES])  # (21,)
    return logits, targets


def probe_values(candidate: LossFn) -> list[float]:
    """Return the candidate's float32 losses on the probe batch, for the behavioural fingerprint."""
    logits, targets = probe_logits()
    with torch.no_grad():
        values = _call(candidate, logits, targets, "probe batch").float()
    if not torch.isfinite(values).all():
        raise CandidateRejected(
            "the loss returned non-finite values on the probe batch, whose logits lie within +-6", "nan"
        )
    return values.tolist()


def _call(candidate: LossFn, logits: torch.Tensor, targets: torch.Tensor, case: str) -> Any:
    try:
        return candidate(logits, targets)
    except CandidateRejected:
        raise
    except Exception as error:  # noqa: BLE001 - any candidate fault becomes a rejection that names the case
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "<candidate>"]
        where = f" (candidate line {frames[-1].lineno})" if frames else ""
        text = f"{type(error).__name__}: {error}"
        category = "dtype_device" if any(w in text for w in ("dtype", "BFloat16", "Half", "same type")) else "exception"
        raise CandidateRejected(f"{case}: {text}{where}", category) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
