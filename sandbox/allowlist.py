"""Access policy data for candidate code: module allow-lists, denied attributes and builtins.

`torch` re-exports os, sys, ctypes and importlib as plain attributes, so a ban on
names starting with "_" cannot keep candidates away from them. Every attribute
of torch, torch.nn.functional, torch.special, torch.linalg and math that a
candidate uses must therefore be a function, type, dtype or constant listed in
allowlist.json beside this file.

The JSON is generated from the installed torch, then reviewed by hand:

    python -m sandbox.allowlist --generate   # rewrite allowlist.json
    python -m sandbox.allowlist --check      # verify it against the installed torch

Importing this module reads the JSON and never imports torch, so the engine
can run the static check on LLM output without loading torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

ALLOWLIST_FILE = Path(__file__).with_name("allowlist.json")

# Child modules reachable as attributes: torch.nn exists only as the way to torch.nn.functional.
SUBMODULES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"torch": ("nn", "special", "linalg"), "torch.nn": ("functional",)}
)

# Names bound before the candidate runs. The DiscoPOP study's candidates were
# methods of a trainer module that had already imported torch and F, so its
# programs often use them without importing.
PRESET_MODULE_ALIASES: Mapping[str, str] = MappingProxyType(
    {"torch": "torch", "F": "torch.nn.functional", "math": "math"}
)

# Builtins the loader provides; getattr and hasattr are replaced by guarded versions.
SAFE_BUILTIN_NAMES = frozenset(
    {
        "abs", "all", "any", "bool", "callable", "dict", "divmod", "enumerate", "filter",
        "float", "frozenset", "getattr", "hasattr", "int", "isinstance", "len", "list",
        "map", "max", "min", "pow", "print", "range", "reversed", "round", "set", "slice",
        "sorted", "str", "sum", "tuple", "zip",
        "ArithmeticError", "AssertionError", "Exception", "IndexError", "KeyError",
        "NotImplementedError", "OverflowError", "RuntimeError", "TypeError", "ValueError",
        "ZeroDivisionError",
    }
)  # fmt: skip

_RUNS_CODE = "it runs code built from strings"
_NAMESPACE = "it exposes the interpreter's namespaces"
_OBJECT_MODEL = "it reaches Python's object model, the usual first step of a sandbox escape"
_INTERACTIVE = "it is an interactive helper"
# Builtins candidates may not name, with the reason; the loader does not provide them either.
FORBIDDEN_BUILTINS: Mapping[str, str] = MappingProxyType(
    {
        "exec": _RUNS_CODE,
        "eval": _RUNS_CODE,
        "compile": _RUNS_CODE,
        "breakpoint": "it starts a debugger",
        "open": "candidates may not read or write files",
        "input": "candidates may not read from the console",
        "globals": _NAMESPACE,
        "locals": _NAMESPACE,
        "vars": _NAMESPACE,
        "dir": _NAMESPACE,
        "type": _OBJECT_MODEL,
        "object": _OBJECT_MODEL,
        "super": _OBJECT_MODEL,
        "classmethod": _OBJECT_MODEL,
        "staticmethod": _OBJECT_MODEL,
        "property": _OBJECT_MODEL,
        "memoryview": "it exposes raw memory",
        "setattr": "candidates may not change attributes",
        "delattr": "candidates may not change attributes",
        "help": _INTERACTIVE,
        "exit": _INTERACTIVE,
        "quit": _INTERACTIVE,
        "copyright": _INTERACTIVE,
        "credits": _INTERACTIVE,
        "license": _INTERACTIVE,
    }
)

_STORAGE = "it exposes the tensor's storage, whose from_file method reads arbitrary files"
_RAW_POINTER = "it returns a raw memory address, which a loss has no use for"
_NUMPY = "numpy arrays can write files (tofile, dump) and reach ctypes; use tensor methods or .tolist()"
_HOOK = "a hook runs candidate code inside the trainer's backward pass, where it can rewrite the policy's gradients"
_INPLACE_AUTOGRAD = "it changes the autograd state of a tensor the caller owns; use .detach() for a new tensor"
_INPLACE_MEMORY = "it swaps or resizes a tensor's memory in place"
_FORMAT = "a format string can read attributes, as in '{0.__class__}'; use an f-string instead"

# Attributes denied on every value (tensors, dtypes, functions, results), with the reason.
DENIED_ATTRIBUTES: Mapping[str, str] = MappingProxyType(
    {
        "storage": _STORAGE,
        "untyped_storage": _STORAGE,
        "storage_type": _STORAGE,
        "from_file": "it reads arbitrary files",
        "data_ptr": _RAW_POINTER,
        "const_data_ptr": _RAW_POINTER,
        "numpy": _NUMPY,
        "tofile": _NUMPY,
        "dump": _NUMPY,
        "dumps": _NUMPY,
        "ctypes": _NUMPY,
        "share_memory_": "it moves the tensor into shared-memory files",
        "register_hook": _HOOK,
        "register_prehook": _HOOK,
        "register_post_accumulate_grad_hook": _HOOK,
        "backward": "the trainer calls backward once per step, and a call inside the loss changes the gradients it applies",
        "requires_grad_": _INPLACE_AUTOGRAD,
        "detach_": _INPLACE_AUTOGRAD,
        "set_": _INPLACE_MEMORY,
        "resize_": _INPLACE_MEMORY,
        "resize_as_": _INPLACE_MEMORY,
        "resize_as_sparse_": _INPLACE_MEMORY,
        "sparse_resize_": _INPLACE_MEMORY,
        "sparse_resize_and_clear_": _INPLACE_MEMORY,
        "module_load": _INPLACE_MEMORY,
        "record_stream": "it changes when the CUDA caching allocator may reuse memory",
        "mro": "it walks the class hierarchy, the usual first step of a sandbox escape",
        "format": _FORMAT,
        "format_map": _FORMAT,
    }
)

# Frame, code, generator, coroutine and traceback internals lead back to a
# frame's f_globals and f_builtins, and from there to exec and __import__.
DENIED_ATTRIBUTE_PREFIXES = ("co_", "f_", "gi_", "cr_", "ag_", "tb_", "func_")

# Reasons a public module attribute is denied, by the code that generate_allowlist stores for each name.
DENIAL_REASONS: Mapping[str, str] = MappingProxyType(
    {
        "module": "it is a module, and the modules reachable from torch include os, sys and ctypes",
        "file_access": "it reads or writes files",
        "code_loading": "it compiles, traces or loads code",
        "global_state": "it changes process-wide state that outlives the loss call",
        "raw_memory": "it exposes uninitialised or raw memory",
        "backend_specific": "it is a backend-specific, sparse or quantized kernel that a loss does not need",
        "denied_attribute": "it changes a tensor's memory or autograd state in place",
        "class": "it is a class other than the allowed tensor, dtype and device types",
        "other": "it is not a tensor operation",
    }
)
_NOT_LISTED = "it is not in the allow-list of functions, types, dtypes and constants"


@dataclass(frozen=True)
class ModulePolicy:
    """The attributes of one module that candidate code may use.

    Attributes:
        path: dotted module name, such as "torch.nn.functional".
        functions: callables that compute on tensors or numbers.
        types: classes allowed for annotations, isinstance and construction.
        dtypes: dtype objects such as float32.
        constants: numbers and markers such as pi, inf and newaxis.
        denied: public names of the installed module that are not allowed, each
            with a key of DENIAL_REASONS.
    """

    path: str
    functions: frozenset[str]
    types: frozenset[str]
    dtypes: frozenset[str]
    constants: frozenset[str]
    denied: Mapping[str, str]

    @property
    def names(self) -> frozenset[str]:
        return self.functions | self.types | self.dtypes | self.constants

    def allows(self, name: str) -> bool:
        return name in self.names


def _read_policies(path: Path) -> dict[str, ModulePolicy]:
    payload = json.loads(path.read_text(encoding="utf-8"))
    policies = {}
    for module_path, entry in payload["modules"].items():
        policies[module_path] = ModulePolicy(
            path=module_path,
            functions=frozenset(entry.get("functions", ())),
            types=frozenset(entry.get("types", ())),
            dtypes=frozenset(entry.get("dtypes", ())),
            constants=frozenset(entry.get("constants", ())),
            denied=MappingProxyType(dict(entry.get("denied", {}))),
        )
    return policies


MODULE_POLICIES: Mapping[str, ModulePolicy] = MappingProxyType(_read_policies(ALLOWLIST_FILE))
IMPORTABLE_MODULES = frozenset(MODULE_POLICIES)


def attribute_denial(name: str) -> str | None:
    """Return why `obj.<name>` is not allowed on any value, or None when it is allowed."""
    if name.startswith("_"):
        return f"attribute {name!r} is not allowed: names starting with '_' are private to Python and the sandbox"
    if name in DENIED_ATTRIBUTES:
        return f"attribute {name!r} is not allowed: {DENIED_ATTRIBUTES[name]}"
    if name.startswith(DENIED_ATTRIBUTE_PREFIXES):
        return (
            f"restricted attribute {name}: frame, code and generator internals lead to the "
            "interpreter's globals and builtins, and a loss function has no use for them"
        )
    return None


def child_module(path: str, name: str) -> str | None:
    """Return the dotted name of module `path`'s allowed child module `name`, or None."""
    if name in SUBMODULES.get(path, ()):
        return f"{path}.{name}"
    return None


def module_attribute_denial(path: str, name: str) -> str | None:
    """Return why `<module path>.<name>` is not allowed, or None when the allow-list contains it."""
    policy = MODULE_POLICIES[path]
    if policy.allows(name) or child_module(path, name) is not None:
        return None
    if path == "torch.nn":
        reason = "torch.nn may be used only to reach torch.nn.functional"
    elif name.startswith("_"):
        reason = "names starting with '_' are private"
    else:
        reason = DENIAL_REASONS.get(policy.denied.get(name, ""), _NOT_LISTED)
    return (
        f"module attribute {path}.{name} not allowed: {reason}. Use only the tensor functions, dtypes "
        "and constants of torch, torch.nn.functional and math, such as torch.exp or F.logsigmoid"
    )


# --- generation and verification against the installed torch -----------------

# torch functions written in Python that are plain tensor maths (torch.functional.__all__ adds the rest).
_TORCH_PYTHON_FUNCTIONS = ("is_tensor", "is_grad_enabled", "get_default_dtype", "is_floating_point")
_TORCH_TYPES = (
    "Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor",
    "IntTensor", "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor",
    "Size", "dtype", "device", "finfo", "iinfo",
)  # fmt: skip
_TORCH_CONSTANTS = ("e", "pi", "inf", "nan", "newaxis", "strided", "contiguous_format", "preserve_format")

_FILE_ACCESS = {"load", "save", "from_file", "get_file_path"}
_CODE_LOADING = {
    "compile", "cond", "while_loop", "vmap", "fork", "wait", "import_ir_module",
    "import_ir_module_from_buffer", "parse_ir", "parse_schema", "parse_type_comment",
    "merge_type_from_type_comment", "unify_type_list",
}  # fmt: skip
_GLOBAL_STATE = {
    "manual_seed", "seed", "initial_seed", "get_rng_state", "default_generator", "init_num_threads",
    "prepare_multiprocessing_environment", "thread_safe_generator", "clear_autocast_cache",
    "profiler_allow_cudagraph_cupti_lazy_reinit_cuda12",
}  # fmt: skip
_GLOBAL_STATE_PREFIXES = ("set_", "use_deterministic", "autocast_")
# NOTE: torch.Tensor(n), the legacy typed constructors such as torch.FloatTensor(n) and Tensor.new_empty
# still return uninitialised memory; the types stay allowed because annotations and isinstance need them.
_RAW_MEMORY = {
    "from_numpy", "frombuffer", "from_dlpack", "to_dlpack", "empty", "empty_like", "empty_strided",
    "empty_permuted", "empty_quantized", "as_strided", "as_strided_", "as_strided_copy",
    "as_strided_scatter", "unsafe_chunk", "unsafe_split", "unsafe_split_with_sizes",
}  # fmt: skip
_BACKEND_PREFIXES = (
    "cudnn_", "miopen_", "mkldnn_", "fbgemm_", "native_", "quantize", "quantized_", "q_",
    "fake_quantize", "dequantize", "int_repr", "choose_qparams", "sparse_", "sym_", "is_vulkan",
    "batch_norm_", "fused_moving_avg_obs_fake_quant", "dsmm", "hsmm", "hspmm", "smm", "spmm", "saddmm", "sspaddmm",
)  # fmt: skip
_FUNCTIONAL_HELPERS = {
    "assert_int_or_pair", "boolean_dispatch", "handle_torch_function", "has_torch_function",
    "has_torch_function_unary", "has_torch_function_variadic",
}  # fmt: skip


def _denial_code(path: str, name: str, value: Any) -> str | None:
    """Return the DENIAL_REASONS key that rules out a public attribute of module `path`, or None."""
    import types

    if isinstance(value, types.ModuleType):
        return "module"
    if name in _FUNCTIONAL_HELPERS:
        return "other"
    if path != "torch":
        # the name sets below list torch's own attributes; torch.linalg.cond, for one, is maths
        return "backend_specific" if name.startswith(_BACKEND_PREFIXES) else None
    if name in _FILE_ACCESS:
        return "file_access"
    if name in _CODE_LOADING:
        return "code_loading"
    if name in _GLOBAL_STATE or name.startswith(_GLOBAL_STATE_PREFIXES):
        return "global_state"
    if name in _RAW_MEMORY:
        return "raw_memory"
    if name.startswith(_BACKEND_PREFIXES):
        return "backend_specific"
    if attribute_denial(name) is not None:
        return "denied_attribute"
    return None


def _is_tensor_function(path: str, value: Any) -> bool:
    """Return whether `value` is a C++ operator or a Python function defined in module `path`."""
    import types

    if isinstance(value, types.BuiltinFunctionType):
        return True
    return isinstance(value, types.FunctionType) and value.__module__ == path


def generate_allowlist() -> dict[str, Any]:
    """Build the allow-list data from the installed torch; imports torch."""
    import importlib
    import math
    import platform

    import torch
    import torch.functional

    payload: dict[str, Any] = {
        "generated_with": {"torch": torch.__version__, "python": platform.python_version()},
        "modules": {},
    }
    aten_ops = torch._C._VariableFunctions
    torch_python = set(_TORCH_PYTHON_FUNCTIONS) | set(torch.functional.__all__)
    for path in ("torch", "torch.nn", "torch.nn.functional", "torch.special", "torch.linalg", "math"):
        module = importlib.import_module(path)
        entry: dict[str, Any] = {"functions": [], "types": [], "dtypes": [], "constants": [], "denied": {}}
        for name in sorted(n for n in dir(module) if not n.startswith("_")):
            if name in SUBMODULES.get(path, ()):
                continue
            value = getattr(module, name)
            code = _denial_code(path, name, value)
            kind = None
            if code is None and path == "torch":
                if isinstance(value, torch.dtype):
                    kind = "dtypes"
                elif name in _TORCH_TYPES:
                    kind = "types"
                elif name in _TORCH_CONSTANTS:
                    kind = "constants"
                elif getattr(aten_ops, name, None) is value or name in torch_python:
                    kind = "functions"
            elif code is None and path == "math":
                kind = "functions" if callable(value) else "constants"
            elif code is None and path != "torch.nn" and _is_tensor_function(path, value):
                kind = "functions"
            if kind is not None:
                entry[kind].append(name)
            elif path != "torch.nn":  # every torch.nn name gets the same message

                entry["denied"][name] = code or ("class" if isinstance(value, type) else "other")
        payload["modules"][path] = entry
    return payload


def check_allowlist(policies: Mapping[str, ModulePolicy] = MODULE_POLICIES) -> list[str]:
    """Return every problem of the stored allow-list against the installed torch; imports torch."""
    import importlib
    import types

    import torch

    problems = []
    for path, policy in policies.items():
        module = importlib.import_module(path)
        for name in sorted(policy.names):
            if not hasattr(module, name):
                problems.append(f"{path}.{name} is allowed but missing from the installed {path}")
                continue
            value = getattr(module, name)
            if isinstance(value, types.ModuleType):
                problems.append(f"{path}.{name} is allowed but is a module")
            if attribute_denial(name) is not None:
                problems.append(f"{path}.{name} is allowed but is also a denied attribute name")
        for name in sorted(policy.functions):
            if hasattr(module, name) and not callable(getattr(module, name)):
                problems.append(f"{path}.{name} is listed as a function but is not callable")
        for name in sorted(policy.types):
            if hasattr(module, name) and not isinstance(getattr(module, name), type):
                problems.append(f"{path}.{name} is listed as a type but is not a class")
        for name in sorted(policy.dtypes):
            if hasattr(module, name) and not isinstance(getattr(module, name), torch.dtype):
                problems.append(f"{path}.{name} is listed as a dtype but is not a torch.dtype")
        for name in sorted(policy.constants):
            if hasattr(module, name) and callable(getattr(module, name)):
                problems.append(f"{path}.{name} is listed as a constant but is callable")
    return problems


def _drift(policies: Mapping[str, ModulePolicy]) -> list[str]:
    """Return names that a fresh generation would allow but the stored allow-list does not."""
    fresh = generate_allowlist()["modules"]
    notes = []
    for path, entry in fresh.items():
        allowed_now = set().union(*(entry[kind] for kind in ("functions", "types", "dtypes", "constants")))
        stored = policies[path].names if path in policies else frozenset()
        for name in sorted(allowed_now - stored):
            notes.append(f"{path}.{name} would be allowed by a fresh generation; review it before adding")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.allowlist", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--generate", action="store_true", help=f"rewrite {ALLOWLIST_FILE.name} from the installed torch")
    action.add_argument("--check", action="store_true", help=f"verify {ALLOWLIST_FILE.name} against the installed torch")
    args = parser.parse_args(argv)

    if args.generate:
        payload = generate_allowlist()
        ALLOWLIST_FILE.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {ALLOWLIST_FILE}")
        return 0

    problems = check_allowlist()
    for note in _drift(MODULE_POLICIES):
        print(f"note: {note}")
    for problem in problems:
        print(f"error: {problem}")
    print(f"{len(problems)} problem(s) in {ALLOWLIST_FILE.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
