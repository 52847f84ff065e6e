"""Blend a tempered logistic loss with an exponential loss, giving the logistic part more weight as the spread of raw margins in the batch grows.

Dynamic Blended Adaptive Quantile Loss as the LLM wrote it during the DiscoPOP search (beta = 0.05).
The LLM's code also computes an adaptive quantile that nothing reads, which is left out here.
"""

import torch
import torch.nn.functional as F


def dbaql(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    temperature = 0.9
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios

    # blend weight sigmoid(v) for the logistic part, so sigmoid(-v) for the exponential part
    variability = logits.var()
    logistic_loss = -F.logsigmoid(self.beta * logits / temperature)

    # sigmoid(-v) * exp(-beta * logits * temperature) as one exp, finite even where the exp alone overflows
    weighted_exp_loss = torch.exp(F.logsigmoid(-variability) - self.beta * logits * temperature)
    return torch.sigmoid(variability) * logistic_loss + weighted_exp_loss
