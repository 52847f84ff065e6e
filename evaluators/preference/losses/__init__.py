"""Offline preference-optimization losses: the baselines and discovered losses of the DiscoPOP study.

Every loss takes per-sequence log-probabilities of shape (B,) and `beta`, and returns per-example
losses of shape (B,). Look losses up by name with `get_loss`:

    loss = get_loss("discopop")(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.05)
"""

from evaluators.preference.losses.baselines import dpo_loss, ipo_loss, kto_pair_loss, slic_loss
from evaluators.preference.losses.discovered import (
    TAU,
    aqfl_loss,
    aqfl_loss_as_written,
    aql_loss,
    aql_loss_as_written,
    cell_loss,
    dbaql_loss,
    dbaql_loss_as_written,
    lrml_loss,
    lrml_loss_as_written,
    padll_loss,
    pfl_loss,
    pfl_loss_as_written,
)
from evaluators.preference.losses.margin import log_ratio_difference
from evaluators.preference.losses.registry import (
    LOSSES,
    LossForm,
    LossFunction,
    LossSpec,
    LossVariant,
    UnknownLossError,
    get_loss,
    get_loss_spec,
    list_losses,
)

__all__ = [
    "LOSSES",
    "TAU",
    "LossForm",
    "LossFunction",
    "LossSpec",
    "LossVariant",
    "UnknownLossError",
    "aqfl_loss",
    "aqfl_loss_as_written",
    "aql_loss",
    "aql_loss_as_written",
    "cell_loss",
    "dbaql_loss",
    "dbaql_loss_as_written",
    "dpo_loss",
    "get_loss",
    "get_loss_spec",
    "ipo_loss",
    "kto_pair_loss",
    "list_losses",
    "log_ratio_difference",
    "lrml_loss",
    "lrml_loss_as_written",
    "padll_loss",
    "pfl_loss",
    "pfl_loss_as_written",
    "slic_loss",
]
