"""Blend logistic and hinge losses, moving weight to the logistic loss as a margin moves away from an adaptive quantile of the batch.

Adaptive Quantile Feedback Loss, discovered in the DiscoPOP study; beta-consistent form of the
authors' code (margins divided by 0.05 inside the blend weight).
"""

import torch
import torch.nn.functional as F


def aqfl(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    quantile_update_rate = 0.05
    distance_scale = 0.1
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = self.beta * (pi_logratios - ref_logratios)

    scaled = logits / 0.05
    adaptive_quantile = scaled.std() * torch.sigmoid(-scaled).mean()
    adaptive_quantile = adaptive_quantile + quantile_update_rate * (torch.sigmoid(scaled.mean()) - adaptive_quantile)
    blend_logit = distance_scale * (scaled - adaptive_quantile).abs()

    logistic_losses = -F.logsigmoid(logits)
    hinge_losses = torch.relu(1 - logits)
    # 1 - sigmoid(a) written as sigmoid(-a)
    return torch.sigmoid(blend_logit) * logistic_losses + torch.sigmoid(-blend_logit) * hinge_losses
