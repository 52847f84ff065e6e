"""Regress the log-ratio difference onto the fixed target 1/(2*beta) with a squared error, so the margin cannot grow without bound.

Identity Preference Optimization (Azar et al. 2023, Eq. 17), on log-probabilities summed over tokens.
"""


def ipo(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    losses = (logits - 1 / (2 * self.beta)) ** 2
    return losses
