"""Value each completion against a batch estimate of the policy's KL divergence from the reference, the reference point of prospect theory.

Paired KTO (Ethayarajh et al. 2024) as the DiscoPOP study ran it. That code returns the chosen and
rejected halves concatenated; this returns their average per pair, which has the same batch mean.
"""

import torch


def kto_pair(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps

    # The KL term for the chosen half is estimated from the rejected half and vice versa.
    chosen_kl = chosen_logratios.mean().clamp(min=0)
    rejected_kl = rejected_logratios.mean().clamp(min=0)

    # 1 - sigmoid(a) written as sigmoid(-a)
    chosen_losses = torch.sigmoid(-self.beta * (chosen_logratios - rejected_kl))
    rejected_losses = torch.sigmoid(-self.beta * (chosen_kl - rejected_logratios))
    return (chosen_losses + rejected_losses) / 2
