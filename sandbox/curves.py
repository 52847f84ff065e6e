"""Loss and gradient curves of candidate programs over a margin grid, computed in a sandboxed child.

Usage (child side): python -m sandbox.curves JOB_DIR

The child reads JOB_DIR/curves_job.json, loads each program with the same
static check and RestrictedPython loader as the worker, and writes
JOB_DIR/curves.json. For each grid value r it calls the program with the first
parameter set to r and every other parameter set to 0, as a batch of one pair,
and takes the gradient with autograd. For a preference loss that is f(rho)
and df/drho at rho = r, as in Figure 6 of the DiscoPOP study (Lu et al. 2024).

`compute_curves` is the engine side. It starts the child through
`run_isolated_job`, which gives it the process backend's isolation (scrubbed
environment, `unshare -rn`, rlimits, a deadline and a process-group kill),
because candidate code never runs in the engine. The analysis job of
`evolve analyze` (sandbox/analysis.py) starts its child the same way.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.protocol import LOG_FILE, write_json_atomic

JOB_FILE = "curves_job.json"
RESULT_FILE = "curves.json"


@dataclass(frozen=True)
class Curve:
    """Values of one program over the grid, None where non-finite; `error` is set instead when it failed."""

    loss: list[float | None]
    grad: list[float | None]
    error: str = ""


class CurvesFailed(RuntimeError):
    """Raised when a sandboxed child (the curves job or the analysis job) did not produce its result file."""


# engine side


def compute_curves(
    programs: dict[str, str],
    params: tuple[str, ...],
    hyperparameters: dict[str, float],
    grid: list[float],
    job_dir: Path,
    timeout_s: float = 120.0,
    memory_mb: int = 4096,
    allow_network: bool = False,
) -> dict[str, Curve]:
    """Evaluate each program (id -> code) over `grid` in a sandboxed child; return id -> Curve.

    Raises SandboxUnavailable when the network cannot be isolated and
    `allow_network` is false, and CurvesFailed when the child crashed or timed out.
    """
    job = {"programs": programs, "params": list(params), "hyperparameters": hyperparameters, "grid": grid}
    payload = run_isolated_job(
        "sandbox.curves", "curves", job, JOB_FILE, RESULT_FILE, job_dir, timeout_s, memory_mb, allow_network
    )
    return {key: Curve(**value) for key, value in payload.items()}


def run_isolated_job(
    module: str,
    label: str,
    job: dict[str, Any],
    job_file: str,
    result_file: str,
    job_dir: Path,
    timeout_s: float,
    memory_mb: int,
    allow_network: bool,
) -> Any:
    """Write `job` to JOB_DIR/job_file, run `python -m module JOB_DIR` isolated, and return the parsed result file.

    The child gets the process backend's isolation: a scrubbed environment,
    `unshare -rn`, rlimits, a deadline and a process-group kill.

    Raises SandboxUnavailable when the network cannot be isolated and
    `allow_network` is false, and CurvesFailed when the child crashed or timed out.
    """
    from sandbox.backend import SandboxUnavailable
    from sandbox.process_backend import build_environment, network_isolation_available, read_log_tail

    isolated = network_isolation_available()
    if not isolated and not allow_network:
        raise SandboxUnavailable(
            f"cannot isolate the network for the {label} job: `unshare -rn true` failed. Enable unprivileged "
            "user namespaces, or run on a machine where the process sandbox works."
        )
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / result_file).unlink(missing_ok=True)
    write_json_atomic(job_dir / job_file, job)
    home = job_dir / "home"
    home.mkdir(exist_ok=True)
    command = [sys.executable, "-m", module, str(job_dir)]
    if isolated:
        command = [shutil.which("unshare") or "unshare", "-rn", *command]

    def apply_limits() -> None:
        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with open(job_dir / LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=job_dir,
            env=build_environment(home, threads=1),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=apply_limits,
        )
        try:
            process.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # the child may have started others in its session; kill the whole group, then reap
            _kill_group(process.pid)
            process.wait()

    tail = read_log_tail(job_dir / LOG_FILE, 1500)
    if timed_out:
        raise CurvesFailed(f"the {label} job timed out after {timeout_s:.0f} s and was killed; log tail:\n{tail}")
    result_path = job_dir / result_file
    if process.returncode != 0 or not result_path.exists():
        raise CurvesFailed(
            f"the {label} job exited with status {process.returncode} and wrote no result; log tail:\n{tail}"
        )
    return json.loads(result_path.read_text())


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# child side


def evaluate_program(
    code: str, params: tuple[str, ...], hyperparameters: dict[str, float], grid: list[float], dtype: str = "float32"
) -> Curve:
    """Check, load and evaluate one program, one pair per grid value, in `dtype`; a failure becomes `Curve.error`."""
    import torch

    from sandbox.loader import load_candidate
    from sandbox.static_check import StaticCheckError, check_source

    try:
        check_source(code, params, tuple(hyperparameters))
        function = load_candidate(code, params, hyperparameters)
    except StaticCheckError as error:
        return Curve([], [], error=f"static check failed: {error.reason}")

    losses: list[float] = []
    grads: list[float] = []
    torch_dtype = getattr(torch, dtype)
    zero = torch.zeros(1, dtype=torch_dtype)
    for value in grid:
        margin = torch.tensor([value], dtype=torch_dtype, requires_grad=True)  # (1,): one pair
        try:
            out = function(margin, *[zero.clone() for _ in params[1:]])
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                return Curve([], [], error=f"returned {shape} for one pair, expected one value")
            loss = out.reshape(())
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, margin, allow_unused=True)
            else:
                grad = None
        except Exception as error:  # noqa: BLE001 - candidate faults are reported per program
            return Curve([], [], error=f"{type(error).__name__} at {params[0]}={value}: {error}")
        losses.append(float(loss.detach()))
        grads.append(float(grad.reshape(())) if grad is not None else 0.0)
    return Curve(losses, grads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sandbox.curves JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    job = json.loads((job_dir / JOB_FILE).read_text())
    params = tuple(job["params"])
    started = time.monotonic()
    curves: dict[str, Any] = {}
    for key, code in job["programs"].items():
        curve = evaluate_program(code, params, job["hyperparameters"], job["grid"])
        curves[key] = {
            "loss": [v if math.isfinite(v) else None for v in curve.loss],
            "grad": [v if math.isfinite(v) else None for v in curve.grad],
            "error": curve.error,
        }
    write_json_atomic(job_dir / RESULT_FILE, curves)
    print(f"curves of {len(curves)} program(s) computed in {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
