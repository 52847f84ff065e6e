"""`evolve analyze`: the sandboxed analysis job, the measured properties and the sweep plots."""

from __future__ import annotations

import json
import math
import sys

import matplotlib.image
import pytest

from engine.commands import analyze
from sandbox.analysis import (
    TAIL_X,
    X_STEP,
    BatchDependence,
    Trend,
    classify_tail,
    negative_curvature_ranges,
    nonfinite_ranges,
    rho_grid,
)
from sandbox.process_backend import network_isolation_available

needs_isolation = pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")

HEADER = (
    "def {name}(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
    "    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
)
# DPO on margins centred by the batch mean: a pair alone always has margin 0.
BATCH_MEAN = "import torch.nn.functional as F\n\n" + HEADER.format(name="batch_mean") + (
    "    return -F.logsigmoid(self.beta * (rho - rho.mean()))\n"
)
BATCH_STD = "import torch.nn.functional as F\n\n" + HEADER.format(name="batch_std") + (
    "    return -F.logsigmoid(self.beta * rho / rho.std())\n"
)
SHELL = "import os\n\n" + HEADER.format(name="shell") + "    os.system('true')\n    return rho\n"


@pytest.fixture
def candidate_exec_events():
    """Record code objects compiled from candidate code that run in this (the engine's) process."""
    seen: list[str] = []

    def hook(event, args):
        if event == "exec" and args and getattr(args[0], "co_filename", "") == "<candidate>":
            seen.append(args[0].co_name)

    sys.addaudithook(hook)
    return seen


def run_json(argv, capsys) -> tuple[int, dict]:
    code = analyze.main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


# --- whole command, with the sandboxed job ----------------------------------------------------


@needs_isolation
def test_discopop_not_convex_at_any_beta(tmp_path, capsys, candidate_exec_events):
    code, report = run_json(["discopop", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert report["loss"] == "lrml"
    assert report["convex"] is False
    assert [entry["beta"] for entry in report["sweep"]] == list(analyze.STUDY_BETAS)
    for entry in report["sweep"]:
        assert entry["convex"] is False, entry["beta"]
        assert entry["nonconvex_ranges"], entry["beta"]

    # In x = beta * rho, LRML is not convex between about x = -0.014 and x = 0.24 (its weight
    # sigmoid(x / 0.05) switches from the logistic to the exponential part there), so at
    # beta = 0.1 the range is about rho = -0.14 to 2.4, cut to the 0.05-nat grid.
    (low, high), = report["sweep"][3]["nonconvex_ranges"]
    assert report["sweep"][3]["beta"] == 0.1
    assert low == pytest.approx(-0.1, abs=0.06)
    assert high == pytest.approx(2.38, abs=0.06)

    # f(0) = (1 - 1/2) * log 2 + (1/2) * e^0 = 0.846574 at every beta. In x, f'(0) = 0.25 / 0.05 * (1 - log 2)
    # - 0.5 * 0.5 - 0.5 = 0.784264, so df/drho(0) = 0.784264 * beta, positive unlike DPO's -beta / 2.
    for entry in report["sweep"]:
        assert entry["loss_at_zero"] == pytest.approx(0.5 * math.log(2) + 0.5, abs=1e-9)
        assert entry["grad_at_zero"] == pytest.approx(0.784264 * entry["beta"], rel=1e-5)

    # both sides behave like DPO: f -> 0 above, linear growth with slope -beta below
    for entry in report["sweep"]:
        assert entry["limits"]["+inf"]["loss"]["trend"] == "to_zero"
        assert entry["limits"]["-inf"]["loss"]["trend"] == "linear"
        assert entry["limits"]["-inf"]["loss"]["value"] == pytest.approx(-entry["beta"], rel=1e-6)
        assert entry["limits"]["-inf"]["grad"]["trend"] == "constant"
    assert report["batch_dependent"] is False

    # two readable PNGs of 3 x 3 panels
    assert len(report["files"]) == 2
    for path in report["files"]:
        image = matplotlib.image.imread(path)
        assert image.shape[0] >= 900, path
        assert image.shape[1] >= 1200, path
    assert report["files"][0].endswith("lrml_loss_sweep.png")
    assert report["files"][1].endswith("lrml_gradient_sweep.png")

    assert candidate_exec_events == []


@needs_isolation
def test_dpo_convex_with_hand_values(tmp_path, capsys):
    code, report = run_json(["dpo", "--betas", "0.1", "2", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert report["convex"] is True
    for entry in report["sweep"]:
        beta = entry["beta"]
        assert entry["nonconvex_ranges"] == []
        # f(0) = -log sigmoid(0) = log 2, f'(0) = -beta * sigmoid(0) = -beta / 2
        assert entry["loss_at_zero"] == pytest.approx(math.log(2), abs=1e-12)
        assert entry["grad_at_zero"] == pytest.approx(-beta / 2, abs=1e-12)
        # f = log(1 + e^(-beta rho)): -> 0 as rho -> +inf, ~ -beta * rho as rho -> -inf
        assert entry["limits"]["+inf"]["loss"]["trend"] == "to_zero"
        assert entry["limits"]["+inf"]["grad"]["trend"] == "to_zero"
        assert entry["limits"]["-inf"]["loss"]["trend"] == "linear"
        assert entry["limits"]["-inf"]["loss"]["value"] == pytest.approx(-beta)
        assert entry["limits"]["-inf"]["grad"]["value"] == pytest.approx(-beta)
    # beta = 2 needs 2 * 20 * 2 / 0.01 + 1 = 8001 points for a step of 0.01 in beta * rho
    assert report["sweep"][1]["points"] == 8001
    assert report["sweep"][1]["evaluation"] == "batched"


@needs_isolation
def test_batch_mean_loss_is_batch_dependent(tmp_path, capsys):
    path = tmp_path / "batch_mean.py"
    path.write_text(BATCH_MEAN)
    code, report = run_json([str(path), "--betas", "0.1", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert report["batch_dependent"] is True
    assert report["batch"].startswith("yes: the loss of a pair changes")
    (entry,) = report["sweep"]
    assert entry["evaluation"] == "one pair at a time"
    # alone, rho - mean(rho) = 0, so f = log 2 for every rho: flat, convex, gradient 0
    assert entry["loss_at_zero"] == pytest.approx(math.log(2))
    assert entry["grad_at_zero"] == 0.0
    assert entry["convex"] is True
    assert entry["limits"]["+inf"]["loss"]["trend"] == "constant"
    assert entry["limits"]["+inf"]["loss"]["value"] == pytest.approx(math.log(2))


@needs_isolation
def test_batch_std_loss_nan_alone(tmp_path, capsys):
    path = tmp_path / "batch_std.py"
    path.write_text(BATCH_STD)
    code, report = run_json([str(path), "--betas", "0.1", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert report["batch"].startswith("yes: the loss of a pair alone is NaN")
    (entry,) = report["sweep"]
    # the std of one value is NaN, so nothing about the shape is known
    assert entry["convex"] is None
    assert report["convex"] is None
    assert entry["limits"]["+inf"]["loss"]["trend"] == "nan"
    assert entry["grad_at_zero"] is None


@needs_isolation
def test_text_report_names_properties(tmp_path, capsys):
    assert analyze.main(["discopop", "--betas", "0.05", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "convex in rho: no, at every beta" in out
    assert "gradient at rho = 0: positive at every beta" in out
    assert "batch statistics: no" in out
    assert f"wrote {tmp_path / 'lrml_loss_sweep.png'}" in out


@needs_isolation
def test_static_rejection_exits_1(tmp_path, capsys):
    path = tmp_path / "shell.py"
    path.write_text(SHELL)
    assert analyze.main([str(path), "--betas", "0.1", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "static check failed" in out
    assert "import of 'os' is not allowed" in out
    assert not list(tmp_path.glob("*.png"))


def test_unknown_name_suggests_close_one(tmp_path, capsys):
    assert analyze.main(["discopopp", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "unknown loss 'discopopp'" in out
    assert "Did you mean 'discopop'?" in out


def test_invalid_options_exit_2(capsys):
    assert analyze.main(["dpo", "--betas", "0", "0.1", "--rho-max", "-1"]) == 2
    out = capsys.readouterr().out
    assert "every beta must be positive" in out
    assert "--rho-max -1.0" in out


# --- properties of sampled values, with hand-made sequences ----------------------------------


def test_grid_contains_zero_and_bounds_step():
    grid = rho_grid(0.1, 20.0, 801)
    assert len(grid) == 801
    assert grid[400] == 0.0
    assert grid[0] == -20.0
    assert grid[-1] == 20.0
    # beta = 5: 2 * 20 * 5 / 0.01 + 1 = 20001 points, step 0.002 nats, 0.01 in beta * rho
    grid = rho_grid(5.0, 20.0, 801)
    assert len(grid) == 20001
    assert (grid[1] - grid[0]) * 5.0 == pytest.approx(X_STEP)


def test_curvature_ranges_of_hand_curves():
    rho = [float(r) for r in range(-5, 6)]
    # |rho| is convex: second differences 0, except 2 at the kink
    assert negative_curvature_ranges(rho, [abs(r) for r in rho]) == []
    # -rho^2 has second difference -2 everywhere: one range over all centres
    assert negative_curvature_ranges(rho, [-r * r for r in rho]) == [(-4.0, 4.0)]
    # a downward jump between 0 and 1 (like PFL's): f(-1) - 2 f(0) + f(1) = 2 - 4 + 0 < 0 at rho = 0
    jump = [2.0 if r <= 0 else 0.0 for r in rho]
    assert negative_curvature_ranges(rho, jump) == [(0.0, 0.0)]
    # windows with a missing value are skipped
    holes = [-r * r for r in rho]
    holes[5] = None
    assert negative_curvature_ranges(rho, holes) == [(-4.0, -2.0), (2.0, 4.0)]
    assert nonfinite_ranges(rho, holes) == [(0.0, 0.0)]


def tail(values, sign=1.0, beta=1.0):
    rho = [sign * x / beta for x in TAIL_X]
    return classify_tail(rho, values)


def test_tail_trends_of_hand_sequences():
    xs = list(TAIL_X)
    # log(1 + e^-x) -> 0, 1 + x (SLiC below its margin, read at rho = -x) -> linear with slope -1
    assert tail([math.log1p(math.exp(-x)) for x in xs]).trend is Trend.TO_ZERO
    linear = tail([1 + x for x in xs], sign=-1.0)
    assert (linear.trend, linear.sign) == (Trend.LINEAR, 1)
    assert linear.value == pytest.approx(-1.0)
    # 0.75 + e^-x settles at 0.75; 3 +- 1/x settles at 3 from either side (Aitken's rule extrapolates the 1/x tail)
    assert tail([0.75 + math.exp(-x) for x in xs]).value == pytest.approx(0.75)
    for values in ([3 + 1 / x for x in xs], [3 - 1 / x for x in xs]):
        settling = tail(values)
        assert settling.trend is Trend.CONSTANT
        assert settling.value == pytest.approx(3.0, abs=1e-9)
    # (x - 10)^2 is quadratic; 0.5 e^(0.1 x) grows exponentially at rate 0.1 per nat of rho
    assert tail([(x - 10) ** 2 for x in xs]).trend is Trend.QUADRATIC
    exponential = tail([0.5 * math.exp(0.1 * x) for x in xs])
    assert exponential.trend is Trend.EXPONENTIAL
    assert exponential.value == pytest.approx(0.1)
    # x^3 is a power law with exponent 3; -x falls linearly to -inf
    assert tail([x**3 for x in xs]).value == pytest.approx(3.0)
    falling = tail([-x for x in xs])
    assert (falling.trend, falling.sign) == (Trend.LINEAR, -1)


def test_tail_special_values():
    assert tail([0.0] * len(TAIL_X)).trend is Trend.EXACTLY_ZERO
    assert tail([1.0, 2.0, 3.0, 4.0, 5.0, math.inf]).describe() == "overflows to +inf in float64"
    assert tail([1.0] * 5 + [None]).trend is Trend.NAN
    # values that change sign at every point have no limit
    assert tail([1.0, -2.0, 3.0, -4.0, 5.0, -6.0]).trend is Trend.UNCLEAR


def test_batch_dependence_texts():
    assert BatchDependence(False, 0.0, False).describe().startswith("no:")
    assert "NaN" in BatchDependence(True, 0.0, True).describe()
    assert "up to 0.25" in BatchDependence(True, 0.25, False).describe()
    assert BatchDependence(False, None, False, error="ValueError: bad").describe() == "unknown (ValueError: bad)"


def test_format_ranges():
    assert analyze.format_ranges([(-0.1, 2.35), (0.0, 0.0)]) == "[-0.1, 2.35], 0"
    assert analyze.format_ranges([]) == ""


def test_panel_limits_keep_small_features():
    import numpy as np

    # DPO's gradient at beta = 0.01 barely changes, yet a loss gradient 3 times its size stays visible
    reference = np.array([-0.0055, -0.0045])
    low, high, clipped = analyze.panel_limits(reference, np.array([-0.0074, 0.0082]))
    assert not clipped
    assert low < -0.0074
    assert high > 0.0082
    # an exponential loss is cut 10 reference sizes (here 100) above DPO's maximum
    low, high, clipped = analyze.panel_limits(np.array([0.0, 100.0]), np.array([0.0, 1e40]))
    assert clipped
    assert high == pytest.approx(1100.0 + 0.05 * 1100.0)
