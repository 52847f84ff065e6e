"""Apply a hinge to the scaled log-ratio difference, so pairs ranked correctly by a margin of one add no loss.

SLiC-HF calibration loss (Zhao et al. 2023) with the reference model, TRL's "hinge" loss.
"""

import torch


def slic(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    losses = torch.relu(1 - self.beta * logits)
    return losses
