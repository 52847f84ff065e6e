"""The registry of preference losses: names, aliases, formulas, sources and forms."""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Protocol

import torch

from evaluators.preference.losses import baselines, discovered

_DISCOPOP_CODE = "github.com/luchris429/DiscoPOP src/alignment/gpo.py (commit 7c30efa)"
_DISCOPOP_STUDY = (
    "Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large Language Models "
    "(arXiv:2406.08414)"
)


class LossForm(enum.Enum):
    """Which version of a loss to use where its source gives two."""

    # The code as the LLM wrote it during the search, which ran with beta = 0.05.
    AS_WRITTEN = "as_written"
    # The authors' rewrite that keeps the loss one fixed function of beta * rho for every beta.
    BETA_CONSISTENT = "beta_consistent"


class LossFunction(Protocol):
    """A preference loss: per-sequence log-probabilities of shape (B,) in, per-example losses (B,) out."""

    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        beta: float,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class LossVariant:
    """One form of a loss: the function and its formula in terms of rho and beta."""

    function: LossFunction
    formula: str


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    Attributes:
        name: canonical lower-case name, also the seed program's name.
        title: the loss's name in its source.
        citation: where the formula comes from.
        forms: the variant for each LossForm. A loss whose source gives one version maps both
            forms to that version, because that version already depends on the log-ratios only
            through beta times them (IPO up to the factor 1/beta**2).
        aliases: other names that `get_loss` accepts, such as TRL's loss_type.
    """

    name: str
    title: str
    citation: str
    forms: Mapping[LossForm, LossVariant]
    aliases: tuple[str, ...] = ()

    @property
    def has_two_forms(self) -> bool:
        return self.forms[LossForm.AS_WRITTEN] is not self.forms[LossForm.BETA_CONSISTENT]

    @property
    def formula(self) -> str:
        """The formula of the beta-consistent form, the default of `get_loss`."""
        return self.forms[LossForm.BETA_CONSISTENT].formula


class UnknownLossError(ValueError):
    """Raised for a loss name that matches no registered name or alias."""


def _spec(
    name: str,
    title: str,
    citation: str,
    as_written: LossVariant,
    beta_consistent: LossVariant | None = None,
    aliases: tuple[str, ...] = (),
) -> LossSpec:
    forms = {LossForm.AS_WRITTEN: as_written, LossForm.BETA_CONSISTENT: beta_consistent or as_written}
    return LossSpec(name, title, citation, MappingProxyType(forms), aliases)


def _discovered_citation(method: str) -> str:
    return f"{_DISCOPOP_STUDY}; code: {_DISCOPOP_CODE}, {method}"


_SPECS = (
    _spec(
        "dpo",
        "Direct Preference Optimization",
        "Rafailov et al. 2023, Direct Preference Optimization, Eq. 7; TRL 1.16 loss_type 'sigmoid'",
        LossVariant(baselines.dpo_loss, "-log sigmoid(beta*rho)"),
        aliases=("sigmoid",),
    ),
    _spec(
        "slic",
        "Sequence Likelihood Calibration (hinge)",
        "Zhao et al. 2023, SLiC-HF, hinge calibration loss with margin 1/beta; TRL 1.16 loss_type 'hinge'",
        LossVariant(baselines.slic_loss, "relu(1 - beta*rho)"),
        aliases=("hinge",),
    ),
    _spec(
        "ipo",
        "Identity Preference Optimization",
        "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences, Eq. 17 "
        "(beta is the paper's tau); TRL 1.16 loss_type 'ipo' divides log-ratios by token counts first",
        LossVariant(baselines.ipo_loss, "(rho - 1/(2*beta))**2"),
    ),
    _spec(
        "kto_pair",
        "Kahneman-Tversky Optimization, paired",
        "Ethayarajh et al. 2024, KTO; paired form of the former TRL loss_type 'kto_pair' as copied in "
        f"{_DISCOPOP_CODE}, kto_pair_loss, halves averaged per pair",
        LossVariant(
            baselines.kto_pair_loss,
            "(sigmoid(-beta*(r_w - KL_l)) + sigmoid(-beta*(KL_w - r_l))) / 2, where r = log pi - log ref per "
            "completion, KL_w = max(0, batch mean of r_w), KL_l = max(0, batch mean of r_l)",
        ),
    ),
    _spec(
        "dbaql",
        "Dynamic Blended Adaptive Quantile Loss",
        _discovered_citation("dynamic_blended_adaptive_quantile_loss[_old]"),
        LossVariant(
            discovered.dbaql_loss_as_written,
            "c*(-log sigmoid(beta*rho/0.9)) + (1 - c)*exp(-0.9*beta*rho), c = sigmoid(batch var of rho)",
        ),
        LossVariant(
            discovered.dbaql_loss,
            "c*(-log sigmoid(x/0.9)) + (1 - c)*exp(-0.9*x), c = sigmoid(batch var of x/0.05), x = beta*rho",
        ),
        aliases=("dynamic_blended_adaptive_quantile_loss",),
    ),
    _spec(
        "aql",
        "Adaptive Quantile Loss",
        _discovered_citation("adaptive_quantile_loss[_old]"),
        LossVariant(
            discovered.aql_loss_as_written,
            "w*(-log sigmoid(beta*rho)) + (1 - w)*relu(1 - beta*rho), w = sigmoid(-beta*(rho - q)), "
            "q = 0.5 + 0.01*(sigmoid(batch mean of rho) - 0.5)",
        ),
        LossVariant(
            discovered.aql_loss,
            "w*(-log sigmoid(x)) + (1 - w)*relu(1 - x), w = sigmoid(-(x/0.05 - q)), "
            "q = 0.5 + 0.01*(sigmoid(batch mean of x/0.05) - 0.5), x = beta*rho",
        ),
        aliases=("adaptive_quantile_loss",),
    ),
    _spec(
        "padll",
        "Performance Adaptive Decay Logistic Loss",
        _discovered_citation("performance_adaptive_decay_logistic_loss"),
        LossVariant(discovered.padll_loss, "0.9*(1 - 0.5*[rho < 0])*(-log sigmoid(beta*rho))"),
        aliases=("performance_adaptive_decay_logistic_loss",),
    ),
    _spec(
        "aqfl",
        "Adaptive Quantile Feedback Loss",
        _discovered_citation("adaptive_quantile_feedback_loss[_old]"),
        LossVariant(
            discovered.aqfl_loss_as_written,
            "b*(-log sigmoid(beta*rho)) + (1 - b)*relu(1 - beta*rho), b = sigmoid(0.1*|rho - q|), "
            "q = q0 + 0.05*(sigmoid(batch mean of rho) - q0), q0 = (batch std of rho)*(batch mean of sigmoid(-rho))",
        ),
        LossVariant(
            discovered.aqfl_loss,
            "b*(-log sigmoid(x)) + (1 - b)*relu(1 - x), b = sigmoid(0.1*|z - q|), "
            "q = q0 + 0.05*(sigmoid(batch mean of z) - q0), q0 = (batch std of z)*(batch mean of sigmoid(-z)), "
            "x = beta*rho, z = x/0.05",
        ),
        aliases=("adaptive_quantile_feedback_loss",),
    ),
    _spec(
        "cell",
        "Combined Exponential + Logistic Loss",
        _discovered_citation("combined_exp_logistic_loss"),
        LossVariant(discovered.cell_loss, "0.5*exp(-beta*rho) + 0.5*(-log sigmoid(beta*rho))"),
        aliases=("combined_exp_logistic_loss",),
    ),
    _spec(
        "lrml",
        "Log Ratio Modulated Loss (DiscoPOP)",
        _discovered_citation("log_ratio_modulated_loss[_old]") + "; TRL 1.16 loss_type 'discopop'",
        LossVariant(
            discovered.lrml_loss_as_written,
            "(1 - sigmoid(rho))*(-log sigmoid(beta*rho)) + sigmoid(rho)*exp(-beta*rho)",
        ),
        LossVariant(
            discovered.lrml_loss,
            "(1 - sigmoid(x/tau))*(-log sigmoid(x)) + sigmoid(x/tau)*exp(-x), x = beta*rho, tau = 0.05",
        ),
        aliases=("discopop", "log_ratio_modulated_loss"),
    ),
    _spec(
        "pfl",
        "Policy Focused Loss",
        _discovered_citation("policy_focused_loss[_old]"),
        LossVariant(
            discovered.pfl_loss_as_written,
            "-log sigmoid(rho)/2 where log pi(y_w) > log pi(y_l), else 2*relu(1 - rho)",
        ),
        LossVariant(
            discovered.pfl_loss,
            "-log sigmoid(x)/2 where log pi(y_w) > log pi(y_l), else 2*relu(1 - x), x = beta*rho",
        ),
        aliases=("policy_focused_loss",),
    ),
)

LOSSES: Mapping[str, LossSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def _build_lookup(specs: Mapping[str, LossSpec]) -> dict[str, str]:
    """Map every name and alias to its canonical name, rejecting an alias that two losses share."""
    lookup: dict[str, str] = {}
    for spec in specs.values():
        for key in (spec.name, *spec.aliases):
            if key in lookup:
                raise ValueError(f"loss name or alias {key!r} is used by both {lookup[key]!r} and {spec.name!r}")
            lookup[key] = spec.name
    return lookup


_LOOKUP = _build_lookup(LOSSES)


def list_losses() -> list[str]:
    """Return the canonical loss names, sorted."""
    return sorted(LOSSES)


def get_loss_spec(name: str) -> LossSpec:
    """Return the spec registered under `name` or an alias; case, spaces and hyphens do not matter."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in _LOOKUP:
        return LOSSES[_LOOKUP[key]]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    aliases = sorted(set(_LOOKUP) - set(LOSSES))
    raise UnknownLossError(
        f"unknown loss {name!r}.{hint} Known losses: {', '.join(list_losses())}; aliases: {', '.join(aliases)}."
    )


def get_loss(name: str, form: LossForm | str = LossForm.BETA_CONSISTENT) -> LossFunction:
    """Return the loss function registered under `name`, in the given form.

    Raises:
        UnknownLossError: for an unknown name.
        ValueError: for an unknown form.
    """
    spec = get_loss_spec(name)
    if not isinstance(form, LossForm):
        try:
            form = LossForm(form)
        except ValueError:
            known = ", ".join(repr(member.value) for member in LossForm)
            raise ValueError(f"unknown loss form {form!r}. Expected one of {known}.") from None
    return spec.forms[form].function
