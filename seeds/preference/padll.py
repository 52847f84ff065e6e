"""Weight the logistic loss by 0.9, and by half that for pairs the policy currently ranks the wrong way round.

Performance Adaptive Decay Logistic Loss, discovered in the DiscoPOP study.
"""

import torch.nn.functional as F


def padll(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    base_decay = 0.9
    mismatch_penalty = 0.5
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios

    mismatches = (logits < 0).to(logits.dtype)
    adaptive_decay = base_decay * (1 - mismatches * mismatch_penalty)
    return adaptive_decay * -F.logsigmoid(self.beta * logits)
