"""Concurrent evaluations: each candidate's deadline holds on its own, whatever the others do."""

from __future__ import annotations

import time

from engine.candidate import Status
from engine.config import RunConfig, SandboxConfig
from engine.loop import Evolution, LoopOptions
from engine.runner import build_pipeline, open_run
from sandbox.protocol import Stage
from tests.engine.test_loop import MARGIN, QuietReporter, ScriptedProposer, reply
from tests.support.processes import leftover_processes

TRAIN_TIMEOUT_S = 30.0

VALID_A = reply("scaled_logistic", MARGIN + "    return -F.logsigmoid(2.0 * self.beta * rho)\n")
# passes the unit tests, whose inputs are leaf tensors, then hangs in training
HANGS_IN_TRAINING = reply(
    "hangs_in_training",
    MARGIN + "    if not policy_chosen_logps.is_leaf:\n        while True:\n            pass\n"
    "    return -F.logsigmoid(3.0 * self.beta * rho)\n",
)
VALID_C = reply("softplus_margin", MARGIN + "    return F.softplus(1.0 - self.beta * rho)\n")
VALID_D = reply("squared_margin", MARGIN + "    return (self.beta * rho - 1.0) ** 2\n")


def test_hung_candidate_killed_at_own_deadline(tmp_path, toy_task_name):
    config = RunConfig(
        task=toy_task_name,
        generations=1,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        sandbox=SandboxConfig(backend="process", unit_test_timeout_s=60, train_timeout_s=TRAIN_TIMEOUT_S, cpus=1),
    )
    context = open_run(config, None, {})
    proposer = ScriptedProposer([VALID_A, HANGS_IN_TRAINING, VALID_C, VALID_D, VALID_A, VALID_A, VALID_A])
    options = LoopOptions(generations=1, max_attempts=1, seed=0, population=4, workers=4)
    evolution = Evolution(context.task, context.settings, context.archive, build_pipeline(context), proposer,
                          QuietReporter(), options)
    evolution.add_seeds(context.task.seeds())
    evolution.judge_unfinished()

    start = time.monotonic()
    evolution.run()
    generation_s = time.monotonic() - start

    proposals = {c.name: c for c in context.archive.iter_proposals()}
    hung = proposals["hangs_in_training"]
    assert hung.status is Status.TIMEOUT
    assert hung.stage is Stage.SANDBOX
    assert hung.timings["evaluate_s"] <= TRAIN_TIMEOUT_S + 5.0
    for name in ("scaled_logistic", "softplus_margin", "squared_margin"):
        assert proposals[name].status is Status.EVALUATED, proposals[name].reason
        assert proposals[name].fitness is not None
    # the generation ends shortly after the hung candidate's deadline, not when it would have finished
    assert generation_s < TRAIN_TIMEOUT_S + 40.0
    assert context.archive.get_meta("completed_generations") == 1
    assert leftover_processes() == []
