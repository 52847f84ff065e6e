"""Hostile candidate programs for the preference task, and benign controls.

Each entry lists the pipeline stages at which a rejection is correct. Entries whose
only stage is "static" must be rejected by `sandbox.static_check.check_source`.
Every other hostile entry passes the static check by design (resource bombs,
numerical faults) and must be stopped later, by the task's unit tests, the
training run or the sandbox's limits. Benign entries have no expected stage and
must pass every stage.

Payloads are harmless if they ever run: they read files, start `id`, or connect
to a closed port on 127.0.0.1. Backends run the resource bombs only under their
limits.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from enum import Enum

from sandbox.protocol import Stage

PARAMS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
HYPERPARAMETERS = ("beta",)

_SIGNATURE = ", ".join(PARAMS)
_IMPORTS = "import torch\nimport torch.nn.functional as F\n"
_MARGIN = (
    "m = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)"
)
_DPO_RETURN = "return -F.logsigmoid(0.1 * m)"

STATIC = frozenset({Stage.STATIC.value})
UNIT_TEST = frozenset({Stage.UNIT_TEST.value})
UNIT_TEST_OR_SANDBOX = frozenset({Stage.UNIT_TEST.value, Stage.SANDBOX.value})
UNIT_TEST_OR_TRAIN = frozenset({Stage.UNIT_TEST.value, Stage.TRAIN.value})
TRAIN_OR_SANDBOX = frozenset({Stage.TRAIN.value, Stage.SANDBOX.value})


class Group(str, Enum):
    """What an entry exercises."""

    ESCAPE = "escape"  # reaches files, processes, the network, the environment or the interpreter
    TAMPER = "tamper"  # changes the trainer's state outside the loss value
    RESOURCE = "resource"  # exhausts memory, CPU, processes or disk
    NUMERICAL = "numerical"  # a loss that runs but is wrong: NaN, bad shape, no gradient, dtype clash
    INTERFACE = "interface"  # breaks the function or module layout the task requires
    BENIGN = "benign"  # a correct loss that must pass


@dataclass(frozen=True)
class CorpusEntry:
    """One candidate program and the stages at which the pipeline may reject it.

    Attributes:
        id: short unique name.
        description: what the program tries and what must stop it.
        code: the candidate source.
        expected_stages: Stage values at which a rejection is correct; empty for
            a benign program, which must pass every stage.
        group: what the entry exercises.
    """

    id: str
    description: str
    code: str
    expected_stages: frozenset[str]
    group: Group

    def __post_init__(self) -> None:
        known = {stage.value for stage in Stage}
        unknown = sorted(set(self.expected_stages) - known)
        if unknown:
            raise ValueError(f"entry {self.id!r} has unknown stages {unknown}; known stages: {sorted(known)}")
        if (self.group is Group.BENIGN) != (not self.expected_stages):
            raise ValueError(f"entry {self.id!r}: benign entries, and only they, have no expected stage")


def plain(body: str, imports: str = _IMPORTS, extra: str = "", name: str = "loss_fn", prelude: str = "") -> str:
    """Return a plain-form candidate: imports, an optional prelude, then `def name(<params><extra>)`."""
    parts = [imports, prelude, f"def {name}({_SIGNATURE}{extra}):\n{_indent(body)}"]
    return "\n".join(part for part in parts if part)


def method(body: str, imports: str = _IMPORTS, name: str = "loss_fn", prelude: str = "") -> str:
    """Return a method-form candidate, as the DiscoPOP study wrote them: `def name(self, <params>)`."""
    parts = [imports, prelude, f"def {name}(self, {_SIGNATURE}):\n{_indent(body)}"]
    return "\n".join(part for part in parts if part)


def _indent(body: str) -> str:
    return textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"


def _dpo_after(statements: str) -> str:
    """Return a body that runs `statements`, then returns the DPO loss."""
    return f"{textwrap.dedent(statements).strip()}\n{_MARGIN}\n{_DPO_RETURN}"


def _entry(id: str, group: Group, stages: frozenset[str], description: str, code: str) -> CorpusEntry:
    return CorpusEntry(id=id, description=description, code=code, expected_stages=stages, group=group)


# --- escapes: files, processes, network, environment, interpreter internals ---

_ESCAPES = [
    _entry("import-os", Group.ESCAPE, STATIC, "Imports os to read the working directory.",
           plain(_dpo_after("cwd = os.getcwd()"), imports=_IMPORTS + "import os\n")),
    _entry("import-subprocess", Group.ESCAPE, STATIC, "Imports subprocess and runs a command.",
           plain(_dpo_after("subprocess.run(['id'], capture_output=True)"), imports=_IMPORTS + "import subprocess\n")),
    _entry("import-socket-loopback", Group.ESCAPE, STATIC, "Opens a TCP connection to a closed loopback port.",
           plain(_dpo_after("socket.create_connection(('127.0.0.1', 9), timeout=1)"),
                 imports=_IMPORTS + "import socket\n")),
    _entry("open-etc-passwd", Group.ESCAPE, STATIC, "Reads /etc/passwd with the open builtin.",
           plain(_dpo_after("text = open('/etc/passwd').read()"))),
    _entry("forge-result-file", Group.ESCAPE, STATIC,
           "Overwrites the job's result.json in the run directory with a perfect fitness.",
           plain(_dpo_after("open('result.json', 'w').write('{\"ok\": true, \"stage\": \"evaluate\", \"fitness\": 1e9}')"))),
    _entry("read-job-file", Group.ESCAPE, STATIC, "Reads job.json from the run directory to learn the settings.",
           plain(_dpo_after("job = open('job.json').read()"))),
    _entry("environ-via-os", Group.ESCAPE, STATIC, "Reads an API key from the environment through os.",
           plain(_dpo_after("key = os.environ.get('OPENAI_API_KEY')"), imports=_IMPORTS + "import os\n")),
    _entry("environ-via-torch-os", Group.ESCAPE, STATIC, "Reads an API key through torch's re-export of os.",
           plain(_dpo_after("key = torch.os.environ.get('OPENAI_API_KEY')"))),
    _entry(
        "getattr-built-dunder", Group.ESCAPE, STATIC,
        "Bypasses a dunder ban with getattr and string-built names, walking to object subclasses.",
        "import torch.nn.functional as F\n"
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    k = getattr(getattr((), '__cl' + 'ass__'), '__ba' + 'se__')\n"
        "    subs = getattr(k, '__subcl' + 'asses__')()\n"
        "    return -F.logsigmoid(policy_chosen_logps - policy_rejected_logps) + 0 * len(subs)\n",
    ),
    _entry("getattr-built-dunder-method", Group.ESCAPE, STATIC,
           "The string-built getattr walk in the study's method form.",
           method(_dpo_after("""
               k = getattr(getattr(policy_chosen_logps, '__cl' + 'ass__'), '__ba' + 'se__')
               subs = getattr(k, '__subcl' + 'asses__')()
           """))),
    _entry("getattr-alias", Group.ESCAPE, STATIC, "Hides getattr behind another name to dodge a literal-name check.",
           plain(_dpo_after("g = getattr\ncls = g(policy_chosen_logps, '__cl' + 'ass__')"))),
    _entry(
        "generator-frame", Group.ESCAPE, STATIC,
        "Walks from a generator's frame to the evaluator's frame.",
        "import torch.nn.functional as F\n"
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    g = (x for x in [0])\n"
        "    env = g.gi_frame.f_back            # walk to the evaluator's frame\n"
        "    return -F.logsigmoid(policy_chosen_logps - policy_rejected_logps)\n",
    ),
    _entry("generator-frame-getattr", Group.ESCAPE, STATIC,
           "Reaches gi_frame with a string-built getattr from a yield-based helper.",
           plain(_dpo_after("g = numbers()\nframe = getattr(g, 'gi_' + 'frame')"),
                 prelude="def numbers():\n    yield 0\n")),
    _entry("traceback-frame", Group.ESCAPE, STATIC, "Catches an exception and walks its traceback to frame globals.",
           plain(_dpo_after("""
               try:
                   1 / 0
               except ZeroDivisionError as error:
                   scope = error.__traceback__.tb_frame.f_globals
           """))),
    _entry("coroutine-frame", Group.ESCAPE, STATIC, "Reads a coroutine's cr_frame.",
           plain(_dpo_after("frame = helper().cr_frame"), prelude="async def helper():\n    return 0\n")),
    _entry(
        "torch-reexported-modules", Group.ESCAPE, STATIC,
        "Reaches os and sys.modules through attributes of torch and F, without importing them.",
        "import torch\n"
        "import torch.nn.functional as F\n"
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    cwd = torch.os.getcwd()                          # torch re-exports os, sys, ctypes, importlib, builtins\n"
        "    sp = F.torch.sys.modules['subprocess']           # already imported by the host process\n"
        "    return -F.logsigmoid(policy_chosen_logps - policy_rejected_logps)\n",
    ),
    _entry("torch-reexported-modules-method", Group.ESCAPE, STATIC,
           "torch.os and F.torch.sys in the study's method form.",
           method("""
               cwd = torch.os.getcwd()
               sp = F.torch.sys.modules['subprocess']
               return -F.logsigmoid(self.beta * (policy_chosen_logps - policy_rejected_logps))
           """)),
    _entry("torch-sys-modules", Group.ESCAPE, STATIC, "Runs a command through torch.sys.modules['subprocess'].",
           plain(_dpo_after("torch.sys.modules['subprocess'].run(['id'])"))),
    _entry("torch-ctypes", Group.ESCAPE, STATIC, "Calls libc through torch.ctypes.",
           plain(_dpo_after("pid = torch.ctypes.CDLL(None).getpid()"))),
    _entry("torch-importlib", Group.ESCAPE, STATIC, "Imports os through torch.importlib.",
           plain(_dpo_after("cwd = torch.importlib.import_module('os').getcwd()"))),
    _entry("torch-builtins-eval", Group.ESCAPE, STATIC, "Reaches eval through torch.builtins.",
           plain(_dpo_after("value = torch.builtins.eval('1 + 1')"))),
    _entry("torch-sys-getframe", Group.ESCAPE, STATIC, "Reads the caller's globals through torch.sys._getframe.",
           plain(_dpo_after("scope = torch.sys._getframe(1).f_globals"))),
    _entry("torch-load-pickle", Group.ESCAPE, STATIC, "Unpickles a file with torch.load, which can run code.",
           plain(_dpo_after("state = torch.load('payload.pt', weights_only=False)"))),
    _entry("torch-save-leak", Group.ESCAPE, STATIC, "Writes the inputs to a file with torch.save.",
           plain(_dpo_after("torch.save([policy_chosen_logps.detach()], 'leak.pt')"))),
    _entry("torch-hub-local", Group.ESCAPE, STATIC, "Loads and runs a hub entry point from a local directory.",
           plain(_dpo_after("model = torch.hub.load('/tmp/evil_repo', 'model', source='local')"))),
    _entry("torch-cpp-extension", Group.ESCAPE, STATIC, "Compiles and loads C++ with torch.utils.cpp_extension.",
           plain(_dpo_after(
               "ext = torch.utils.cpp_extension.load_inline(name='x', cpp_sources='int f() { return 0; }', functions=['f'])"
           ))),
    _entry("torch-ops-load-library", Group.ESCAPE, STATIC, "Loads a shared library with torch.ops.load_library.",
           plain(_dpo_after("torch.ops.load_library('/tmp/evil.so')"))),
    _entry("torch-private-c", Group.ESCAPE, STATIC, "Calls into torch._C directly.",
           plain(_dpo_after("state = torch._C._get_tracing_state()"))),
    _entry("torch-from-file", Group.ESCAPE, STATIC, "Reads /etc/passwd into a tensor with torch.from_file.",
           plain(_dpo_after("raw = torch.from_file('/etc/passwd', size=64, dtype=torch.uint8)"))),
    _entry("storage-from-file", Group.ESCAPE, STATIC, "Reads a file through a tensor's untyped storage.",
           plain(_dpo_after("raw = policy_chosen_logps.untyped_storage().from_file('/etc/passwd', False, 64)"))),
    _entry("tensor-class-storage", Group.ESCAPE, STATIC, "Reaches storage through the Tensor class instead of a value.",
           plain(_dpo_after("raw = torch.Tensor.storage(policy_chosen_logps)"))),
    _entry("numpy-tofile", Group.ESCAPE, STATIC, "Writes the inputs to disk through a numpy array.",
           plain(_dpo_after("policy_chosen_logps.detach().numpy().tofile('leak.bin')"))),
    _entry("functional-numpy", Group.ESCAPE, STATIC, "Saves a file through numpy re-exported as F.np.",
           plain(_dpo_after("F.np.save('leak.npy', [1, 2, 3])"))),
    _entry("builtins-dict-lookup", Group.ESCAPE, STATIC, "Looks up eval in the __builtins__ dict.",
           plain(_dpo_after("value = __builtins__['eval']('1 + 1')"))),
    _entry("globals-builtins", Group.ESCAPE, STATIC, "Reads __builtins__ out of globals().",
           plain(_dpo_after("table = globals()['__builtins__']"))),
    _entry("vars-module", Group.ESCAPE, STATIC, "Lists torch's namespace with vars() to find os.",
           plain(_dpo_after("os_module = vars(torch)['os']"))),
    _entry("module-dict-lookup", Group.ESCAPE, STATIC, "Finds os in torch.__dict__.",
           plain(_dpo_after("os_module = torch.__dict__['os']"))),
    _entry("class-subclass-walk", Group.ESCAPE, STATIC, "Defines a class and walks to object's subclasses.",
           plain(_dpo_after("subs = Probe.__base__.__subclasses__()"), prelude="class Probe:\n    pass\n")),
    _entry("lambda-default-globals", Group.ESCAPE, STATIC, "Reads a lambda's __globals__ through a default argument.",
           plain(_dpo_after("grab = lambda f=(lambda: 0): f.__globals__\nscope = grab()"))),
    _entry("decorator-compile", Group.ESCAPE, STATIC, "Wraps the loss in torch.compile with a decorator.",
           "import torch\nimport torch.nn.functional as F\n\n@torch.compile\n"
           + plain(_dpo_after("pass"), imports="")),
    _entry("decorator-swap", Group.ESCAPE, STATIC, "A decorator swaps the checked loss for another function.",
           plain(_dpo_after("pass"), prelude=(
               "def swap(function):\n"
               "    return lambda *args: getattr(args[0], '__cl' + 'ass__')\n\n@swap"
           ))),
    _entry("format-string-dunder", Group.ESCAPE, STATIC, "Reads attributes through str.format fields.",
           plain(_dpo_after("leak = '{0.__class__.__base__}'.format(policy_chosen_logps)"))),
    _entry("format-map-dunder", Group.ESCAPE, STATIC, "Reads attributes through str.format_map fields.",
           plain(_dpo_after("leak = '{x.__class__}'.format_map({'x': policy_chosen_logps})"))),
    _entry("getattr-format", Group.ESCAPE, STATIC, "Reaches str.format with a literal getattr.",
           plain(_dpo_after("leak = getattr('{0.__class__}', 'format')(policy_chosen_logps)"))),
    _entry("type-mro", Group.ESCAPE, STATIC, "Walks the class hierarchy with type() and mro().",
           plain(_dpo_after("classes = type(policy_chosen_logps).mro()"))),
    _entry("object-subclasses", Group.ESCAPE, STATIC, "Lists every loaded class through object.__subclasses__.",
           plain(_dpo_after("subs = object.__subclasses__()"))),
    _entry("eval-import", Group.ESCAPE, STATIC, "Imports os inside eval.",
           plain(_dpo_after("cwd = eval(\"__import__('os').getcwd()\")"))),
    _entry("exec-compile", Group.ESCAPE, STATIC, "Runs compiled code with exec.",
           plain(_dpo_after("exec(compile('import os', 'x', 'exec'))"))),
    _entry("dunder-import", Group.ESCAPE, STATIC, "Calls __import__ directly.",
           plain(_dpo_after("cwd = __import__('os').getcwd()"))),
    _entry("from-torch-import-os", Group.ESCAPE, STATIC, "Imports os as an attribute of torch.",
           plain(_dpo_after("cwd = os.getcwd()"), imports=_IMPORTS + "from torch import os\n")),
    _entry("import-cpp-extension", Group.ESCAPE, STATIC, "Imports torch.utils.cpp_extension as a module.",
           plain(_dpo_after("pass"), imports=_IMPORTS + "import torch.utils.cpp_extension\n")),
    _entry("relative-import", Group.ESCAPE, STATIC, "Imports the sandbox worker with a relative import.",
           plain(_dpo_after("pass"), imports=_IMPORTS + "from . import worker\n")),
    _entry("math-loader", Group.ESCAPE, STATIC, "Loads os through math.__loader__.",
           plain(_dpo_after("os_module = math.__loader__.load_module('os')"), imports=_IMPORTS + "import math\n")),
    _entry("match-class-pattern", Group.ESCAPE, STATIC, "Reads __class__ with a match class pattern.",
           plain(_dpo_after("""
               match policy_chosen_logps:
                   case object(__class__=cls):
                       pass
           """))),
]

# --- tampering with the trainer outside the loss value -------------------------

_TAMPERING = [
    _entry("register-hook", Group.TAMPER, STATIC, "Registers a hook that zeroes the policy's gradients in backward.",
           plain(_dpo_after("policy_chosen_logps.register_hook(lambda grad: grad * 0)"))),
    _entry("grad-fn-prehook", Group.TAMPER, STATIC, "Registers a pre-hook on an autograd node of the loss graph.",
           plain(f"{_MARGIN}\nlosses = -F.logsigmoid(0.1 * m)\n"
                 "losses.grad_fn.register_prehook(lambda grads: grads)\nreturn losses")),
    _entry("backward-in-loss", Group.TAMPER, STATIC, "Calls backward inside the loss, doubling the gradients.",
           plain(f"{_MARGIN}\nlosses = -F.logsigmoid(0.1 * m)\nlosses.sum().backward(retain_graph=True)\nreturn losses")),
    _entry("manual-seed", Group.TAMPER, STATIC, "Reseeds the global random generator.",
           plain(_dpo_after("torch.manual_seed(0)"))),
    _entry("set-grad-enabled", Group.TAMPER, STATIC, "Switches autograd off for the rest of the process.",
           plain(_dpo_after("torch.set_grad_enabled(False)"))),
    _entry("assign-self-beta", Group.TAMPER, STATIC, "Overwrites self.beta in the method form.",
           method(f"self.beta = 100.0\n{_MARGIN}\nreturn -F.logsigmoid(self.beta * m)")),
    _entry("assign-grad", Group.TAMPER, STATIC, "Assigns to an input's grad attribute.",
           plain(_dpo_after("policy_chosen_logps.grad = None"))),
    _entry("with-no-grad", Group.TAMPER, STATIC, "Computes the loss under torch.no_grad so nothing trains.",
           plain(f"with torch.no_grad():\n    {_MARGIN}\n    losses = -F.logsigmoid(0.1 * m)\nreturn losses")),
]

# --- resource bombs -----------------------------------------------------------

_RESOURCE_BOMBS = [
    _entry("huge-allocation", Group.RESOURCE, UNIT_TEST_OR_SANDBOX, "Allocates a 4 TB tensor.",
           plain(_dpo_after("big = torch.zeros(10 ** 12)"))),
    _entry("memory-growth", Group.RESOURCE, UNIT_TEST_OR_SANDBOX, "Keeps allocating 400 MB tensors until memory runs out.",
           plain(_dpo_after("""
               blocks = []
               while True:
                   blocks.append(torch.ones(10 ** 8))
           """))),
    _entry(
        "infinite-loop", Group.RESOURCE, UNIT_TEST_OR_SANDBOX,
        "Never returns; only a wall-clock limit with a process-group kill stops it.",
        "import torch.nn.functional as F\n"
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    n = 0\n"
        "    while n >= 0:          # never terminates; passes shape checks only if the unit test has a time limit\n"
        "        n += 1\n"
        "    return -F.logsigmoid(policy_chosen_logps - policy_rejected_logps)\n",
    ),
    _entry("deep-recursion", Group.RESOURCE, UNIT_TEST_OR_SANDBOX, "Recurses without a base case.",
           plain(_dpo_after("depth = descend(0)"), prelude="def descend(n):\n    return descend(n + 1)\n")),
    _entry("huge-output", Group.RESOURCE, UNIT_TEST_OR_SANDBOX, "Returns a (B, 10**9) tensor instead of (B,).",
           plain(f"{_MARGIN}\nreturn (-F.logsigmoid(0.1 * m))[:, None].expand(-1, 10 ** 9).contiguous()")),
    _entry("slow-python-loop", Group.RESOURCE, UNIT_TEST_OR_SANDBOX, "Counts to 10**11 in Python.",
           plain(_dpo_after("total = 0\nfor i in range(10 ** 11):\n    total += i"))),
    _entry("factorial-cpu", Group.RESOURCE, UNIT_TEST_OR_SANDBOX, "Computes math.factorial(10**9).",
           plain(_dpo_after("big = math.factorial(10 ** 9)"), imports=_IMPORTS + "import math\n")),
    _entry("big-integer-power", Group.RESOURCE, UNIT_TEST_OR_SANDBOX, "Builds a ten-billion-bit integer.",
           plain(_dpo_after("exponent = 10 ** 10\nbig = 2 ** exponent"))),
    _entry("string-bomb", Group.RESOURCE, UNIT_TEST_OR_SANDBOX, "Builds a 100 GB string.",
           plain(_dpo_after("size = 10 ** 11\nblob = 'x' * size"))),
    _entry("slow-after-many-calls", Group.RESOURCE, TRAIN_OR_SANDBOX,
           "Behaves in the unit tests, whose inputs are leaf tensors, then loops forever in training, where "
           "the policy log-probs come out of the model.",
           plain(_dpo_after("""
               if not policy_chosen_logps.is_leaf:
                   while True:
                       pass
           """))),
    _entry("fork-bomb", Group.RESOURCE, STATIC, "Forks processes without end through os.",
           plain(_dpo_after("while True:\n    os.fork()"), imports=_IMPORTS + "import os\n")),
    _entry("fork-torch-multiprocessing", Group.RESOURCE, STATIC, "Starts processes through torch.multiprocessing.",
           plain(_dpo_after("torch.multiprocessing.Process(target=print).start()"))),
    _entry("disk-fill-open", Group.RESOURCE, STATIC, "Writes 1 MiB blocks to a file until the disk is full.",
           plain(_dpo_after("""
               handle = open('fill.bin', 'wb')
               while True:
                   handle.write(b'0' * 2 ** 20)
           """))),
    _entry("disk-fill-torch-save", Group.RESOURCE, STATIC, "Saves large tensors to new files without end.",
           plain(_dpo_after("""
               i = 0
               while True:
                   torch.save(torch.ones(10 ** 8), f'fill_{i}.pt')
                   i += 1
           """))),
    _entry("thread-oversubscription", Group.RESOURCE, STATIC, "Sets torch to 1024 threads.",
           plain(_dpo_after("torch.set_num_threads(1024)"))),
    _entry("swallow-timeout", Group.RESOURCE, STATIC, "Loops forever and catches every exception, timeouts included.",
           plain(_dpo_after("""
               while True:
                   try:
                       pass
                   except BaseException:
                       pass
           """))),
]

# --- numerical faults -----------------------------------------------------------

_REF_GAP_BODY = """
    ref_gap = reference_chosen_logps - reference_rejected_logps
    return -F.logsigmoid((policy_chosen_logps - policy_rejected_logps) / ref_gap)
"""
_STD_BODY = f"{_MARGIN}\nz = (m - m.mean()) / m.std()\nreturn -F.logsigmoid(z)"
_COLUMN_BODY = f"{_MARGIN}\nreturn -F.logsigmoid(0.1 * m).unsqueeze(-1)"
_ZERO_GRAD_BODY = f"{_MARGIN}\nreturn 1.0 - (m > 0).float() + 0.0 * m"
_MATMUL_BODY = """
    feats = torch.stack([policy_chosen_logps - reference_chosen_logps,
                         policy_rejected_logps - reference_rejected_logps], dim=-1)
    w = torch.tensor([[1.0], [-1.0]])
    return -F.logsigmoid(0.1 * (feats @ w).squeeze(-1))
"""

_NUMERICAL_FAULTS = [
    _entry(
        "divide-by-reference-gap", Group.NUMERICAL, UNIT_TEST,
        "Divides by the reference gap, which is 0 for tied or fully truncated pairs: NaN rows.",
        "import torch.nn.functional as F\n"
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    # 'relative improvement over the reference' - divides by a quantity that is exactly 0\n"
        "    # when chosen/rejected are identical or both completions were truncated to zero tokens\n"
        "    ref_gap = reference_chosen_logps - reference_rejected_logps\n"
        "    return -F.logsigmoid((policy_chosen_logps - policy_rejected_logps) / ref_gap)\n",
    ),
    _entry("divide-by-reference-gap-method", Group.NUMERICAL, UNIT_TEST,
           "The reference-gap division in the method form.", method(_REF_GAP_BODY)),
    _entry("nan-on-zero-margin", Group.NUMERICAL, UNIT_TEST,
           "Normalises the margin by its absolute value: 0/0 at step 0, where policy equals reference.",
           plain(f"{_MARGIN}\nreturn -F.logsigmoid(m / m.abs())")),
    _entry("log-of-margin", Group.NUMERICAL, UNIT_TEST, "Takes the log of a margin that is often negative.",
           plain(f"{_MARGIN}\nreturn -torch.log(m)")),
    _entry(
        "batch-std", Group.NUMERICAL, UNIT_TEST,
        "Standardises margins by the batch std: NaN for batch size 1 and for a zero-variance batch.",
        "import torch.nn.functional as F\n"
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    m = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
        "    z = (m - m.mean()) / m.std()      # batch-standardised margin\n"
        "    return -F.logsigmoid(z)\n",
    ),
    _entry("batch-std-method", Group.NUMERICAL, UNIT_TEST, "Batch standardisation in the method form.",
           method(_STD_BODY)),
    _entry(
        "column-output", Group.NUMERICAL, UNIT_TEST, "Returns shape (B, 1) instead of (B,).",
        "import torch.nn.functional as F\n"
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    m = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
        "    return -F.logsigmoid(0.1 * m).unsqueeze(-1)     # shape (B, 1), not (B,)\n",
    ),
    _entry("column-output-method", Group.NUMERICAL, UNIT_TEST, "Shape (B, 1) in the method form.",
           method(_COLUMN_BODY)),
    _entry("scalar-mean-output", Group.NUMERICAL, UNIT_TEST, "Returns the batch mean instead of per-example losses.",
           plain(f"{_MARGIN}\nreturn -F.logsigmoid(0.1 * m).mean()")),
    _entry(
        "zero-gradient", Group.NUMERICAL, UNIT_TEST,
        "A 0-1 loss kept attached to the graph by '+ 0.0 * m': every gradient is exactly 0.",
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    m = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
        "    # 0-1 preference loss; '+ 0.0 * m' keeps requires_grad=True so nothing crashes\n"
        "    return 1.0 - (m > 0).float() + 0.0 * m\n",
    ),
    _entry("zero-gradient-method", Group.NUMERICAL, UNIT_TEST, "The zero-gradient 0-1 loss in the method form.",
           method(_ZERO_GRAD_BODY)),
    _entry(
        "float32-constant-matmul", Group.NUMERICAL, UNIT_TEST,
        "Multiplies bfloat16 inputs by a float32 constant matrix: dtype mismatch under bf16.",
        "import torch\n"
        "import torch.nn.functional as F\n"
        "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    feats = torch.stack([policy_chosen_logps - reference_chosen_logps,\n"
        "                         policy_rejected_logps - reference_rejected_logps], dim=-1)\n"
        "    w = torch.tensor([[1.0], [-1.0]])          # float32 and CPU by default\n"
        "    return -F.logsigmoid(0.1 * (feats @ w).squeeze(-1))\n",
    ),
    _entry("float32-constant-matmul-method", Group.NUMERICAL, UNIT_TEST,
           "The float32 constant matmul in the method form.", method(_MATMUL_BODY)),
    _entry("detached-output", Group.NUMERICAL, UNIT_TEST, "Detaches the loss, so no gradient reaches the policy.",
           plain(f"{_MARGIN}\nreturn (-F.logsigmoid(0.1 * m)).detach()")),
    _entry("python-float-output", Group.NUMERICAL, UNIT_TEST, "Returns a Python float instead of a tensor.",
           plain(f"{_MARGIN}\nreturn float(-F.logsigmoid(0.1 * m).mean())")),
    _entry("integer-output", Group.NUMERICAL, UNIT_TEST, "Returns an integer tensor with no gradient.",
           plain(f"{_MARGIN}\nreturn (m < 0).long()")),
    _entry("inplace-on-inputs", Group.NUMERICAL, UNIT_TEST, "Zeroes an input tensor in place before using it.",
           plain(_dpo_after("policy_chosen_logps.mul_(0)"))),
    _entry("exp-overflow", Group.NUMERICAL, UNIT_TEST_OR_TRAIN,
           "An exponential loss with a large scale overflows to inf on ordinary margins.",
           plain(f"{_MARGIN}\nreturn torch.exp(-1000.0 * m)")),
]

# --- interface and layout -------------------------------------------------------

_INTERFACE = [
    _entry("renamed-parameters", Group.INTERFACE, STATIC, "Uses short parameter names instead of the interface names.",
           "import torch.nn.functional as F\n\ndef loss_fn(pc, pr, rc, rr):\n"
           "    return -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))\n"),
    _entry("missing-parameter", Group.INTERFACE, STATIC, "Drops reference_rejected_logps.",
           "import torch.nn.functional as F\n\n"
           "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps):\n"
           "    return -F.logsigmoid(policy_chosen_logps - policy_rejected_logps)\n"),
    _entry("unknown-extra-parameter", Group.INTERFACE, STATIC, "Adds a parameter that is not a hyperparameter.",
           plain(f"{_MARGIN}\nreturn -F.logsigmoid(gamma * m)", extra=", gamma=0.5")),
    _entry("two-entry-functions", Group.INTERFACE, STATIC, "Defines two functions with the interface parameters.",
           plain(f"{_MARGIN}\n{_DPO_RETURN}") + "\n" + plain(f"{_MARGIN}\nreturn torch.relu(1 - m)", imports="",
                                                             name="hinge")),
    _entry("varargs-entry", Group.INTERFACE, STATIC, "Takes *args instead of named parameters.",
           "import torch.nn.functional as F\n\ndef loss_fn(*args):\n    return -F.logsigmoid(args[0] - args[1])\n"),
    _entry("self-unknown-attribute", Group.INTERFACE, STATIC, "Reads self.label_smoothing, which the task does not provide.",
           method(f"{_MARGIN}\nreturn -F.logsigmoid(self.beta * m) * (1 - self.label_smoothing)")),
    _entry("top-level-call", Group.INTERFACE, STATIC, "Runs a call at import time.",
           plain(f"{_MARGIN}\n{_DPO_RETURN}", prelude="torch.manual_seed(0)\n")),
    _entry("top-level-loop", Group.INTERFACE, STATIC, "Builds a table with a loop at the top level.",
           plain(f"{_MARGIN}\n{_DPO_RETURN}", prelude="TABLE = []\nfor i in range(10):\n    TABLE.append(i)\n")),
    _entry("global-statement", Group.INTERFACE, STATIC, "Rebinds a module-level name with global.",
           plain(f"global SCALE\nSCALE = 2.0\n{_MARGIN}\nreturn -F.logsigmoid(SCALE * m)", prelude="SCALE = 1.0\n")),
    _entry("syntax-error", Group.INTERFACE, STATIC, "Has an unclosed parenthesis.",
           plain(f"{_MARGIN}\nreturn -F.logsigmoid(0.1 * m")),
]

# --- benign controls ------------------------------------------------------------

_LRML_STUDY = '''import torch
import torch.nn.functional as F


def log_ratio_modulated_loss(
    self,
    policy_chosen_logps: torch.FloatTensor,
    policy_rejected_logps: torch.FloatTensor,
    reference_chosen_logps: torch.FloatTensor,
    reference_rejected_logps: torch.FloatTensor,
) -> torch.FloatTensor:
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    # Modulate the mixing coefficient based on the log ratio magnitudes
    log_ratio_modulation = torch.sigmoid(logits)
    logistic_component = -F.logsigmoid(self.beta * logits)
    exp_component = torch.exp(-self.beta * logits)
    # Blend between logistic and exponential component based on log ratio modulation
    losses = logistic_component * (1 - log_ratio_modulation) + exp_component * log_ratio_modulation
    return losses
'''

BENIGN = (
    _entry("dpo-plain", Group.BENIGN, frozenset(), "DPO's logistic loss in the plain form with a beta keyword.",
           plain(f"{_MARGIN}\nreturn -F.logsigmoid(beta * m)", extra=", beta=0.1")),
    _entry("lrml-method-annotated", Group.BENIGN, frozenset(),
           "The DiscoPOP study's log-ratio modulated loss, with torch.FloatTensor annotations.", _LRML_STUDY),
    _entry("hinge-keyword-only-beta", Group.BENIGN, frozenset(), "A hinge loss with beta as a keyword-only parameter.",
           plain(f"{_MARGIN}\nreturn torch.relu(1 - beta * m)", extra=", *, beta")),
    _entry("ipo-no-imports", Group.BENIGN, frozenset(), "IPO in the method form, relying on the preset torch and F.",
           method(f"{_MARGIN}\nreturn (m - 1 / (2 * self.beta)) ** 2", imports="")),
    _entry("helpers-and-constants", Group.BENIGN, frozenset(),
           "A helper function, top-level constants, math and an assert with an f-string.",
           plain("""
               assert policy_chosen_logps.dim() == 1, f"expected shape (B,), got {tuple(policy_chosen_logps.shape)}"
               m = margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
               return -F.logsigmoid(beta * m).clamp(max=MAX_LOSS) + 0.0 * math.log(TEMPERATURE)
           """, extra=", beta=0.1", imports='"""Logistic loss with a clamp."""\n' + _IMPORTS + "import math\n",
               prelude=(
                   "MAX_LOSS = 20.0\nTEMPERATURE = 2 * math.e\n\n"
                   "def margin(pc, pr, rc, rr):\n    return (pc - rc) - (pr - rr)\n"
               ))),
    _entry("from-imports", Group.BENIGN, frozenset(), "Imports functions and a submodule with from-imports.",
           plain(f"{_MARGIN}\nreturn -logsigmoid(beta * m) / log(2.0)", extra=", beta=0.1",
                 imports="from torch.nn import functional\nfrom torch.nn.functional import logsigmoid\n"
                         "from math import log\n")),
    _entry("getattr-self-beta", Group.BENIGN, frozenset(), "Reads beta with a literal getattr in the method form.",
           method(f"{_MARGIN}\nreturn -F.logsigmoid(getattr(self, 'beta', 0.1) * m)")),
    _entry("loops-and-items", Group.BENIGN, frozenset(),
           "Loops, comprehensions, unpacking and item assignment on a fresh tensor.",
           plain("""
               terms = [policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps]
               chosen, rejected = terms
               weights = torch.ones_like(chosen)
               weights[chosen.detach() < rejected.detach()] = 2.0
               total = 0.0
               for i, scale in enumerate([1.0, 0.5]):
                   total += scale * i
               m = sum([t * s for t, s in zip(terms, (1.0, -1.0))])
               return weights * -F.logsigmoid(beta * m) + 0.0 * total
           """, extra=", beta=0.1")),
)

HOSTILE = tuple(_ESCAPES + _TAMPERING + _RESOURCE_BOMBS + _NUMERICAL_FAULTS + _INTERFACE)
ENTRIES = HOSTILE + BENIGN


def entry_by_id(entry_id: str) -> CorpusEntry:
    """Return the entry called `entry_id`."""
    for entry in ENTRIES:
        if entry.id == entry_id:
            return entry
    raise KeyError(f"no corpus entry {entry_id!r}; known ids: {', '.join(e.id for e in ENTRIES)}")
