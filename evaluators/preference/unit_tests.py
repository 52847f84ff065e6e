"""Cheap checks of a candidate loss on synthetic log-probs, before any training.

Inputs model what DPOTrainer passes: each value is a completion's summed token
log-probs (so <= 0), one per example, shape (B,). The fixtures include the
states that break fragile losses in real runs: policy == reference at step 0
(all margins zero), a batch of one, completions truncated to zero tokens
(all four log-probs 0.0), tied references, extreme margins and bfloat16.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from evaluators.task import CandidateRejected

# Sums of token log-probs of completions of realistic length: about -1 to -300.
_LOGP_LOW, _LOGP_HIGH = -300.0, -1.0

# Margins given as beta * margin, so the grid stays in the same regime for
# every beta. |beta * margin| = 30 is far past the point where DPO's
# sigmoid saturates, but exp(30) still fits in float32 and bfloat16.
_SCALED_MARGINS = (-30.0, -10.0, -3.0, -1.0, -0.1, 0.0, 0.1, 1.0, 3.0, 10.0, 30.0)

# Log-ratio values (nats) of the behavioural probe grid; see `probe_inputs`.
_PROBE_LOGRATIOS = (-10.0, -2.0, 0.0, 2.0, 10.0)

# Messages of torch errors that a constant with the wrong dtype or device raises.
_DTYPE_DEVICE_MARKERS = (
    "dtype",
    "same device",
    "device type",
    "expected scalar type",
    "found at least two devices",
    "BFloat16",
    "Half",
)


@dataclass(frozen=True)
class Fixture:
    """One batch of synthetic log-probs: (policy_chosen, policy_rejected, reference_chosen, reference_rejected)."""

    name: str
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    degenerate_batch: bool = False  # a batch of one or a batch with zero variance

    @property
    def batch_size(self) -> int:
        return self.tensors[0].shape[0]


def _random_batch(generator: torch.Generator, batch_size: int, spread: float) -> tuple[torch.Tensor, ...]:
    """Return reference log-probs in the realistic range and a policy within `spread` nats of them."""
    reference = torch.empty(2, batch_size).uniform_(_LOGP_LOW, _LOGP_HIGH, generator=generator)
    policy = (reference + spread * torch.randn(2, batch_size, generator=generator)).clamp(max=0.0)
    return policy[0], policy[1], reference[0], reference[1]


def build_fixtures(beta: float) -> list[Fixture]:
    """Build the float32 CPU fixtures, with fixed seeds."""
    generator = torch.Generator().manual_seed(0)
    fixtures = [
        Fixture("random batch of 3", _random_batch(generator, 3, spread=5.0)),
        Fixture("random batch of 8", _random_batch(generator, 8, spread=5.0)),
        Fixture("batch of one", _random_batch(generator, 1, spread=5.0), degenerate_batch=True),
    ]

    # policy == reference, the state at training step 0: every margin is 0
    _, _, reference_chosen, reference_rejected = _random_batch(generator, 4, spread=0.0)
    fixtures.append(
        Fixture(
            "policy equals reference (step 0)",
            (reference_chosen.clone(), reference_rejected.clone(), reference_chosen, reference_rejected),
            degenerate_batch=True,
        )
    )

    # margins from the grid; the policy lowers the rejected log-prob for a
    # positive margin and the chosen one for a negative margin, so every
    # log-prob stays <= 0 whatever beta is
    margins = torch.tensor(_SCALED_MARGINS) / beta
    reference_chosen = torch.full_like(margins, -80.0)
    reference_rejected = torch.full_like(margins, -90.0)
    policy_chosen = reference_chosen + margins.clamp(max=0.0)
    policy_rejected = reference_rejected - margins.clamp(min=0.0)
    fixtures.append(Fixture("margin grid", (policy_chosen, policy_rejected, reference_chosen, reference_rejected)))

    # row 1: both completions truncated to zero tokens, so every sum is 0.0
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = _random_batch(generator, 3, spread=5.0)
    for tensor in (policy_chosen, policy_rejected, reference_chosen, reference_rejected):
        tensor[1] = 0.0
    fixtures.append(
        Fixture("fully truncated pair", (policy_chosen, policy_rejected, reference_chosen, reference_rejected))
    )

    # row 0: the reference gives chosen and rejected the same log-prob
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = _random_batch(generator, 3, spread=5.0)
    reference_rejected[0] = reference_chosen[0]
    fixtures.append(Fixture("tied pair", (policy_chosen, policy_rejected, reference_chosen, reference_rejected)))
    return fixtures


def probe_inputs() -> tuple[torch.Tensor, ...]:
    """Return the fixed probe batch, float32, shape (27,) each.

    Rows 0-24 cross five chosen log-ratios with five rejected log-ratios at
    reference log-probs -60 and -70. Rows 25-26 repeat two margins with the
    reference gap reversed, which separates losses that read the reference
    values themselves from losses that read only the log-ratios.
    """
    rows = [(-60.0 + a, -70.0 + b, -60.0, -70.0) for a in _PROBE_LOGRATIOS for b in _PROBE_LOGRATIOS]
    rows += [(-70.0 + 2.0, -60.0 - 2.0, -70.0, -60.0), (-70.0 - 2.0, -60.0 + 2.0, -70.0, -60.0)]
    columns = torch.tensor(rows, dtype=torch.float32).T
    return tuple(column.contiguous() for column in columns)


def _is_dtype_device_error(error: Exception) -> bool:
    text = str(error)
    return isinstance(error, (RuntimeError, TypeError)) and any(marker in text for marker in _DTYPE_DEVICE_MARKERS)


def _candidate_line(error: Exception) -> str:
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == "<candidate>"]
    return f" (candidate line {frames[-1].lineno})" if frames else ""


def _call(candidate: Callable[..., Any], fixture: Fixture, label: str, dtype: torch.dtype, device: str):
    """Run the candidate on one fixture and return its output and the two policy inputs."""
    inputs = [tensor.detach().to(device=device, dtype=dtype).clone() for tensor in fixture.tensors]
    inputs[0].requires_grad_(True)
    inputs[1].requires_grad_(True)
    try:
        output = candidate(*inputs)
    except Exception as error:  # noqa: BLE001 - every candidate fault must become a rejection
        where = _candidate_line(error)
        if _is_dtype_device_error(error):
            raise CandidateRejected(
                f"dtype/device mismatch on {label}: {type(error).__name__}: {error}{where}. Build constants "
                "with dtype=x.dtype, device=x.device of an input x",
                category="dtype_device",
            ) from error
        raise CandidateRejected(
            f"{type(error).__name__} on {label}: {error}{where}", category="exception"
        ) from error
    return output, inputs[0], inputs[1]


def _check_output(output: Any, fixture: Fixture, label: str) -> None:
    """Check type, shape, dtype and finiteness of the per-example losses."""
    batch_size = fixture.batch_size
    if not isinstance(output, torch.Tensor):
        raise CandidateRejected(
            f"returned {type(output).__name__} on {label}, expected a tensor of shape (B,)=({batch_size},)",
            category="type",
        )
    if tuple(output.shape) != (batch_size,):
        hint = "return one loss per example, do not reduce" if output.dim() == 0 else "return a 1-D tensor"
        raise CandidateRejected(
            f"output shape {tuple(output.shape)} != (B,)=({batch_size},) on {label}: {hint}", category="shape"
        )
    if not output.is_floating_point():
        raise CandidateRejected(
            f"output dtype {output.dtype} on {label} is not a floating type; losses must be differentiable",
            category="dtype_device",
        )
    bad_rows = torch.nonzero(~torch.isfinite(output.detach())).flatten().tolist()
    if bad_rows:
        kinds = "NaN" if torch.isnan(output.detach()).any() else "inf"
        if fixture.degenerate_batch:
            reason = (
                f"{kinds} for batch_size=1 / zero-variance batch: rows {bad_rows} on {label} "
                "(a batch statistic such as std is undefined there, and this is the state at step 0)"
            )
        else:
            reason = f"{kinds} in rows {bad_rows} on {label} (zero denominator or log of 0 on degenerate input?)"
        raise CandidateRejected(reason, category="nan")


def _gradient_norms(output: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, label: str) -> tuple[float, float]:
    """Backpropagate the summed loss; return the gradient norms wrt policy chosen and rejected."""
    if not output.requires_grad:
        return 0.0, 0.0
    try:
        output.sum().backward()
    except RuntimeError as error:
        raise CandidateRejected(f"backward failed on {label}: {error}", category="exception") from error
    norms = []
    for name, tensor in (("policy_chosen_logps", chosen), ("policy_rejected_logps", rejected)):
        if tensor.grad is None:
            norms.append(0.0)
            continue
        bad_rows = torch.nonzero(~torch.isfinite(tensor.grad)).flatten().tolist()
        if bad_rows:
            raise CandidateRejected(
                f"non-finite gradient wrt {name} in rows {bad_rows} on {label} although the loss is finite "
                "(sqrt, log or division at 0?)",
                category="nan",
            )
        norms.append(tensor.grad.float().norm().item())
    return norms[0], norms[1]


def _runs() -> list[tuple[torch.dtype, str]]:
    """Return the (dtype, device) combinations to test: CPU always, CUDA when present."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(dtype, device) for device in devices for dtype in (torch.float32, torch.bfloat16)]


def check_candidate(candidate: Callable[..., Any], beta: float) -> dict[str, Any]:
    """Run every fixture in float32 and bfloat16; raise CandidateRejected on the first failure.

    Returns metrics: the behavioural probe (float32 losses on `probe_inputs`),
    the number of fixture runs and the largest gradient norms seen.
    """
    fixtures = build_fixtures(beta)
    max_chosen_grad = max_rejected_grad = 0.0
    runs = 0

    for dtype, device in _runs():
        for fixture in fixtures:
            label = f"fixture '{fixture.name}' ({str(dtype).removeprefix('torch.')}, {device})"
            output, chosen, rejected = _call(candidate, fixture, label, dtype, device)
            _check_output(output, fixture, label)
            chosen_norm, rejected_norm = _gradient_norms(output, chosen, rejected, label)
            max_chosen_grad = max(max_chosen_grad, chosen_norm)
            max_rejected_grad = max(max_rejected_grad, rejected_norm)
            runs += 1

    # a loss whose gradient vanishes everywhere leaves the policy at the reference
    for name, norm in (("policy_chosen_logps", max_chosen_grad), ("policy_rejected_logps", max_rejected_grad)):
        if norm == 0.0:
            raise CandidateRejected(
                f"no learning signal (zero gradient): the gradient wrt {name} is 0 on every fixture; "
                "the loss must depend differentiably on both policy log-probs (no comparisons, rounding "
                "or .detach() on the path)",
                category="zero_gradient",
            )

    probe = Fixture("probe", probe_inputs())
    with torch.no_grad():
        output, _, _ = _call(candidate, probe, "the probe grid", torch.float32, "cpu")
    _check_output(output, probe, "the probe grid")
    return {
        "probe": [float(value) for value in output.detach().float().tolist()],
        "unit_test_runs": runs,
        "max_grad_norm_chosen": max_chosen_grad,
        "max_grad_norm_rejected": max_rejected_grad,
    }
