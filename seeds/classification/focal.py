"""Scale cross-entropy by (1 - p_t)^2, so confidently correct examples contribute little and training focuses on the hard ones.

Focal loss (Lin et al. 2017, arXiv:1708.02002) with gamma = 2 and no class weights.
"""

import torch
import torch.nn.functional as F


def focal(logits, targets):
    gamma = 2.0
    log_probs = F.log_softmax(logits, dim=-1)  # (B, C)
    target_log_prob = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)  # (B,)
    # log(1 - p_t) as the log-sum-exp of the other classes' log-probabilities,
    # which stays finite with a finite gradient when p_t rounds to 1
    others = log_probs.masked_fill(F.one_hot(targets, logits.shape[-1]).bool(), float("-inf"))
    log_one_minus_p = torch.logsumexp(others, dim=-1)  # (B,)
    return -torch.exp(gamma * log_one_minus_p) * target_log_prob
