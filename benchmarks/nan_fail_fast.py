"""Cost of a candidate whose loss is NaN at the first step, against a full fine-tune, and its peak memory.

Both are preference-task evaluation jobs in the process backend, forked from
its warm fork server as the engine runs them by default. One is the study's
DPO seed, which trains every step and is then scored. The other is a loss
that is NaN from the first step, which the trainer stops before the
optimizer's first update. The NaN job pays the fork and the model and data
loading, but no imports, training or scoring. Both jobs also run in a fresh
interpreter (`--no-warm-start`), to show what the warm start saves and that
it changes no result. One untimed job starts the fork server before the timed ones.
Jobs alternate, in an order that flips every repeat, so load changes hit all
alike. The full fine-tune's peak RSS is the worker's own maximum resident set
size (ru_maxrss).

Usage: .venv/bin/python -m benchmarks.nan_fail_fast [--preset cpu] [--repeats 4] [--cpus 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LoadSampler, command_line, machine_lines, table  # noqa: E402

TARGET_SHARE = 0.10
TARGET_RSS_MIB = 5 * 1024
# sqrt of a negative number is NaN for every input, so the loss is NaN at the first step
NAN_LOSS = """import torch
import torch.nn.functional as F


def nan_from_first_step(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(self.beta * rho) + torch.sqrt(rho - rho - 1.0)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="preference preset (default: cpu)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="jobs of each kind; an even number balances the order (default: 4)")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPU threads per job, as sandbox.cpus (default: 2)")
    parser.add_argument("--cache-dir", type=Path, help="prepared cache (default: the user's evolve cache)")
    args = parser.parse_args(argv)

    from engine.config import default_cache_dir
    from engine.runner import prepare_task
    from evaluators.registry import get_task
    from sandbox.backend import Limits
    from sandbox.process_backend import ProcessBackend
    from sandbox.protocol import Job, JobKind
    from seeds import load_seed_programs

    cache_dir = args.cache_dir or default_cache_dir()
    task = get_task("preference")
    settings = task.presets()[args.preset]
    with tempfile.TemporaryDirectory(prefix="evolve-prepare-") as job_dir:
        prepare_task(task, settings, cache_dir, Path(job_dir), task_ref="preference")
    dpo = next(seed for seed in load_seed_programs("preference", "baselines") if seed.name == "dpo")
    codes = {"nan": NAN_LOSS, "full": dpo.code, "nan_cold": NAN_LOSS, "full_cold": dpo.code}
    backends = {kind: ProcessBackend(warm=not kind.endswith("_cold")) for kind in codes}
    limits = Limits(timeout_s=1800, memory_mb=12288, cpus=args.cpus)
    results = {kind: [] for kind in codes}

    with tempfile.TemporaryDirectory(prefix="evolve-bench-") as scratch, LoadSampler() as load:
        warm_up = Job(kind=JobKind.UNIT_TEST, task="preference", settings=task.settings_to_dict(settings),
                      cache_dir=str(cache_dir), code=dpo.code)
        backends["nan"].run(warm_up, Path(scratch) / "warm-up", limits)
        for repeat in range(args.repeats):
            # the order flips every repeat, so a load trend favours neither job
            kinds = list(codes) if repeat % 2 == 0 else list(reversed(codes))
            for kind in kinds:
                code = codes[kind]
                job = Job(kind=JobKind.EVALUATE, task="preference", settings=task.settings_to_dict(settings),
                          cache_dir=str(cache_dir), code=code, seed=0, candidate_id=f"{kind}-{repeat}")
                results[kind].append(backends[kind].run(job, Path(scratch) / f"{kind}-{repeat}", limits))

    for result in results["full"] + results["full_cold"]:
        if not result.ok:
            raise RuntimeError(f"the DPO fine-tune failed: {result.reason}\n{result.log_tail}")
    for result in results["nan"] + results["nan_cold"]:
        if result.ok or result.category != "nan":
            raise RuntimeError(f"the NaN loss was not stopped as expected: ok={result.ok} {result.category}: "
                               f"{result.reason}")

    full_s = statistics.median(r.wall_s for r in results["full"])
    nan_s = statistics.median(r.wall_s for r in results["nan"])
    rows = []
    for kind, label in (("full", "DPO seed, full fine-tune and scoring"), ("nan", "loss NaN at step 1"),
                        ("full_cold", "DPO seed, fresh interpreter (`--no-warm-start`)"),
                        ("nan_cold", "loss NaN at step 1, fresh interpreter (`--no-warm-start`)")):
        runs = results[kind]
        walls = [r.wall_s for r in runs]
        peaks = [r.peak_rss_mb for r in runs if r.peak_rss_mb is not None]
        fitness = sorted({f"{r.fitness:.4f}" for r in runs if r.fitness is not None}) or ["none"]
        rows.append([label, f"{statistics.median(walls):.1f} s", f"{min(walls):.1f} to {max(walls):.1f} s",
                     f"{statistics.median(peaks):.0f} MiB" if peaks else "n/a", ", ".join(fitness),
                     f"{statistics.median(walls) / full_s:.3f}"])
    full_metrics = results["full"][0].metrics
    peak_full = statistics.median(r.peak_rss_mb for r in results["full"] if r.peak_rss_mb is not None)

    print("## A loss that is NaN at step 1 against a full fine-tune\n")
    print(f"- command: `{command_line()}`")
    for line in machine_lines():
        print(line)
    print(f"- 1-minute load average during the runs: {load.summary()}")
    print(f"- preset {args.preset}, evaluation jobs in the process backend, forked from the warm server "
          f"unless marked, with {args.cpus:g} CPU thread(s), "
          f"{args.repeats} jobs of each kind\n")
    print(table(["job", "wall time (median)", "range", "worker peak RSS", "fitness", "ratio to the full fine-tune"],
                rows))
    share = nan_s / full_s
    print(f"\nTarget: the NaN candidate costs under {TARGET_SHARE:.0%} of a full fine-tune: "
          f"{'met' if share < TARGET_SHARE else 'not met'} ({share:.1%}).")
    print(f"Target: one {args.preset}-preset evaluation peaks under {TARGET_RSS_MIB / 1024:.0f} GiB: "
          f"{'met' if peak_full < TARGET_RSS_MIB else 'not met'} ({peak_full:.0f} MiB).")
    print(f"The first full fine-tune's own split: load {full_metrics['load_s']:.1f} s, train "
          f"{full_metrics['train_s']:.1f} s, sampling and scoring {full_metrics['eval_s']:.1f} s. "
          f"The NaN job's reason: {results['nan'][0].reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
