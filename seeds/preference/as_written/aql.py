"""Blend logistic and hinge losses per pair, giving the logistic loss more weight where the margin lies below a slowly adapting quantile.

Adaptive Quantile Loss as the LLM wrote it during the DiscoPOP search (beta = 0.05): the quantile
weight is sigmoid(-beta * (margin - quantile)), much flatter in the margin than the authors' rewrite.
"""

import torch
import torch.nn.functional as F


def aql(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    percentile = 0.5
    moving_quantile_weight = 0.01
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios

    moving_quantile = percentile + moving_quantile_weight * (torch.sigmoid(logits.mean()) - percentile)
    weight_logit = -self.beta * (logits - moving_quantile)

    logistic_losses = -F.logsigmoid(self.beta * logits)
    hinge_losses = torch.relu(1 - self.beta * logits)
    # 1 - sigmoid(a) written as sigmoid(-a)
    return torch.sigmoid(weight_logit) * logistic_losses + torch.sigmoid(-weight_logit) * hinge_losses
