"""Blend logistic and exponential losses with a sigmoid of the margin, so the exponential loss takes over for pairs already ranked correctly.

Log Ratio Modulated Loss, called DiscoPOP in the DiscoPOP study; the authors' beta-consistent form
with tau = 0.05, which TRL implements as its "discopop" loss.
"""

import torch
import torch.nn.functional as F


def lrml(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    tau = 0.05
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = self.beta * (pi_logratios - ref_logratios)

    # weight sigmoid(logits / tau) on the exponential part, 1 - sigmoid(a) = sigmoid(-a) on the logistic part
    logistic_component = torch.sigmoid(-logits / tau) * -F.logsigmoid(logits)
    # sigmoid(logits / tau) * exp(-logits) as one exp, finite even where exp(-logits) alone overflows
    exp_component = torch.exp(F.logsigmoid(logits / tau) - logits)
    return logistic_component + exp_component
