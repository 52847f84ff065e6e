"""Input checks and the log-ratio difference rho that every loss here is a function of."""

from __future__ import annotations

import torch


def log_ratio_difference(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Check the inputs and return rho, shape (B,).

    rho = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)), where each
    log-probability is summed over the completion's tokens.

    Raises:
        ValueError: if the four tensors are not 1-D tensors of one shape, or beta is not positive.
    """
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
    }
    shapes = {name: tuple(tensor.shape) for name, tensor in named.items()}
    if len(set(shapes.values())) != 1 or len(policy_chosen_logps.shape) != 1:
        raise ValueError(
            f"expected four 1-D tensors of per-sequence log-probabilities with one shape (B,), got shapes {shapes}. "
            "Sum token log-probabilities over each completion before calling the loss."
        )
    if not beta > 0:
        raise ValueError(f"invalid beta {beta!r}: beta must be positive")
    return (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
