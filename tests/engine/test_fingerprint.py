"""Canonical and behavioural fingerprints: equal for rewrites, different for different losses."""

from __future__ import annotations

import hashlib
import math

import pytest

from engine.fingerprint import behavioural_fingerprint, canonical_fingerprint, canonical_form

PARAMS = "policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps"

# an archived program written with short names and no import line
ARCHIVED_DPO = "def loss_fn(pc, pr, rc, rr):\n    return -F.logsigmoid(0.1*((pc-rc)-(pr-rr)))"

# the same program again: renamed variables, a comment, blank lines and a
# single-use variable
RENAMED_DPO = (
    "import torch.nn.functional as F\n\n"
    f"def loss_fn({PARAMS}):\n"
    "    # standard DPO\n"
    "    d = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
    "    return -F.logsigmoid(0.1 * d)\n"
)


def same(first: str, second: str, hyperparameters: tuple[str, ...] = ()) -> bool:
    return canonical_fingerprint(first, hyperparameters) == canonical_fingerprint(second, hyperparameters)


def test_renamed_program_matches_archived_one():
    assert canonical_fingerprint(RENAMED_DPO) == canonical_fingerprint(ARCHIVED_DPO)


def test_fingerprint_is_sha256_of_canonical_form():
    form = canonical_form(ARCHIVED_DPO)

    assert form == "def %0(%1, %2, %3, %4):\n    return -torch.nn.functional.logsigmoid((%1 - %3 - (%2 - %4)) * 0.1)"
    assert canonical_fingerprint(ARCHIVED_DPO) == hashlib.sha256(form.encode()).hexdigest()


@pytest.mark.parametrize(
    "variant",
    [
        ARCHIVED_DPO.replace("0.1", "0.2"),
        ARCHIVED_DPO.replace("-F.logsigmoid", "F.relu"),
        ARCHIVED_DPO.replace("(pc-rc)-(pr-rr)", "(pr-rr)-(pc-rc)"),
        ARCHIVED_DPO.replace("-F.logsigmoid(", "-F.logsigmoid(-"),
    ],
    ids=["coefficient", "function", "operand_order_of_minus", "sign"],
)
def test_different_losses_differ(variant):
    assert not same(ARCHIVED_DPO, variant)


@pytest.mark.parametrize("literal", ["1e-1", ".10", "0.100", "1/10", "(0.05 + 0.05)", "+0.1"])
def test_numeric_spellings_match(literal):
    assert same(ARCHIVED_DPO, ARCHIVED_DPO.replace("0.1", literal))


def test_int_and_float_of_same_value_match():
    assert same("def f(x):\n    return x ** 2", "def f(x):\n    return x ** 2.0")


def test_method_form_matches_parameter_form_with_hyperparameters():
    method = f"def dpo(self, {PARAMS}):\n    return -F.logsigmoid(self.beta * (policy_chosen_logps - policy_rejected_logps))"
    parameter = f"def dpo({PARAMS}, beta=0.05):\n    return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))"

    assert same(method, parameter, hyperparameters=("beta",))
    # without the declaration, beta is an ordinary parameter with a default
    assert not same(method, parameter)


def test_import_spellings_match():
    spellings = [
        "import torch.nn.functional as F\ndef f(x):\n    return F.logsigmoid(x)",
        "import torch\ndef f(x):\n    return torch.nn.functional.logsigmoid(x)",
        "from torch.nn import functional as nnf\ndef f(x):\n    return nnf.logsigmoid(x)",
        "from torch.nn.functional import logsigmoid\ndef f(x):\n    return logsigmoid(x)",
        "def f(x):\n    return F.logsigmoid(x)",
    ]

    fingerprints = {canonical_fingerprint(code) for code in spellings}

    assert len(fingerprints) == 1


def test_documented_torch_aliases_match():
    assert same("import torch\ndef f(x):\n    return torch.clip(x, 0, 1)", "import torch\ndef f(x):\n    return torch.clamp(x, 0, 1)")
    assert same("import torch.nn.functional as F\ndef f(x):\n    return F.sigmoid(x)", "import torch\ndef f(x):\n    return torch.sigmoid(x)")


def test_local_named_like_module_alias_is_a_variable():
    # F is assigned here, so it must not be read as torch.nn.functional
    shadowed = "def f(x):\n    F = x * 2\n    return F.logsigmoid(x)"

    assert not same(shadowed, "def f(x):\n    return F.logsigmoid(x)")


def test_docstrings_annotations_and_comments_are_ignored():
    plain = "def f(x, y):\n    return x * y"
    decorated = (
        '"""Module docstring."""\n'
        "from __future__ import annotations\n"
        "def f(x: 'Tensor', y: float = 1.0) -> 'Tensor':\n"
        '    """Multiply."""\n'
        "    result: 'Tensor' = x * y  # the product\n"
        "    return result\n"
    )

    assert same(plain, decorated.replace(" = 1.0", ""))


def test_commutative_operands_match():
    assert same("def f(x, y):\n    return 0.1 * (x + y)", "def f(x, y):\n    return (y + x) * 0.1")
    assert same("def f(a, b, c):\n    return a * b * c", "def f(a, b, c):\n    return c * (b * a)")


def test_string_concatenation_order_matters():
    assert not same("def f(x):\n    return 'a' + x", "def f(x):\n    return x + 'a'")


def test_reassigned_variable_is_not_inlined():
    # x = a; x = x * 2 computes 2a, which must not match 3a
    assert not same("def f(a):\n    x = a\n    x = x * 2\n    return x", "def f(a):\n    x = a * 3\n    return x")


def test_name_used_before_assignment_keeps_its_value():
    # K is read by f before the module assigns it, so K must not be inlined away
    first = "def f(x):\n    return K * x\nK = 0.1"
    second = "def f(x):\n    return K * x\nK = 0.2"

    assert not same(first, second)


def test_module_constant_is_inlined():
    assert same("TAU = 0.05\ndef f(x):\n    return x / TAU", "def f(x):\n    return x / 0.05")


def test_comprehension_variable_blocks_inlining():
    # inlining a = x into the comprehension would capture the loop's x
    first = "def f(x, xs):\n    a = x\n    return [a for x in xs]"
    second = "def f(x, xs):\n    return [x for x in xs]"

    assert not same(first, second)


def test_call_used_twice_is_not_inlined():
    # two draws of random noise differ, but one draw used twice cancels out
    first = "def f(x):\n    noise = torch.randn_like(x)\n    return x + noise - noise"
    second = "def f(x):\n    return x + torch.randn_like(x) - torch.randn_like(x)"

    assert not same(first, second)


def test_in_place_call_is_not_inlined():
    first = "def f(x):\n    y = x.add_(1)\n    return x"
    second = "def f(x):\n    return x"

    assert not same(first, second)


def test_unparsable_code_has_no_fingerprint():
    assert canonical_fingerprint("def f(:\n    return") is None
    assert canonical_form("return (") is None


# behavioural fingerprints


def test_behavioural_fingerprint_rounds_to_decimals():
    # 0.1234501 and 0.1234549 both round to 0.12345 at 5 decimals; 0.12347 does not
    assert behavioural_fingerprint([0.1234501, 1.0]) == behavioural_fingerprint([0.1234549, 1.0])
    assert behavioural_fingerprint([0.1234549, 1.0]) != behavioural_fingerprint([0.12347, 1.0])


def test_behavioural_fingerprint_of_known_values():
    # "0.50000,-2.00000" is what the hash covers
    expected = hashlib.sha256(b"0.50000,-2.00000").hexdigest()

    assert behavioural_fingerprint([0.5, -2]) == expected


def test_negative_zero_equals_zero():
    assert behavioural_fingerprint([-0.0, 1.0]) == behavioural_fingerprint([0.0, 1.0])
    # a tiny negative value rounds to -0.00000, which must read as 0.00000
    assert behavioural_fingerprint([-1e-9]) == behavioural_fingerprint([0.0])


def test_nan_and_infinity_hash_consistently():
    assert behavioural_fingerprint([math.nan, 1.0]) == behavioural_fingerprint([float("nan"), 1.0])
    assert behavioural_fingerprint([math.nan]) != behavioural_fingerprint([0.0])
    assert behavioural_fingerprint([math.inf]) != behavioural_fingerprint([-math.inf])


def test_value_order_and_count_matter():
    assert behavioural_fingerprint([1.0, 2.0]) != behavioural_fingerprint([2.0, 1.0])
    assert behavioural_fingerprint([1.0]) != behavioural_fingerprint([1.0, 1.0])


def test_nested_values_are_flattened():
    assert behavioural_fingerprint([[1.0, 2.0], (3.0,)]) == behavioural_fingerprint([1.0, 2.0, 3.0])


def test_behavioural_fingerprint_rejects_bad_input():
    with pytest.raises(TypeError, match="expected a number"):
        behavioural_fingerprint(["0.5"])
    with pytest.raises(ValueError, match="decimals is -1"):
        behavioural_fingerprint([0.5], decimals=-1)
