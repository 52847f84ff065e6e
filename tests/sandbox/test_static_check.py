"""Tests of the static policy check and of the module allow-list it relies on."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

from sandbox.allowlist import MODULE_POLICIES, check_allowlist
from sandbox.static_check import (
    MAX_SOURCE_CHARS,
    EntryForm,
    RejectionCategory,
    StaticCheckError,
    check_source,
)
from tests.corpus.hostile import BENIGN, HYPERPARAMETERS, PARAMS, entry_by_id

ROOT = Path(__file__).resolve().parents[2]
SIGNATURE = ", ".join(PARAMS)
DPO_BODY = (
    "    m = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
    "    return -F.logsigmoid(0.1 * m)\n"
)


def plain_loss(body: str = DPO_BODY, prelude: str = "import torch\nimport torch.nn.functional as F\n") -> str:
    return f"{prelude}\ndef loss_fn({SIGNATURE}):\n{body}"


def rejection(code: str, hyperparameters: tuple[str, ...] = HYPERPARAMETERS) -> StaticCheckError:
    with pytest.raises(StaticCheckError) as caught:
        check_source(code, PARAMS, hyperparameters)
    return caught.value


# --- accepted forms -------------------------------------------------------------


def test_study_method_form_accepted():
    report = check_source(entry_by_id("lrml-method-annotated").code, PARAMS, HYPERPARAMETERS)
    assert report.entry.name == "log_ratio_modulated_loss"
    assert report.entry.form is EntryForm.METHOD
    assert report.entry.keyword_hyperparameters == ()
    assert report.modules == ("torch", "torch.nn.functional")


def test_plain_form_accepted():
    report = check_source(plain_loss(), PARAMS, HYPERPARAMETERS)
    assert report.entry.form is EntryForm.PLAIN
    assert report.entry.keyword_hyperparameters == ()


@pytest.mark.parametrize("extra", [", beta", ", beta=0.1", ", *, beta"])
def test_plain_form_beta_parameter(extra):
    code = f"import torch.nn.functional as F\n\ndef loss_fn({SIGNATURE}{extra}):\n    return -F.logsigmoid(beta * policy_chosen_logps)\n"
    report = check_source(code, PARAMS, HYPERPARAMETERS)
    assert report.entry.keyword_hyperparameters == ("beta",)


def test_helper_functions_allowed():
    code = plain_loss(
        "    return helper(policy_chosen_logps) + 0 * policy_rejected_logps\n",
        prelude="import torch\nEPS = 1e-6\n\ndef helper(x):\n    return torch.relu(x) + EPS\n",
    )
    assert check_source(code, PARAMS, HYPERPARAMETERS).entry.name == "loss_fn"


# Interface of each task whose seeds live in seeds/<task>/: parameters and hyperparameters.
TASK_INTERFACES = {"preference": (PARAMS, HYPERPARAMETERS), "classification": (("logits", "targets"), ())}


@pytest.mark.parametrize(
    "path",
    [path for task in TASK_INTERFACES for path in sorted((ROOT / "seeds" / task).glob("*.py"))],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_seed_programs_accepted(path):
    params, hyperparameters = TASK_INTERFACES[path.parent.name]
    report = check_source(path.read_text(), params, hyperparameters)
    assert report.entry.name == path.stem


@pytest.mark.parametrize("entry", BENIGN, ids=lambda e: e.id)
def test_benign_corpus_accepted(entry):
    check_source(entry.code, PARAMS, HYPERPARAMETERS)


def test_constant_division_not_executed():
    # A check that ran the module would raise ZeroDivisionError here.
    code = plain_loss(prelude="import torch.nn.functional as F\nSCALE = 1 / 0\n")
    assert check_source(code, PARAMS, HYPERPARAMETERS).entry.name == "loss_fn"


def test_check_does_not_import_torch():
    script = (
        "import sys\n"
        "from sandbox.static_check import check_source\n"
        f"check_source({plain_loss()!r}, {PARAMS!r}, ('beta',))\n"
        "print('torch' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


# --- the three sandbox escapes ------------------------------------------------


def test_getattr_built_dunder_rejected():
    error = rejection(entry_by_id("getattr-built-dunder").code)
    assert error.category == "forbidden_name"
    assert error.line == 3
    assert "getattr needs a literal attribute name" in error.reason
    assert "'__cl' + 'ass__'" in error.reason
    assert "'__subcl' + 'asses__'" in error.reason


def test_getattr_literal_dunder_rejected():
    error = rejection(plain_loss("    k = getattr((), '__class__')\n" + DPO_BODY))
    assert error.category == "forbidden_attribute"
    assert "getattr(..., '__class__')" in error.reason
    assert "names starting with '_' are private" in error.reason


def test_generator_frame_rejected():
    error = rejection(entry_by_id("generator-frame").code)
    found = {(v.category, v.line) for v in error.violations}
    assert (RejectionCategory.FORBIDDEN_SYNTAX, 3) in found  # the generator expression
    reasons = [v.reason for v in error.violations if v.category is RejectionCategory.FORBIDDEN_ATTRIBUTE]
    assert any(r.startswith("restricted attribute gi_frame") for r in reasons)
    assert any(r.startswith("restricted attribute f_back") for r in reasons)


def test_torch_reexported_modules_rejected():
    error = rejection(entry_by_id("torch-reexported-modules").code)
    assert error.category == "module_attribute"
    assert error.line == 4
    assert error.reason.startswith("line 4: module attribute torch.os not allowed: it is a module")
    assert "line 5: module attribute torch.nn.functional.torch (written F.torch) not allowed" in error.reason


# --- rules, one case each ----------------------------------------------------------

_RULE_CASES = [
    # (id, code, category, text the reason must contain)
    ("import-os", plain_loss(prelude="import os\nimport torch.nn.functional as F\n"), "import",
     "import of 'os' is not allowed: only torch, torch.nn.functional"),
    ("from-torch-import-os", plain_loss(prelude="from torch import os\nimport torch.nn.functional as F\n"),
     "module_attribute", "cannot import 'os': module attribute torch.os not allowed"),
    ("star-import", plain_loss(prelude="from torch import *\nimport torch.nn.functional as F\n"), "import",
     "star imports are not allowed"),
    ("torch-load", plain_loss("    x = torch.load('a.pt')\n" + DPO_BODY), "module_attribute",
     "module attribute torch.load not allowed: it reads or writes files"),
    ("torch-utils", plain_loss("    x = torch.utils.cpp_extension\n" + DPO_BODY), "module_attribute",
     "module attribute torch.utils not allowed"),
    ("torch-nn-module", plain_loss("    x = torch.nn.Linear(2, 2)\n" + DPO_BODY), "module_attribute",
     "torch.nn may be used only to reach torch.nn.functional"),
    ("set-num-threads", plain_loss("    torch.set_num_threads(64)\n" + DPO_BODY), "module_attribute",
     "changes process-wide state"),
    ("module-as-value", plain_loss("    t = torch\n" + DPO_BODY), "module_attribute",
     "module torch (named torch) cannot be used as a value"),
    ("submodule-as-value", plain_loss("    nn = torch.nn\n" + DPO_BODY), "module_attribute",
     "module torch.nn cannot be used as a value"),
    ("rebind-alias", plain_loss("    F = 3\n" + DPO_BODY), "module_attribute",
     "name 'F' refers to module torch.nn.functional and cannot be rebound"),
    ("getattr-module", plain_loss("    f = getattr(torch, 'exp')\n" + DPO_BODY), "module_attribute",
     "cannot be used as a value"),
    ("hasattr-computed", plain_loss("    ok = hasattr(policy_chosen_logps, 'gr' + 'ad')\n" + DPO_BODY), "forbidden_name",
     "hasattr needs a literal attribute name"),
    ("getattr-keyword", plain_loss("    g = getattr(policy_chosen_logps, name='grad')\n" + DPO_BODY), "forbidden_name",
     "getattr must be called as"),
    ("setattr", plain_loss("    setattr(policy_chosen_logps, 'grad', None)\n" + DPO_BODY), "forbidden_name",
     "name 'setattr' is not allowed"),
    ("eval", plain_loss("    eval('1')\n" + DPO_BODY), "forbidden_name", "name 'eval' is not allowed"),
    ("undefined-name", plain_loss("    x = os.getcwd()\n" + DPO_BODY), "undefined_name", "name 'os' is not defined"),
    ("attribute-store", plain_loss("    policy_chosen_logps.grad = None\n" + DPO_BODY), "forbidden_attribute",
     "assigning or deleting attribute 'grad' is not allowed"),
    ("storage", plain_loss("    s = policy_chosen_logps.untyped_storage()\n" + DPO_BODY), "forbidden_attribute",
     "attribute 'untyped_storage' is not allowed"),
    ("code-attribute", plain_loss("    c = loss_fn.co_consts\n" + DPO_BODY), "forbidden_attribute",
     "restricted attribute co_consts"),
    ("format", plain_loss("    s = '{}'.format(1)\n" + DPO_BODY), "forbidden_attribute",
     "attribute 'format' is not allowed"),
    ("class", plain_loss(prelude="import torch.nn.functional as F\nclass A:\n    pass\n"), "forbidden_syntax",
     "class definitions are not allowed"),
    ("with", plain_loss("    with torch.enable_grad():\n        pass\n" + DPO_BODY), "forbidden_syntax",
     "with statements are not allowed"),
    ("try", plain_loss("    try:\n        pass\n    except ValueError:\n        pass\n" + DPO_BODY), "forbidden_syntax",
     "try statements are not allowed"),
    ("yield", plain_loss(prelude="import torch.nn.functional as F\ndef g():\n    yield 1\n"), "forbidden_syntax",
     "generators (yield) are not allowed"),
    ("decorator", plain_loss(prelude="import torch.nn.functional as F\ndef d(f):\n    return f\n@d"),
     "forbidden_syntax", "decorators are not allowed on 'loss_fn'"),
    ("nonlocal", plain_loss("    def inner():\n        nonlocal m\n    " + DPO_BODY.lstrip()), "forbidden_syntax",
     "nonlocal statements are not allowed"),
    ("top-level-call", plain_loss(prelude="import torch.nn.functional as F\nprint('loaded')\n"), "top_level",
     "top-level statement `print('loaded')` is not allowed"),
    ("top-level-if-main", plain_loss() + "\nif __name__ == '__main__':\n    pass\n", "top_level",
     "top-level statement `if __name__ == '__main__':` is not allowed"),
    ("private-name", plain_loss("    _hidden = 1\n" + DPO_BODY), "forbidden_name",
     "name '_hidden' is not allowed: names starting with '_' are private"),
    ("self-unknown", f"import torch.nn.functional as F\ndef loss_fn(self, {SIGNATURE}):\n"
     "    return -F.logsigmoid(self.gamma * policy_chosen_logps)\n", "interface",
     "self.gamma is not available: in the method form self exposes only the hyperparameters (self.beta)"),
    ("getattr-self-unknown", f"def loss_fn(self, {SIGNATURE}):\n    return getattr(self, 'gamma') * policy_chosen_logps\n",
     "interface", "self.gamma is not available"),
    ("restricted-python-reserved-name", plain_loss(prelude="import torch.nn.functional as F\ndef helper(print):\n    return 0\n"),
     "restricted_python", '"print" is a reserved name'),
]


@pytest.mark.parametrize(("code", "category", "text"), [case[1:] for case in _RULE_CASES], ids=[c[0] for c in _RULE_CASES])
def test_rule_rejects(code, category, text):
    error = rejection(code)
    assert error.category == category, error.reason
    assert text in error.reason


def test_lambda_and_comprehension_allowed():
    code = plain_loss("    f = lambda x: x * 2\n    xs = [f(t) for t in (policy_chosen_logps, policy_rejected_logps)]\n" + DPO_BODY)
    check_source(code, PARAMS, HYPERPARAMETERS)


def test_locally_bound_builtin_name_allowed():
    # `input` is a forbidden builtin, but here it names the candidate's own variable.
    check_source(plain_loss("    input = policy_chosen_logps * 2\n" + DPO_BODY), PARAMS, HYPERPARAMETERS)


# --- interface ------------------------------------------------------------------


def test_renamed_parameters_message():
    error = rejection("import torch.nn.functional as F\n\ndef loss_fn(pc, pr, rc, rr):\n    return pc\n")
    assert error.category == "interface"
    assert error.line == 3
    assert error.reason == (
        "line 3: no function has the interface parameters: expected parameters (policy_chosen_logps, "
        "policy_rejected_logps, reference_chosen_logps, reference_rejected_logps), optionally preceded by self "
        "and followed by hyperparameters (beta); got loss_fn(pc, pr, rc, rr)"
    )


def test_unknown_extra_parameter_rejected():
    code = f"def loss_fn({SIGNATURE}, gamma=0.5):\n    return policy_chosen_logps * gamma\n"
    assert "got loss_fn(" in rejection(code).reason


def test_hyperparameter_not_declared_by_task():
    code = f"def loss_fn({SIGNATURE}, beta=0.1):\n    return policy_chosen_logps * beta\n"
    assert rejection(code, hyperparameters=()).category == "interface"


def test_two_matching_functions_rejected():
    code = plain_loss() + f"\ndef other({SIGNATURE}):\n    return policy_chosen_logps\n"
    error = rejection(code)
    assert "functions loss_fn, other all take the interface parameters" in error.reason


def test_no_function_rejected():
    assert "the code defines no top-level function" in rejection("X = 1\n").reason


# --- input limits and reporting ---------------------------------------------------


def test_syntax_error_has_line():
    error = rejection(plain_loss("    return (policy_chosen_logps\n"))
    assert error.category == "syntax"
    assert error.line == 5  # two imports, a blank line, the def, then the body
    assert "invalid syntax at line 5" in error.reason


def test_null_byte_rejected():
    error = rejection(plain_loss() + "\x00")
    assert error.category == "syntax"
    assert "null bytes" in error.reason


def test_oversized_source_rejected():
    error = rejection(plain_loss() + "#" * MAX_SOURCE_CHARS)
    assert error.category == "too_large"


def test_every_problem_listed_in_line_order():
    code = plain_loss("    a = torch.os\n    b = eval('1')\n    c = policy_chosen_logps.numpy()\n" + DPO_BODY)
    error = rejection(code)
    assert [v.line for v in error.violations] == [5, 6, 7]
    assert error.line == 5
    assert error.reason.index("line 5:") < error.reason.index("line 6:") < error.reason.index("line 7:")


# --- the allow-list --------------------------------------------------------------


def test_allowlist_names_exist_and_are_not_modules():
    for path, policy in MODULE_POLICIES.items():
        module = importlib.import_module(path)
        for name in policy.names:
            assert hasattr(module, name), f"{path}.{name} is allowed but missing"
            assert not isinstance(getattr(module, name), types.ModuleType), f"{path}.{name} is a module"


def test_allowlist_check_finds_no_problems():
    assert check_allowlist() == []


def test_allowlist_check_command_succeeds():
    completed = subprocess.run(
        [sys.executable, "-m", "sandbox.allowlist", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "0 problem(s)" in completed.stdout


@pytest.mark.parametrize(
    "name",
    ["load", "save", "from_file", "hub", "utils", "ops", "compile", "_C", "classes", "library", "jit",
     "distributed", "cuda", "backends", "os", "sys", "ctypes", "importlib", "builtins", "manual_seed",
     "set_num_threads", "set_default_dtype", "use_deterministic_algorithms", "empty", "as_strided",
     "UntypedStorage", "no_grad", "autograd", "multiprocessing", "detach_"],
)
def test_allowlist_excludes_torch_attribute(name):
    assert not MODULE_POLICIES["torch"].allows(name)


@pytest.mark.parametrize(
    ("path", "name"),
    [("torch", "exp"), ("torch", "log"), ("torch", "clamp"), ("torch", "where"), ("torch", "stack"),
     ("torch", "cat"), ("torch", "sigmoid"), ("torch", "logsumexp"), ("torch", "float32"), ("torch", "bfloat16"),
     ("torch", "Tensor"), ("torch", "FloatTensor"), ("torch", "pi"), ("torch", "inf"), ("torch", "finfo"),
     ("torch.nn.functional", "logsigmoid"), ("torch.nn.functional", "softplus"), ("torch.nn.functional", "relu"),
     ("torch.nn.functional", "sigmoid"), ("torch.special", "expit"), ("torch.linalg", "vector_norm"),
     ("math", "pi"), ("math", "log"), ("math", "exp")],
)
def test_allowlist_includes_loss_building_block(path, name):
    assert MODULE_POLICIES[path].allows(name)


def test_functional_reexports_excluded():
    for name in ("torch", "np", "grad", "importlib", "math", "warnings", "handle_torch_function"):
        assert not MODULE_POLICIES["torch.nn.functional"].allows(name), name
