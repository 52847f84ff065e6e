"""The offline proposer and the loss grammar it searches."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import random
from types import SimpleNamespace

import pytest
import torch

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
from engine.offline_proposer import OfflineProposer, crossover, mutate, random_genome, request_seed
from engine.proposer import HistoryEntry, ProposalRequest
from engine.reply import NAME_PATTERN, parse_reply

HYPERPARAMETERS = ("beta",)
DISCOPOP = Genome(primary=Shape.LOGISTIC, secondary=Shape.EXPONENTIAL, mixing=Mixing.LOG_RATIO, tau=0.05)

# DPO as a seed program is written, without a genome comment
DPO_SEED = (
    "import torch.nn.functional as F\n\n\n"
    f"def dpo(self, {', '.join(PARAMS)}):\n"
    "    pi_logratios = policy_chosen_logps - policy_rejected_logps\n"
    "    ref_logratios = reference_chosen_logps - reference_rejected_logps\n"
    "    return -F.logsigmoid(self.beta * (pi_logratios - ref_logratios))\n"
)

# DiscoPOP's log-ratio modulated loss written by hand, also without a genome comment
LRML_SEED = (
    "import torch\nimport torch.nn.functional as F\n\n\n"
    f"def lrml(self, {', '.join(PARAMS)}):\n"
    "    tau = 0.05\n"
    "    logits = self.beta * ((policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps))\n"
    "    modulation = torch.sigmoid(logits / tau)\n"
    "    return (1 - modulation) * -F.logsigmoid(logits) + modulation * torch.exp(-logits)\n"
)


def entry(genome: Genome, fitness: float | None, status: str = "evaluated") -> HistoryEntry:
    name = genome_name(genome)
    return HistoryEntry(name=name, code=render_code(genome, name), fitness=fitness, status=status)


def small_history() -> list[HistoryEntry]:
    return [
        HistoryEntry(name="dpo", code=DPO_SEED, fitness=0.50, status="evaluated"),
        entry(Genome(primary=Shape.HINGE), 0.45),
        entry(Genome(primary=Shape.SQUARED), 0.40),
        entry(Genome(primary=Shape.SIGMOID, scale=2.0), None, status="rejected"),
    ]


def request(history: list[HistoryEntry], generation: int = 1, attempt: int = 1, seed: int = 0) -> ProposalRequest:
    return ProposalRequest(messages=[], history=history, generation=generation, attempt=attempt, seed=seed)


def load_loss(code: str, name: str):
    """Run trusted, generated code in this test process and return its loss function."""
    namespace: dict[str, object] = {}
    exec(compile(code, f"<{name}>", "exec"), namespace)
    return namespace[name]


def fifty_replies(history: list[HistoryEntry]) -> list[str]:
    proposer = OfflineProposer()
    return [proposer.propose(request(history, generation=generation)).text for generation in range(1, 51)]


# proposals


def test_fifty_proposals_parse_and_compile():
    for text in fifty_replies(small_history()):
        proposal = parse_reply(text)
        tree = ast.parse(proposal.code)

        assert NAME_PATTERN.fullmatch(proposal.name)
        assert proposal.thought.endswith(".")
        assert proposal.warnings == ()
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        assert [function.name for function in functions] == [proposal.name]
        assert [arg.arg for arg in functions[0].args.args] == ["self", *PARAMS]


def test_replies_come_fenced_and_bare():
    texts = fifty_replies(small_history())

    fenced = sum(text.startswith("```json") for text in texts)
    # fence_rate is 0.3, so 50 replies hold about 15 fenced ones
    assert 5 <= fenced <= 30


def test_proposals_from_one_history_are_mostly_distinct():
    fingerprints = {canonical_fingerprint(parse_reply(text).code, HYPERPARAMETERS) for text in fifty_replies(small_history())}

    assert len(fingerprints) >= 40


def test_proposals_avoid_everything_in_history():
    # a run of 50 generations in which every proposal joins the history with a toy fitness
    history = small_history()
    known = {canonical_fingerprint(item.code, HYPERPARAMETERS) for item in history}
    proposer = OfflineProposer()
    rng = random.Random(7)
    for generation in range(1, 51):
        code = parse_reply(proposer.propose(request(history, generation=generation)).text).code
        fingerprint = canonical_fingerprint(code, HYPERPARAMETERS)

        assert fingerprint not in known
        known.add(fingerprint)
        history.append(HistoryEntry(name=f"p{generation}", code=code, fitness=rng.random(), status="evaluated"))


def test_same_request_gives_same_reply():
    history = small_history()

    first = OfflineProposer().propose(request(history, generation=3, attempt=2, seed=11))
    # a second proposer stands for a resumed process with empty caches
    second = OfflineProposer().propose(request(history, generation=3, attempt=2, seed=11))

    assert first.text == second.text
    assert first.model == "offline-genetic-v1"


def test_attempt_and_seed_change_the_reply():
    history = small_history()
    proposer = OfflineProposer()

    base = proposer.propose(request(history, attempt=1, seed=0)).text

    assert proposer.propose(request(history, attempt=2, seed=0)).text != base
    assert proposer.propose(request(history, attempt=1, seed=1)).text != base


def test_request_seed_depends_on_history():
    history = small_history()
    changed = [*history[:-1], dataclasses.replace(history[-1], status="evaluated", fitness=0.3)]

    assert request_seed(request(history)) == request_seed(request(list(history)))
    assert request_seed(request(history)) != request_seed(request(changed))


def count_with_exponential(history: list[HistoryEntry]) -> int:
    proposer = OfflineProposer()
    count = 0
    for generation in range(1, 51):
        genome, exact = genome_from_code(parse_reply(proposer.propose(request(history, generation=generation)).text).code)
        assert exact
        count += Shape.EXPONENTIAL in genome.shapes()
    return count


def test_fit_parents_pass_on_their_building_blocks():
    # only the DiscoPOP parent has an exponential term. With 5 parents a
    # tournament of 3 picks the fittest with probability 1 - C(4,3)/C(5,3) = 0.6.
    # Mutation (55% of proposals) keeps the term in most children and crossover
    # (35%) often inherits it, so about half the children carry it when DiscoPOP
    # is fittest. When a hinge parent is fittest, the term comes mainly from
    # random immigrants (10%), about one child in ten.
    others = [Genome(primary=shape) for shape in (Shape.HINGE, Shape.SQUARED, Shape.SIGMOID, Shape.SMOOTH_HINGE)]
    discopop_fittest = [entry(DISCOPOP, 0.9)] + [entry(genome, 0.15) for genome in others]
    hinge_fittest = [entry(DISCOPOP, 0.1), entry(others[0], 0.9)] + [entry(genome, 0.15) for genome in others[1:]]

    assert count_with_exponential(discopop_fittest) >= 18
    assert count_with_exponential(hinge_fittest) <= 10


def test_empty_history_still_proposes():
    proposal = parse_reply(OfflineProposer().propose(request([])).text)

    assert "Explores a random combination" in proposal.thought


def test_invalid_settings_are_reported_together():
    with pytest.raises(ValueError) as caught:
        OfflineProposer(tournament_size=0, crossover_rate=1.5, max_tries=0)

    message = str(caught.value)
    assert "tournament_size is 0" in message
    assert "crossover_rate is 1.5" in message
    assert "max_tries is 0" in message


# genomes


def test_genome_round_trips_through_code():
    rng = random.Random(3)
    for _ in range(200):
        genome = random_genome(rng)

        assert genome_from_code(render_code(genome, genome_name(genome))) == (genome, True)


def test_seed_code_gets_an_approximate_genome():
    assert genome_from_code(DPO_SEED) == (Genome(primary=Shape.LOGISTIC), False)
    assert genome_from_code(LRML_SEED) == (DISCOPOP, False)
    assert genome_from_code("def f(x):\n    return x") is None


def test_corrupt_genome_comment_falls_back_to_inference():
    code = render_code(DISCOPOP, "lrml").replace('"version":1', '"version":99')

    assert genome_from_code(code) == (DISCOPOP, False)


def test_genome_values_snap_to_ladders():
    code = render_code(Genome(), "dpo").replace('"scale":1.0', '"scale":1.9')

    genome, exact = genome_from_code(code)

    assert exact
    assert genome.scale == 2.0


def test_mutation_always_changes_the_genome():
    rng = random.Random(5)
    for _ in range(300):
        parent = random_genome(rng)

        child, changes = mutate(parent, rng)

        assert child != parent
        assert 1 <= len(changes) <= 2


def test_crossover_takes_genes_from_parents():
    first = dataclasses.replace(DISCOPOP, scale=2.0, focal_gamma=1.0)
    second = Genome(primary=Shape.HINGE, margin=0.5, smoothing=0.1)
    rng = random.Random(9)
    for _ in range(100):
        child, _ = crossover(first, second, rng)

        assert child.primary in (first.primary, second.primary)
        assert child.scale in (first.scale, second.scale)
        assert child.margin in (first.margin, second.margin)
        assert child.focal_gamma in (first.focal_gamma, second.focal_gamma)


def test_normalized_drops_unused_genes():
    genome = Genome(primary=Shape.HINGE, secondary=Shape.HINGE, mixing=Mixing.FIXED, mix_weight=0.9, tau=0.5)

    assert genome.normalized() == Genome(primary=Shape.HINGE)


def test_name_and_summary_of_discopop():
    assert genome_name(DISCOPOP) == "logistic_exp_lrml_tau0p05"
    assert describe(DISCOPOP) == (
        "Uses a blend of a logistic (DPO) loss and an exponential loss, moving from the first to the "
        "second as sigmoid(logits / 0.05) rises, as in DiscoPOP."
    )


def test_long_names_are_cut_with_a_digest():
    genome = Genome(
        primary=Shape.SMOOTH_HINGE,
        secondary=Shape.SQUARED,
        mixing=Mixing.LOG_RATIO,
        tau=0.25,
        scale=0.25,
        margin=0.25,
        chosen_weight=1.25,
        rejected_weight=0.75,
        anchor=20.0,
        smoothing=0.05,
        focal_gamma=0.5,
    )

    name = genome_name(genome)

    assert len(name) == 64
    assert NAME_PATTERN.fullmatch(name)
    assert name.startswith("smooth_hinge_squared_lrml_tau0p25_scale0p25")


# the rendered code


def every_structure() -> list[Genome]:
    """Every shape alone and every ordered pair under both mixings, with every optional gene on."""
    extras = dict(scale=2.0, margin=0.25, chosen_weight=1.25, rejected_weight=0.75, anchor=5.0, focal_gamma=0.5, smoothing=0.1)
    genomes = [Genome(primary=shape, **extras) for shape in Shape]
    for primary, secondary in itertools.permutations(Shape, 2):
        for mixing in (Mixing.FIXED, Mixing.LOG_RATIO):
            genomes.append(Genome(primary=primary, secondary=secondary, mixing=mixing, tau=0.02, **extras))
    return [genome.normalized() for genome in genomes]


def test_code_uses_only_allowed_names():
    for genome in every_structure():
        tree = ast.parse(render_code(genome, genome_name(genome)))

        imports = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert imports == ["torch", "torch.nn.functional"]
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not {attribute for attribute in attributes if attribute.startswith("_")}
        # one loss per example: nothing reduces over the batch
        assert not attributes & {"mean", "sum", "item"}
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert not names & {"getattr", "eval", "exec", "open", "__import__"}
        assert "beta" in attributes


def random_inputs(batch: int, spread: float, generator: torch.Generator) -> list[torch.Tensor]:
    return [(-spread * torch.rand(batch, generator=generator)).requires_grad_() for _ in PARAMS]


@pytest.mark.parametrize("spread", [5.0, 1000.0], ids=["typical", "extreme"])
def test_rendered_losses_are_finite_per_example(spread):
    generator = torch.Generator().manual_seed(0)
    module = SimpleNamespace(beta=0.05)
    for genome in every_structure():
        name = genome_name(genome)
        loss = load_loss(render_code(genome, name), name)
        inputs = random_inputs(16, spread, generator)

        losses = loss(module, *inputs)
        losses.sum().backward()

        assert losses.shape == (16,), name
        assert torch.isfinite(losses).all(), name
        for tensor in inputs:
            assert torch.isfinite(tensor.grad).all(), name


def test_rendered_discopop_matches_formula():
    # at beta = 0.05 and rho = 4: logits = 0.2, m = sigmoid(0.2 / 0.05) = sigmoid(4),
    # loss = (1 - m) * log(1 + exp(-0.2)) + m * exp(-0.2)
    loss = load_loss(render_code(DISCOPOP, "lrml"), "lrml")
    chosen, rejected, reference = torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([0.0])

    value = loss(SimpleNamespace(beta=0.05), chosen, rejected, reference, reference)

    m = torch.sigmoid(torch.tensor(4.0))
    expected = (1 - m) * torch.log1p(torch.exp(torch.tensor(-0.2))) + m * torch.exp(torch.tensor(-0.2))
    assert torch.allclose(value, expected.reshape(1))


def test_sampled_proposals_run_on_random_inputs():
    generator = torch.Generator().manual_seed(1)
    module = SimpleNamespace(beta=0.05)
    for text in fifty_replies(small_history())[::5]:
        proposal = parse_reply(text)
        loss = load_loss(proposal.code, proposal.name)

        losses = loss(module, *random_inputs(8, 50.0, generator))

        assert losses.shape == (8,), proposal.name
        assert torch.isfinite(losses).all(), proposal.name


def test_rendered_code_passes_static_check():
    from sandbox.static_check import check_source

    for genome in every_structure():
        name = genome_name(genome)

        report = check_source(render_code(genome, name), PARAMS, HYPERPARAMETERS)

        assert report.entry.name == name


def test_proposals_pass_static_check():
    from sandbox.static_check import check_source

    for text in fifty_replies(small_history()):
        proposal = parse_reply(text)

        report = check_source(proposal.code, PARAMS, HYPERPARAMETERS)

        assert report.entry.name == proposal.name


def test_ladders_hold_the_defaults():
    defaults = Genome()
    for gene, ladder in LADDERS.items():
        assert getattr(defaults, gene) in ladder, gene
