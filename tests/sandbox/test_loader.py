"""Tests of loading candidate code under RestrictedPython, with real torch tensors."""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest
import torch

from sandbox.loader import (
    HyperparameterView,
    RestrictedAccessError,
    _load_restricted,
    guarded_import,
    load_candidate,
    module_proxy,
)
from sandbox.static_check import CANDIDATE_FILENAME, StaticCheckError
from tests.corpus.hostile import PARAMS, entry_by_id

ROOT = Path(__file__).resolve().parents[2]
SIGNATURE = ", ".join(PARAMS)
BETA = {"beta": 0.5}
DPO_METHOD = f"""import torch.nn.functional as F

def dpo(self, {SIGNATURE}):
    m = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(self.beta * m)
"""
DPO_PLAIN = f"""import torch.nn.functional as F

def dpo({SIGNATURE}, beta=0.1):
    m = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * m)
"""


def hand_checked_inputs() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return inputs whose DPO losses at beta = 0.5 are known in closed form.

    Row 0 has margin 0, so the loss is -log(sigmoid(0)) = log 2 = 0.693147.
    Row 1 has margin 2 ln 3, so beta * m = ln 3, sigmoid(ln 3) = 3/4 and the loss
    is -log(3/4) = 0.287682.
    """
    chosen = torch.tensor([0.0, 2 * math.log(3.0)])
    zeros = torch.zeros(2)
    expected = torch.tensor([math.log(2.0), -math.log(0.75)])
    return [chosen, zeros, zeros, zeros], expected


def random_inputs(batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, generator=generator, requires_grad=True) for _ in PARAMS]


# --- both forms -------------------------------------------------------------------


def test_method_form_reads_self_beta():
    inputs, expected = hand_checked_inputs()
    candidate = load_candidate(DPO_METHOD, PARAMS, BETA)
    torch.testing.assert_close(candidate(*inputs), expected)


def test_plain_form_gets_beta_keyword():
    # The default 0.1 would give different values; the loader passes beta = 0.5.
    inputs, expected = hand_checked_inputs()
    candidate = load_candidate(DPO_PLAIN, PARAMS, BETA)
    torch.testing.assert_close(candidate(*inputs), expected)


def test_plain_form_without_hyperparameters():
    code = f"import torch\n\ndef loss_fn({SIGNATURE}):\n    return torch.relu(1 - (policy_chosen_logps - policy_rejected_logps))\n"
    candidate = load_candidate(code, PARAMS, BETA)
    # relu(1 - (0.5 - 2.0)) = 2.5 and relu(1 - (3.0 - 0.0)) = 0
    out = candidate(torch.tensor([0.5, 3.0]), torch.tensor([2.0, 0.0]), torch.zeros(2), torch.zeros(2))
    torch.testing.assert_close(out, torch.tensor([2.5, 0.0]))


def test_study_code_with_annotations_runs():
    candidate = load_candidate(entry_by_id("lrml-method-annotated").code, PARAMS, {"beta": 0.1})
    inputs = random_inputs()
    losses = candidate(*inputs)
    losses.sum().backward()
    assert losses.shape == (4,)
    assert inputs[0].grad is not None and inputs[0].grad.abs().sum() > 0


@pytest.mark.parametrize("path", sorted((ROOT / "seeds" / "preference").glob("*.py")), ids=lambda p: p.stem)
def test_seed_programs_load_and_run(path):
    losses = load_candidate(path.read_text(), PARAMS, {"beta": 0.1})(*random_inputs())
    assert losses.shape == (4,)
    assert torch.isfinite(losses).all()


def test_keyword_arguments_bound_by_name():
    inputs, expected = hand_checked_inputs()
    candidate = load_candidate(DPO_METHOD, PARAMS, BETA)
    torch.testing.assert_close(candidate(**dict(zip(PARAMS, inputs))), expected)


def test_wrong_argument_count_raises():
    candidate = load_candidate(DPO_METHOD, PARAMS, BETA)
    with pytest.raises(TypeError, match="expected the arguments"):
        candidate(torch.zeros(2))


def test_runtime_helpers_work():
    code = f"""import torch

def loss_fn({SIGNATURE}):
    out = torch.zeros_like(policy_chosen_logps)
    out[0] = 2.0
    total = 0
    for i, value in enumerate([1, 2, 3]):
        total += i * value
    first, second = (1, 2)
    print('not shown', total)
    return out + total + first + second
"""
    # out = [2, 0]; total = 0*1 + 1*2 + 2*3 = 8; first + second = 3
    out = load_candidate(code, PARAMS, BETA)(*[torch.zeros(2)] * 4)
    torch.testing.assert_close(out, torch.tensor([13.0, 11.0]))


def test_candidate_frames_named_for_worker():
    code = f"def loss_fn({SIGNATURE}):\n    return 1 / 0\n"
    candidate = load_candidate(code, PARAMS, BETA)
    with pytest.raises(ZeroDivisionError) as caught:
        candidate(*[torch.zeros(1)] * 4)
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert [(f.filename, f.lineno) for f in frames if f.filename == CANDIDATE_FILENAME] == [(CANDIDATE_FILENAME, 2)]


# --- the static check runs first, and loading failures are rejections ----------------


def test_static_check_runs_before_loading():
    code = f"def loss_fn({SIGNATURE}):\n    return policy_chosen_logps.untyped_storage()\n"
    with pytest.raises(StaticCheckError) as caught:
        load_candidate(code, PARAMS, BETA)
    assert caught.value.category == "forbidden_attribute"


def test_top_level_failure_is_load_rejection():
    code = f"SCALE = 1 / 0\n\ndef loss_fn({SIGNATURE}):\n    return policy_chosen_logps * SCALE\n"
    with pytest.raises(StaticCheckError) as caught:
        load_candidate(code, PARAMS, BETA)
    assert caught.value.category == "load"
    assert "ZeroDivisionError" in caught.value.reason


# --- the runtime layer alone, with the static policy check skipped -----------------


def test_restricted_compile_rejects_class_attribute():
    # plain compile() would accept this and ().__class__ would return tuple
    code = f"def loss_fn({SIGNATURE}):\n    return ().__class__\n"
    with pytest.raises(StaticCheckError) as caught:
        _load_restricted(code, PARAMS, BETA)
    assert caught.value.category == "restricted_python"
    assert '"__class__" is an invalid attribute name' in caught.value.reason


def test_attribute_reads_go_through_guard():
    # RestrictedPython compiles this; only the runtime _getattr_ guard stops it.
    code = f"def loss_fn({SIGNATURE}):\n    return policy_chosen_logps.untyped_storage\n"
    candidate = _load_restricted(code, PARAMS, BETA)
    with pytest.raises(RestrictedAccessError, match="attribute 'untyped_storage' is not allowed"):
        candidate(*random_inputs())


def test_runtime_blocks_getattr_built_dunder():
    candidate = _load_restricted(entry_by_id("getattr-built-dunder").code, PARAMS, BETA)
    with pytest.raises(RestrictedAccessError, match="attribute '__class__' is not allowed"):
        candidate(*random_inputs())


def test_runtime_blocks_generator_frame_at_compile():
    with pytest.raises(StaticCheckError) as caught:
        _load_restricted(entry_by_id("generator-frame").code, PARAMS, BETA)
    assert caught.value.category == "restricted_python"
    assert '"gi_frame" is a restricted name' in caught.value.reason


def test_runtime_blocks_generator_frame_getattr():
    code = f"def loss_fn({SIGNATURE}):\n    g = (x for x in [0])\n    return getattr(g, 'gi_' + 'frame')\n"
    candidate = _load_restricted(code, PARAMS, BETA)
    with pytest.raises(RestrictedAccessError, match="restricted attribute gi_frame"):
        candidate(*random_inputs())


def test_runtime_blocks_torch_os():
    candidate = _load_restricted(entry_by_id("torch-reexported-modules").code, PARAMS, BETA)
    with pytest.raises(RestrictedAccessError, match="module attribute torch.os not allowed"):
        candidate(*random_inputs())


def test_runtime_blocks_functional_torch():
    code = f"import torch.nn.functional as F\n\ndef loss_fn({SIGNATURE}):\n    return F.torch.sys.modules\n"
    candidate = _load_restricted(code, PARAMS, BETA)
    with pytest.raises(RestrictedAccessError, match="module attribute torch.nn.functional.torch not allowed"):
        candidate(*random_inputs())


def test_runtime_blocks_module_aliasing():
    code = f"import torch\n\ndef loss_fn({SIGNATURE}):\n    t = [torch][0]\n    return getattr(t, 'os')\n"
    candidate = _load_restricted(code, PARAMS, BETA)
    with pytest.raises(RestrictedAccessError, match="module attribute torch.os not allowed"):
        candidate(*random_inputs())


def test_from_import_of_denied_module_fails():
    # Without the proxy's checks Python would fall back to sys.modules['torch.cuda'].
    code = f"from torch import cuda\n\ndef loss_fn({SIGNATURE}):\n    return policy_chosen_logps\n"
    with pytest.raises(StaticCheckError) as caught:
        _load_restricted(code, PARAMS, BETA)
    assert caught.value.category == "load"
    assert "module attribute torch.cuda not allowed" in caught.value.reason


def test_attribute_assignment_blocked():
    code = f"def loss_fn({SIGNATURE}):\n    policy_chosen_logps.grad = None\n    return policy_chosen_logps\n"
    candidate = _load_restricted(code, PARAMS, BETA)
    with pytest.raises(RestrictedAccessError, match="assigning attribute 'grad' is not allowed"):
        candidate(*random_inputs())


def test_self_assignment_blocked():
    code = f"def loss_fn(self, {SIGNATURE}):\n    self.beta = 100.0\n    return policy_chosen_logps\n"
    candidate = _load_restricted(code, PARAMS, BETA)
    with pytest.raises(RestrictedAccessError):
        candidate(*random_inputs())


# --- proxies and guards ------------------------------------------------------------


def test_guarded_import_returns_proxies():
    assert guarded_import("torch.nn.functional") is module_proxy("torch")
    assert guarded_import("torch.nn.functional", fromlist=("logsigmoid",)) is module_proxy("torch.nn.functional")
    with pytest.raises(ImportError, match="import of 'os' is not allowed"):
        guarded_import("os")
    with pytest.raises(ImportError, match="relative imports are not allowed"):
        guarded_import("torch", level=1)


def test_module_proxy_exposes_only_allowed_names():
    proxy = module_proxy("torch")
    assert proxy.exp is torch.exp
    assert proxy.nn.functional is module_proxy("torch.nn.functional")
    for name in ("os", "__name__", "__dict__", "__class__", "load"):
        with pytest.raises(AttributeError):
            getattr(proxy, name)
    with pytest.raises(RestrictedAccessError, match="read-only"):
        proxy.exp = None


def test_hyperparameter_view_read_only():
    view = HyperparameterView({"beta": 0.25})
    assert view.beta == 0.25
    with pytest.raises(RestrictedAccessError, match="self.gamma is not available"):
        view.gamma
    with pytest.raises(RestrictedAccessError, match="read-only"):
        view.beta = 1.0


def test_hyperparameter_names_validated():
    with pytest.raises(ValueError, match="public identifiers"):
        _load_restricted(DPO_METHOD, PARAMS, {"_beta": 0.1})
