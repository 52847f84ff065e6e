"""Halve the logistic loss of the raw margin on pairs the policy already ranks correctly and double a hinge loss on the others.

Policy Focused Loss as the LLM wrote it during the DiscoPOP search: it never reads beta. "Correct"
compares the policy's own log-probabilities, without the reference model.
"""

import torch
import torch.nn.functional as F


def pfl(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    focus_scale = 2.0
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios

    is_correct = policy_chosen_logps > policy_rejected_logps
    logistic_losses = -F.logsigmoid(logits)
    hinge_losses = torch.relu(1 - logits)
    return torch.where(is_correct, logistic_losses / focus_scale, hinge_losses * focus_scale)
