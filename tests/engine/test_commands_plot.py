"""Loss curves computed in the sandboxed curves job, and the plot helpers that draw them."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from engine.commands.plot import clipped_limits, reference_curves
from sandbox.curves import CurvesFailed, compute_curves
from sandbox.process_backend import network_isolation_available

PARAMS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
HEADER = "def {name}(self, " + ", ".join(PARAMS) + "):\n"
MARGIN = (
    "    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
)
DPO = (
    "import torch.nn.functional as F\n\n"
    + HEADER.format(name="dpo")
    + MARGIN
    + "    return -F.logsigmoid(self.beta * rho)\n"
)
RAISES = "import torch\n\n" + HEADER.format(name="raises") + MARGIN + "    return torch.ones(3)[rho.long() + 7]\n"
SHELL = "import os\n\n" + HEADER.format(name="shell") + MARGIN + "    os.system('true')\n    return rho\n"
BATCH_STD = "import torch\n\n" + HEADER.format(name="batch_std") + MARGIN + "    return rho - rho.std()\n"
CONSTANT = "import torch\n\n" + HEADER.format(name="constant") + "    return torch.ones_like(policy_chosen_logps)\n"

needs_isolation = pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")


@pytest.fixture
def candidate_exec_events():
    """Record code objects compiled from candidate code that run in this (the engine's) process."""
    seen: list[str] = []

    def hook(event, args):
        if event == "exec" and args and getattr(args[0], "co_filename", "") == "<candidate>":
            seen.append(args[0].co_name)

    sys.addaudithook(hook)
    return seen


@needs_isolation
def test_curves_match_hand_values(tmp_path, candidate_exec_events):
    programs = {"dpo": DPO, "raises": RAISES, "shell": SHELL, "constant": CONSTANT, "batch_std": BATCH_STD}
    curves = compute_curves(programs, PARAMS, {"beta": 0.5}, [0.0, 4.0], tmp_path / "job")

    # f = -log sigmoid(beta * rho), df/drho = -beta * sigmoid(-beta * rho); beta = 0.5:
    # rho = 0: f = log 2 = 0.693147, df = -0.5 * 0.5 = -0.25
    # rho = 4: f = log(1 + e^-2) = 0.126928, df = -0.5 * sigmoid(-2) = -0.5 * 0.119203 = -0.059601
    dpo = curves["dpo"]
    assert dpo.error == ""
    assert dpo.loss == pytest.approx([0.693147, 0.126928], abs=1e-5)
    assert dpo.grad == pytest.approx([-0.25, -0.059601], abs=1e-5)

    # a constant loss has no path to rho, so its gradient is reported as 0
    assert curves["constant"].loss == [1.0, 1.0]
    assert curves["constant"].grad == [0.0, 0.0]

    # the std of a single pair is NaN, which the curves file stores as None
    assert curves["batch_std"].error == ""
    assert curves["batch_std"].loss == [None, None]

    # a failing program reports its error without hiding the others
    assert curves["raises"].error.startswith("IndexError at policy_chosen_logps=0.0")
    assert curves["shell"].error.startswith("static check failed: line 1: import of 'os' is not allowed")

    # the programs ran in the child only
    assert candidate_exec_events == []


@needs_isolation
def test_curves_agree_with_reference_formula(tmp_path):
    rho = np.linspace(-20.0, 20.0, 41)
    curve = compute_curves({"dpo": DPO}, PARAMS, {"beta": 0.1}, rho.tolist(), tmp_path / "job")["dpo"]
    loss, grad = reference_curves(0.1, rho)["DPO"]
    assert np.allclose(curve.loss, loss, atol=1e-5)
    assert np.allclose(curve.grad, grad, atol=1e-6)


@needs_isolation
def test_curves_deadline_kills_child(tmp_path):
    # 0.2 s is far less than the child needs to import torch, so the deadline always hits
    with pytest.raises(CurvesFailed, match="timed out after 0 s"):
        compute_curves({"dpo": DPO}, PARAMS, {"beta": 0.1}, [0.0], tmp_path / "job", timeout_s=0.2)
    assert not (tmp_path / "job" / "curves.json").exists()


def test_reference_curves_hand_values():
    loss, grad = reference_curves(2.0, np.array([0.0, 1.0]))["SLiC"]
    # SLiC: max(0, 1 - 2 rho) -> 1 at rho 0 and 0 at rho 1; gradient -2 below rho = 0.5, else 0
    assert loss.tolist() == [1.0, 0.0]
    assert grad.tolist() == [-2.0, 0.0]
    loss, grad = reference_curves(2.0, np.array([0.0]))["DPO"]
    assert loss[0] == pytest.approx(math.log(2))
    assert grad[0] == pytest.approx(-1.0)


def test_clipped_limits_keep_references_visible():
    references = [np.array([0.0, 2.0])]
    # the references span 2, so curves may reach 2 spans beyond them: -4 to 6, padded by 5 %
    limits = clipped_limits(references, [np.array([-1.0, 100.0, np.nan])])
    assert limits.clipped
    assert limits.range == pytest.approx((-1.0 - 0.35, 6.0 + 0.35))
    limits = clipped_limits(references, [np.array([0.5, 3.0])])
    assert not limits.clipped
    assert limits.range == pytest.approx((-0.15, 3.15))
