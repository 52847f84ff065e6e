"""Blend a tempered logistic loss with an exponential loss, giving the logistic part more weight as the spread of margins in the batch grows.

Dynamic Blended Adaptive Quantile Loss, discovered in the DiscoPOP study; beta-consistent form of
the authors' code (margins divided by 0.05 inside the blend weight).
"""

import torch
import torch.nn.functional as F


def dbaql(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    temperature = 0.9
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = self.beta * (pi_logratios - ref_logratios)

    # blend weight sigmoid(v) for the logistic part, so sigmoid(-v) for the exponential part
    variability = (logits / 0.05).var()
    logistic_loss = -F.logsigmoid(logits / temperature)

    # sigmoid(-v) * exp(-logits * temperature) as one exp, finite even where exp alone overflows
    weighted_exp_loss = torch.exp(F.logsigmoid(-variability) - logits * temperature)
    return torch.sigmoid(variability) * logistic_loss + weighted_exp_loss
