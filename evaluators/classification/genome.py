"""The genome of a classification loss: its genes, the ladder of values each gene takes, and its JSON form.

`evaluators.classification.grammar` explains the loss a genome stands for and renders it as code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

GENOME_VERSION = 1
PARAMS = ("logits", "targets")

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
MARGINS = (0.0, 0.25, 0.5, 1.0, 2.0)
MIX_WEIGHTS = (0.1, 0.25, 0.5, 0.75, 0.9)
SMOOTHINGS = (0.0, 0.05, 0.1, 0.2)
FOCAL_GAMMAS = (0.0, 0.5, 1.0, 2.0)
POLY_EPSILONS = (0.0, 0.5, 1.0, 2.0)
CONFIDENCE_PENALTIES = (0.0, 0.05, 0.1, 0.2)
GCE_Q = 0.7  # the q of generalized cross-entropy that Zhang & Sabuncu (2018) recommend

# the ladder each numeric gene moves on
LADDERS: dict[str, tuple[float, ...]] = {
    "temperature": TEMPERATURES,
    "margin": MARGINS,
    "mix_weight": MIX_WEIGHTS,
    "smoothing": SMOOTHINGS,
    "focal_gamma": FOCAL_GAMMAS,
    "poly_epsilon": POLY_EPSILONS,
    "confidence_penalty": CONFIDENCE_PENALTIES,
}

# genes grouped by role; crossover takes each group whole from one parent
SHAPE_GENES = ("primary", "secondary", "mix_weight")
LOGIT_GENES = ("temperature", "margin")
REGULARIZER_GENES = ("smoothing", "focal_gamma", "poly_epsilon", "confidence_penalty")
GENE_GROUPS = (SHAPE_GENES, LOGIT_GENES, REGULARIZER_GENES)


class Shape(str, Enum):
    """A base loss of the softmax probabilities p and the one-hot target y."""

    CROSS_ENTROPY = "cross_entropy"  # -log p_t
    BRIER = "brier"  # sum_k (p_k - y_k)^2, the Brier score (Brier 1950)
    MAE = "mae"  # 1 - p_t, half the L1 distance of p and y, robust to label noise (Ghosh et al. 2017)
    GCE = "gce"  # (1 - p_t^q) / q, generalized cross-entropy (Zhang & Sabuncu 2018, arXiv:1805.07836)
    HINGE = "hinge"  # relu(1 - (z_t - max_{k != t} z_k)), multi-class hinge (Crammer & Singer 2001)


@dataclass(frozen=True)
class ClassificationGenome:
    """One loss in the grammar; `evaluators.classification.grammar` states the formula.

    Attributes:
        primary: the first base shape f1.
        secondary: the shape f2 blended in with weight `mix_weight`, or None.
        mix_weight: weight w of f2.
        temperature: T dividing the logits before the softmax.
        margin: m subtracted from the true class's logit, so an example keeps
            contributing until it is won by this much (additive-margin
            softmax, Wang et al. 2018, arXiv:1801.05599).
        smoothing: eps of label smoothing (Szegedy et al. 2016, arXiv:1512.00567).
        focal_gamma: gamma of the focal factor (1 - p_t)^gamma (Lin et al.
            2017, arXiv:1708.02002), which down-weights examples already won.
        poly_epsilon: weight of the extra (1 - p_t) term of Poly-1 (Leng et
            al. 2022, arXiv:2204.12511).
        confidence_penalty: weight of the negative entropy of p (Pereyra et
            al. 2017, arXiv:1701.06548), which discourages overconfidence.
    """

    primary: Shape = Shape.CROSS_ENTROPY
    secondary: Shape | None = None
    mix_weight: float = 0.5
    temperature: float = 1.0
    margin: float = 0.0
    smoothing: float = 0.0
    focal_gamma: float = 0.0
    poly_epsilon: float = 0.0
    confidence_penalty: float = 0.0

    def normalized(self) -> ClassificationGenome:
        """Return the genome with genes that have no effect reset to their defaults."""
        genome = self
        if genome.secondary is None or genome.secondary == genome.primary:
            genome = dataclasses.replace(genome, secondary=None, mix_weight=ClassificationGenome.mix_weight)
        return genome

    def shapes(self) -> tuple[Shape, ...]:
        return (self.primary,) if self.secondary is None else (self.primary, self.secondary)

    def to_json(self) -> str:
        payload: dict[str, Any] = {"version": GENOME_VERSION}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            payload[field.name] = value.value if isinstance(value, Enum) else value
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ClassificationGenome:
        """Build a genome from `to_json` output; raise ValueError naming the bad field."""
        payload = json.loads(text)
        if not isinstance(payload, dict) or payload.get("version") != GENOME_VERSION:
            raise ValueError(f"genome JSON {text[:80]!r} is not version {GENOME_VERSION}")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in payload:
                raise ValueError(f"genome JSON is missing the field {field.name!r}")
            raw = payload[field.name]
            if field.name == "primary":
                values[field.name] = Shape(raw)
            elif field.name == "secondary":
                values[field.name] = None if raw is None else Shape(raw)
            else:
                if not isinstance(raw, (int, float)) or isinstance(raw, bool):
                    raise ValueError(f"genome field {field.name!r} is {raw!r}; expected a number")
                values[field.name] = snap(field.name, float(raw))
        return cls(**values).normalized()


def snap(gene: str, value: float) -> float:
    """Return the rung of `gene`'s ladder nearest to `value`."""
    return min(LADDERS[gene], key=lambda rung: (abs(rung - value), rung))
