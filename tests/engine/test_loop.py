"""The evolution loop end to end on the toy task, with real sandbox processes.

The proposer is scripted (a fake LLM); the static checks, the sandbox worker
processes and the training are real.
"""

from __future__ import annotations

import json
import sys

import pytest

from engine.candidate import Origin, Status
from engine.config import RunConfig, SandboxConfig
from engine.loop import Evolution, LoopOptions
from engine.proposer import ProposalRequest, Proposer, ProposerReply
from engine.runner import build_pipeline, open_run
from sandbox.protocol import Stage

HEADER = "def {name}(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"


def reply(name: str, body: str, imports: str = "import torch\nimport torch.nn.functional as F\n") -> str:
    code = imports + "\n" + HEADER.format(name=name) + body
    return "Here you go:\n```json\n" + json.dumps({"thought": f"try {name}", "name": name, "code": code}) + "\n```"


MARGIN = "    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
SYSTEM_CALL = reply("shell_out", MARGIN + "    os.system('touch /tmp/evolve-pwned')\n    return -F.logsigmoid(rho)\n",
                    imports="import os\nimport torch.nn.functional as F\n")
MEAN = reply("mean_loss", MARGIN + "    losses = -F.logsigmoid(self.beta * rho)\n    return losses.mean()\n")
SOFTPLUS = reply("softplus_margin", MARGIN + "    return F.softplus(1.0 - self.beta * rho)\n")
RENAMED_DPO = reply("tidy_logistic", "    # standard DPO\n"
                    "    d = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
                    "    return -F.logsigmoid(self.beta * d)\n", imports="import torch.nn.functional as F\n")
SQUARED = reply("squared_margin", MARGIN + "    return (self.beta * rho - 1.0) ** 2\n")
NOT_JSON = "I think a hinge loss would be good here, but I'm not sure how to write it."


class ScriptedProposer(Proposer):
    name = "scripted"

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.requests: list[ProposalRequest] = []

    def propose(self, request: ProposalRequest) -> ProposerReply:
        self.requests.append(request)
        return ProposerReply(text=self.replies.pop(0), model="scripted", prompt_tokens=100, completion_tokens=50)


class QuietReporter:
    def generation_started(self, generation, total):
        pass

    def candidate_started(self, candidate):
        pass

    def candidate_finished(self, candidate):
        pass

    def generation_finished(self, generation, candidates):
        pass

    def stage(self, candidate, label):
        pass

    def progress(self, candidate, event):
        pass


def make_evolution(tmp_path, toy_task_name, replies, generations=2):
    config = RunConfig(
        task=toy_task_name,
        generations=generations,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        sandbox=SandboxConfig(backend="process", unit_test_timeout_s=60, train_timeout_s=120),
    )
    context = open_run(config, None, {})
    proposer = ScriptedProposer(replies)
    pipeline = build_pipeline(context)
    options = LoopOptions(generations=generations, max_attempts=4, seed=0)
    evolution = Evolution(context.task, context.settings, context.archive, pipeline, proposer, QuietReporter(), options)
    evolution.add_seeds(context.task.seeds())
    return evolution, proposer, context.archive


CANDIDATE_FUNCTIONS = {"shell_out", "mean_loss", "softplus_margin", "tidy_logistic", "squared_margin", "dpo", "hinge"}


def _function_names(code) -> set[str]:
    names = {code.co_name}
    for const in code.co_consts:
        if hasattr(const, "co_name"):
            names |= _function_names(const)
    return names


@pytest.fixture
def exec_events():
    """Record every code object executed in this process that defines a candidate's function."""
    seen: list[str] = []

    def hook(event, args):
        if event == "exec" and args and hasattr(args[0], "co_consts"):
            found = _function_names(args[0]) & CANDIDATE_FUNCTIONS
            if found or args[0].co_filename == "<candidate>":
                seen.append(f"{args[0].co_filename}: {sorted(found)}")

    sys.addaudithook(hook)
    return seen


def test_loop_judges_and_feeds_back(tmp_path, toy_task_name, exec_events):
    evolution, proposer, archive = make_evolution(
        tmp_path, toy_task_name, [SYSTEM_CALL, MEAN, NOT_JSON, SOFTPLUS, RENAMED_DPO, SQUARED]
    )
    evolution.judge_unfinished()
    evolution.run()

    seeds = archive.seeds()
    assert [s.status for s in seeds] == [Status.EVALUATED, Status.EVALUATED]
    proposals = {c.name: c for c in archive.iter_proposals()}

    # os.system never gets past the static stage
    shell = proposals["shell_out"]
    assert shell.status is Status.REJECTED
    assert shell.stage is Stage.STATIC
    assert "os" in shell.reason

    # a reduced loss is caught by the unit tests with a shape reason
    mean = proposals["mean_loss"]
    assert mean.status is Status.REJECTED
    assert mean.stage is Stage.UNIT_TEST
    assert "shape" in mean.reason

    # a reply that is not JSON is a parse rejection that keeps the raw reply
    unparsed = [c for c in archive.iter_proposals() if c.stage is Stage.PARSE]
    assert len(unparsed) == 1
    assert unparsed[0].reply == NOT_JSON

    # the valid candidate is trained and scored
    softplus = proposals["softplus_margin"]
    assert softplus.status is Status.EVALUATED
    assert softplus.generation == 1
    assert 0.0 <= softplus.fitness <= 1.0
    assert softplus.metrics["train_loss"]

    # generation 2: the renamed DPO is a duplicate of the seed and is not trained
    duplicate = proposals["tidy_logistic"]
    assert duplicate.status is Status.DUPLICATE
    assert duplicate.duplicate_of == "seed-dpo"
    assert "evaluate_s" not in duplicate.timings
    assert proposals["squared_margin"].status is Status.EVALUATED

    # every rejection was fed back to the proposer in the next request
    second_request = proposer.requests[1].messages
    assert second_request[-1]["role"] == "user"
    assert second_request[-1]["content"].startswith("Code not valid. Error:")
    assert archive.get_meta("completed_generations") == 2
    assert archive.llm_totals()["calls"] == 6

    # no candidate code was ever executed in this (the engine's) process
    assert exec_events == []


def test_seeds_are_not_added_twice(tmp_path, toy_task_name):
    evolution, _, archive = make_evolution(tmp_path, toy_task_name, [], generations=0)
    evolution.add_seeds(evolution.task.seeds())
    assert len([c for c in archive.candidates() if c.origin is Origin.SEED]) == 2
