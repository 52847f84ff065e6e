"""Load candidate code under RestrictedPython and return its loss function as a callable.

This module executes candidate code, so only sandbox worker processes import
it, never the engine. `load_candidate` runs the static check first. The
runtime layer enforces the same policy again in case the static check is ever
bypassed:

- the code is compiled with RestrictedPython's `compile_restricted_exec`, so
  attribute reads, item reads, iteration and writes go through the guards below;
- `_getattr_` applies RestrictedPython's `safer_getattr` rules, the attribute
  deny-list of sandbox.allowlist, and rejects any module object;
- `torch`, `F`, `math` and every import are read-only proxies that return only
  allow-listed attributes, so `torch.os` fails here too;
- the builtins are the short list in sandbox.allowlist.SAFE_BUILTIN_NAMES.
"""

from __future__ import annotations

import builtins
import importlib
import operator
from types import MappingProxyType, ModuleType
from typing import Any, Callable, Mapping

from RestrictedPython import compile_restricted_exec
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence, safer_getattr
from RestrictedPython.PrintCollector import PrintCollector

from sandbox.allowlist import (
    IMPORTABLE_MODULES,
    PRESET_MODULE_ALIASES,
    SAFE_BUILTIN_NAMES,
    attribute_denial,
    child_module,
    module_attribute_denial,
)
from sandbox.static_check import (
    CANDIDATE_FILENAME,
    EntryForm,
    EntryPoint,
    RejectionCategory,
    StaticCheckError,
    check_source,
    find_entry_point,
    parse_source,
    raise_violations,
    restricted_python_violation,
)


class RestrictedAccessError(AttributeError):
    """Raised when running candidate code reaches a name that the sandbox policy denies.

    It subclasses AttributeError so that hasattr() and Python's import machinery
    treat a denied attribute like a missing one.
    """


# --- module and hyperparameter proxies ---------------------------------------


class ModuleProxy:
    """Read-only view of an allow-listed module that returns only allow-listed attributes.

    Every attribute read, dunder names included, goes through __getattribute__,
    so the proxy has no `__name__` for `from torch import x` to fall back on
    sys.modules with.
    """

    __slots__ = ("_sandbox_path",)

    def __init__(self, path: str) -> None:
        object.__setattr__(self, "_sandbox_path", path)

    def __getattribute__(self, name: str) -> Any:
        path = object.__getattribute__(self, "_sandbox_path")
        child = child_module(path, name)
        if child is not None:
            return module_proxy(child)
        denial = module_attribute_denial(path, name)
        if denial is not None:
            raise RestrictedAccessError(denial)
        return getattr(importlib.import_module(path), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise RestrictedAccessError(f"module {object.__getattribute__(self, '_sandbox_path')} is read-only")

    def __delattr__(self, name: str) -> None:
        raise RestrictedAccessError(f"module {object.__getattribute__(self, '_sandbox_path')} is read-only")

    def __repr__(self) -> str:
        return f"<sandboxed module {object.__getattribute__(self, '_sandbox_path')}>"


_PROXIES = {path: ModuleProxy(path) for path in IMPORTABLE_MODULES}


def module_proxy(path: str) -> ModuleProxy:
    """Return the proxy of an allow-listed module."""
    return _PROXIES[path]


class HyperparameterView:
    """Read-only `self` of the method form: exposes the hyperparameters as attributes, nothing else."""

    __slots__ = ("_sandbox_values",)

    def __init__(self, values: Mapping[str, float]) -> None:
        object.__setattr__(self, "_sandbox_values", MappingProxyType(dict(values)))

    def __getattribute__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_sandbox_values")
        if name in values:
            return values[name]
        available = ", ".join(f"self.{key}" for key in values) or "nothing"
        raise RestrictedAccessError(
            f"self.{name} is not available: in the method form self exposes only the hyperparameters ({available})"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise RestrictedAccessError("self is read-only: compute new values instead of assigning to self")

    def __delattr__(self, name: str) -> None:
        raise RestrictedAccessError("self is read-only")

    def __repr__(self) -> str:
        return f"<hyperparameters {dict(object.__getattribute__(self, '_sandbox_values'))}>"


# --- RestrictedPython guards ---------------------------------------------------


def guarded_getattr(obj: Any, name: str, *default: Any) -> Any:
    """Read `obj.<name>` for candidate code: deny-list, safer_getattr rules, no module objects."""
    if not isinstance(name, str):
        raise TypeError(f"attribute name must be a str; got {type(name).__name__}")
    if isinstance(obj, ModuleProxy):
        # the proxy checks its module's allow-list, which excludes every denied attribute name
        return getattr(obj, name, *default)
    denial = attribute_denial(name)
    if denial is not None:
        raise RestrictedAccessError(denial)
    if isinstance(obj, ModuleType):
        raise RestrictedAccessError(f"attribute {name!r} of a module object is not allowed: {obj.__name__} is not a sandbox proxy")
    if default:
        value = safer_getattr(obj, name, default[0])
    else:
        value = _getattr_or_raise(obj, name)
    if isinstance(value, ModuleType):
        raise RestrictedAccessError(f"attribute {name!r} is the module {value.__name__}, and modules are not allowed")
    return value


def _getattr_or_raise(obj: Any, name: str) -> Any:
    # safer_getattr returns its default (None) for a missing attribute unless the default is raise_
    from RestrictedPython.Guards import raise_

    return safer_getattr(obj, name, raise_)


def guarded_hasattr(obj: Any, name: str) -> bool:
    try:
        guarded_getattr(obj, name)
    except AttributeError:
        return False
    return True


def guarded_getitem(obj: Any, key: Any) -> Any:
    if isinstance(obj, (ModuleType, ModuleProxy, HyperparameterView)):
        raise RestrictedAccessError(f"{obj!r} does not support item access")
    value = obj[key]
    if isinstance(value, ModuleType):
        raise RestrictedAccessError("the item is a module, and modules are not allowed")
    return value


class _ItemWriter:
    """Write proxy for a tensor: item assignment passes through, attribute assignment fails."""

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __setitem__(self, key: Any, value: Any) -> None:
        object.__getattribute__(self, "_target")[key] = value

    def __delitem__(self, key: Any) -> None:
        del object.__getattribute__(self, "_target")[key]

    def __setattr__(self, name: str, value: Any) -> None:
        raise RestrictedAccessError(f"assigning attribute {name!r} is not allowed: compute a new value instead")

    def __delattr__(self, name: str) -> None:
        raise RestrictedAccessError(f"deleting attribute {name!r} is not allowed")


def guarded_write(obj: Any) -> Any:
    """Return what `obj[...] = v` and `obj.x = v` write through: lists, dicts and tensor items only."""
    if type(obj) in (list, dict):
        return obj  # built-in lists and dicts accept no attribute assignment
    import torch

    if isinstance(obj, torch.Tensor):
        return _ItemWriter(obj)
    raise RestrictedAccessError(f"assigning items or attributes of {type(obj).__name__} objects is not allowed")


_INPLACE_OPERATORS = {
    "+=": operator.iadd,
    "-=": operator.isub,
    "*=": operator.imul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": operator.imod,
    "**=": operator.ipow,
    "@=": operator.imatmul,
    "&=": operator.iand,
    "|=": operator.ior,
    "^=": operator.ixor,
    "<<=": operator.ilshift,
    ">>=": operator.irshift,
}


def inplace_operation(op: str, target: Any, value: Any) -> Any:
    """Apply `target op= value` with Python's usual in-place semantics."""
    return _INPLACE_OPERATORS[op](target, value)


def apply_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `function(*args, **kwargs)`; RestrictedPython routes star-argument calls here."""
    return function(*args, **kwargs)


def guarded_import(
    name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
) -> ModuleProxy:
    """Import for candidate code: return proxies of allow-listed modules and raise ImportError for the rest."""
    if level != 0:
        raise ImportError("relative imports are not allowed")
    if name not in IMPORTABLE_MODULES:
        raise ImportError(
            f"import of {name!r} is not allowed: only torch, torch.nn.functional, torch.special, "
            "torch.linalg and math may be imported"
        )
    # `import a.b` binds the package a; `from a.b import c` reads c from a.b
    if not fromlist:
        return module_proxy(name.split(".")[0])
    for attribute in fromlist:
        # checked here because Python's import machinery turns the proxy's AttributeError into a vaguer message
        denial = None if child_module(name, attribute) else module_attribute_denial(name, attribute)
        if denial is not None:
            raise ImportError(f"cannot import {attribute!r} from {name}: {denial}")
    return module_proxy(name)


def restricted_globals() -> dict[str, Any]:
    """Return a fresh global namespace for one candidate module."""
    # RestrictedPython rewrites every use of print to the _print_ collector, so the real print stays out.
    safe_builtins = {name: getattr(builtins, name) for name in SAFE_BUILTIN_NAMES if name != "print"}
    safe_builtins.update(getattr=guarded_getattr, hasattr=guarded_hasattr, __import__=guarded_import)
    namespace: dict[str, Any] = {
        "__builtins__": safe_builtins,
        "__name__": "candidate",
        "_getattr_": guarded_getattr,
        "_getitem_": guarded_getitem,
        "_getiter_": iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": guarded_write,
        "_inplacevar_": inplace_operation,
        "_apply_": apply_call,
        "_print_": PrintCollector,
    }
    for alias, path in PRESET_MODULE_ALIASES.items():
        namespace[alias] = module_proxy(path)
    return namespace


# --- loading -----------------------------------------------------------------


class LoadedCandidate:
    """The candidate's entry function, called with the interface tensors in order.

    The method form receives a read-only `self` with the hyperparameters as
    attributes; the plain form receives the hyperparameters it declares as keywords.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        entry: EntryPoint,
        params: tuple[str, ...],
        hyperparameters: Mapping[str, float],
    ) -> None:
        self.entry = entry
        self.params = params
        self._function = function
        self._self = HyperparameterView(hyperparameters)
        self._keywords = {name: hyperparameters[name] for name in entry.keyword_hyperparameters}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = self._bind(args, kwargs)
        if self.entry.form is EntryForm.METHOD:
            return self._function(self._self, *tensors, **self._keywords)
        return self._function(*tensors, **self._keywords)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown or len(args) + len(kwargs) != len(self.params):
            raise TypeError(
                f"expected the arguments ({', '.join(self.params)}); got {len(args)} positional and "
                f"keywords {sorted(kwargs)}"
            )
        values = list(args)
        for name in self.params[len(args) :]:
            if name not in kwargs:
                raise TypeError(f"missing argument {name!r}; expected ({', '.join(self.params)})")
            values.append(kwargs[name])
        return values

    def __repr__(self) -> str:
        return f"<candidate {self.entry.name} ({self.entry.form.value} form)>"


def load_candidate(code: str, params: tuple[str, ...], hyperparameters: dict[str, float]) -> LoadedCandidate:
    """Check, compile and run candidate code under RestrictedPython; return its entry function.

    Raises:
        StaticCheckError: if the static check rejects the code, RestrictedPython
            rejects it at compile time, or running its top level fails (category "load").
    """
    check_source(code, tuple(params), tuple(hyperparameters))
    return _load_restricted(code, tuple(params), hyperparameters)


def _load_restricted(code: str, params: tuple[str, ...], hyperparameters: Mapping[str, float]) -> LoadedCandidate:
    """Compile and run the code under the runtime guards alone, without the static policy check.

    Only the interface is checked statically, to know which function to call.
    Tests call this directly to prove that the runtime layer blocks escapes by itself.
    """
    params = tuple(params)
    invalid = [name for name in hyperparameters if not name.isidentifier() or name.startswith("_")]
    if invalid:
        raise ValueError(f"hyperparameter names must be public identifiers; got {invalid}")
    entry = find_entry_point(parse_source(code), params, tuple(hyperparameters))

    result = compile_restricted_exec(code, filename=CANDIDATE_FILENAME)
    raise_violations(restricted_python_violation(message) for message in result.errors)
    if result.code is None:
        raise StaticCheckError("RestrictedPython produced no code", RejectionCategory.RESTRICTED_PYTHON)

    namespace = restricted_globals()
    try:
        exec(result.code, namespace)  # noqa: S102 - restricted bytecode with guarded globals and builtins
    except Exception as error:  # noqa: BLE001 - any failure of the candidate's top level is a rejection
        raise StaticCheckError(
            f"running the module's top level failed: {type(error).__name__}: {error}", RejectionCategory.LOAD
        ) from error
    function = namespace.get(entry.name)
    if not callable(function):
        raise StaticCheckError(
            f"the module does not define a function {entry.name!r} after running", RejectionCategory.LOAD
        )
    return LoadedCandidate(function, entry, params, hyperparameters)
