"""Tests of the classification loss grammar: rendered code, its formulas, variation and parent recovery.

Rendered code is loaded with the sandbox's RestrictedPython loader and judged
by the task's own unit tests, as a proposal would be in a run.
"""

from __future__ import annotations

import dataclasses
import keyword
import random

import pytest
import torch
import torch.nn.functional as F

from evaluators.classification import ClassificationTask
from evaluators.classification.checks import run_unit_tests
from evaluators.classification.genome import GENE_GROUPS, GENOME_VERSION, ClassificationGenome, Shape
from evaluators.classification.grammar import ClassificationLossGrammar
from sandbox.loader import load_candidate

TASK = ClassificationTask()
GRAMMAR = ClassificationLossGrammar()


def rendered(genome: ClassificationGenome):
    code = GRAMMAR.render_code(genome, GRAMMAR.genome_name(genome))
    return load_candidate(code, TASK.interface.params, {})


def sample_genomes(count: int, seed: int) -> list[ClassificationGenome]:
    rng = random.Random(seed)
    genomes = []
    for index in range(count):
        genome = GRAMMAR.random_genome(rng)
        if index % 2:
            genome, _ = GRAMMAR.mutate(genome, rng)
        genomes.append(genome)
    return genomes


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, generator=generator, dtype=torch.float64) * 3
    targets = torch.randint(0, 10, (32,), generator=generator)
    return logits, targets


def reference(genome: ClassificationGenome, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Compute the loss of a single-change genome in float64 straight from its published formula."""
    one_hot = F.one_hot(targets, 10).double()
    z = logits / genome.temperature - genome.margin * one_hot
    p = z.softmax(dim=-1)
    p_t = (p * one_hot).sum(dim=-1)
    ce = -torch.log(p_t)
    base = {
        Shape.CROSS_ENTROPY: ce,
        Shape.BRIER: ((p - one_hot) ** 2).sum(dim=-1),
        Shape.MAE: 1 - p_t,
        Shape.GCE: (1 - p_t**0.7) / 0.7,
        Shape.HINGE: torch.relu(1 - (z * one_hot).sum(-1) + (z - 1e9 * one_hot).max(dim=-1).values),
    }
    losses = base[genome.primary]
    losses = losses * (1 - p_t) ** genome.focal_gamma
    losses = (1 - genome.smoothing) * losses + genome.smoothing * (-torch.log(p)).mean(dim=-1)
    losses = losses + genome.poly_epsilon * (1 - p_t)
    entropy = -(p * torch.log(p)).sum(dim=-1)
    return losses - genome.confidence_penalty * entropy


FORMULAS = [
    ClassificationGenome(),
    ClassificationGenome(primary=Shape.BRIER),
    ClassificationGenome(primary=Shape.MAE),
    ClassificationGenome(primary=Shape.GCE),
    ClassificationGenome(primary=Shape.HINGE),
    ClassificationGenome(temperature=2.0),
    ClassificationGenome(margin=1.0),
    ClassificationGenome(focal_gamma=2.0),
    ClassificationGenome(smoothing=0.1),
    ClassificationGenome(poly_epsilon=1.0),
    ClassificationGenome(confidence_penalty=0.1),
    ClassificationGenome(primary=Shape.GCE, margin=0.5, focal_gamma=0.5, poly_epsilon=2.0),
]


@pytest.mark.parametrize("genome", FORMULAS, ids=[GRAMMAR.genome_name(g) for g in FORMULAS])
def test_rendered_loss_matches_its_formula(genome, batch):
    logits, targets = batch
    # the rendered code computes in float32, so agreement is to float32 precision
    actual = rendered(genome)(logits.float(), targets).double()
    assert actual.shape == (32,)
    assert torch.allclose(actual, reference(genome, logits, targets), rtol=1e-4, atol=1e-5)


def test_default_genome_is_cross_entropy(batch):
    logits, targets = batch
    actual = rendered(ClassificationGenome())(logits.float(), targets)
    assert torch.allclose(actual, F.cross_entropy(logits.float(), targets, reduction="none"), atol=1e-6)


def test_smoothing_genome_is_torch_label_smoothing(batch):
    logits, targets = batch
    actual = rendered(ClassificationGenome(smoothing=0.1))(logits.float(), targets)
    expected = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=0.1)
    assert torch.allclose(actual, expected, atol=1e-6)


def test_blend_weights_the_two_shapes(batch):
    logits, targets = batch
    genome = ClassificationGenome(primary=Shape.CROSS_ENTROPY, secondary=Shape.BRIER, mix_weight=0.25)
    actual = rendered(genome)(logits.float(), targets).double()
    ce = reference(ClassificationGenome(), logits, targets)
    brier = reference(ClassificationGenome(primary=Shape.BRIER), logits, targets)
    assert torch.allclose(actual, 0.75 * ce + 0.25 * brier, rtol=1e-4, atol=1e-5)


def test_every_sampled_genome_passes_unit_tests():
    for genome in sample_genomes(60, seed=7):
        metrics = run_unit_tests(rendered(genome))
        assert len(metrics["probe"]) == 21, GRAMMAR.genome_name(genome)


def test_rendered_code_round_trips_its_genome():
    for genome in sample_genomes(40, seed=1):
        code = GRAMMAR.render_code(genome, "candidate")
        assert GRAMMAR.genome_from_code(code) == (genome, True)


def test_seed_genomes_are_inferred_approximately():
    inferred = {seed.name: GRAMMAR.genome_from_code(seed.code) for seed in TASK.seeds()}
    assert inferred["cross_entropy"] == (ClassificationGenome(), False)
    assert inferred["label_smoothing"] == (ClassificationGenome(smoothing=0.1), False)
    assert inferred["focal"] == (ClassificationGenome(focal_gamma=2.0), False)


def test_unknown_code_has_no_genome():
    assert GRAMMAR.genome_from_code("def f(logits, targets):\n    return logits.sum(dim=-1)\n") is None
    assert GRAMMAR.genome_from_code("def f(:\n") is None


def test_from_json_rejects_other_versions_and_missing_fields():
    payload = ClassificationGenome().to_json()
    with pytest.raises(ValueError, match="is not version"):
        ClassificationGenome.from_json(payload.replace(f'"version":{GENOME_VERSION}', '"version":99'))
    with pytest.raises(ValueError, match="missing the field 'margin'"):
        ClassificationGenome.from_json(payload.replace('"margin":0.0,', ""))


def test_from_json_snaps_numbers_to_ladders():
    payload = ClassificationGenome().to_json().replace('"margin":0.0', '"margin":0.9')
    assert ClassificationGenome.from_json(payload).margin == 1.0


def test_names_are_identifiers_within_64_characters():
    genomes = set(sample_genomes(200, seed=3))
    names = {GRAMMAR.genome_name(genome) for genome in genomes}
    assert len(names) == len(genomes)
    for name in names:
        assert name.isidentifier()
        assert not keyword.iskeyword(name)
        assert len(name) <= 64


def test_longest_name_is_cut_with_a_digest():
    genome = ClassificationGenome(
        primary=Shape.GCE, secondary=Shape.HINGE, mix_weight=0.75, temperature=0.5, margin=0.25, smoothing=0.05,
        focal_gamma=0.5, poly_epsilon=0.5, confidence_penalty=0.05,
    )
    name = GRAMMAR.genome_name(genome)
    digest = name.rsplit("_", 1)[1]
    assert len(name) <= 64
    assert name.startswith("gce_hinge_mix0p75_temp0p5")
    assert len(digest) == 6
    assert all(character in "0123456789abcdef" for character in digest)


def test_mutation_always_changes_the_genome():
    rng = random.Random(5)
    for parent in sample_genomes(100, seed=11):
        child, changes = GRAMMAR.mutate(parent, rng)
        assert child != parent
        assert 1 <= len(changes) <= 2


def test_crossover_takes_whole_groups_from_parents():
    rng = random.Random(2)
    parents = sample_genomes(40, seed=4)
    for first, second in zip(parents[::2], parents[1::2]):
        child, sentence = GRAMMAR.crossover(first, second, rng)
        assert "parent" in sentence
        for group in GENE_GROUPS:
            values = [getattr(child, gene) for gene in group if gene != "mix_weight"]
            from_first = [getattr(first, gene) for gene in group if gene != "mix_weight"]
            from_second = [getattr(second, gene) for gene in group if gene != "mix_weight"]
            assert values in (from_first, from_second)


def test_same_seed_gives_same_proposals():
    assert sample_genomes(20, seed=9) == sample_genomes(20, seed=9)
    assert sample_genomes(20, seed=9) != sample_genomes(20, seed=10)


def test_normalized_drops_a_repeated_shape():
    genome = ClassificationGenome(primary=Shape.MAE, secondary=Shape.MAE, mix_weight=0.9).normalized()
    assert genome == ClassificationGenome(primary=Shape.MAE)
    assert dataclasses.replace(genome, secondary=Shape.BRIER).shapes() == (Shape.MAE, Shape.BRIER)
