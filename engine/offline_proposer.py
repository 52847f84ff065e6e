"""The built-in proposer used when no language model is configured: a genetic search over loss genomes.

Each call selects parents among the evaluated candidates by tournament on
fitness and varies their genomes (see `engine.loss_grammar`) by mutation and
crossover. It writes the child as the reply text a model would send: a JSON
object with thought, name and code, sometimes inside a ```json fence. While
few candidates have a fitness, half the proposals are random genomes.

Parents are recovered from the archived code itself. Code this proposer
wrote starts with a `# genome: {...}` comment, so its genome comes back
exactly. Other code (seeds, model replies) gets an approximate genome from
the loss shapes it calls. Nothing else is stored between calls, so the
proposer needs no state of its own to resume a run.

Every random choice comes from a generator seeded by the run seed, the
generation, the attempt and a digest of the history, so a resumed run that
rebuilds the same history from its archive gets the same proposals. The
chat messages of the request are not read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from enum import Enum

from engine.candidate import Status
from engine.fingerprint import canonical_fingerprint
from engine.loss_grammar import (
    LADDERS,
    PARAMS,
    Genome,
    Mixing,
    Shape,
    describe,
    genome_from_code,
    genome_name,
    render_code,
)
from engine.proposer import HistoryEntry, ProposalRequest, Proposer, ProposerReply

logger = logging.getLogger(__name__)

MODEL_NAME = "offline-genetic-v1"
HYPERPARAMETERS = ("beta",)

# genes grouped by role; crossover takes each group whole from one parent,
# because genes inside a group only make sense together
_SHAPE_GENES = ("primary", "secondary", "mixing", "mix_weight", "tau")
_LOGIT_GENES = ("scale", "margin", "chosen_weight", "rejected_weight", "anchor")
_WEIGHTING_GENES = ("focal_gamma", "smoothing")
_GENE_GROUPS = (_SHAPE_GENES, _LOGIT_GENES, _WEIGHTING_GENES)

_GENE_LABELS = {
    "scale": "the logit scale",
    "margin": "the margin",
    "tau": "tau",
    "mix_weight": "the blend weight",
    "chosen_weight": "the chosen log-ratio weight",
    "rejected_weight": "the rejected log-ratio weight",
    "focal_gamma": "the focal gamma",
    "smoothing": "the label smoothing",
    "anchor": "the DPO-Positive penalty",
}


class Crossover(str, Enum):
    """The two ways `crossover` combines parents."""

    BLEND = "blend"  # the first parent with the second's main shape blended in
    GROUPS = "groups"  # each gene group whole from either parent


@dataclass(frozen=True)
class Parent:
    """An evaluated candidate whose genome could be recovered."""

    name: str
    fitness: float
    genome: Genome


@dataclass(frozen=True)
class Child:
    """A varied genome and the sentence that describes how it was made."""

    genome: Genome
    origin: str


class PreferenceLossGrammar:
    """The preference-loss building blocks of `engine.loss_grammar`, behind the grammar interface.

    A grammar provides `params`, `hyperparameters`, `random_genome(rng)`,
    `mutate(genome, rng) -> (genome, [changes])`, `crossover(a, b, rng) ->
    (genome, sentence)`, `genome_from_code(code) -> (genome, exact) | None`,
    `render_code(genome, name)`, `genome_name(genome)` and `describe(genome)`.
    Tasks other than preference supply their own through `Task.loss_grammar()`.
    """

    params = PARAMS
    hyperparameters = HYPERPARAMETERS

    def random_genome(self, rng: random.Random) -> Genome:
        return random_genome(rng)

    def mutate(self, genome: Genome, rng: random.Random) -> tuple[Genome, list[str]]:
        return mutate(genome, rng)

    def crossover(self, first: Genome, second: Genome, rng: random.Random) -> tuple[Genome, str]:
        child, operator = crossover(first, second, rng)
        if operator is Crossover.BLEND:
            return child, "blends the main shape of the second parent into the first"
        return child, "combines the gene groups of both parents"

    def genome_from_code(self, code: str) -> tuple[Genome, bool] | None:
        return genome_from_code(code)

    def render_code(self, genome: Genome, name: str) -> str:
        return render_code(genome, name)

    def genome_name(self, genome: Genome) -> str:
        return genome_name(genome)

    def describe(self, genome: Genome) -> str:
        return describe(genome)


class OfflineProposer(Proposer):
    """Proposes losses by tournament selection, mutation and crossover of loss genomes.

    The grammar decides what the programs look like; the default writes
    preference-optimization losses (the four log-probability parameters and
    `self.beta`).
    """

    name = MODEL_NAME

    def __init__(
        self,
        grammar=None,
        tournament_size: int = 3,
        exploration_threshold: int = 4,
        crossover_rate: float = 0.35,
        immigrant_rate: float = 0.1,
        fence_rate: float = 0.3,
        max_tries: int = 64,
    ) -> None:
        """Configure the search.

        Args:
            grammar: the building blocks; None uses PreferenceLossGrammar.
            tournament_size: candidates drawn per tournament; the fittest wins.
            exploration_threshold: below this many parents, half the proposals
                are random genomes.
            crossover_rate: share of proposals made by crossover of two parents.
            immigrant_rate: share of random genomes once there are enough parents.
            fence_rate: share of replies wrapped in a ```json fence, so the
                parser's fence handling is exercised as with a real model.
            max_tries: variations tried before giving up on finding a program
                that is not already in the history.
        """
        problems = []
        if tournament_size < 1:
            problems.append(f"tournament_size is {tournament_size}; expected 1 or more")
        for label, rate in (("crossover_rate", crossover_rate), ("immigrant_rate", immigrant_rate), ("fence_rate", fence_rate)):
            if not 0.0 <= rate <= 1.0:
                problems.append(f"{label} is {rate}; expected a value from 0 to 1")
        if crossover_rate + immigrant_rate > 1.0:
            problems.append(f"crossover_rate + immigrant_rate is {crossover_rate + immigrant_rate}; expected at most 1")
        if max_tries < 1:
            problems.append(f"max_tries is {max_tries}; expected 1 or more")
        if problems:
            raise ValueError("invalid offline proposer settings: " + "; ".join(problems))
        self.grammar = grammar if grammar is not None else PreferenceLossGrammar()
        self.tournament_size = tournament_size
        self.exploration_threshold = exploration_threshold
        self.crossover_rate = crossover_rate
        self.immigrant_rate = immigrant_rate
        self.fence_rate = fence_rate
        self.max_tries = max_tries
        # fingerprints depend only on the code, so caching them keeps the
        # proposer deterministic while sparing a re-parse of the whole history
        self._fingerprints: dict[str, str | None] = {}
        self._genomes: dict[str, tuple[object, bool] | None] = {}

    def propose(self, request: ProposalRequest) -> ProposerReply:
        start = time.perf_counter()
        rng = random.Random(request_seed(request))
        parents = self._parents(request.history)
        seen = {self._fingerprint(entry.code) for entry in request.history if entry.code}

        # vary until the child is a program the history does not hold yet
        for _ in range(self.max_tries):
            child = self._vary(parents, rng)
            if self._fingerprint(self.grammar.render_code(child.genome, "candidate")) not in seen:
                break
        else:
            # NOTE: the engine's duplicate check still catches this program
            # before it runs, so the attempt is only wasted, not evaluated twice.
            logger.info(
                "offline proposer found no new program in %d tries (generation %d, attempt %d)",
                self.max_tries,
                request.generation,
                request.attempt,
            )

        name = self.grammar.genome_name(child.genome)
        logger.debug("generation %d attempt %d: proposing %s. %s", request.generation, request.attempt, name, child.origin)
        thought = f"{self.grammar.describe(child.genome)} {child.origin}"
        code = self.grammar.render_code(child.genome, name)
        payload = json.dumps({"thought": thought, "name": name, "code": code}, indent=1)
        text = f"```json\n{payload}\n```" if rng.random() < self.fence_rate else payload
        return ProposerReply(text=text, model=MODEL_NAME, latency_s=time.perf_counter() - start)

    # selection

    def _parents(self, history: list[HistoryEntry]) -> list[Parent]:
        parents = []
        for entry in history:
            if entry.status != Status.EVALUATED.value or entry.fitness is None or not math.isfinite(entry.fitness):
                continue
            if entry.code not in self._genomes:
                self._genomes[entry.code] = self.grammar.genome_from_code(entry.code)
            recovered = self._genomes[entry.code]
            if recovered is not None:
                parents.append(Parent(name=entry.name, fitness=entry.fitness, genome=recovered[0]))
        return parents

    def _tournament(self, parents: list[Parent], rng: random.Random) -> Parent:
        drawn = rng.sample(range(len(parents)), min(self.tournament_size, len(parents)))
        # ties go to the older candidate, which has the lower index
        best = max(drawn, key=lambda index: (parents[index].fitness, -index))
        return parents[best]

    def _fingerprint(self, code: str) -> str | None:
        if code not in self._fingerprints:
            self._fingerprints[code] = canonical_fingerprint(code, tuple(self.grammar.hyperparameters))
        return self._fingerprints[code]

    # variation

    def _vary(self, parents: list[Parent], rng: random.Random) -> Child:
        explore = 0.5 if len(parents) < self.exploration_threshold else self.immigrant_rate
        draw = rng.random()
        if not parents or draw < explore:
            return Child(self.grammar.random_genome(rng), "Explores a random combination of building blocks to keep the search diverse.")

        if draw < explore + self.crossover_rate and len(parents) >= 2:
            first = self._tournament(parents, rng)
            second = self._tournament(parents, rng)
            if first is not second:
                genome, how = self.grammar.crossover(first.genome, second.genome, rng)
                if genome not in (first.genome, second.genome):
                    return Child(genome, f"Crosses {_label(first)} with {_label(second)}: {how}.")

        parent = self._tournament(parents, rng)
        genome, changes = self.grammar.mutate(parent.genome, rng)
        return Child(genome, f"Mutates {_label(parent)} by {' and '.join(changes)}.")


def _label(parent: Parent) -> str:
    return f"'{parent.name}' (fitness {parent.fitness:.4f})"


def request_seed(request: ProposalRequest) -> int:
    """Return the random seed of one request, a function of the run seed, position and history."""
    digest = hashlib.sha256(f"{request.seed}|{request.generation}|{request.attempt}".encode())
    for entry in request.history:
        fitness = "none" if entry.fitness is None else repr(float(entry.fitness))
        digest.update(f"|{entry.name}|{entry.status}|{fitness}|".encode())
        digest.update(hashlib.sha256(entry.code.encode()).digest())
    return int.from_bytes(digest.digest()[:8], "big")


def random_genome(rng: random.Random) -> Genome:
    """Draw a genome: any shape, a second shape half the time, each other gene off its default 30% of the time."""
    shapes = list(Shape)
    primary = rng.choice(shapes)
    genome = Genome(primary=primary)
    if rng.random() < 0.5:
        secondary = rng.choice([shape for shape in shapes if shape is not primary])
        mixing = rng.choice([Mixing.FIXED, Mixing.LOG_RATIO])
        genome = dataclasses.replace(
            genome,
            secondary=secondary,
            mixing=mixing,
            mix_weight=rng.choice(LADDERS["mix_weight"]),
            tau=rng.choice(LADDERS["tau"]),
        )
    for gene in (*_LOGIT_GENES, *_WEIGHTING_GENES):
        if rng.random() < 0.3:
            genome = dataclasses.replace(genome, **{gene: rng.choice(LADDERS[gene])})
    return genome.normalized()


def mutate(genome: Genome, rng: random.Random) -> tuple[Genome, list[str]]:
    """Change one gene (70%) or two (30%); return the child and what changed, in words."""
    changes: list[str] = []
    changed: set[str] = set()
    child = genome
    # two steps on one gene could cancel out, so each step takes a new gene
    for _ in range(1 if rng.random() < 0.7 else 2):
        child, gene, change = _mutate_one(child, rng, changed)
        changed.add(gene)
        changes.append(change)
    return child.normalized(), changes


def _mutate_one(genome: Genome, rng: random.Random, exclude: set[str]) -> tuple[Genome, str, str]:
    """Change one gene not in `exclude`; return the child, the gene and the change in words."""
    numeric = ["scale", "margin", "chosen_weight", "rejected_weight", "anchor", "focal_gamma"]
    if genome.primary is not Shape.EXPONENTIAL:
        numeric.append("smoothing")
    if genome.mixing is Mixing.FIXED:
        numeric.append("mix_weight")
    if genome.mixing is Mixing.LOG_RATIO:
        numeric.append("tau")
    structural = ["primary", "secondary"] + (["mixing"] if genome.secondary is not None else [])
    numeric = [gene for gene in numeric if gene not in exclude]
    structural = [gene for gene in structural if gene not in exclude]
    # structure changes are rarer than numeric steps, which refine a parent
    gene = rng.choice(structural) if rng.random() < 0.35 else rng.choice(numeric)
    child, change = _mutate_gene(genome, gene, rng)
    return child, gene, change


def _mutate_gene(genome: Genome, gene: str, rng: random.Random) -> tuple[Genome, str]:
    if gene == "primary":
        choices = [shape for shape in Shape if shape not in genome.shapes()]
        primary = rng.choice(choices)
        return dataclasses.replace(genome, primary=primary), f"replacing the main shape {genome.primary.value} with {primary.value}"
    if gene == "secondary":
        if genome.secondary is not None and rng.random() < 0.3:
            return dataclasses.replace(genome, secondary=None, mixing=Mixing.NONE), f"dropping the {genome.secondary.value} term"
        secondary = rng.choice([shape for shape in Shape if shape not in genome.shapes()])
        mixing = genome.mixing if genome.mixing is not Mixing.NONE else rng.choice([Mixing.FIXED, Mixing.LOG_RATIO])
        return dataclasses.replace(genome, secondary=secondary, mixing=mixing), f"blending in a {secondary.value} term"
    if gene == "mixing":
        mixing = Mixing.LOG_RATIO if genome.mixing is Mixing.FIXED else Mixing.FIXED
        return dataclasses.replace(genome, mixing=mixing), f"switching the blend from {genome.mixing.value} to {mixing.value}"

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
    return dataclasses.replace(genome, **{gene: value}), f"changing {_GENE_LABELS[gene]} from {current:g} to {value:g}"


def crossover(first: Genome, second: Genome, rng: random.Random) -> tuple[Genome, Crossover]:
    """Combine two genomes; return the child and the operator used.

    Two operators: group-wise crossover takes each gene group whole from
    either parent, and shape blending keeps the first parent and blends in
    the second parent's main shape, which is how DiscoPOP's logistic plus
    exponential combination arises from its two parts.
    """
    if rng.random() < 0.3 and second.primary not in first.shapes():
        mixing = first.mixing if first.mixing is not Mixing.NONE else rng.choice([Mixing.FIXED, Mixing.LOG_RATIO])
        child = dataclasses.replace(first, secondary=second.primary, mixing=mixing)
        return child.normalized(), Crossover.BLEND

    values = {}
    for group in _GENE_GROUPS:
        donor = first if rng.random() < 0.5 else second
        values.update({gene: getattr(donor, gene) for gene in group})
    return Genome(**values).normalized(), Crossover.GROUPS
