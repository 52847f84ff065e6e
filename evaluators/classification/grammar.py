"""Building blocks of classification losses, for a proposer that writes candidates without a language model.

A genome picks one or two base shapes of the softmax probabilities and adds
temperature, margin and regularising terms around them. With z the logits,
y the one-hot target, p = softmax(z / T - m y) and p_t the true class's
probability, the rendered loss is

    losses = (1 - w) * f1(p) + w * f2(p)
    losses = losses * (1 - p_t) ** gamma                 focal factor
    losses = (1 - eps) * losses + eps * mean_k(-log p_k) label smoothing
    losses = losses + poly * (1 - p_t)                   Poly-1 term
    losses = losses - penalty * entropy(p)               confidence penalty

With the default genome this is plain cross-entropy. Each numeric gene takes
values from a short ladder, so a mutation moves one rung at a time. The
rendered code starts with a `# genome: {...}` comment containing the genome as
JSON, which is how a parent is recovered from the code stored in the archive.
The rendered function uses only torch and torch.nn.functional, has the
task's parameters (logits, targets) and passes the task's unit tests for
every genome (tests/evaluators/test_classification_grammar.py checks this).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import random
import re

from evaluators.classification.genome import (
    GCE_Q,
    GENE_GROUPS,
    LADDERS,
    LOGIT_GENES,
    MIX_WEIGHTS,
    PARAMS,
    REGULARIZER_GENES,
    ClassificationGenome,
    Shape,
    snap,
)

_MAX_NAME = 64
_GENOME_LINE = re.compile(r"^[ \t]*#[ \t]*genome:[ \t]*(\{.*\})[ \t]*$", re.MULTILINE)

_SHAPE_SLUGS = {
    Shape.CROSS_ENTROPY: "ce",
    Shape.BRIER: "brier",
    Shape.MAE: "mae",
    Shape.GCE: "gce",
    Shape.HINGE: "hinge",
}

_SHAPE_WORDS = {
    Shape.CROSS_ENTROPY: "cross-entropy",
    Shape.BRIER: "the Brier score (squared error of the probabilities)",
    Shape.MAE: "the mean absolute error of the probabilities",
    Shape.GCE: f"generalized cross-entropy with q = {GCE_Q:g}",
    Shape.HINGE: "the multi-class hinge loss",
}

_GENE_LABELS = {
    "temperature": "the softmax temperature",
    "margin": "the target margin",
    "mix_weight": "the blend weight",
    "smoothing": "the label smoothing",
    "focal_gamma": "the focal gamma",
    "poly_epsilon": "the Poly-1 weight",
    "confidence_penalty": "the confidence penalty",
}


class ClassificationLossGrammar:
    """Random genomes, variation, code rendering and parent recovery for classification losses.

    Stateless; every random choice comes from the `random.Random` passed in,
    so a caller that seeds it gets the same proposals again.
    """

    params = PARAMS
    hyperparameters: tuple[str, ...] = ()

    # search

    def random_genome(self, rng: random.Random) -> ClassificationGenome:
        """Draw a genome: any primary shape, a second one in a third of draws, each other gene set in 30% of draws."""
        shapes = list(Shape)
        genome = ClassificationGenome(primary=rng.choice(shapes))
        if rng.random() < 1 / 3:
            secondary = rng.choice([shape for shape in shapes if shape is not genome.primary])
            genome = dataclasses.replace(genome, secondary=secondary, mix_weight=rng.choice(MIX_WEIGHTS))
        for gene in (*LOGIT_GENES, *REGULARIZER_GENES):
            if rng.random() < 0.3:
                genome = dataclasses.replace(genome, **{gene: rng.choice(LADDERS[gene])})
        return genome.normalized()

    def mutate(self, genome: ClassificationGenome, rng: random.Random) -> tuple[ClassificationGenome, list[str]]:
        """Change one gene (70%) or two (30%); return the child and what changed, in words."""
        child, change = self._mutate_one(genome, rng)
        changes = [change]
        if rng.random() < 0.3:
            # a second step may undo the first (a rung up, then down), so it is redrawn until it does not
            second, change = self._mutate_one(child, rng)
            while second.normalized() == genome.normalized():
                second, change = self._mutate_one(child, rng)
            child = second
            changes.append(change)
        return child.normalized(), changes

    def crossover(
        self, first: ClassificationGenome, second: ClassificationGenome, rng: random.Random
    ) -> tuple[ClassificationGenome, str]:
        """Take each gene group whole from either parent; return the child and a sentence saying so."""
        values = {}
        donors = []
        for group in GENE_GROUPS:
            donor = first if rng.random() < 0.5 else second
            donors.append("first" if donor is first else "second")
            values.update({gene: getattr(donor, gene) for gene in group})
        sentence = (
            f"shapes from the {donors[0]} parent, temperature and margin from the {donors[1]}, "
            f"regularisers from the {donors[2]}"
        )
        return ClassificationGenome(**values).normalized(), sentence

    def _mutate_one(self, genome: ClassificationGenome, rng: random.Random) -> tuple[ClassificationGenome, str]:
        numeric = [*LOGIT_GENES, *REGULARIZER_GENES] + (["mix_weight"] if genome.secondary is not None else [])
        # structure changes are rarer than numeric steps, which refine a parent
        gene = rng.choice(("primary", "secondary")) if rng.random() < 0.3 else rng.choice(numeric)

        if gene == "primary":
            primary = rng.choice([shape for shape in Shape if shape not in genome.shapes()])
            change = f"the main shape from {genome.primary.value} to {primary.value}"
            return dataclasses.replace(genome, primary=primary), change
        if gene == "secondary":
            if genome.secondary is not None and rng.random() < 0.4:
                return dataclasses.replace(genome, secondary=None), f"dropping the {genome.secondary.value} term"
            secondary = rng.choice([shape for shape in Shape if shape not in genome.shapes()])
            return dataclasses.replace(genome, secondary=secondary), f"the blended shape to {secondary.value}"

        ladder = LADDERS[gene]
        current = getattr(genome, gene)
        position = ladder.index(current)
        if position == 0:
            step = 1
        elif position == len(ladder) - 1:
            step = -1
        else:
            step = rng.choice((-1, 1))
        value = ladder[position + step]
        return dataclasses.replace(genome, **{gene: value}), f"{_GENE_LABELS[gene]} from {current:g} to {value:g}"

    # parents

    def genome_from_code(self, code: str) -> tuple[ClassificationGenome, bool] | None:
        """Recover the genome behind `code` as (genome, exact), or None.

        Code rendered here carries its genome in a comment, so the result is
        exact. Other code (seeds, model replies) gets an approximate genome
        from the functions it calls and the constants it names.
        """
        match = _GENOME_LINE.search(code)
        if match is not None:
            try:
                return ClassificationGenome.from_json(match.group(1)), True
            except ValueError:
                pass
        inferred = _infer_genome(code)
        return None if inferred is None else (inferred, False)

    # names, summaries and code

    def genome_name(self, genome: ClassificationGenome) -> str:
        """Return a descriptive snake_case name of at most 64 characters."""
        parts = [_SHAPE_SLUGS[genome.primary]]
        if genome.secondary is not None:
            parts += [_SHAPE_SLUGS[genome.secondary], f"mix{_slug_number(genome.mix_weight)}"]
        optional = [
            ("temp", genome.temperature, 1.0),
            ("margin", genome.margin, 0.0),
            ("smooth", genome.smoothing, 0.0),
            ("focal", genome.focal_gamma, 0.0),
            ("poly", genome.poly_epsilon, 0.0),
            ("confpen", genome.confidence_penalty, 0.0),
        ]
        parts += [f"{label}{_slug_number(value)}" for label, value, default in optional if value != default]
        name = "_".join(parts)
        if len(name) <= _MAX_NAME:
            return name
        # a cut name could collide with another genome's, so a digest keeps it unique
        digest = hashlib.sha256(genome.to_json().encode()).hexdigest()[:6]
        return f"{name[: _MAX_NAME - 7].rstrip('_')}_{digest}"

    def describe(self, genome: ClassificationGenome) -> str:
        """Return one sentence stating the loss a genome renders."""
        core = _SHAPE_WORDS[genome.primary]
        if genome.secondary is not None:
            second = _SHAPE_WORDS[genome.secondary]
            core = f"a blend of {core} and {second} with weight {genome.mix_weight:g} on the second"
        details = []
        if genome.temperature != 1.0:
            details.append(f"logits divided by a temperature of {genome.temperature:g}")
        if genome.margin:
            details.append(f"a target-logit margin of {genome.margin:g}")
        if genome.focal_gamma:
            details.append(f"a focal factor with gamma {genome.focal_gamma:g}")
        if genome.smoothing:
            details.append(f"label smoothing {genome.smoothing:g}")
        if genome.poly_epsilon:
            details.append(f"a Poly-1 term of weight {genome.poly_epsilon:g}")
        if genome.confidence_penalty:
            details.append(f"a confidence penalty of {genome.confidence_penalty:g} on low entropy")
        sentence = f"Uses {core}"
        if len(details) == 1:
            sentence += f", with {details[0]}"
        elif details:
            sentence += f", with {', '.join(details[:-1])} and {details[-1]}"
        return sentence + "."

    def render_code(self, genome: ClassificationGenome, name: str) -> str:
        """Write the loss as a function of (logits, targets) returning one float32 loss per example, shape (B,)."""
        genome = genome.normalized()
        lines = [
            f"# genome: {genome.to_json()}",
            "import torch",
            "import torch.nn.functional as F",
            "",
            "",
            f"def {name}({', '.join(PARAMS)}):",
        ]
        lines += _logit_lines(genome)
        lines += _shape_lines(genome)
        lines += _regularizer_lines(genome)
        lines.append("    return losses  # (B,)")
        return "\n".join(lines) + "\n"


def _logit_lines(genome: ClassificationGenome) -> list[str]:
    lines = [
        # float32 keeps bfloat16 logits from losing the small probabilities
        "    z = logits.float()  # (B, C)",
        "    one_hot = F.one_hot(targets, z.shape[-1]).float()  # (B, C)",
    ]
    if genome.temperature != 1.0:
        lines.append(f"    z = z / {genome.temperature!r}")
    if genome.margin:
        lines.append(f"    z = z - {genome.margin!r} * one_hot")
    lines.append("    log_probs = F.log_softmax(z, dim=-1)  # (B, C)")
    lines.append("    target_log_prob = (log_probs * one_hot).sum(dim=-1)  # (B,)")
    return lines


def _shape_lines(genome: ClassificationGenome) -> list[str]:
    lines = [f"    {_term(shape)} = {_shape_expression(shape)}" for shape in genome.shapes()]
    if genome.secondary is None:
        lines.append(f"    losses = {_term(genome.primary)}")
    else:
        keep = round(1.0 - genome.mix_weight, 10)
        primary, secondary = _term(genome.primary), _term(genome.secondary)
        lines.append(f"    losses = {keep!r} * {primary} + {genome.mix_weight!r} * {secondary}")
    return lines


def _regularizer_lines(genome: ClassificationGenome) -> list[str]:
    lines = []
    if genome.focal_gamma:
        # (1 - p_t)**gamma as exp(gamma * log(1 - p_t)), with log(1 - p_t) the
        # log-sum-exp of the other classes, keeps a finite gradient at p_t = 1
        lines.append("    others = log_probs.masked_fill(one_hot.bool(), float('-inf'))")
        lines.append(f"    losses = losses * torch.exp({genome.focal_gamma!r} * torch.logsumexp(others, dim=-1))")
    if genome.smoothing:
        keep = round(1.0 - genome.smoothing, 10)
        lines.append(f"    losses = {keep!r} * losses - {genome.smoothing!r} * log_probs.mean(dim=-1)")
    if genome.poly_epsilon:
        lines.append(f"    losses = losses + {genome.poly_epsilon!r} * (1.0 - torch.exp(target_log_prob))")
    if genome.confidence_penalty:
        lines.append("    entropy = -(torch.exp(log_probs) * log_probs).sum(dim=-1)  # (B,)")
        lines.append(f"    losses = losses - {genome.confidence_penalty!r} * entropy")
    return lines


def _term(shape: Shape) -> str:
    return f"{shape.value}_loss"


def _shape_expression(shape: Shape) -> str:
    if shape is Shape.CROSS_ENTROPY:
        return "-target_log_prob"
    if shape is Shape.BRIER:
        return "((torch.exp(log_probs) - one_hot) ** 2).sum(dim=-1)"
    if shape is Shape.MAE:
        return "1.0 - torch.exp(target_log_prob)"
    if shape is Shape.GCE:
        # p_t**q as exp(q * log p_t), finite with a finite gradient where p_t underflows
        return f"(1.0 - torch.exp({GCE_Q!r} * target_log_prob)) / {GCE_Q!r}"
    # the best wrong class's logit: the target's own entry is pushed to -inf first
    return "F.relu(1.0 - (z * one_hot).sum(dim=-1) + z.masked_fill(one_hot.bool(), float('-inf')).amax(dim=-1))"


def _slug_number(value: float) -> str:
    return f"{value:g}".replace(".", "p").replace("-", "neg")


def _infer_genome(code: str) -> ClassificationGenome | None:
    """Guess a genome from the calls and constants in `code`; None when no known shape is found."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    shapes: list[Shape] = []
    values: dict[str, float] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = _called_name(node)
            shape = {
                "cross_entropy": Shape.CROSS_ENTROPY,
                "log_softmax": Shape.CROSS_ENTROPY,
                "nll_loss": Shape.CROSS_ENTROPY,
                "mse_loss": Shape.BRIER,
                "multi_margin_loss": Shape.HINGE,
            }.get(function)
            if shape is not None and shape not in shapes:
                shapes.append(shape)
            for keyword in node.keywords:
                if keyword.arg == "label_smoothing" and _number(keyword.value) is not None:
                    values["smoothing"] = snap("smoothing", _number(keyword.value))
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            # constants named after a gene, such as `gamma = 2.0` or `temperature = 2`
            number = _number(node.value)
            gene = _gene_for_name(node.targets[0].id)
            if number is not None and gene is not None:
                values[gene] = snap(gene, number)
    if not shapes:
        return None
    genome = ClassificationGenome(primary=shapes[0], **values)
    if len(shapes) > 1:
        genome = dataclasses.replace(genome, secondary=shapes[1])
    return genome.normalized()


def _gene_for_name(name: str) -> str | None:
    lowered = name.lower()
    for fragment, gene in (("gamma", "focal_gamma"), ("temperature", "temperature"), ("margin", "margin"),
                           ("smoothing", "smoothing"), ("poly", "poly_epsilon")):
        if fragment in lowered:
            return gene
    return None


def _called_name(call: ast.Call) -> str:
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    if isinstance(call.func, ast.Name):
        return call.func.id
    return ""


def _number(node: ast.expr) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    return None
