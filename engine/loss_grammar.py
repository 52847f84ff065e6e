"""The genome of a preference-optimization loss and the code, name and summary written from it.

A genome picks one or two loss shapes f(z) of the logits z and how they are
mixed, then adds weights and offsets around them. With
rho = (pi_c - ref_c) - (pi_r - ref_r), the rendered loss is

    logits = scale * beta * (w_c * (pi_c - ref_c) - w_r * (pi_r - ref_r)
                             - anchor * relu(ref_c - pi_c)) - margin
    losses = (1 - m) * f1(logits) + m * f2(logits)
    losses = (1 - eps) * losses + eps * f1(-logits)
    losses = losses * sigmoid(-logits) ** gamma

where m is 0 (no mixing), a constant, or sigmoid(logits / tau). With
f1 = logistic, f2 = exponential and m = sigmoid(logits / 0.05) this is
DiscoPOP's log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414).

Each continuous gene takes values from a short ladder, so mutations move one
rung at a time and names stay readable. The rendered code starts with a
`# genome: {...}` comment holding the genome as JSON, which is how the
offline proposer recovers a parent from the code stored in the archive.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from engine.canonical_ast import normalize_tree

GENOME_VERSION = 1
PARAMS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
MARGINS = (0.0, 0.1, 0.25, 0.5, 1.0)
TAUS = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
MIX_WEIGHTS = (0.1, 0.25, 0.5, 0.75, 0.9)
SIDE_WEIGHTS = (0.5, 0.75, 1.0, 1.25, 1.5)
FOCAL_GAMMAS = (0.0, 0.5, 1.0, 2.0)
SMOOTHINGS = (0.0, 0.05, 0.1, 0.2)
ANCHORS = (0.0, 1.0, 5.0, 20.0, 50.0)

# the ladder each numeric gene moves on
LADDERS: dict[str, tuple[float, ...]] = {
    "scale": SCALES,
    "margin": MARGINS,
    "tau": TAUS,
    "mix_weight": MIX_WEIGHTS,
    "chosen_weight": SIDE_WEIGHTS,
    "rejected_weight": SIDE_WEIGHTS,
    "focal_gamma": FOCAL_GAMMAS,
    "smoothing": SMOOTHINGS,
    "anchor": ANCHORS,
}

# exp(-logits) overflows float32 near logits = -88; the clamp keeps the loss
# finite while leaving every logit above -20 untouched
_EXP_CLAMP = 20.0
_MAX_NAME = 64
_GENOME_LINE = re.compile(r"^[ \t]*#[ \t]*genome:[ \t]*(\{.*\})[ \t]*$", re.MULTILINE)


class Shape(str, Enum):
    """A loss as a function of the logits z; every shape falls as z grows."""

    LOGISTIC = "logistic"  # -log sigmoid(z): DPO (Rafailov et al. 2023, arXiv:2305.18290)
    HINGE = "hinge"  # relu(1 - z): SLiC's hinge, TRL loss_type "hinge"
    SMOOTH_HINGE = "smooth_hinge"  # softplus(4 (1 - z)) / 4, a hinge with a rounded knee
    EXPONENTIAL = "exponential"  # exp(-z), the exponential loss used by DiscoPOP
    SQUARED = "squared"  # (z - 1/2)^2: IPO's (rho - 1/(2 beta))^2 times beta^2 (Azar et al. 2023)
    SIGMOID = "sigmoid"  # sigmoid(-z), bounded so outlier pairs cannot dominate


class Mixing(str, Enum):
    """Blending rule of a second shape into the first."""

    NONE = "none"
    FIXED = "fixed"  # (1 - w) f1 + w f2
    LOG_RATIO = "log_ratio"  # m = sigmoid(z / tau), DiscoPOP's log-ratio modulation


_SHAPE_SLUGS = {
    Shape.LOGISTIC: "logistic",
    Shape.HINGE: "hinge",
    Shape.SMOOTH_HINGE: "smooth_hinge",
    Shape.EXPONENTIAL: "exp",
    Shape.SQUARED: "squared",
    Shape.SIGMOID: "sigmoid",
}

_SHAPE_WORDS = {
    Shape.LOGISTIC: "a logistic (DPO) loss",
    Shape.HINGE: "a hinge loss",
    Shape.SMOOTH_HINGE: "a smoothed hinge loss",
    Shape.EXPONENTIAL: "an exponential loss",
    Shape.SQUARED: "a squared (IPO-style) loss",
    Shape.SIGMOID: "a bounded sigmoid loss",
}


@dataclass(frozen=True)
class Genome:
    """One loss in the grammar; see the module docstring for the formula.

    Attributes:
        primary: the first shape f1.
        secondary: the shape f2 blended in, or None.
        mixing: how f2 is blended in; NONE exactly when secondary is None.
        mix_weight: weight w of f2 under FIXED mixing.
        tau: temperature of sigmoid(logits / tau) under LOG_RATIO mixing.
        scale: multiplier of beta, a temperature on the logits.
        margin: offset subtracted from the logits, so a pair keeps
            contributing until it is won by this much.
        chosen_weight: weight w_c of the chosen log-ratio.
        rejected_weight: weight w_r of the rejected log-ratio.
        focal_gamma: exponent gamma of the focal factor sigmoid(-logits)^gamma
            (Lin et al. 2017, arXiv:1708.02002), which down-weights won pairs.
        smoothing: weight eps on f1 of the reversed preference, as in
            conservative DPO's label smoothing in TRL.
        anchor: lambda of DPO-Positive (Pal et al. 2024, arXiv:2402.13228,
            Eq. 3), which penalises the chosen log-likelihood falling below
            the reference.
    """

    primary: Shape = Shape.LOGISTIC
    secondary: Shape | None = None
    mixing: Mixing = Mixing.NONE
    mix_weight: float = 0.5
    tau: float = 0.05
    scale: float = 1.0
    margin: float = 0.0
    chosen_weight: float = 1.0
    rejected_weight: float = 1.0
    focal_gamma: float = 0.0
    smoothing: float = 0.0
    anchor: float = 0.0

    def normalized(self) -> Genome:
        """Return the genome with genes that have no effect reset to their defaults."""
        defaults = Genome()
        genome = self
        if genome.secondary is None or genome.secondary == genome.primary or genome.mixing is Mixing.NONE:
            genome = dataclasses.replace(genome, secondary=None, mixing=Mixing.NONE)
        if genome.mixing is not Mixing.FIXED:
            genome = dataclasses.replace(genome, mix_weight=defaults.mix_weight)
        if genome.mixing is not Mixing.LOG_RATIO:
            genome = dataclasses.replace(genome, tau=defaults.tau)
        # exp(+logits) of the reversed preference grows without bound
        if genome.primary is Shape.EXPONENTIAL:
            genome = dataclasses.replace(genome, smoothing=0.0)
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
    def from_json(cls, text: str) -> Genome:
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
            elif field.name == "mixing":
                values[field.name] = Mixing(raw)
            else:
                if not isinstance(raw, (int, float)) or isinstance(raw, bool):
                    raise ValueError(f"genome field {field.name!r} is {raw!r}; expected a number")
                values[field.name] = snap(field.name, float(raw))
        return cls(**values).normalized()


def snap(gene: str, value: float) -> float:
    """Return the rung of `gene`'s ladder nearest to `value`."""
    return min(LADDERS[gene], key=lambda rung: (abs(rung - value), rung))


def genome_from_code(code: str) -> tuple[Genome, bool] | None:
    """Recover the genome behind `code` as (genome, exact), or None.

    Code written by the offline proposer carries its genome in a comment, so
    the result is exact. Other code (seeds, model replies) gets an
    approximate genome built from the shapes it calls.
    """
    match = _GENOME_LINE.search(code)
    if match is not None:
        try:
            return Genome.from_json(match.group(1)), True
        except ValueError:
            pass
    inferred = _infer_genome(code)
    return None if inferred is None else (inferred, False)


def _infer_genome(code: str) -> Genome | None:
    """Guess shapes and DiscoPOP-style modulation from the functions `code` calls.

    The code is normalised first (variables assigned once are inlined and
    constants folded), so `tau = 0.05; sigmoid(x / tau)` reads as a
    modulation with tau 0.05. A sigmoid or log-sigmoid of something divided
    by a constant below 1 is taken as a modulation, not as a shape.
    """
    tree = normalize_tree(code)
    if tree is None:
        return None

    shapes: list[Shape] = []
    tau: float | None = None
    for node in _source_order(tree):
        shape = None
        if isinstance(node, ast.Call) and node.args:
            function = _called_name(node)
            divisor = _temperature(node.args[0])
            if function in ("sigmoid", "logsigmoid") and divisor is not None:
                tau = tau or divisor
            elif function in ("logsigmoid", "softplus", "log1p"):
                shape = Shape.LOGISTIC
            elif function == "relu":
                shape = Shape.HINGE
            elif function == "exp":
                shape = Shape.EXPONENTIAL
            elif function == "sigmoid":
                shape = Shape.SIGMOID
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            if isinstance(node.right, ast.Constant) and node.right.value == 2:
                shape = Shape.SQUARED
        if shape is not None and shape not in shapes:
            shapes.append(shape)

    if not shapes:
        return None
    genome = Genome(primary=shapes[0])
    if len(shapes) > 1:
        mixing = Mixing.LOG_RATIO if tau is not None else Mixing.FIXED
        genome = dataclasses.replace(genome, secondary=shapes[1], mixing=mixing, tau=snap("tau", tau or 0.05))
    return genome.normalized()


def _source_order(node: ast.AST) -> list[ast.AST]:
    """Return the nodes depth-first in field order, which follows the source text."""
    nodes = [node]
    for child in ast.iter_child_nodes(node):
        nodes.extend(_source_order(child))
    return nodes


def _called_name(call: ast.Call) -> str:
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    if isinstance(call.func, ast.Name):
        return call.func.id
    return ""


def _temperature(node: ast.expr) -> float | None:
    """Return c when `node` is x / c or -x / c for a constant 0 < c < 1, else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
        value = node.right.value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1:
            return float(value)
    return None


# names and summaries


def genome_name(genome: Genome) -> str:
    """Return a descriptive snake_case name of at most 64 characters."""
    parts = [_SHAPE_SLUGS[genome.primary]]
    if genome.secondary is not None:
        parts.append(_SHAPE_SLUGS[genome.secondary])
        if genome.mixing is Mixing.LOG_RATIO:
            parts.append(f"lrml_tau{_slug_number(genome.tau)}")
        else:
            parts.append(f"mix{_slug_number(genome.mix_weight)}")
    optional = [
        ("scale", genome.scale, 1.0),
        ("margin", genome.margin, 0.0),
        ("cw", genome.chosen_weight, 1.0),
        ("rw", genome.rejected_weight, 1.0),
        ("anchor", genome.anchor, 0.0),
        ("smooth", genome.smoothing, 0.0),
        ("focal", genome.focal_gamma, 0.0),
    ]
    parts += [f"{label}{_slug_number(value)}" for label, value, default in optional if value != default]
    name = "_".join(parts)
    if len(name) <= _MAX_NAME:
        return name
    # a cut name could collide with another genome's, so a digest keeps it unique
    digest = hashlib.sha256(genome.to_json().encode()).hexdigest()[:6]
    return f"{name[: _MAX_NAME - 7].rstrip('_')}_{digest}"


def _slug_number(value: float) -> str:
    text = f"{value:g}"
    return text.replace(".", "p").replace("-", "neg")


def describe(genome: Genome) -> str:
    """Write one sentence that states the loss a genome renders."""
    core = _SHAPE_WORDS[genome.primary]
    if genome.secondary is not None:
        second = _SHAPE_WORDS[genome.secondary]
        if genome.mixing is Mixing.LOG_RATIO:
            core = (
                f"a blend of {core} and {second}, moving from the first to the second as "
                f"sigmoid(logits / {genome.tau:g}) rises, as in DiscoPOP"
            )
        else:
            core = f"a fixed blend of {core} and {second} with weight {genome.mix_weight:g} on the second"

    details = []
    if genome.scale != 1.0:
        details.append(f"logits scaled by {genome.scale:g}")
    if genome.margin:
        details.append(f"a target margin of {genome.margin:g}")
    if (genome.chosen_weight, genome.rejected_weight) != (1.0, 1.0):
        details.append(f"log-ratio weights {genome.chosen_weight:g} (chosen) and {genome.rejected_weight:g} (rejected)")
    if genome.anchor:
        details.append(f"a DPO-Positive penalty of {genome.anchor:g} on the chosen log-ratio falling below zero")
    if genome.smoothing:
        details.append(f"label smoothing {genome.smoothing:g}")
    if genome.focal_gamma:
        details.append(f"a focal factor with gamma {genome.focal_gamma:g}")

    sentence = f"Uses {core}"
    if len(details) == 1:
        sentence += f", with {details[0]}"
    elif details:
        sentence += f", with {', '.join(details[:-1])} and {details[-1]}"
    return sentence + "."


# code


def render_code(genome: Genome, name: str) -> str:
    """Write the loss as the study's method: one loss per example, shape (B,), never reduced."""
    genome = genome.normalized()
    lines = [
        f"# genome: {genome.to_json()}",
        "import torch",
        "import torch.nn.functional as F",
        "",
        "",
        f"def {name}(self, {', '.join(PARAMS)}):",
        "    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)",
        "    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)",
        f"    rho = {_weighted('chosen_logratios', genome.chosen_weight)} - "
        f"{_weighted('rejected_logratios', genome.rejected_weight)}",
    ]
    if genome.anchor:
        lines.append("    # DPO-Positive: penalise the chosen log-likelihood falling below the reference")
        lines.append(f"    rho = rho - {genome.anchor!r} * F.relu(-chosen_logratios)")
    logits = "self.beta * rho" if genome.scale == 1.0 else f"{genome.scale!r} * self.beta * rho"
    if genome.margin:
        logits += f" - {genome.margin!r}"
    lines.append(f"    logits = {logits}  # (B,)")

    for shape in genome.shapes():
        lines.append(f"    {_term(shape)} = {_shape_expression(shape, 'logits')}")
    first = _term(genome.primary)
    if genome.mixing is Mixing.NONE:
        lines.append(f"    losses = {first}")
    elif genome.mixing is Mixing.FIXED:
        second = _term(genome.secondary)  # type: ignore[arg-type]
        keep = round(1.0 - genome.mix_weight, 10)
        lines.append(f"    losses = {keep!r} * {first} + {genome.mix_weight!r} * {second}")
    else:
        second = _term(genome.secondary)  # type: ignore[arg-type]
        lines.append(f"    modulation = torch.sigmoid(logits / {genome.tau!r})")
        lines.append(f"    losses = (1.0 - modulation) * {first} + modulation * {second}")

    if genome.smoothing:
        lines.append("    # label smoothing: part of the loss treats the preference as reversed")
        lines.append(f"    reversed_loss = {_shape_expression(genome.primary, '-logits')}")
        keep = round(1.0 - genome.smoothing, 10)
        lines.append(f"    losses = {keep!r} * losses + {genome.smoothing!r} * reversed_loss")
    if genome.focal_gamma:
        # sigmoid(-z)**gamma computed in log space has a finite gradient even
        # where sigmoid(-z) underflows to zero
        lines.append(f"    losses = losses * torch.exp({genome.focal_gamma!r} * F.logsigmoid(-logits))")
    lines.append("    return losses  # (B,)")
    return "\n".join(lines) + "\n"


def _weighted(variable: str, weight: float) -> str:
    return variable if weight == 1.0 else f"{weight!r} * {variable}"


def _term(shape: Shape) -> str:
    return f"{shape.value}_loss"


def _shape_expression(shape: Shape, logits: str) -> str:
    negated = logits[1:] if logits.startswith("-") else f"-{logits}"
    if shape is Shape.LOGISTIC:
        return f"-F.logsigmoid({logits})"
    if shape is Shape.HINGE:
        return f"F.relu(1.0 - {logits})" if not logits.startswith("-") else f"F.relu(1.0 + {negated})"
    if shape is Shape.SMOOTH_HINGE:
        inner = f"1.0 - {logits}" if not logits.startswith("-") else f"1.0 + {negated}"
        return f"F.softplus(4.0 * ({inner})) / 4.0"
    if shape is Shape.EXPONENTIAL:
        return f"torch.exp(torch.clamp({negated}, max={_EXP_CLAMP!r}))"
    if shape is Shape.SQUARED:
        return f"({logits} - 0.5) ** 2"
    return f"torch.sigmoid({negated})"
