"""Blend logistic and hinge losses, moving weight to the logistic loss as a raw margin moves away from an adaptive quantile of the batch.

Adaptive Quantile Feedback Loss as the LLM wrote it during the DiscoPOP search (beta = 0.05): the
blend weight reads the margins without beta.
"""

import torch
import torch.nn.functional as F


def aqfl(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    quantile_update_rate = 0.05
    distance_scale = 0.1
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios

    adaptive_quantile = logits.std() * torch.sigmoid(-logits).mean()
    adaptive_quantile = adaptive_quantile + quantile_update_rate * (torch.sigmoid(logits.mean()) - adaptive_quantile)
    blend_logit = distance_scale * (logits - adaptive_quantile).abs()

    logistic_losses = -F.logsigmoid(self.beta * logits)
    hinge_losses = torch.relu(1 - self.beta * logits)
    # 1 - sigmoid(a) written as sigmoid(-a)
    return torch.sigmoid(blend_logit) * logistic_losses + torch.sigmoid(-blend_logit) * hinge_losses
