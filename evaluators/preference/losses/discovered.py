"""The seven losses found by the LLM-driven search of the DiscoPOP study (Lu et al. 2024, arXiv:2406.08414).

Every formula here follows the authors' code: github.com/luchris429/DiscoPOP, file
src/alignment/gpo.py at commit 7c30efa5e7456cfdba37af1da051bcfdf1830a07, method named in each
docstring. Where that file gives two versions of a loss, this module has two functions:

- `<name>_loss_as_written`: the `<method>_old` version, the code as the LLM wrote it. The search
  ran it with beta = 0.05.
- `<name>_loss`: the version without the suffix, which the authors' beta sweeps (IMDb) ran. It
  computes x = beta * rho and uses x / TAU wherever the LLM's code used rho itself, so the loss is
  one fixed function of x for every beta. At beta = TAU both versions return the same values,
  except for AQL and PFL (see the NOTEs there).

NOTE: these formulas are checked against the authors' code only, not against the study's
appendix, so no appendix equation numbers are cited.

The functions return the source's values with algebra that avoids overflow and 0 * inf:
-log sigmoid(a) is computed by F.logsigmoid, 1 - sigmoid(a) as sigmoid(-a), and a weight
sigmoid(a) times exp(b) as exp(logsigmoid(a) + b), which stays finite whenever the product is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evaluators.preference.losses.margin import log_ratio_difference

# The beta of the search. The beta-consistent forms divide beta * rho by it where the LLM's code used rho.
TAU = 0.05


def _logistic(x: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(x)


def _hinge(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(1 - x)


def _sigmoid_times_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return sigmoid(a) * exp(b) without forming exp(b) alone, which may overflow."""
    return torch.exp(F.logsigmoid(a) + b)


# DBAQL: Dynamic Blended Adaptive Quantile Loss.
# NOTE: torch's var() is unbiased, so a batch of one example gives NaN, as in the source.

_DBAQL_TEMPERATURE = 0.9


def dbaql_loss_as_written(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DBAQL as the LLM wrote it (gpo.py `dynamic_blended_adaptive_quantile_loss_old`)."""
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    # The source also computes an adaptive quantile that nothing uses, so it is left out here.
    # Its blend weight is sigmoid(var(rho)) * 1.0, so the exponential term's weight is sigmoid(-var(rho)).
    variance = rho.var()
    logistic_part = torch.sigmoid(variance) * _logistic(beta * rho / _DBAQL_TEMPERATURE)
    exp_part = _sigmoid_times_exp(-variance, -beta * rho * _DBAQL_TEMPERATURE)
    return logistic_part + exp_part


def dbaql_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DBAQL, beta-consistent (gpo.py `dynamic_blended_adaptive_quantile_loss`)."""
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    x = beta * rho
    variance = (x / TAU).var()
    logistic_part = torch.sigmoid(variance) * _logistic(x / _DBAQL_TEMPERATURE)
    exp_part = _sigmoid_times_exp(-variance, -x * _DBAQL_TEMPERATURE)
    return logistic_part + exp_part


# AQL: Adaptive Quantile Loss. The quantile is a batch statistic and is not detached, as in the source.


def _moving_quantile(values: torch.Tensor) -> torch.Tensor:
    # percentile 0.5 nudged by weight 0.01 towards sigmoid of the batch mean
    return 0.5 + 0.01 * (torch.sigmoid(values.mean()) - 0.5)


def aql_loss_as_written(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """AQL as the LLM wrote it (gpo.py `adaptive_quantile_loss_old`)."""
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    weight_logit = -beta * (rho - _moving_quantile(rho))
    x = beta * rho
    return torch.sigmoid(weight_logit) * _logistic(x) + torch.sigmoid(-weight_logit) * _hinge(x)


def aql_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """AQL, beta-consistent (gpo.py `adaptive_quantile_loss`).

    NOTE: unlike the other pairs, this does not reduce to `aql_loss_as_written` at beta = TAU. Its
    quantile weight is sigmoid(-(x/TAU - q)), while the LLM's is sigmoid(-beta * (rho - q)), which at
    beta = 0.05 is 20 times flatter in rho. This follows the authors' code, not the x/TAU rule.
    """
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    x = beta * rho
    weight_logit = -(x / TAU - _moving_quantile(x / TAU))
    return torch.sigmoid(weight_logit) * _logistic(x) + torch.sigmoid(-weight_logit) * _hinge(x)


def padll_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """PADLL, Performance Adaptive Decay Logistic Loss (gpo.py `performance_adaptive_decay_logistic_loss`).

    The source has one version: rho enters only through beta * rho and the sign of rho, which
    beta > 0 does not change, so it is already beta-consistent.
    """
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    # base decay 0.9, halved (mismatch penalty 0.5) where the policy ranks the pair wrongly
    mismatches = (rho < 0).to(rho.dtype)
    decay = 0.9 * (1 - 0.5 * mismatches)
    return decay * _logistic(beta * rho)


# AQFL: Adaptive Quantile Feedback Loss.
# NOTE: torch's std() is unbiased, so a batch of one example gives NaN, as in the source.


def _aqfl_blend(values: torch.Tensor) -> torch.Tensor:
    """Return the logit of the logistic part's weight, computed from rho (as written) or x/TAU."""
    quantile = values.std() * torch.sigmoid(-values).mean()
    quantile = quantile + 0.05 * (torch.sigmoid(values.mean()) - quantile)
    distance = (values - quantile).abs()
    return 0.1 * distance


def aqfl_loss_as_written(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """AQFL as the LLM wrote it (gpo.py `adaptive_quantile_feedback_loss_old`)."""
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    blend_logit = _aqfl_blend(rho)
    x = beta * rho
    return torch.sigmoid(blend_logit) * _logistic(x) + torch.sigmoid(-blend_logit) * _hinge(x)


def aqfl_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """AQFL, beta-consistent (gpo.py `adaptive_quantile_feedback_loss`)."""
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    x = beta * rho
    blend_logit = _aqfl_blend(x / TAU)
    return torch.sigmoid(blend_logit) * _logistic(x) + torch.sigmoid(-blend_logit) * _hinge(x)


def cell_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """CELL, Combined Exponential + Logistic Loss (gpo.py `combined_exp_logistic_loss`), which has one version.

    The exponential term has no weight that could cancel it, so for beta * rho below about -88.7 the
    loss exceeds the float32 and bfloat16 range and is inf, which is the true value rounded.
    """
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    x = beta * rho
    mixing = 0.5
    return mixing * torch.exp(-x) + (1 - mixing) * _logistic(x)


# LRML: Log Ratio Modulated Loss, which the study calls DiscoPOP.


def lrml_loss_as_written(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """LRML as the LLM wrote it, with sigmoid(rho) as blend weight (gpo.py `log_ratio_modulated_loss_old`)."""
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    x = beta * rho
    return torch.sigmoid(-rho) * _logistic(x) + _sigmoid_times_exp(rho, -x)


def lrml_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    tau: float = TAU,
) -> torch.Tensor:
    """LRML (DiscoPOP), beta-consistent (gpo.py `log_ratio_modulated_loss`, TRL 1.16 loss_type "discopop").

    tau is TRL's `discopop_tau`, which the study fixes at 0.05.
    """
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    x = beta * rho
    # TRL multiplies sigmoid(x/tau) by exp(-x), which gives 0 * inf = NaN for x below about -88.7 in
    # float32. The exponential part here tends to 0 there, as the formula does.
    return torch.sigmoid(-x / tau) * _logistic(x) + _sigmoid_times_exp(x / tau, -x)


# PFL: Policy Focused Loss. "Correct" compares the policy's log-probabilities only, without the
# reference model, as gpo.py does. The plotting script of the same repository uses rho > 0 instead.

_PFL_FOCUS_SCALE = 2.0


def _pfl(values: torch.Tensor, is_correct: torch.Tensor) -> torch.Tensor:
    # de-emphasise pairs the policy already ranks correctly, emphasise the others
    return torch.where(is_correct, _logistic(values) / _PFL_FOCUS_SCALE, _hinge(values) * _PFL_FOCUS_SCALE)


def pfl_loss_as_written(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """PFL as the LLM wrote it, which never reads beta (gpo.py `policy_focused_loss_old`)."""
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return _pfl(rho, policy_chosen_logps > policy_rejected_logps)


def pfl_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """PFL, beta-adjusted (gpo.py `policy_focused_loss`).

    NOTE: this uses x = beta * rho where the LLM's code used rho, not x/TAU, so it does not reduce
    to `pfl_loss_as_written` at beta = TAU (the two agree only at beta = 1). This follows the
    authors' code, not the x/TAU rule.
    """
    rho = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return _pfl(beta * rho, policy_chosen_logps > policy_rejected_logps)
