"""Inlining of variables that are assigned once, a step of the canonical form.

Programs are parsed here, never compiled or run.
"""

from __future__ import annotations

import ast
import copy
from collections import Counter


def inline_single_assignments(tree: ast.Module, max_inlined_nodes: int) -> None:
    """Substitute each variable assigned exactly once by its expression, as in `d = ...; return f(d)`.

    Only straight-line assignments at the top of a function or module body
    are inlined, and only when every name the expression reads is bound at
    most once in that scope, so the substitution cannot change which value a
    name refers to. An expression containing a call is inlined only into a
    single use. A variable is kept when inlining it would copy more than
    `max_inlined_nodes` nodes, because chains of variables each used twice
    would otherwise grow the tree exponentially.
    """
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for scope in [*functions, tree]:
        _inline_in_scope(scope, max_inlined_nodes)


def _inline_in_scope(scope: ast.Module | ast.FunctionDef | ast.AsyncFunctionDef, max_inlined_nodes: int) -> None:
    counts = binding_counts(scope)
    remaining: list[ast.stmt] = []
    for index, statement in enumerate(scope.body):
        target = _single_name_target(statement)
        if target is None or counts[target] != 1:
            remaining.append(statement)
            continue
        value = statement.value  # type: ignore[attr-defined]
        # a use before the assignment (in a function defined earlier, say)
        # would lose its meaning if the assignment disappeared
        used_before = sum(_count_loads(earlier, target) for earlier in scope.body[:index])
        if used_before or _count_loads(value, target) or not _is_inlinable(value, counts):
            remaining.append(statement)
            continue
        uses = sum(_count_loads(later, target) for later in scope.body[index + 1 :])
        # a call such as torch.randn_like(x) may return a new value each time,
        # so an expression with a call is copied into one use only
        has_call = any(isinstance(node, ast.Call) for node in ast.walk(value))
        if uses * _node_count(value) > max_inlined_nodes or (uses > 1 and has_call):
            remaining.append(statement)
            continue
        substitute = _Substitute(target, value)
        for later in scope.body[index + 1 :]:
            substitute.visit(later)
    scope.body = remaining or [ast.Pass()]


def _single_name_target(statement: ast.stmt) -> str | None:
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target = statement.targets[0]
        if isinstance(target, ast.Name):
            return target.id
    return None


def _is_inlinable(value: ast.expr, counts: Counter[str]) -> bool:
    for node in ast.walk(value):
        if isinstance(node, (ast.NamedExpr, ast.Lambda, ast.Yield, ast.YieldFrom, ast.Await)):
            return False
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return False
        if isinstance(node, ast.Name) and counts[node.id] > 1:
            return False
        # torch's in-place methods end with an underscore (x.add_(y))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_"):
            return False
    return True


def binding_counts(scope: ast.AST) -> Counter[str]:
    """Count how often each name is bound anywhere inside `scope`, nested scopes included."""
    counts: Counter[str] = Counter()
    for node in ast.walk(scope):
        if node is scope:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                counts.update(_parameter_names(node.args))
            continue
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            counts[node.id] += 1
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            counts[node.name] += 1
            if not isinstance(node, ast.ClassDef):
                counts.update(_parameter_names(node.args))
        elif isinstance(node, ast.Lambda):
            counts.update(_parameter_names(node.args))
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            counts[node.name] += 1
        elif isinstance(node, ast.MatchMapping) and node.rest:
            counts[node.rest] += 1
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            counts.update({name: 2 for name in node.names})
    return counts


def bound_names(tree: ast.AST) -> set[str]:
    """Return every name that `tree` binds: assignments, parameters, definitions and handlers."""
    return set(binding_counts(tree))


def _parameter_names(args: ast.arguments) -> list[str]:
    parameters = args.posonlyargs + args.args + args.kwonlyargs
    parameters += [parameter for parameter in (args.vararg, args.kwarg) if parameter is not None]
    return [parameter.arg for parameter in parameters]


def _count_loads(tree: ast.AST, name: str) -> int:
    return sum(
        1 for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)
    )


def _node_count(tree: ast.AST) -> int:
    return sum(1 for _ in ast.walk(tree))


class _Substitute(ast.NodeTransformer):
    def __init__(self, name: str, value: ast.expr) -> None:
        self.name = name
        self.value = value

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == self.name and isinstance(node.ctx, ast.Load):
            return copy.deepcopy(self.value)
        return node
