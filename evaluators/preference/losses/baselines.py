"""The four human-designed losses that seed the DiscoPOP search: DPO, SLiC, IPO and paired KTO.

Each function returns per-example losses of shape (B,), and callers take the mean. `rho` is the
log-ratio difference defined in `margin.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evaluators.preference.losses.margin import log_ratio_difference


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO: -log sigmoid(beta * rho) (Rafailov et al. 2023, Eq. 7), TRL's loss_type "sigmoid"."""
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    # logsigmoid stays finite for any rho, while log(1 + exp(-beta * rho)) overflows for large negative rho.
    return -F.logsigmoid(beta * rho)


def slic_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """SLiC: relu(1 - beta * rho), the hinge calibration loss of Zhao et al. 2023 (TRL loss_type "hinge").

    SLiC-HF states the hinge on policy log-probabilities with a margin delta. With the reference terms
    in rho and delta = 1/beta, beta * relu(1/beta - rho) equals this form.
    """
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return torch.relu(1 - beta * rho)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO: (rho - 1/(2*beta))**2 (Azar et al. 2023, Eq. 17, where beta is the paper's tau).

    TRL 1.16's loss_type "ipo" first divides each log-ratio by its completion's token count. Pass
    per-token mean log-probabilities here to get that variant. The DiscoPOP study used sums.
    """
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return (rho - 1 / (2 * beta)) ** 2


def kto_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Paired KTO (Ethayarajh et al. 2024), as the DiscoPOP study ran it.

    With r_w, r_l the chosen and rejected log-ratios log pi - log ref, and batch means
    KL_w = max(0, mean(r_w)), KL_l = max(0, mean(r_l)):

        loss_i = ((1 - sigmoid(beta * (r_w,i - KL_l))) + (1 - sigmoid(beta * (KL_w - r_l,i)))) / 2

    Source: the former TRL DPOTrainer loss_type "kto_pair" (its comment cites Eq. 7 of the HALOs
    report), copied into DiscoPOP's src/alignment/gpo.py `kto_pair_loss` and used as the fourth
    seed in scripts/launch_evo.py. That code returns the two halves concatenated, shape (2B,), and
    the trainer takes the mean. Averaging the halves per pair gives shape (B,) and the same batch
    mean. As there, the KL estimates are not detached, so gradients also flow through the means.
    """
    log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)

    # The KL term for chosen pairs is estimated from the rejected half and vice versa.
    chosen_kl = chosen_logratios.mean().clamp(min=0)
    rejected_kl = rejected_logratios.mean().clamp(min=0)

    # 1 - sigmoid(a) is written as sigmoid(-a), which keeps precision when sigmoid(a) is near 1.
    chosen_losses = torch.sigmoid(-beta * (chosen_logratios - rejected_kl))
    rejected_losses = torch.sigmoid(-beta * (chosen_kl - rejected_logratios))
    return (chosen_losses + rejected_losses) / 2
