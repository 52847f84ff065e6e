"""Treat each preference pair as a binary classification and minimise the logistic loss of the scaled log-ratio difference.

Direct Preference Optimization (Rafailov et al. 2023, Eq. 7), the first seed of the DiscoPOP search.
"""

import torch.nn.functional as F


def dpo(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    losses = -F.logsigmoid(self.beta * logits)
    return losses
