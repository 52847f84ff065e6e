"""`evolve analyze`: a loss and its gradient over rho for a sweep of beta, against DPO, and its measured properties.

The loss's code runs only in the sandboxed analysis job (sandbox/analysis.py).
It receives one pair whose policy_chosen_logps is rho and whose other inputs
are 0, so rho is the log-ratio difference of the pair. The two PNGs follow Figures 9
and 10 of the DiscoPOP study (Lu et al. 2024), which compare LRML with DPO at
beta = 0.01 ... 5, one panel per beta.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 160)

# The beta values of the DiscoPOP study's sweep figures.
STUDY_BETAS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_COLUMNS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve analyze",
        description="Plot a loss f(rho) and its gradient df/drho against DPO for a sweep of beta (two PNGs, one "
        "panel per beta), and print properties measured on the values: where f is not convex, f'(0), the "
        "limits of f and f' as rho -> +inf and -inf, and whether the loss uses batch statistics. The loss "
        "runs only in the sandbox. Exit status: 0 analysed, 1 the loss failed, 2 usage error or no sandbox.",
    )
    parser.add_argument("loss", metavar="NAME|FILE", help="library loss name or alias (such as discopop), or a .py "
                        "file with one loss function")
    parser.add_argument("--form", choices=("beta_consistent", "as_written"),
                        help="version of a discovered library loss (default: beta_consistent)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="directory of the PNGs (default: analysis/NAME)")
    parser.add_argument("--betas", type=float, nargs="+", metavar="BETA", default=list(STUDY_BETAS),
                        help="beta values, one panel each (default: 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5)")
    parser.add_argument("--rho-max", type=float, default=20.0, metavar="NATS",
                        help="the curves span rho from -NATS to NATS (default: 20)")
    parser.add_argument("--points", type=int, default=801, metavar="N",
                        help="minimum number of rho values per beta; a large beta gets more, so that beta times the "
                        "grid step is at most 0.01, up to 20001 values (default: 801)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="wall-clock limit of the sandboxed analysis job (default: 120)")
    parser.add_argument("--json", action="store_true", help="print the properties as one JSON object")
    return parser


def _usage_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.points < 3:
        problems.append(f"--points {args.points}: expected at least 3")
    if not args.rho_max > 0:
        problems.append(f"--rho-max {args.rho_max}: expected a positive number of nats")
    if any(not beta > 0 for beta in args.betas):
        problems.append(f"--betas {args.betas}: every beta must be positive")
    if not args.timeout > 0:
        problems.append(f"--timeout {args.timeout}: expected a positive number of seconds")
    return problems


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    problems = _usage_problems(args)
    if problems:
        console.print(f"[red]error:[/] invalid options: {escape('; '.join(problems))}", soft_wrap=True)
        return 2

    from engine.commands.train import resolve_loss_program
    from evaluators.registry import get_task
    from sandbox.analysis import analyze_program
    from sandbox.backend import SandboxUnavailable
    from sandbox.curves import CurvesFailed

    try:
        program = resolve_loss_program(args.loss, args.form)
    except ValueError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2
    params = tuple(get_task("preference").interface.params)
    with tempfile.TemporaryDirectory(prefix="evolve-analysis-") as job_dir:
        try:
            sweep = analyze_program(program.code, params, args.betas, args.rho_max, args.points,
                                    Path(job_dir), timeout_s=args.timeout)
        except SandboxUnavailable as error:
            console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
            return 2
        except CurvesFailed as error:
            console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
            return 1

    report = analysis_report(program, sweep, args.rho_max)
    if all(entry.error for entry in sweep):
        report["files"] = []
        _print_report(report, args.json)
        return 1

    import matplotlib

    matplotlib.use("Agg")
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", program.name).strip("_") or "loss"
    out_dir = args.out or Path("analysis") / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    report["files"] = [
        str(plot_sweep(sweep, program.name, "loss", out_dir / f"{slug}_loss_sweep.png")),
        str(plot_sweep(sweep, program.name, "grad", out_dir / f"{slug}_gradient_sweep.png")),
    ]
    _print_report(report, args.json)
    return 0


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


# properties


def analysis_report(program, sweep, rho_max: float) -> dict[str, Any]:
    """Return the JSON form of the analysis: the loss, the per-beta properties and the overall verdicts."""
    verdicts = [entry.convex for entry in sweep if not entry.error]
    if verdicts and all(verdict is True for verdict in verdicts):
        convex: bool | None = True
    elif any(verdict is False for verdict in verdicts):
        convex = False
    else:
        convex = None
    batches = [entry.batch for entry in sweep if not entry.error and not entry.batch.error]
    return {
        "loss": program.name,
        "source": program.source,
        "file": program.path,
        "form": program.form,
        "title": program.title,
        "formula": program.formula,
        "rho_max": rho_max,
        "convex": convex,
        "batch_dependent": any(batch.dependent for batch in batches) if batches else None,
        "batch": next((batch.describe() for batch in batches if batch.dependent), batches[0].describe())
        if batches
        else "unknown",
        "sweep": [entry.summary() for entry in sweep],
    }


def format_ranges(ranges: list) -> str:
    """Return '[a, b], c' for rho ranges, a one-point range as its value."""
    parts = []
    for low, high in ranges:
        parts.append(f"{low:.3g}" if low == high else f"[{low:.3g}, {high:.3g}]")
    return ", ".join(parts)


def _tail_text(limits: dict[str, Any]) -> str:
    if not limits:
        return "-"
    return f"f {limits['loss']['text']}; f' {limits['grad']['text']}"


def _convex_text(entry: dict[str, Any]) -> str:
    if entry["error"]:
        return "failed"
    if entry["convex"] is None:
        return "unknown (f not finite)"
    return "yes" if entry["convex"] else "no"


def convexity_summary(report: dict[str, Any]) -> str:
    """Return one sentence on convexity over the whole sweep."""
    entries = [entry for entry in report["sweep"] if not entry["error"]]
    no = [entry["beta"] for entry in entries if entry["convex"] is False]
    unknown = [entry["beta"] for entry in entries if entry["convex"] is None]
    if report["convex"] is True:
        return "yes, at every beta: no negative second difference on the grid"
    if no and len(no) == len(entries):
        return "no, at every beta: f'' < 0 in the ranges in the table"
    if no:
        return f"no at beta {', '.join(f'{b:g}' for b in no)}: f'' < 0 in the ranges in the table"
    return f"unknown: f is not finite for one pair at beta {', '.join(f'{b:g}' for b in unknown)}"


def print_report(report: dict[str, Any]) -> None:
    if report["source"] == "library":
        console.print(f"[bold]{escape(report['loss'])}[/]: {escape(report['title'])}, "
                      f"{report['form'].replace('_', '-')} form ({escape(report['file'])})")
        console.print(f"  f = {escape(report['formula'])}", soft_wrap=True)
    else:
        console.print(f"[bold]{escape(report['loss'])}[/] ({escape(report['file'])})")
    console.print("  evaluated in the sandbox, in float64, on one pair: policy_chosen_logps = rho, the other inputs 0")

    table = Table(title_justify="left")
    for column in ("beta", "convex", "f'' < 0 for rho in", "f(0)", "f'(0)", "rho -> +inf", "rho -> -inf"):
        table.add_column(column, overflow="fold")
    for entry in report["sweep"]:
        if entry["error"]:
            table.add_row(f"{entry['beta']:g}", "failed", escape(entry["error"][:200]), "", "", "", "")
            continue
        limits = entry["limits"]
        table.add_row(
            f"{entry['beta']:g}",
            _convex_text(entry),
            format_ranges(entry["nonconvex_ranges"]) or "-",
            _number(entry["loss_at_zero"]),
            _number(entry["grad_at_zero"]),
            escape(_tail_text(limits.get("+inf", {}))),
            escape(_tail_text(limits.get("-inf", {}))),
        )
    console.print(table)

    console.print(f"convex in rho: {convexity_summary(report)}")
    gradients = [entry["grad_at_zero"] for entry in report["sweep"] if entry["grad_at_zero"] is not None]
    if gradients and all(gradient > 0 for gradient in gradients):
        console.print("gradient at rho = 0: positive at every beta, so at rho = 0 a gradient step on a pair lowers "
                      "its margin (DPO's f'(0) = -beta/2 raises it)")
    console.print(f"batch statistics: {escape(report['batch'])}")
    for path in report.get("files", []):
        console.print(f"wrote {escape(path)}")


def _number(value: float | None) -> str:
    return "NaN" if value is None else f"{value:.4g}"


# plots


def plot_sweep(sweep, name: str, kind: str, path: Path) -> Path:
    """Draw one panel per beta with the loss (kind "loss") or its gradient (kind "grad") and DPO's; save a PNG."""
    import matplotlib.pyplot as plt
    import numpy as np

    from engine.commands.plot import reference_curves

    rows = math.ceil(len(sweep) / _COLUMNS)
    columns = min(_COLUMNS, len(sweep))
    figure, axes_grid = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    index = 0 if kind == "loss" else 1
    ylabel = "loss f(rho)" if kind == "loss" else "gradient df/drho"
    for axes, entry in zip(axes_grid.flat, sweep):
        axes.set_title(f"beta = {entry.beta:g}")
        axes.set_xlabel("rho = log-ratio difference (nats)")
        axes.set_ylabel(ylabel)
        axes.axvline(0.0, color="lightgray", linewidth=0.8)
        axes.grid(alpha=0.3)
        if entry.error:
            axes.text(0.5, 0.5, "the loss failed at this beta", transform=axes.transAxes, ha="center", color="red")
            continue
        rho = np.array(entry.rho)
        reference = reference_curves(entry.beta, rho)["DPO"][index]
        sampled = entry.loss if kind == "loss" else entry.grad
        values = np.array([np.nan if v is None else v for v in sampled])
        # DPO is drawn above the loss, dashed, so that neither hides the other where they agree
        axes.plot(rho, reference, linestyle="--", color="black", linewidth=1.5, zorder=3,
                  label=f"DPO, beta = {entry.beta:g}")
        if np.isfinite(values).any():
            axes.plot(rho, values, color="tab:red", linewidth=2, label=f"{name}, beta = {entry.beta:g}")
        else:
            axes.text(0.5, 0.5, f"{name}: not finite for one pair\n(batch statistics?)", transform=axes.transAxes,
                      ha="center", color="gray", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        if kind == "loss":
            _shade_nonconvex(axes, entry.nonconvex_ranges)
        low, high, clipped = panel_limits(reference, values)
        axes.set_ylim(low, high)
        if clipped:
            axes.set_title(f"beta = {entry.beta:g} ({name} clipped)")
        axes.legend(fontsize="small")
    for axes in list(axes_grid.flat)[len(sweep):]:
        axes.set_visible(False)
    what = "loss f(rho)" if kind == "loss" else "gradient df/drho"
    figure.suptitle(f"{name} vs DPO: {what} for each beta (shaded: f'' < 0)" if kind == "loss"
                    else f"{name} vs DPO: {what} for each beta")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def panel_limits(reference, values, extent: float = 10.0) -> tuple[float, float, bool]:
    """Return y limits (low, high) and whether they cut the curve off.

    The limits show DPO in full and the loss up to `extent` times DPO's size beyond, where the
    size is the larger of DPO's span and its largest magnitude. An exponential loss would
    otherwise flatten DPO into a line, while a near-constant DPO gradient still leaves room for
    the loss's own features.
    """
    import numpy as np

    low, high = float(np.nanmin(reference)), float(np.nanmax(reference))
    size = max(high - low, abs(low), abs(high), 1e-12)
    floor, ceiling = low - extent * size, high + extent * size
    finite = values[np.isfinite(values)]
    if finite.size:
        low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    clipped = low < floor or high > ceiling
    low, high = max(low, floor), min(high, ceiling)
    pad = 0.05 * (high - low)
    return low - pad, high + pad, clipped


def _shade_nonconvex(axes, ranges) -> None:
    for number, (low, high) in enumerate(ranges):
        label = "f'' < 0" if number == 0 else None
        if low == high:
            axes.axvline(low, color="tab:orange", linestyle=":", linewidth=1.5, label=label)
        else:
            axes.axvspan(low, high, color="tab:orange", alpha=0.2, label=label)
