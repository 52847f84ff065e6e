"""Blend logistic and hinge losses per pair, giving the logistic loss more weight where the margin lies below a slowly adapting quantile.

Adaptive Quantile Loss, discovered in the DiscoPOP study; the authors' beta-consistent form.
"""

import torch
import torch.nn.functional as F


def aql(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    percentile = 0.5
    moving_quantile_weight = 0.01
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = self.beta * (pi_logratios - ref_logratios)

    scaled = logits / 0.05
    moving_quantile = percentile + moving_quantile_weight * (torch.sigmoid(scaled.mean()) - percentile)
    weight_logit = -(scaled - moving_quantile)

    logistic_losses = -F.logsigmoid(logits)
    hinge_losses = torch.relu(1 - logits)
    # 1 - sigmoid(a) written as sigmoid(-a)
    return torch.sigmoid(weight_logit) * logistic_losses + torch.sigmoid(-weight_logit) * hinge_losses
