"""The classification task in the evolution loop, with real sandbox processes and a scripted proposer.

The proposer replays fixed replies as a language model would send them. The
static checks, the unit tests and the training run in sandbox worker processes.
"""

from __future__ import annotations

import json

from engine.candidate import Status
from engine.config import RunConfig, SandboxConfig
from engine.loop import Evolution, LoopOptions, interface_text
from engine.proposer import ProposalRequest, Proposer, ProposerReply
from engine.runner import build_pipeline, open_run, prepare_task
from sandbox.protocol import Stage


def reply(name: str, body: str) -> str:
    code = f"import torch\nimport torch.nn.functional as F\n\n\ndef {name}(logits, targets):\n{body}"
    return json.dumps({"thought": f"try {name}", "name": name, "code": code})


REDUCED = reply("mean_cross_entropy", "    return F.cross_entropy(logits, targets)\n")
# cross-entropy written out by hand: other code, same values, so the probe finds the seed
HAND_CROSS_ENTROPY = reply(
    "manual_nll",
    "    log_probs = F.log_softmax(logits, dim=-1)\n"
    "    return -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)\n",
)
BRIER = reply(
    "brier_score",
    "    probs = torch.softmax(logits.float(), dim=-1)\n"
    "    one_hot = F.one_hot(targets, logits.shape[-1]).float()\n"
    "    return ((probs - one_hot) ** 2).sum(dim=-1)\n",
)


class ScriptedProposer(Proposer):
    name = "scripted"

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.requests: list[ProposalRequest] = []

    def propose(self, request: ProposalRequest) -> ProposerReply:
        self.requests.append(request)
        return ProposerReply(text=self.replies.pop(0), model="scripted")


class QuietReporter:
    def generation_started(self, generation, total):
        pass

    def candidate_started(self, candidate):
        pass

    def candidate_finished(self, candidate):
        pass

    def generation_finished(self, generation, candidates):
        pass


def test_loop_judges_classification_proposals(tmp_path):
    config = RunConfig(
        task="classification",
        preset="tiny",
        generations=1,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        sandbox=SandboxConfig(backend="process", unit_test_timeout_s=120, train_timeout_s=300),
    )
    context = open_run(config, None, {})
    prepare_task(context.task, context.settings, tmp_path / "cache", tmp_path / "run" / "jobs" / "prepare")
    proposer = ScriptedProposer([REDUCED, HAND_CROSS_ENTROPY, BRIER])
    options = LoopOptions(generations=1, max_attempts=4, seed=0)
    evolution = Evolution(
        context.task, context.settings, context.archive, build_pipeline(context), proposer, QuietReporter(), options
    )
    evolution.add_seeds(context.task.seeds())
    evolution.judge_unfinished()
    evolution.run()

    # the three seeds are trained and scored by the classification evaluator
    seeds = {seed.name: seed for seed in context.archive.seeds()}
    assert set(seeds) == {"cross_entropy", "label_smoothing", "focal"}
    for seed in seeds.values():
        assert seed.status is Status.EVALUATED
        assert 0.5 < seed.fitness <= 1.0
        assert seed.metrics["accuracy"] == seed.fitness

    proposals = {candidate.name: candidate for candidate in context.archive.iter_proposals()}
    reduced = proposals["mean_cross_entropy"]
    assert reduced.status is Status.REJECTED
    assert reduced.stage is Stage.UNIT_TEST
    assert "one loss per example" in reduced.reason

    duplicate = proposals["manual_nll"]
    assert duplicate.status is Status.DUPLICATE
    assert duplicate.duplicate_of == "seed-cross_entropy"

    brier = proposals["brier_score"]
    assert brier.status is Status.EVALUATED
    assert 0.5 < brier.fitness <= 1.0
    assert len(brier.metrics["train_curve"]) == 1
    assert len(proposer.requests) == 3

    # the prompt states the task's interface and its data
    system = proposer.requests[0].messages[0]["content"]
    assert interface_text(context.task) in system
    assert "8x8 handwritten digits" in system
