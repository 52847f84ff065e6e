"""Average the exponential and logistic losses of the scaled margin, penalising wrongly ranked pairs more steeply than the logistic loss alone.

Combined Exponential + Logistic Loss, discovered in the DiscoPOP study.
"""

import torch
import torch.nn.functional as F


def cell(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    alpha = 0.5
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios

    exp_losses = torch.exp(-self.beta * logits)
    log_losses = -F.logsigmoid(self.beta * logits)
    return alpha * exp_losses + (1 - alpha) * log_losses
