"""Candidate checks of the preference task, on plain-Python losses (no model needed)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from evaluators.preference import PreferenceTask
from evaluators.preference.unit_tests import build_fixtures, check_candidate, probe_inputs
from evaluators.task import CandidateRejected

BETA = 0.1


def _margin(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def dpo_loss(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * _margin(pc, pr, rc, rr))


def dpo_softplus_loss(pc, pr, rc, rr, beta):
    # -logsigmoid(z) == softplus(-z), so this is DPO written another way
    return F.softplus(-beta * _margin(pc, pr, rc, rr))


def hinge_loss(pc, pr, rc, rr, beta):
    return torch.relu(1 - beta * _margin(pc, pr, rc, rr))


def discopop_loss(pc, pr, rc, rr, beta, tau=0.05):
    # DiscoPOP, the log-ratio modulated loss of Lu et al. 2024 (eq. 5), as TRL 1.16 writes it
    logits = beta * _margin(pc, pr, rc, rr)
    modulation = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def mean_loss(pc, pr, rc, rr, beta):
    return dpo_loss(pc, pr, rc, rr, beta).mean()


def column_loss(pc, pr, rc, rr, beta):
    return dpo_loss(pc, pr, rc, rr, beta).unsqueeze(-1)


def reference_gap_ratio_loss(pc, pr, rc, rr, beta):
    # divides by the reference gap, which is 0 for truncated and tied pairs
    return -F.logsigmoid((pc - pr) / (rc - rr))


def tied_only_ratio_loss(pc, pr, rc, rr, beta):
    # survives fully truncated rows (reference 0.0) but not a tied reference
    gap = torch.where(rc == 0, torch.ones_like(rc), rc - rr)
    return -F.logsigmoid((pc - pr) / gap)


def standardized_loss(pc, pr, rc, rr, beta):
    margin = _margin(pc, pr, rc, rr)
    return -F.logsigmoid((margin - margin.mean()) / margin.std())


def float32_constant_loss(pc, pr, rc, rr, beta):
    features = torch.stack([pc - rc, pr - rr], dim=-1)
    weights = torch.tensor([[1.0], [-1.0]])  # float32 on CPU whatever the inputs are
    return -F.logsigmoid(beta * (features @ weights).squeeze(-1))


def zero_one_loss(pc, pr, rc, rr, beta):
    margin = _margin(pc, pr, rc, rr)
    return 1.0 - (margin > 0).float() + 0.0 * margin


def chosen_only_loss(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * (pc - rc))


def cubed_exponential_loss(pc, pr, rc, rr, beta):
    # exp(3 * 30) overflows float32 at the most negative grid margin
    return torch.exp(-3 * beta * _margin(pc, pr, rc, rr))


def sqrt_at_zero_loss(pc, pr, rc, rr, beta):
    # sqrt(m^2) is |m| with a finite value, but its backward computes
    # 2m / (2 sqrt(m^2)) = 0 / 0 at m = 0, the margin at step 0
    margin = _margin(pc, pr, rc, rr)
    return 0.01 * torch.sqrt(margin**2) - F.logsigmoid(beta * margin)


def float_loss(pc, pr, rc, rr, beta):
    return float(dpo_loss(pc, pr, rc, rr, beta).mean())


def name_error_loss(pc, pr, rc, rr, beta):
    return undefined_name * pc  # noqa: F821 - the fault under test


def _rejection(loss) -> CandidateRejected:
    with pytest.raises(CandidateRejected) as caught:
        check_candidate(functools.partial(loss, beta=BETA), BETA)
    return caught.value


@pytest.mark.parametrize("loss", [dpo_loss, dpo_softplus_loss, hinge_loss, discopop_loss])
def test_known_losses_pass(loss):
    metrics = check_candidate(functools.partial(loss, beta=BETA), BETA)
    assert len(metrics["probe"]) == 27
    assert all(math.isfinite(value) for value in metrics["probe"])
    assert metrics["max_grad_norm_chosen"] > 0
    assert metrics["max_grad_norm_rejected"] > 0


def test_dpo_probe_values():
    probe = check_candidate(functools.partial(dpo_loss, beta=BETA), BETA)["probe"]

    # row 12 has both log-ratios 0: -logsigmoid(0) = log 2
    assert probe[12] == pytest.approx(math.log(2), abs=1e-6)
    # row 20 has chosen log-ratio 10 and rejected -10: margin 20, beta * margin = 2,
    # -logsigmoid(2) = log(1 + e^-2) = 0.126928
    assert probe[20] == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)
    # row 4 is the mirror image: -logsigmoid(-2) = log(1 + e^2) = 2.126928
    assert probe[4] == pytest.approx(math.log1p(math.exp(2)), abs=1e-5)


def test_probe_matches_equivalent_losses():
    dpo = check_candidate(functools.partial(dpo_loss, beta=BETA), BETA)["probe"]
    softplus = check_candidate(functools.partial(dpo_softplus_loss, beta=BETA), BETA)["probe"]
    hinge = check_candidate(functools.partial(hinge_loss, beta=BETA), BETA)["probe"]

    assert softplus == pytest.approx(dpo, abs=1e-6)
    assert hinge != pytest.approx(dpo, abs=1e-3)


def test_repeated_check_gives_same_metrics():
    # inputs are copied per run, so gradients never accumulate across fixtures or calls
    first = check_candidate(functools.partial(dpo_loss, beta=BETA), BETA)
    second = check_candidate(functools.partial(dpo_loss, beta=BETA), BETA)

    assert first == second


def test_scalar_output_rejected():
    rejection = _rejection(mean_loss)

    assert rejection.category == "shape"
    assert "output shape () != (B,)=(3,)" in rejection.reason
    assert "do not reduce" in rejection.reason


def test_column_output_rejected():
    rejection = _rejection(column_loss)

    assert rejection.category == "shape"
    assert "output shape (3, 1) != (B,)=(3,)" in rejection.reason


def test_float_output_rejected():
    rejection = _rejection(float_loss)

    assert rejection.category == "type"
    assert "returned float" in rejection.reason


def test_zero_denominator_on_truncated_pair():
    rejection = _rejection(reference_gap_ratio_loss)

    assert rejection.category == "nan"
    assert "NaN in rows [1]" in rejection.reason
    assert "fixture 'fully truncated pair'" in rejection.reason
    assert "zero denominator" in rejection.reason


def test_tied_reference_rejected():
    rejection = _rejection(tied_only_ratio_loss)

    assert rejection.category == "nan"
    assert "rows [0]" in rejection.reason
    assert "fixture 'tied pair'" in rejection.reason


def test_batch_statistic_nan_rejected():
    rejection = _rejection(standardized_loss)

    assert rejection.category == "nan"
    assert "NaN for batch_size=1 / zero-variance batch" in rejection.reason
    assert "fixture 'batch of one'" in rejection.reason


def test_overflow_on_extreme_margin():
    rejection = _rejection(cubed_exponential_loss)

    assert rejection.category == "nan"
    assert "inf in rows [0]" in rejection.reason
    assert "fixture 'margin grid'" in rejection.reason


def test_dtype_mismatch_in_bfloat16():
    rejection = _rejection(float32_constant_loss)

    assert rejection.category == "dtype_device"
    assert "expected m1 and m2 to have the same dtype" in rejection.reason
    assert "bfloat16" in rejection.reason
    assert "dtype=x.dtype, device=x.device" in rejection.reason


def test_zero_gradient_rejected():
    rejection = _rejection(zero_one_loss)

    assert rejection.category == "zero_gradient"
    assert "no learning signal (zero gradient)" in rejection.reason


def test_loss_without_rejected_term_rejected():
    rejection = _rejection(chosen_only_loss)

    assert rejection.category == "zero_gradient"
    assert "policy_rejected_logps" in rejection.reason


def test_infinite_derivative_rejected():
    rejection = _rejection(sqrt_at_zero_loss)

    assert rejection.category == "nan"
    assert "non-finite gradient wrt policy_chosen_logps" in rejection.reason
    assert "fixture 'policy equals reference (step 0)'" in rejection.reason


def test_candidate_exception_names_fixture():
    rejection = _rejection(name_error_loss)

    assert rejection.category == "exception"
    assert "NameError" in rejection.reason
    assert "fixture 'random batch of 3'" in rejection.reason


def test_fixtures_cover_degenerate_states():
    fixtures = {fixture.name: fixture for fixture in build_fixtures(BETA)}

    assert {fixture.batch_size for fixture in fixtures.values()} >= {1, 3, 8}
    truncated = torch.stack(fixtures["fully truncated pair"].tensors)[:, 1]
    assert truncated.tolist() == [0.0, 0.0, 0.0, 0.0]
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = fixtures[
        "policy equals reference (step 0)"
    ].tensors
    assert torch.equal(policy_chosen, reference_chosen)
    assert torch.equal(policy_rejected, reference_rejected)
    tied = fixtures["tied pair"].tensors
    assert tied[2][0] == tied[3][0]
    for fixture in fixtures.values():
        for tensor in fixture.tensors:
            assert tensor.dtype == torch.float32
            assert (tensor <= 0).all()


def test_margin_grid_reaches_30_over_beta():
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = {
        fixture.name: fixture for fixture in build_fixtures(BETA)
    }["margin grid"].tensors
    margins = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)

    # the grid is -30..30 in units of beta * margin, so -300..300 nats at beta 0.1
    assert margins.min().item() == pytest.approx(-300.0, abs=1e-3)
    assert margins.max().item() == pytest.approx(300.0, abs=1e-3)


def test_probe_inputs_shape():
    columns = probe_inputs()

    assert len(columns) == 4
    assert all(column.shape == (27,) for column in columns)
    assert all(column.dtype == torch.float32 for column in columns)


def test_task_unit_test_uses_settings_beta():
    task = PreferenceTask()
    settings = task.presets()["tiny"]
    metrics = task.unit_test(functools.partial(dpo_loss, beta=settings.beta), settings)

    assert metrics["probe"][12] == pytest.approx(math.log(2), abs=1e-6)
