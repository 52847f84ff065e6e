"""Normalisation of a program's syntax tree, so that equivalent spellings of one program become one tree.

Programs are parsed here, never compiled or run. The steps, in order:

1. remove docstrings and annotations,
2. read `self.<name>` and hyperparameter parameters as free names,
3. replace import aliases by full dotted paths,
4. inline variables that are assigned once (in `engine.ast_inlining`),
5. fold numeric literals,
6. rename bound names in order of first appearance,
7. sort the operands of + and *.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Collection, Iterable

from engine.ast_inlining import bound_names, inline_single_assignments

# Free names that conventionally mean a module even when the import line is
# missing, as in code quoted from the study's prompts.
CONVENTIONAL_ALIASES = {"F": "torch.nn.functional", "nn": "torch.nn"}

# Public torch functions that are documented aliases of one another (torch 2.x).
FUNCTION_SYNONYMS = {
    "torch.nn.functional.sigmoid": "torch.sigmoid",
    "torch.nn.functional.tanh": "torch.tanh",
    "torch.nn.functional.relu": "torch.relu",
    "torch.special.expit": "torch.sigmoid",
    "torch.special.log1p": "torch.log1p",
    "torch.special.expm1": "torch.expm1",
    "torch.clip": "torch.clamp",
    "torch.absolute": "torch.abs",
}

# maximum number of nodes that inlining one variable may copy
_MAX_INLINED_NODES = 2_000
_SIGNIFICANT_DIGITS = 12
_MAX_FOLDED_EXPONENT = 64


def normalize_tree(code: str, hyperparameters: Collection[str] = ()) -> ast.Module | None:
    """Parse `code` and normalise everything but names and operand order; None if it does not parse.

    The result has no docstrings, annotations or import statements, reads
    modules by full dotted path (torch.nn.functional.logsigmoid), has
    variables that are assigned once inlined and numeric literals folded.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None

    # each step rewrites the tree in place; the order matters because later
    # steps rely on names resolved and statements removed by earlier ones
    _strip_no_effect(tree)
    _HyperparameterForm(frozenset(hyperparameters)).visit(tree)
    _resolve_imports(tree)
    inline_single_assignments(tree, _MAX_INLINED_NODES)
    return _ConstantFolder().visit(tree)


def canonicalize_tree(tree: ast.Module) -> ast.Module:
    """Rename bound names and sort commutative operands of a tree from `normalize_tree`."""
    _rename_bound_names(tree)
    tree = _CommutativeSorter().visit(tree)
    return ast.fix_missing_locations(tree)


# step 1: docstrings, comments and annotations


def _strip_no_effect(tree: ast.Module) -> None:
    """Remove docstrings and other bare constant statements, and every type annotation."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
            statements = [statement for statement in body if not _is_bare_constant(statement)]
            node.body = statements or [ast.Pass()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        if isinstance(node, ast.arg):
            node.annotation = None

    # an annotated assignment with a value is a plain assignment; one without
    # a value only declares a type
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for index, statement in enumerate(body):
                if isinstance(statement, ast.AnnAssign):
                    body[index] = (
                        ast.Assign(targets=[statement.target], value=statement.value)
                        if statement.value is not None
                        else ast.Pass()
                    )


def _is_bare_constant(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)


# step 2: the method form and hyperparameter parameters


class _HyperparameterForm(ast.NodeTransformer):
    """Rewrite `self.<name>` to `<name>` and drop `self` and hyperparameter parameters.

    After this step both `def f(self, x): ... self.beta` and
    `def f(x, beta=0.1): ... beta` read `beta` as a free name. Defaults of
    hyperparameters are dropped because the sandbox always binds them.
    """

    def __init__(self, hyperparameters: frozenset[str]) -> None:
        self.hyperparameters = hyperparameters

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self._drop_parameters(node.args)
        self.generic_visit(node)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.value, ast.Name) and node.value.id == "self" and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Name(id=node.attr, ctx=ast.Load()), node)
        self.generic_visit(node)
        return node

    def _drop_parameters(self, args: ast.arguments) -> None:
        positional = args.posonlyargs + args.args
        first_default = len(positional) - len(args.defaults)
        kept_posonly: list[ast.arg] = []
        kept_args: list[ast.arg] = []
        kept_defaults: list[ast.expr] = []
        for index, parameter in enumerate(positional):
            if (index == 0 and parameter.arg == "self") or parameter.arg in self.hyperparameters:
                continue
            if index < len(args.posonlyargs):
                kept_posonly.append(parameter)
            else:
                kept_args.append(parameter)
            # defaults belong to a suffix of the parameters, and removing
            # parameters keeps the remaining defaulted ones a suffix
            if index >= first_default:
                kept_defaults.append(args.defaults[index - first_default])
        args.posonlyargs, args.args, args.defaults = kept_posonly, kept_args, kept_defaults

        keyword_pairs = [
            (parameter, default)
            for parameter, default in zip(args.kwonlyargs, args.kw_defaults)
            if parameter.arg not in self.hyperparameters
        ]
        args.kwonlyargs = [parameter for parameter, _ in keyword_pairs]
        args.kw_defaults = [default for _, default in keyword_pairs]


# step 3: imports


def _resolve_imports(tree: ast.Module) -> None:
    """Replace imported aliases by full dotted paths, map synonyms and remove import statements."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if alias.name != "*":
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    bound = bound_names(tree)
    for name, path in CONVENTIONAL_ALIASES.items():
        if name not in bound:
            aliases.setdefault(name, path)
    # a name that code also assigns is a variable, not only a module alias
    aliases = {name: path for name, path in aliases.items() if name not in bound}

    _remove_imports(tree)
    _DottedPathRewriter(aliases).visit(tree)


def _remove_imports(tree: ast.Module) -> None:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
            statements = [statement for statement in body if not _is_resolvable_import(statement)]
            node.body = statements or [ast.Pass()]


def _is_resolvable_import(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Import):
        return True
    if isinstance(statement, ast.ImportFrom):
        # a star import or relative import cannot be resolved, so it stays
        return statement.level == 0 and all(alias.name != "*" for alias in statement.names)
    return False


class _DottedPathRewriter(ast.NodeTransformer):
    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases

    def visit_Name(self, node: ast.Name) -> ast.AST:
        path = self.aliases.get(node.id)
        if path is None or not isinstance(node.ctx, ast.Load):
            return node
        return ast.copy_location(_dotted_expression(FUNCTION_SYNONYMS.get(path, path)), node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        path = _dotted_path(node)
        if path is not None and path in FUNCTION_SYNONYMS:
            return ast.copy_location(_dotted_expression(FUNCTION_SYNONYMS[path]), node)
        return node


def _dotted_path(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _dotted_expression(path: str) -> ast.expr:
    head, *rest = path.split(".")
    node: ast.expr = ast.Name(id=head, ctx=ast.Load())
    for part in rest:
        node = ast.Attribute(value=node, attr=part, ctx=ast.Load())
    return node


# step 5: numeric literals


class _ConstantFolder(ast.NodeTransformer):
    """Fold arithmetic on numeric literals and spell every number one way.

    Integers become floats when exactly representable, and floats keep 12
    significant digits, so 0.1, 1e-1, .10 and 1/10 are one literal.
    """

    _OPERATORS = {
        ast.Add: lambda a, b: a + b,
        ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b,
        ast.Pow: lambda a, b: a**b,
    }

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if _is_number(node.value):
            node.value = _normal_number(node.value)
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, (ast.USub, ast.UAdd)) and isinstance(node.operand, ast.Constant):
            if _is_number(node.operand.value):
                value = -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
                return ast.copy_location(ast.Constant(value=_normal_number(value)), node)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        operator = self._OPERATORS.get(type(node.op))
        left, right = node.left, node.right
        if operator is None or not (isinstance(left, ast.Constant) and isinstance(right, ast.Constant)):
            return node
        if not (_is_number(left.value) and _is_number(right.value)):
            return node
        if isinstance(node.op, ast.Pow) and abs(right.value) > _MAX_FOLDED_EXPONENT:
            return node
        try:
            value = operator(left.value, right.value)
        except (ArithmeticError, ValueError):
            return node
        if not _is_number(value) or not math.isfinite(value):
            return node
        return ast.copy_location(ast.Constant(value=_normal_number(value)), node)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normal_number(value: int | float) -> int | float:
    if isinstance(value, int):
        return float(value) if abs(value) <= 2**53 else value
    if not math.isfinite(value):
        return value
    return float(f"{value:.{_SIGNIFICANT_DIGITS}g}") + 0.0  # + 0.0 turns -0.0 into 0.0


# step 6: alpha-renaming


def _rename_bound_names(tree: ast.Module) -> None:
    """Rename every bound name to %0, %1, ... in order of first appearance.

    The % sign cannot start a Python identifier, so a canonical name never
    collides with a free name such as `torch`.
    """
    bound = bound_names(tree)
    mapping: dict[str, str] = {}

    def canonical(name: str) -> str:
        if name not in bound:
            return name
        if name not in mapping:
            mapping[name] = f"%{len(mapping)}"
        return mapping[name]

    # ast.walk is breadth-first; a depth-first walk in field order follows the
    # source order, so first appearance means the same thing in both programs
    for node in _depth_first(tree):
        if isinstance(node, ast.Name):
            node.id = canonical(node.id)
        elif isinstance(node, ast.arg):
            node.arg = canonical(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            node.name = canonical(node.name)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            node.name = canonical(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            node.rest = canonical(node.rest)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            node.names = [canonical(name) for name in node.names]


def _depth_first(node: ast.AST) -> Iterable[ast.AST]:
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _depth_first(child)


# step 7: operand order of + and *


class _CommutativeSorter(ast.NodeTransformer):
    """Flatten chains of + or * and sort their operands, so a*b and b*a match.

    NOTE: this treats floating-point + and * as associative, which holds for
    the value of a loss up to rounding but not bit for bit. Chains with a
    string, list or tuple operand are left alone because there + concatenates.
    """

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if not isinstance(node.op, (ast.Add, ast.Mult)):
            return node
        operands = _chain_operands(node, type(node.op))
        if any(_is_sequence_like(operand) for operand in operands):
            return node
        operands.sort(key=ast.dump)
        result = operands[0]
        for operand in operands[1:]:
            result = ast.BinOp(left=result, op=type(node.op)(), right=operand)
        return ast.copy_location(result, node)


def _chain_operands(node: ast.expr, operator: type) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, operator):
        return _chain_operands(node.left, operator) + _chain_operands(node.right, operator)
    return [node]


def _is_sequence_like(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, bytes))
    return isinstance(node, (ast.JoinedStr, ast.List, ast.Tuple, ast.ListComp))
