"""`evolve plot`: PNG plots of a run: fitness by generation, loss shapes and training curves.

The loss-shape plot needs the values of candidate losses, which only a
sandboxed child computes (sandbox/curves.py); everything else reads the archive.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from engine.report import RunDirError, best_so_far, leaderboard, open_run_archive, top_proposals

console = Console()

FITNESS_FILE = "fitness_by_generation.png"
SHAPES_FILE = "loss_shapes.png"
TRAINING_FILE = "training_curves.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve plot",
        description="Write PNG plots of a run: fitness by generation with the seed baselines, the loss f(rho) "
        "and its gradient for the best proposals against DPO and SLiC, and their training-loss curves.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (contains archive.sqlite)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: RUN_DIR/plots)")
    parser.add_argument("--top", type=int, default=3, metavar="K", help="best proposals drawn (default: 3)")
    parser.add_argument("--rho-max", type=float, default=20.0, metavar="NATS",
                        help="the loss-shape plot spans rho from -NATS to NATS (default: 20)")
    parser.add_argument("--points", type=int, default=201, help="rho values evaluated per loss (default: 201)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="wall-clock limit of the sandboxed job that evaluates the losses (default: 120)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.points < 2 or args.rho_max <= 0 or args.top < 1:
        console.print(
            f"[red]error:[/] invalid values --points {args.points}, --rho-max {args.rho_max}, --top {args.top}: "
            "--points must be at least 2, --rho-max positive and --top at least 1",
            soft_wrap=True,
        )
        return 2
    try:
        archive = open_run_archive(args.run_dir)
    except RunDirError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    out_dir = args.out or args.run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        written = [plot_fitness(archive, out_dir / FITNESS_FILE)]
        shapes = plot_loss_shapes(archive, out_dir / SHAPES_FILE, args.top, args.rho_max, args.points, args.timeout)
        training = plot_training_curves(archive, out_dir / TRAINING_FILE, args.top)
    finally:
        archive.close()
    written += [path for path in (shapes, training) if path is not None]
    for path in written:
        console.print(f"wrote {escape(str(path))}")
    return 0


def plot_fitness(archive: Archive, path: Path) -> Path:
    """Plot each evaluated proposal's fitness by generation, the best so far and the seeds as horizontal lines."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    candidates = archive.candidates()
    proposals = [c for c in candidates if c.origin is Origin.PROPOSER]
    evaluated = [c for c in proposals if c.status is Status.EVALUATED and c.fitness is not None]
    seeds = [c for c in archive.seeds() if c.status is Status.EVALUATED and c.fitness is not None]

    figure, axes = plt.subplots(figsize=(9, 5))
    if evaluated:
        axes.scatter([c.generation for c in evaluated], [c.fitness for c in evaluated],
                     color="tab:blue", zorder=3, label="evaluated proposal")
        steps = best_so_far(candidates)
        axes.step([g for g, _ in steps], [f for _, f in steps], where="post",
                  color="tab:red", linewidth=2, label="best so far")
    else:
        axes.text(0.5, 0.5, "no evaluated proposals yet", transform=axes.transAxes, ha="center", color="gray")
    colors = plt.get_cmap("tab10")
    for index, seed in enumerate(sorted(seeds, key=lambda c: -c.fitness)):
        axes.axhline(seed.fitness, linestyle="--", linewidth=1, color=colors(index % 10),
                     label=f"seed {seed.name} ({seed.fitness:.3f})")
    rejected = len(proposals) - len(evaluated)
    axes.set_title(f"fitness by generation: {len(evaluated)} evaluated, {rejected} not evaluated")
    axes.set_xlabel("generation")
    axes.set_ylabel("fitness (higher is better)")
    generations = [c.generation for c in proposals] or [1]
    axes.set_xlim(0.5, max(generations) + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def reference_curves(beta: float, rho) -> dict[str, tuple]:
    """Return the loss and d loss / d rho of DPO and SLiC at `beta`.

    DPO: -log sigmoid(beta * rho) (Rafailov et al. 2023, eq. 7), gradient -beta * sigmoid(-beta * rho).
    SLiC: max(0, 1 - beta * rho) (Zhao et al. 2023), gradient -beta where beta * rho < 1, else 0.
    """
    import numpy as np

    scaled = beta * rho
    dpo = (np.logaddexp(0.0, -scaled), -beta / (1.0 + np.exp(scaled)))
    slic = (np.maximum(0.0, 1.0 - scaled), np.where(scaled < 1.0, -beta, 0.0))
    return {"DPO": dpo, "SLiC": slic}


def plot_loss_shapes(
    archive: Archive, path: Path, top: int, rho_max: float, points: int, timeout_s: float
) -> Path | None:
    """Plot f(rho) and df/drho of the best proposals, computed in the sandbox, against DPO and SLiC."""
    import matplotlib.pyplot as plt
    import numpy as np

    from evaluators.registry import UnknownTaskError, get_task
    from sandbox.backend import SandboxUnavailable
    from sandbox.curves import CurvesFailed, compute_curves

    config = archive.get_meta("config") or {}
    settings = archive.get_meta("settings") or {}
    try:
        interface = get_task(config.get("task", "")).interface
    except (UnknownTaskError, ValueError) as error:
        console.print(f"[yellow]skipped {path.name}:[/] the run's task cannot be loaded ({escape(str(error))})")
        return None
    hyperparameters = {name: settings[name] for name in interface.hyperparameters if name in settings}
    beta = hyperparameters.get("beta")
    best = top_proposals(archive, top)
    rho = np.linspace(-rho_max, rho_max, points)

    curves = {}
    if best:
        with tempfile.TemporaryDirectory(prefix="evolve-curves-") as job_dir:
            try:
                curves = compute_curves(
                    {c.id: c.code for c in best}, tuple(interface.params), hyperparameters, rho.tolist(),
                    Path(job_dir), timeout_s=timeout_s,
                    allow_network=bool((config.get("sandbox") or {}).get("allow_network")),
                )
            except (SandboxUnavailable, CurvesFailed) as error:
                console.print(f"[yellow]skipped {path.name}:[/] {escape(str(error))}")
                return None

    figure, (loss_axes, grad_axes) = plt.subplots(1, 2, figsize=(12, 5))
    references = reference_curves(beta, rho) if beta is not None else {}
    for name, (loss, grad) in references.items():
        # drawn above the candidates, dashed, so that a candidate equal to a baseline hides neither
        style = {"linestyle": "--", "color": "black" if name == "DPO" else "dimgray", "linewidth": 1.5, "zorder": 3}
        loss_axes.plot(rho, loss, label=name, **style)
        grad_axes.plot(rho, grad, label=name, **style)
    drawn = []
    for candidate in best:
        curve = curves.get(candidate.id)
        if curve is None or curve.error:
            reason = curve.error if curve is not None else "no result"
            console.print(f"[yellow]{candidate.id} left out of {path.name}:[/] {escape(reason)}")
            continue
        loss, grad = _as_array(curve.loss), _as_array(curve.grad)
        if not np.isfinite(loss).any():
            console.print(
                f"[yellow]{candidate.id} left out of {path.name}:[/] no finite loss for a single pair "
                "(a loss that uses batch statistics such as std is undefined for one pair)"
            )
            continue
        label = f"{candidate.name} ({candidate.fitness:.3f})"
        loss_axes.plot(rho, loss, label=label, linewidth=2)
        grad_axes.plot(rho, grad, label=label, linewidth=2)
        drawn.append((loss, grad))
    at = f" at beta = {beta}" if beta is not None else ""
    loss_axes.set_title(f"loss f(rho){at}")
    grad_axes.set_title(f"gradient df/drho{at}")
    for index, (axes, ylabel) in enumerate(((loss_axes, "loss f(rho)"), (grad_axes, "df/drho"))):
        axes.set_xlabel("rho = log-ratio difference, chosen minus rejected (nats)")
        axes.set_ylabel(ylabel)
        axes.axvline(0.0, color="lightgray", linewidth=0.8)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        if references:
            limits = clipped_limits([pair[index] for pair in references.values()], [pair[index] for pair in drawn])
            axes.set_ylim(*limits.range)
            if limits.clipped:
                axes.text(0.99, 0.01, "some curves leave the plotted range", transform=axes.transAxes,
                          ha="right", va="bottom", fontsize="small", color="gray")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@dataclass(frozen=True)
class Limits:
    range: tuple[float, float]
    clipped: bool


def clipped_limits(references: list, curves: list, spans: float = 2.0) -> Limits:
    """Return y limits that show the reference curves in full and the others up to `spans` reference spans beyond.

    A candidate that grows much faster than DPO would otherwise flatten the
    baselines into a line at zero.
    """
    import numpy as np

    low = min(float(np.nanmin(r)) for r in references)
    high = max(float(np.nanmax(r)) for r in references)
    span = max(high - low, 1e-6)
    floor, ceiling = low - spans * span, high + spans * span
    finite = [c[np.isfinite(c)] for c in curves]
    values = np.concatenate(finite) if finite else np.array([])
    if values.size:
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    clipped = low < floor or high > ceiling
    low, high = max(low, floor), min(high, ceiling)
    pad = 0.05 * (high - low)
    return Limits((low - pad, high + pad), clipped)


def _as_array(values: list):
    import numpy as np

    return np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_training_curves(archive: Archive, path: Path, top: int) -> Path | None:
    """Plot the per-step training loss of the best proposals and of the best seed (dashed)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    drawn: list[tuple[Candidate, bool]] = [(c, False) for c in top_proposals(archive, top)]
    best_seed = next((c for c in leaderboard(archive) if c.origin is Origin.SEED), None)
    if best_seed is not None:
        drawn.append((best_seed, True))
    drawn = [(c, seed) for c, seed in drawn if isinstance(c.metrics.get("train_loss"), list)]
    drawn = [(c, seed) for c, seed in drawn if c.metrics["train_loss"]]
    if not drawn:
        console.print(f"[yellow]skipped {path.name}:[/] no evaluated candidate recorded a train_loss curve")
        return None

    figure, axes = plt.subplots(figsize=(9, 5))
    values = []
    for candidate, seed in drawn:
        losses = _as_array(candidate.metrics["train_loss"])
        values.append(losses)
        label = f"{'seed ' if seed else ''}{candidate.name} ({candidate.fitness:.3f})"
        axes.plot(range(1, len(losses) + 1), losses, label=label, linestyle="--" if seed else "-", marker=".")
    axes.set_title("training loss of the best proposals (dashed: best seed)")
    axes.set_xlabel("optimizer step")
    ylabel = "training loss (batch mean)"
    magnitudes = np.abs(np.concatenate(values))
    magnitudes = magnitudes[np.isfinite(magnitudes)]
    typical = float(np.median(magnitudes)) if magnitudes.size else 0.0
    if typical > 0 and magnitudes.max() > 1000 * typical:
        # one diverging curve would flatten the others; symlog is linear near 0 and logarithmic beyond
        axes.set_yscale("symlog", linthresh=typical)
        ylabel += ", symlog scale"
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
