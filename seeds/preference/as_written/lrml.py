"""Blend logistic and exponential losses with a sigmoid of the raw margin, so the exponential loss takes over for pairs already ranked correctly.

Log Ratio Modulated Loss (DiscoPOP) as the LLM wrote it during the DiscoPOP search, which ran with
beta = 0.05: the blend weight reads the margin without beta, so the loss changes shape with beta.
"""

import torch
import torch.nn.functional as F


def lrml(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios

    # weight sigmoid(logits) on the exponential part, 1 - sigmoid(a) = sigmoid(-a) on the logistic part
    logistic_component = torch.sigmoid(-logits) * -F.logsigmoid(self.beta * logits)
    # sigmoid(logits) * exp(-beta * logits) as one exp, finite even where the exp alone overflows
    exp_component = torch.exp(F.logsigmoid(logits) - self.beta * logits)
    return logistic_component + exp_component
