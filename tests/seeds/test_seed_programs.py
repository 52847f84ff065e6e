"""Tests of the seed programs: their index, their form, and their agreement with the loss library."""

from __future__ import annotations

import ast
import sys
from types import SimpleNamespace

import pytest
import torch

from evaluators.preference.losses import LOSSES, get_loss
from seeds import SEED_GROUPS, SEEDS_DIR, load_seed_programs, read_seed

PREFERENCE_SEEDS = [name for group in SEED_GROUPS["preference"].values() for name in group]
SEED_PARAMETERS = [
    "self",
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
]
ALLOWED_IMPORTS = {("torch", None), ("torch.nn.functional", "F"), ("math", None)}


def seed_function(name: str):
    """Execute a seed's code in a fresh namespace and return its function. Seeds are our own trusted code."""
    (seed,) = [seed for seed in load_all() if seed.name == name]
    namespace: dict = {}
    exec(compile(seed.code, f"<seed {name}>", "exec"), namespace)
    return namespace[name]


def load_all():
    return [seed for group in SEED_GROUPS["preference"] for seed in load_seed_programs("preference", group)]


def random_logps(seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple((-50 + 15 * torch.randn(12, generator=generator, dtype=torch.float64)).to(dtype) for _ in range(4))


# --- index and loader --------------------------------------------------------------------------


def test_index_matches_seed_files():
    on_disk = sorted(path.stem for path in (SEEDS_DIR / "preference").glob("*.py"))
    assert sorted(PREFERENCE_SEEDS) == on_disk
    assert len(set(PREFERENCE_SEEDS)) == len(PREFERENCE_SEEDS), "a seed is listed in two groups"


def test_default_group_is_study_baselines():
    names = [seed.name for seed in load_seed_programs("preference")]
    assert names == ["dpo", "slic", "ipo", "kto_pair"]


def test_discovered_group_lists_study_losses():
    names = [seed.name for seed in load_seed_programs("preference", "discovered")]
    assert names == ["dbaql", "aql", "padll", "aqfl", "cell", "lrml", "pfl"]


def test_every_seed_is_registered_loss():
    assert set(PREFERENCE_SEEDS) <= set(LOSSES)


def test_unknown_group_suggests_close_name():
    with pytest.raises(ValueError, match=r"unknown seed group 'baseline'\. Did you mean 'baselines'\?"):
        load_seed_programs("preference", "baseline")


def test_unknown_task_lists_tasks():
    with pytest.raises(ValueError, match=r"unknown seed task 'chess'\. Known tasks: preference\."):
        load_seed_programs("chess")


def test_loader_does_not_import_seeds():
    load_all()
    assert not [module for module in sys.modules if module.startswith("seeds.preference")]


def test_seed_without_docstring_rejected(tmp_path):
    path = tmp_path / "bare.py"
    path.write_text("def bare(self, a, b, c, d):\n    return a\n")
    with pytest.raises(ValueError, match="has no module docstring"):
        read_seed(path)


def test_code_leaves_out_docstring():
    for seed in load_all():
        assert ast.get_docstring(ast.parse(seed.code)) is None, seed.name
        assert seed.code.startswith(("import ", "def ")), seed.name
        assert seed.thought not in seed.code
        assert seed.code.endswith("\n")


def test_seeds_package_imports_nothing_of_ours():
    tree = ast.parse((SEEDS_DIR / "__init__.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in {"engine", "evaluators", "sandbox", "seeds"}}


# --- form of each seed file --------------------------------------------------------------------


@pytest.mark.parametrize("name", PREFERENCE_SEEDS)
def test_seed_thought_is_one_sentence(name):
    seed = read_seed(SEEDS_DIR / "preference" / f"{name}.py")
    assert seed.thought.endswith(".")
    assert ". " not in seed.thought[:-1], seed.thought


@pytest.mark.parametrize("name", PREFERENCE_SEEDS)
def test_seed_has_only_allowed_imports_then_one_function(name):
    tree = ast.parse((SEEDS_DIR / "preference" / f"{name}.py").read_text())
    docstring, *imports, function = tree.body
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    for statement in imports:
        assert isinstance(statement, ast.Import), ast.unparse(statement)
        for alias in statement.names:
            assert (alias.name, alias.asname) in ALLOWED_IMPORTS, ast.unparse(statement)

    assert isinstance(function, ast.FunctionDef)
    assert function.name == name
    assert [argument.arg for argument in function.args.args] == SEED_PARAMETERS
    assert not (function.args.defaults or function.args.vararg or function.args.kwarg or function.args.kwonlyargs)


@pytest.mark.parametrize("name", PREFERENCE_SEEDS)
def test_seed_avoids_sandbox_restricted_names(name):
    tree = ast.parse((SEEDS_DIR / "preference" / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert "_" not in node.attr, f"attribute {node.attr!r} contains an underscore"
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                assert node.attr == "beta", f"self.{node.attr} is not a hyperparameter"
        if isinstance(node, ast.Name):
            assert node.id not in {"getattr", "setattr", "eval", "exec", "open", "__import__"}, node.id
            assert not node.id.startswith("_"), node.id


# --- agreement with the loss library ---------------------------------------------------------


@pytest.mark.parametrize("beta", [0.05, 0.1])
@pytest.mark.parametrize("name", PREFERENCE_SEEDS)
def test_seed_matches_library(name, beta):
    inputs = random_logps(seed=7)
    expected = get_loss(name)(*inputs, beta=beta)
    actual = seed_function(name)(SimpleNamespace(beta=beta), *inputs)
    assert actual.shape == (12,)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", PREFERENCE_SEEDS)
def test_seed_matches_library_at_extremes(name):
    # rho = +-1e4 at beta 0.1 puts beta * rho at +-1000. The seeds use the library's overflow-safe
    # algebra, so they return the same values there, inf included for CELL at rho = -1e4.
    half = torch.tensor([-1e4, -3.0, 0.0, 2.0, 1e4]) / 2
    reference = torch.full_like(half, -40.0)
    inputs = (reference + half, reference - half, reference, reference.clone())
    expected = get_loss(name)(*inputs, beta=0.1)
    actual = seed_function(name)(SimpleNamespace(beta=0.1), *inputs)
    assert not torch.isnan(actual).any(), actual
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
