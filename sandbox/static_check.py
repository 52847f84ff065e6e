"""Static checks on candidate source code, run before any of it executes.

`check_source` parses the code with `ast`, applies the sandbox policy and then
collects RestrictedPython's compile errors. It never executes the code and never
imports torch, so the engine calls it directly on LLM output. The policy:

- the top level contains only imports, function definitions and constant assignments;
- exactly one function takes the interface parameters, either in the DiscoPOP
  study's method form `f(self, <params>)` reading `self.<hyperparameter>`, or in
  the plain form `f(<params>, [<hyperparameter>=...])`;
- imports come from torch, torch.nn.functional, torch.special, torch.linalg and
  math, and every attribute of those modules is in sandbox.allowlist;
- no builtin that reaches code, frames, files or the object model, no attribute
  that starts with "_" or is on the deny-list, and getattr/hasattr only with a
  literal attribute name;
- no classes, generators, async code, decorators, or with, try, match, global
  and nonlocal statements.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

from RestrictedPython import compile_restricted_exec

from sandbox.allowlist import (
    FORBIDDEN_BUILTINS,
    IMPORTABLE_MODULES,
    PRESET_MODULE_ALIASES,
    SAFE_BUILTIN_NAMES,
    attribute_denial,
    child_module,
    module_attribute_denial,
)

# Filename of compiled candidate code; the worker looks for it in tracebacks.
CANDIDATE_FILENAME = "<candidate>"
# A loss function is a few dozen lines; this bound keeps parsing and checking fast.
MAX_SOURCE_CHARS = 50_000
_MAX_LISTED_PROBLEMS = 5
_IMPORT_HINT = "only torch, torch.nn.functional, torch.special, torch.linalg and math may be imported"
# Builtins that may only be called directly with a literal attribute name.
_LITERAL_NAME_CALLS = {"getattr": (2, 3), "hasattr": (2, 2)}

_FORBIDDEN_SYNTAX = {
    ast.ClassDef: "class definitions are not allowed: define functions only",
    ast.With: "with statements are not allowed: a loss function needs no context manager such as torch.no_grad()",
    ast.AsyncWith: "async code is not allowed",
    ast.AsyncFunctionDef: "async code is not allowed",
    ast.AsyncFor: "async code is not allowed",
    ast.Await: "async code is not allowed",
    ast.Yield: "generators (yield) are not allowed: return a tensor or build a list",
    ast.YieldFrom: "generators (yield from) are not allowed: return a tensor or build a list",
    ast.GeneratorExp: (
        "generator expressions are not allowed, because a generator's frame leads back to the caller's "
        "frames: use a list comprehension, as in sum([...])"
    ),
    ast.Global: "global statements are not allowed: pass values as arguments and return results",
    ast.Nonlocal: "nonlocal statements are not allowed: pass values as arguments and return results",
    ast.Try: (
        "try statements are not allowed: a loss should not catch errors, and catching them could "
        "swallow the sandbox's timeout"
    ),
    ast.TryStar: "try statements are not allowed: a loss should not catch errors",
    ast.Match: "match statements are not allowed: class patterns read attributes without the sandbox's checks",
}


class RejectionCategory(str, Enum):
    """Kind of static rejection, stored as `StaticCheckError.category`."""

    SYNTAX = "syntax"
    TOO_LARGE = "too_large"
    TOP_LEVEL = "top_level"
    INTERFACE = "interface"
    IMPORT = "import"
    FORBIDDEN_NAME = "forbidden_name"
    UNDEFINED_NAME = "undefined_name"
    FORBIDDEN_ATTRIBUTE = "forbidden_attribute"
    MODULE_ATTRIBUTE = "module_attribute"
    FORBIDDEN_SYNTAX = "forbidden_syntax"
    RESTRICTED_PYTHON = "restricted_python"
    LOAD = "load"  # raised by sandbox.loader when the module's top level fails to run


class EntryForm(str, Enum):
    """Calling convention of the entry function, which decides how it receives hyperparameters."""

    METHOD = "method"  # def f(self, <params>) reading self.<hyperparameter>
    PLAIN = "plain"  # def f(<params>, <hyperparameter>=...) or def f(<params>)


@dataclass(frozen=True)
class Violation:
    """One broken rule, at a line of the candidate code."""

    category: RejectionCategory
    reason: str
    line: int | None


@dataclass(frozen=True)
class EntryPoint:
    """The function that implements the interface.

    Attributes:
        name: the function's name.
        form: whether it takes `self` (method form) or not (plain form).
        keyword_hyperparameters: extra parameters after the interface parameters,
            each a hyperparameter name that the loader passes as a keyword.
        line: line of the `def`.
    """

    name: str
    form: EntryForm
    keyword_hyperparameters: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class StaticReport:
    """Result of a passed static check: the entry point and the imported modules."""

    entry: EntryPoint
    modules: tuple[str, ...]  # modules the code imports, sorted


class StaticCheckError(Exception):
    """Raised when candidate code breaks the sandbox policy; `reason` names the problem and the fix.

    `category` is a RejectionCategory value, `line` the line of the first problem,
    and `violations` every problem found, in line order.
    """

    def __init__(
        self, reason: str, category: str, line: int | None = None, violations: tuple[Violation, ...] = ()
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category.value if isinstance(category, Enum) else str(category)
        self.line = line
        self.violations = violations

    def __str__(self) -> str:
        return f"{self.category}: {self.reason}"


def raise_violations(violations: Iterable[Violation]) -> None:
    """Raise one StaticCheckError that lists `violations`; return if there are none."""
    ordered = sorted(violations, key=lambda v: v.line or 0)
    if not ordered:
        return
    listed = [f"line {v.line}: {v.reason}" if v.line else v.reason for v in ordered[:_MAX_LISTED_PROBLEMS]]
    reason = "; ".join(listed)
    if len(ordered) > _MAX_LISTED_PROBLEMS:
        reason += f"; and {len(ordered) - _MAX_LISTED_PROBLEMS} more problem(s)"
    first = ordered[0]
    raise StaticCheckError(reason, first.category, first.line, tuple(ordered))


def parse_source(code: str) -> ast.Module:
    """Parse candidate code without running it; raise StaticCheckError for size or syntax errors."""
    if not isinstance(code, str):
        raise TypeError(f"candidate code must be a str; got {type(code).__name__}")
    if len(code) > MAX_SOURCE_CHARS:
        raise StaticCheckError(
            f"the code has {len(code)} characters; the limit is {MAX_SOURCE_CHARS}: write a shorter function",
            RejectionCategory.TOO_LARGE,
        )
    try:
        return ast.parse(code, filename=CANDIDATE_FILENAME)
    except SyntaxError as error:
        where = f" at line {error.lineno}" if error.lineno else ""
        text = f" in {error.text.strip()!r}" if error.text else ""
        raise StaticCheckError(
            f"invalid syntax{where}: {error.msg}{text}", RejectionCategory.SYNTAX, error.lineno
        ) from None
    except (ValueError, RecursionError, MemoryError) as error:
        # ValueError: null bytes in the source; RecursionError: nesting deeper than the parser allows
        raise StaticCheckError(f"the code cannot be parsed: {error}", RejectionCategory.SYNTAX) from None


def describe_interface(params: tuple[str, ...], hyperparameters: tuple[str, ...]) -> str:
    """Return the accepted signatures in words, for error messages and prompts."""
    text = f"({', '.join(params)}), optionally preceded by self"
    if hyperparameters:
        text += f" and followed by hyperparameters ({', '.join(hyperparameters)})"
    return text


def _match_interface(
    function: ast.FunctionDef, params: tuple[str, ...], hyperparameters: tuple[str, ...]
) -> EntryPoint | None:
    args = function.args
    if args.vararg or args.kwarg:
        return None
    positional = [a.arg for a in args.posonlyargs + args.args]
    form = EntryForm.PLAIN
    if positional[:1] == ["self"] and params[:1] != ("self",):
        form = EntryForm.METHOD
        positional = positional[1:]
    if tuple(positional[: len(params)]) != params:
        return None
    extras = positional[len(params) :] + [a.arg for a in args.kwonlyargs]
    if any(name not in hyperparameters for name in extras):
        return None
    # extras are passed as keywords, so none may be positional-only
    if len(args.posonlyargs) > len(params) + (form is EntryForm.METHOD):
        return None
    return EntryPoint(function.name, form, tuple(extras), function.lineno)


def find_entry_point(tree: ast.Module, params: tuple[str, ...], hyperparameters: tuple[str, ...]) -> EntryPoint:
    """Return the one top-level function whose parameters match the interface.

    Raises:
        StaticCheckError: with category "interface" if no function or several match.
    """
    params, hyperparameters = tuple(params), tuple(hyperparameters)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    matches = [entry for entry in (_match_interface(f, params, hyperparameters) for f in functions) if entry]
    if len(matches) == 1:
        return matches[0]

    expected = describe_interface(params, hyperparameters)
    if len(matches) > 1:
        names = ", ".join(entry.name for entry in matches)
        reason = f"functions {names} all take the interface parameters; define exactly one such function"
        raise StaticCheckError(reason, RejectionCategory.INTERFACE, matches[1].line)
    if not functions:
        reason = f"the code defines no top-level function; expected one with parameters {expected}"
        raise StaticCheckError(reason, RejectionCategory.INTERFACE, None)
    got = "; ".join(f"{f.name}({_signature(f)})" for f in functions)
    reason = f"no function has the interface parameters: expected parameters {expected}; got {got}"
    raise StaticCheckError(reason, RejectionCategory.INTERFACE, functions[0].lineno)


def _signature(function: ast.FunctionDef) -> str:
    args = function.args
    names = [a.arg for a in args.posonlyargs + args.args]
    if args.vararg:
        names.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append(f"**{args.kwarg.arg}")
    return ", ".join(names)


def check_source(code: str, params: tuple[str, ...], hyperparameters: tuple[str, ...]) -> StaticReport:
    """Check candidate code against the sandbox policy without executing it.

    Raises:
        StaticCheckError: listing every problem found, with the first one's category and line.
    """
    params, hyperparameters = tuple(params), tuple(hyperparameters)
    tree = parse_source(code)
    violations: list[Violation] = []

    entry = None
    try:
        entry = find_entry_point(tree, params, hyperparameters)
    except StaticCheckError as error:
        violations.append(Violation(RejectionCategory.INTERFACE, error.reason, error.line))

    visitor = _PolicyVisitor(tree, entry, hyperparameters)
    try:
        visitor.run()
    except RecursionError:
        violations.append(
            Violation(RejectionCategory.TOO_LARGE, "the code is nested too deeply to check: flatten it", None)
        )
    violations += visitor.violations
    raise_violations(violations)

    # RestrictedPython's own policy, as a second opinion; compiling runs none of the code
    try:
        result = compile_restricted_exec(code, filename=CANDIDATE_FILENAME)
    except RecursionError:
        result = None
        violations.append(Violation(RejectionCategory.TOO_LARGE, "the code is nested too deeply to compile", None))
    if result is not None:
        violations += [restricted_python_violation(message) for message in result.errors]
    raise_violations(violations)

    assert entry is not None  # a failed find_entry_point added a violation, raised above
    return StaticReport(entry=entry, modules=tuple(sorted(visitor.imported_modules)))


def restricted_python_violation(message: str) -> Violation:
    """Turn one RestrictedPython compile error ("Line 3: ...") into a Violation."""
    match = re.match(r"Line (\d+): (.*)", message, flags=re.DOTALL)
    if match is None:
        return Violation(RejectionCategory.RESTRICTED_PYTHON, message, None)
    return Violation(RejectionCategory.RESTRICTED_PYTHON, match.group(2), int(match.group(1)))


def _is_constant_expression(node: ast.expr) -> bool:
    """Return whether a top-level assignment's value is a literal, arithmetic on literals or a name."""
    if isinstance(node, (ast.Constant, ast.Name, ast.Attribute)):
        # names and attributes are checked like any other use; a call is not a constant
        return True
    if isinstance(node, ast.UnaryOp):
        return _is_constant_expression(node.operand)
    if isinstance(node, ast.BinOp):
        return _is_constant_expression(node.left) and _is_constant_expression(node.right)
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(_is_constant_expression(element) for element in node.elts)
    return False


def _short(node: ast.AST, limit: int = 60) -> str:
    text = ast.unparse(node).splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _PolicyVisitor(ast.NodeVisitor):
    """Walks a parsed module once and collects every violation of the sandbox policy."""

    def __init__(self, tree: ast.Module, entry: EntryPoint | None, hyperparameters: tuple[str, ...]) -> None:
        self.tree = tree
        self.entry = entry
        self.hyperparameters = hyperparameters
        self.violations: list[Violation] = []
        self.imported_modules: set[str] = set()
        self.parents: dict[ast.AST, ast.AST] = {}
        self.module_aliases: dict[str, str] = dict(PRESET_MODULE_ALIASES)
        self.bound_names: set[str] = set()
        self._in_method_entry = False

    def run(self) -> None:
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self._collect_bindings()
        self._check_top_level()
        self.visit(self.tree)

    def _reject(self, node: ast.AST | None, category: RejectionCategory, reason: str) -> None:
        self.violations.append(Violation(category, reason, getattr(node, "lineno", None)))

    # bindings: module aliases from imports, and every other name the code binds

    def _collect_bindings(self) -> None:
        imported_aliases: dict[str, str] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._bind_import(node, alias, imported_aliases)
            elif isinstance(node, ast.ImportFrom):
                self._bind_import_from(node, imported_aliases)
            elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                self.bound_names.add(node.id)
            elif isinstance(node, ast.arg):
                self.bound_names.add(node.arg)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.bound_names.add(node.name)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                self.bound_names.add(node.name)
        self.module_aliases.update(imported_aliases)

    def _bind_module(self, node: ast.AST, name: str, module: str, imported_aliases: dict[str, str]) -> None:
        self._check_binding(node, name, check_alias=False)
        previous = imported_aliases.get(name)
        if previous is not None and previous != module:
            self._reject(
                node,
                RejectionCategory.IMPORT,
                f"name {name!r} is bound to both {previous} and {module}: use one name per module",
            )
        imported_aliases[name] = module
        self.imported_modules.add(module)

    def _bind_import(self, node: ast.Import, alias: ast.alias, imported_aliases: dict[str, str]) -> None:
        if alias.name not in IMPORTABLE_MODULES:
            self._reject(node, RejectionCategory.IMPORT, f"import of {alias.name!r} is not allowed: {_IMPORT_HINT}")
        elif alias.asname:
            self._bind_module(node, alias.asname, alias.name, imported_aliases)
        else:
            # `import torch.nn.functional` binds the top-level package `torch`
            top = alias.name.split(".")[0]
            self._bind_module(node, top, top, imported_aliases)
            self.imported_modules.add(alias.name)

    def _bind_import_from(self, node: ast.ImportFrom, imported_aliases: dict[str, str]) -> None:
        if node.level:
            self._reject(node, RejectionCategory.IMPORT, f"relative imports are not allowed: {_IMPORT_HINT}")
            return
        if node.module not in IMPORTABLE_MODULES:
            self._reject(node, RejectionCategory.IMPORT, f"import of {node.module!r} is not allowed: {_IMPORT_HINT}")
            return
        self.imported_modules.add(node.module)
        for alias in node.names:
            bound = alias.asname or alias.name
            child = child_module(node.module, alias.name)
            if alias.name == "*":
                self._reject(node, RejectionCategory.IMPORT, "star imports are not allowed: import the names you use")
            elif child is not None:
                self._bind_module(node, bound, child, imported_aliases)
            elif (denial := module_attribute_denial(node.module, alias.name)) is not None:
                self._reject(node, RejectionCategory.MODULE_ATTRIBUTE, f"cannot import {alias.name!r}: {denial}")
            else:
                self._check_binding(node, bound)
                self.bound_names.add(bound)

    # top level

    def _check_top_level(self) -> None:
        for index, statement in enumerate(self.tree.body):
            if isinstance(statement, (ast.Import, ast.ImportFrom, ast.FunctionDef)):
                continue
            if type(statement) in _FORBIDDEN_SYNTAX:
                continue  # reported by the visitor with a more specific reason
            if index == 0 and isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                continue  # module docstring
            if isinstance(statement, ast.Assign) and self._is_constant_assignment(statement.targets, statement.value):
                continue
            if isinstance(statement, ast.AnnAssign) and statement.value is not None:
                if self._is_constant_assignment([statement.target], statement.value):
                    continue
            self._reject(
                statement,
                RejectionCategory.TOP_LEVEL,
                f"top-level statement `{_short(statement)}` is not allowed: the module may contain only imports, "
                "function definitions and constant assignments such as EPS = 1e-6; compute values inside the function",
            )

    @staticmethod
    def _is_constant_assignment(targets: list[ast.expr], value: ast.expr) -> bool:
        names_only = all(
            isinstance(t, ast.Name) or (isinstance(t, ast.Tuple) and all(isinstance(e, ast.Name) for e in t.elts))
            for t in targets
        )
        return names_only and _is_constant_expression(value)

    # syntax

    def generic_visit(self, node: ast.AST) -> None:
        reason = _FORBIDDEN_SYNTAX.get(type(node))
        if reason is not None:
            self._reject(node, RejectionCategory.FORBIDDEN_SYNTAX, reason)
        super().generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.decorator_list:
            self._reject(node, RejectionCategory.FORBIDDEN_SYNTAX, f"decorators are not allowed on {node.name!r}")
        self._check_binding(node, node.name)
        is_entry = self.entry is not None and node.lineno == self.entry.line and node.name == self.entry.name
        outer = self._in_method_entry
        if is_entry:
            self._in_method_entry = self.entry.form is EntryForm.METHOD
        self.generic_visit(node)
        self._in_method_entry = outer

    def visit_arg(self, node: ast.arg) -> None:
        self._check_binding(node, node.arg)
        self.generic_visit(node)

    def _check_binding(self, node: ast.AST, name: str, check_alias: bool = True) -> None:
        if name.startswith("_") and name != "_":
            self._reject(
                node, RejectionCategory.FORBIDDEN_NAME, f"name {name!r} is not allowed: names starting with '_' are private"
            )
        elif check_alias and name in self.module_aliases:
            self._reject(
                node,
                RejectionCategory.MODULE_ATTRIBUTE,
                f"name {name!r} refers to module {self.module_aliases[name]} and cannot be rebound: choose another name",
            )

    # names

    def visit_Name(self, node: ast.Name) -> None:
        name = node.id
        parent = self.parents.get(node)
        if not isinstance(node.ctx, ast.Load):
            self._check_binding(node, name)
        elif name.startswith("_") and name != "_":
            self._reject(
                node, RejectionCategory.FORBIDDEN_NAME, f"name {name!r} is not allowed: names starting with '_' are private"
            )
        elif name in self.module_aliases:
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                module = self.module_aliases[name]
                self._reject(
                    node,
                    RejectionCategory.MODULE_ATTRIBUTE,
                    f"module {module} (named {name}) cannot be used as a value: write {name}.<function> where you need it",
                )
        elif name in self.bound_names:
            pass
        elif name in FORBIDDEN_BUILTINS:
            self._reject(node, RejectionCategory.FORBIDDEN_NAME, f"name {name!r} is not allowed: {FORBIDDEN_BUILTINS[name]}")
        elif name in _LITERAL_NAME_CALLS:
            if not (isinstance(parent, ast.Call) and parent.func is node):
                self._reject(
                    node,
                    RejectionCategory.FORBIDDEN_NAME,
                    f"{name} may only be called directly, as {name}(obj, 'attribute')",
                )
        elif name not in SAFE_BUILTIN_NAMES:
            self._reject(
                node,
                RejectionCategory.UNDEFINED_NAME,
                f"name {name!r} is not defined: define or import it ({_IMPORT_HINT}); the available builtins "
                f"are {', '.join(sorted(n for n in SAFE_BUILTIN_NAMES if n.islower()))}",
            )

    # attributes

    def _module_path(self, node: ast.expr) -> str | None:
        """Return the module that `node` names (torch, F, torch.nn, ...), or None for other values."""
        if isinstance(node, ast.Name):
            return self.module_aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._module_path(node.value)
            return child_module(base, node.attr) if base is not None else None
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        base = self._module_path(node.value)
        if base is not None:
            self._check_module_attribute(node, base)
        else:
            denial = attribute_denial(node.attr)
            if denial is not None:
                self._reject(node, RejectionCategory.FORBIDDEN_ATTRIBUTE, denial)
            elif isinstance(node.value, ast.Name) and node.value.id == "self":
                self._check_self_attribute(node, node.attr)
        if not isinstance(node.ctx, ast.Load):
            self._reject(
                node,
                RejectionCategory.FORBIDDEN_ATTRIBUTE,
                f"assigning or deleting attribute {node.attr!r} is not allowed: compute a new value instead",
            )
        self.generic_visit(node)

    def _check_module_attribute(self, node: ast.Attribute, base: str) -> None:
        child = child_module(base, node.attr)
        if child is not None:
            parent = self.parents.get(node)
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                self._reject(
                    node,
                    RejectionCategory.MODULE_ATTRIBUTE,
                    f"module {child} cannot be used as a value: write {_short(node)}.<function> where you need it",
                )
            return
        denial = module_attribute_denial(base, node.attr)
        if denial is not None:
            written = _short(node)
            if written != f"{base}.{node.attr}":
                denial = denial.replace(f"{base}.{node.attr} ", f"{base}.{node.attr} (written {written}) ", 1)
            self._reject(node, RejectionCategory.MODULE_ATTRIBUTE, denial)

    def _check_self_attribute(self, node: ast.AST, attribute: str) -> None:
        if self._in_method_entry and attribute not in self.hyperparameters:
            available = ", ".join(f"self.{name}" for name in self.hyperparameters) or "nothing"
            self._reject(
                node,
                RejectionCategory.INTERFACE,
                f"self.{attribute} is not available: in the method form self exposes only the hyperparameters ({available})",
            )

    # calls

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _LITERAL_NAME_CALLS and func.id not in self.bound_names:
            self._check_literal_attribute_call(node, func.id)
        self.generic_visit(node)

    def _check_literal_attribute_call(self, node: ast.Call, name: str) -> None:
        low, high = _LITERAL_NAME_CALLS[name]
        usage = f"{name}(obj, 'attribute')" + (" or getattr(obj, 'attribute', default)" if high == 3 else "")
        starred = any(isinstance(arg, ast.Starred) for arg in node.args)
        if node.keywords or starred or not low <= len(node.args) <= high:
            self._reject(node, RejectionCategory.FORBIDDEN_NAME, f"{name} must be called as {usage}")
            return
        attribute = node.args[1]
        if not (isinstance(attribute, ast.Constant) and isinstance(attribute.value, str)):
            self._reject(
                node,
                RejectionCategory.FORBIDDEN_NAME,
                f"{name} needs a literal attribute name, as in {usage}; a computed name such as "
                f"{_short(attribute)} is not allowed",
            )
            return
        denial = attribute_denial(attribute.value)
        if denial is not None:
            self._reject(node, RejectionCategory.FORBIDDEN_ATTRIBUTE, f"{name}(..., {attribute.value!r}): {denial}")
        elif isinstance(node.args[0], ast.Name) and node.args[0].id == "self":
            self._check_self_attribute(node, attribute.value)
