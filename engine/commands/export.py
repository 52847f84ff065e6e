"""`evolve export`: write one candidate as a standalone Python module with a TRL trainer that uses it.

The module imports torch and trl only, never evolve. In the DiscoPOP study's
method form the loss reads `self.beta`. The export turns `self` into a plain
`beta` keyword argument by editing the source text at the positions that `ast`
reports, so comments and layout survive. When `self` is used in any other way,
the original function is kept and a plain wrapper passes it a namespace.
"""

from __future__ import annotations

import argparse
import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from engine.candidate import Candidate
from engine.report import RunDirError, find_candidate, open_run_archive

console = Console()

# Names the sandbox binds before candidate code runs (sandbox.allowlist.PRESET_MODULE_ALIASES),
# with the import that binds each in a normal module.
_PRESET_IMPORTS = {"torch": "import torch", "F": "import torch.nn.functional as F", "math": "import math"}


class ExportError(ValueError):
    """Raised when a candidate's code has no function that matches the task's interface."""


@dataclass(frozen=True)
class PlainLoss:
    """Candidate code rewritten so that its loss is a plain function.

    Attributes:
        code: the module source of the loss.
        function: name of the function that takes the interface parameters.
        keywords: hyperparameters that `function` accepts as keyword arguments.
    """

    code: str
    function: str
    keywords: tuple[str, ...]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve export",
        description="Write a candidate as a standalone module: the loss as a plain function of the four "
        "log-probability tensors and beta, plus a trl.DPOTrainer subclass that minimises it. "
        "The module needs torch and trl, not evolve.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (contains archive.sqlite)")
    parser.add_argument("candidate_id", metavar="ID", help="candidate id, such as g003-a02 or seed-dpo")
    parser.add_argument("--out", type=Path, metavar="FILE", help="output file (default: ./<candidate name>.py)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        archive = open_run_archive(args.run_dir)
    except RunDirError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2
    try:
        candidate = find_candidate(archive, args.candidate_id)
        config = archive.get_meta("config") or {}
        settings = archive.get_meta("settings") or {}
        run_id = archive.get_meta("run_id", args.run_dir.name)
    except KeyError as error:
        console.print(f"[red]error:[/] {escape(error.args[0])}", soft_wrap=True)
        return 2
    finally:
        archive.close()
    if not candidate.code.strip():
        console.print(
            f"[red]error:[/] candidate {candidate.id} has no code (its reply could not be parsed)", soft_wrap=True
        )
        return 1

    from evaluators.registry import UnknownTaskError, get_task

    try:
        interface = get_task(config.get("task", "")).interface
    except (UnknownTaskError, ValueError) as error:
        console.print(f"[red]error:[/] the run's task cannot be loaded: {escape(str(error))}", soft_wrap=True)
        return 2
    hyperparameters = {name: settings[name] for name in interface.hyperparameters if name in settings}
    try:
        text = export_module(candidate, tuple(interface.params), hyperparameters, str(run_id), config.get("task", ""))
    except ExportError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 1

    out = args.out or Path(f"{candidate.name or candidate.id.replace('-', '_')}.py")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    console.print(f"wrote {escape(str(out))}: loss {candidate.name}(...), trainer {trainer_class_name(candidate.name)}")
    if candidate.status.value != "evaluated":
        console.print(f"[yellow]note:[/] {candidate.id} was not evaluated (status {candidate.status.value}: "
                      f"{escape(candidate.reason[:200])})")
    return 0


# rewriting the loss


def plain_loss(code: str, params: tuple[str, ...], hyperparameters: dict[str, float]) -> PlainLoss:
    """Return the candidate code with its loss as a plain function of the params and keyword hyperparameters."""
    from sandbox.static_check import EntryForm, StaticCheckError, find_entry_point, parse_source

    try:
        tree = parse_source(code)
        entry = find_entry_point(tree, params, tuple(hyperparameters))
    except StaticCheckError as error:
        raise ExportError(f"cannot export: {error.reason}") from None
    code = _add_missing_imports(tree, _drop_module_docstring(tree, code))
    tree = ast.parse(code)
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == entry.name)

    if entry.form is not EntryForm.METHOD:
        return PlainLoss(code, entry.name, entry.keyword_hyperparameters)
    if _self_only_reads_hyperparameters(function, hyperparameters):
        return PlainLoss(_rewrite_method(code, function, hyperparameters), entry.name, tuple(hyperparameters))
    return _wrap_method(code, entry.name, params, hyperparameters)


def _drop_module_docstring(tree: ast.Module, code: str) -> str:
    first = tree.body[0] if tree.body else None
    if not isinstance(first, ast.Expr) or not isinstance(first.value, ast.Constant):
        return code
    if not isinstance(first.value.value, str):
        return code
    lines = code.splitlines(keepends=True)
    return "".join(lines[first.end_lineno:]).lstrip("\n")


def _add_missing_imports(tree: ast.Module, code: str) -> str:
    """Prepend the imports of torch, F and math when the code uses them without importing, as the sandbox allows."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    missing = [line for name, line in _PRESET_IMPORTS.items() if name in used and name not in bound]
    return "\n".join(missing) + "\n" + code if missing else code


def _self_only_reads_hyperparameters(function: ast.FunctionDef, hyperparameters: dict[str, float]) -> bool:
    """Return whether every use of `self` in the function is `self.<hyperparameter>` and no such name is rebound."""
    parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and node.id == "self":
            parent = parents.get(node)
            if not isinstance(parent, ast.Attribute) or not isinstance(parent.ctx, ast.Load):
                return False
            if parent.attr not in hyperparameters:
                return False
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)) and node.id in hyperparameters:
            return False
        if isinstance(node, ast.arg) and node.arg in hyperparameters:
            return False
    return True


def _rewrite_method(code: str, function: ast.FunctionDef, hyperparameters: dict[str, float]) -> str:
    """Drop `self` from the signature, add `beta=<run value>` keywords and replace `self.beta` by `beta`."""
    lines = [line.encode("utf-8") for line in code.splitlines(keepends=True)]
    # (line, column, end line, end column, replacement), with 1-based lines
    edits: list[tuple[int, int, int, int, bytes]] = []

    arguments = function.args.posonlyargs + function.args.args
    self_arg, following = arguments[0], arguments[1]
    edits.append((self_arg.lineno, self_arg.col_offset, following.lineno, following.col_offset, b""))

    ends = [(n.end_lineno, n.end_col_offset) for n in (*arguments, *function.args.kwonlyargs,
                                                       *function.args.defaults, *function.args.kw_defaults) if n]
    end_line, end_column = max(ends)
    keywords = ", ".join(f"{name}={value!r}" for name, value in hyperparameters.items())
    edits.append((end_line, end_column, end_line, end_column, f", {keywords}".encode()))

    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, node.attr.encode()))

    # apply from the end so that earlier positions stay valid; ast columns are UTF-8 byte offsets
    for line, column, end_line, end_column, text in sorted(edits, reverse=True):
        head = lines[line - 1][:column]
        tail = lines[end_line - 1][end_column:]
        lines[line - 1 : end_line] = [head + text + tail]
    return b"".join(lines).decode("utf-8")


def _wrap_method(code: str, name: str, params: tuple[str, ...], hyperparameters: dict[str, float]) -> PlainLoss:
    """Keep the method unchanged and add a plain function that calls it with a namespace holding the hyperparameters."""
    wrapper = f"{name}_loss"
    signature = ", ".join([*params, *(f"{key}={value!r}" for key, value in hyperparameters.items())])
    namespace = ", ".join(f"{key}={key}" for key in hyperparameters)
    addition = (
        f"\n\ndef {wrapper}({signature}):\n"
        f'    """Call {name} with the hyperparameters as keyword arguments instead of attributes of self."""\n'
        f"    return {name}(SimpleNamespace({namespace}), {', '.join(params)})\n"
    )
    return PlainLoss("from types import SimpleNamespace\n" + code.rstrip() + "\n" + addition, wrapper,
                     tuple(hyperparameters))


# the module


def trainer_class_name(name: str) -> str:
    parts = [part for part in name.split("_") if part]
    return "".join(part[:1].upper() + part[1:] for part in parts) + "DPOTrainer" if parts else "CandidateDPOTrainer"


def export_module(
    candidate: Candidate, params: tuple[str, ...], hyperparameters: dict[str, float], run_id: str, task: str
) -> str:
    """Return the source of the standalone module for `candidate`."""
    if len(params) != 4:
        raise ExportError(
            f"cannot export for task {task!r}: the trainer needs a loss of four log-probability tensors; "
            f"the task's interface has {len(params)} parameters ({', '.join(params)})"
        )
    loss = plain_loss(candidate.code, params, hyperparameters)
    trainer = trainer_class_name(candidate.name)
    if candidate.fitness is not None:
        fitness = f"{candidate.fitness:.4f}"
    else:
        fitness = f"not measured ({candidate.status.value})"
    thought = textwrap.fill(candidate.thought.strip() or "(none given)", 88, initial_indent="    ",
                            subsequent_indent="    ")
    settings_text = ", ".join(f"{key} = {value}" for key, value in hyperparameters.items()) or "none"
    call_keywords = "".join(f", {key}=self.{key}" for key in loss.keywords if key == "beta")
    beta = hyperparameters.get("beta", 0.1)
    header = f'''"""{candidate.name}: a preference-optimization loss found by evolve.

Run {run_id}, candidate {candidate.id} (task {task}, generation {candidate.generation});
fitness {fitness}, measured with {settings_text}.

The proposer's idea:

{thought}

`{loss.function}(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps{", beta" if "beta" in loss.keywords else ""})` takes tensors of shape (B,), each a completion's
summed token log-probabilities, and returns one loss per pair, shape (B,).
`{trainer}` is a trl.DPOTrainer (tested with TRL 1.16.0) that minimises
their mean, with `DPOConfig.beta` as beta:

    trainer = {trainer}(
        model=model, args=DPOConfig(output_dir="out", beta={beta}), train_dataset=pairs, processing_class=tokenizer
    )
    trainer.train()
"""
'''
    present = _top_level_imports(loss.code)
    imports = [line for line in ("import torch", "from trl import DPOTrainer") if line not in present]
    body = _TRAINER_TEMPLATE.format(trainer=trainer, function=loss.function, call_keywords=call_keywords)
    return header + "\n" + "\n".join(imports) + "\n" + loss.code.rstrip() + "\n\n" + body


def _top_level_imports(code: str) -> set[str]:
    """Return the module's top-level import statements as single-name source lines."""
    lines = set()
    for node in ast.parse(code).body:
        if isinstance(node, ast.Import):
            prefix = "import "
        elif isinstance(node, ast.ImportFrom):
            prefix = f"from {node.module} import "
        else:
            continue
        lines.update(prefix + alias.name + (f" as {alias.asname}" if alias.asname else "") for alias in node.names)
    return lines


_TRAINER_TEMPLATE = '''
# The trainer. TRL 1.16.0 computes DPO's loss inside DPOTrainer._compute_loss, so
# this subclass overrides that method: the log-probabilities are computed as
# DPOTrainer does, then the loss above replaces the built-in loss types.

_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


class {trainer}(DPOTrainer):
    """trl.DPOTrainer that minimises `{function}`; `loss_type` and `loss_weights` are ignored."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unsupported = []
        if self.ld_alpha is not None:
            unsupported.append(f"ld_alpha={{self.ld_alpha}}")
        if self.f_divergence_type != "reverse_kl":
            unsupported.append(f"f_divergence_type={{self.f_divergence_type!r}}")
        if self.use_weighting:
            unsupported.append("use_weighting=True")
        if unsupported:
            raise ValueError(
                f"{trainer} does not support {{', '.join(unsupported)}}: the loss receives plain summed "
                "log-probabilities; leave these DPOConfig options at their defaults"
            )

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"

        # summed log-probabilities of each completion under the policy
        model_kwargs = {{key: value for key, value in inputs.items() if key not in _NON_MODEL_KEYS}}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)  # (2B,), zero outside the completion
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # (B,) each: the batch is chosen rows, then rejected

        # the same sums under the reference model: precomputed columns, or a forward pass without gradients
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        ref_chosen_logps = ref_chosen_logps.to(chosen_logps.device, chosen_logps.dtype)
        ref_rejected_logps = ref_rejected_logps.to(rejected_logps.device, rejected_logps.dtype)

        losses = {function}(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps{call_keywords})
        if not isinstance(losses, torch.Tensor) or losses.shape != chosen_logps.shape:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            expected = tuple(chosen_logps.shape)
            raise ValueError(f"{function} returned {{shape}}; expected one loss per pair, shape {{expected}}")
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        # DPO's implicit rewards beta * log(pi / pi_ref) (Rafailov et al. 2023, eq. 5), logged as DPOTrainer logs them
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps).detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(self.accelerator.gather(accuracies).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected_logps.detach()).mean().item())

        if return_outputs:
            return loss, outputs
        return loss
'''
