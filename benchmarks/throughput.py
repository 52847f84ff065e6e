"""Candidates judged per hour with 1 and 2 workers, and with the Ray executor.

Each measurement is one fresh run: the offline proposer writes `population`
candidates per generation for `generations` generations, and the engine
judges them (static checks, unit-test job, fine-tune job) with the given
number of workers. The seed programs are judged before the clock starts. All
configurations get the same proposals, because the offline proposer's
choices depend only on the run seed and the judged history, so the rate
ratios compare the same work. Configurations alternate, and each repeat
starts with another one, so that changes in the machine's load hit all of
them alike.

Usage: .venv/bin/python -m benchmarks.throughput [--task toy|preference-tiny] [--repeats 3] [--ray]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import TOY_TASK, LoadSampler, command_line, local_ray_cluster, machine_lines, table  # noqa: E402

TASKS = {
    # name: (task reference, preset, train timeout in seconds)
    "toy": (TOY_TASK, "default", 120.0),
    "preference-tiny": ("preference", "tiny", 900.0),
}


@dataclass(frozen=True)
class Setup:
    executor: str
    workers: int

    @property
    def label(self) -> str:
        return f"{self.executor}, {self.workers} worker(s)"


@dataclass
class Measurement:
    elapsed_s: float
    judged: int
    evaluated: int
    fingerprints: tuple[str, ...]

    @property
    def per_hour(self) -> float:
        return self.judged / self.elapsed_s * 3600.0


class SilentReporter:
    def generation_started(self, generation, total):
        pass

    def candidate_started(self, candidate):
        pass

    def candidate_finished(self, candidate):
        pass

    def generation_finished(self, generation, candidates):
        pass


def measure(setup: Setup, task_name: str, args: argparse.Namespace, cache_dir: Path, ray_address: str) -> Measurement:
    """Run one fresh evolution and time its generations (seeds excluded)."""
    from engine.candidate import Status
    from engine.config import ProposerConfig, RunConfig, SandboxConfig
    from engine.loop import Evolution, LoopOptions
    from engine.runner import build_pipeline, choose_proposer, open_run

    task_ref, preset, train_timeout_s = TASKS[task_name]
    with tempfile.TemporaryDirectory(prefix="evolve-throughput-") as scratch:
        config = RunConfig(
            task=task_ref,
            preset=preset,
            generations=args.generations,
            population=args.population,
            workers=setup.workers,
            max_attempts=1,
            seed=0,
            run_dir=str(Path(scratch) / "run"),
            cache_dir=str(cache_dir),
            proposer=ProposerConfig(kind="offline"),
            sandbox=SandboxConfig(backend="process", executor=setup.executor, ray_address=ray_address or "auto",
                                  unit_test_timeout_s=120.0, train_timeout_s=train_timeout_s, cpus=1.0),
        )
        context = open_run(config, None, {})
        proposer = choose_proposer(config.proposer, context.archive, context.task)
        options = LoopOptions(generations=args.generations, max_attempts=1, seed=0,
                              population=args.population, workers=setup.workers)
        evolution = Evolution(context.task, context.settings, context.archive, build_pipeline(context), proposer,
                              SilentReporter(), options)
        evolution.add_seeds(context.task.seeds())
        evolution.judge_unfinished()

        start = time.monotonic()
        evolution.run()
        elapsed = time.monotonic() - start

        proposals = list(context.archive.iter_proposals())
        judged = [c for c in proposals if c.status.is_final]
        evaluated = sum(1 for c in judged if c.status is Status.EVALUATED)
        fingerprints = tuple(sorted(c.fingerprint or c.code for c in judged))
        return Measurement(elapsed, len(judged), evaluated, fingerprints)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="toy", help="task to judge candidates on (default: toy)")
    parser.add_argument("--generations", type=int, default=3, help="generations per run (default: 3)")
    parser.add_argument("--population", type=int, default=4, help="candidates per generation (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration (default: 3)")
    parser.add_argument("--ray", action="store_true", help="add --executor ray with 2 workers on a local 2-CPU Ray cluster")
    parser.add_argument("--cache-dir", type=Path, help="prepared cache (default: a temporary one for toy, "
                                                        "the user's evolve cache for preference-tiny)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    setups = [Setup("local", 1), Setup("local", 2)]
    if args.ray:
        setups.append(Setup("ray", 2))

    with ExitStack() as stack:
        ray_address = stack.enter_context(local_ray_cluster(num_cpus=2)) if args.ray else ""
        cache_dir = args.cache_dir
        if cache_dir is None and args.task == "toy":
            cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evolve-toy-cache-")))
        elif cache_dir is None:
            from engine.config import default_cache_dir

            cache_dir = default_cache_dir()
        prepare(args.task, cache_dir)

        results: dict[Setup, list[Measurement]] = {setup: [] for setup in setups}
        with LoadSampler() as load:
            for repeat in range(args.repeats):
                # each repeat starts with another configuration, so a load trend favours none of them
                shift = repeat % len(setups)
                for setup in setups[shift:] + setups[:shift]:
                    results[setup].append(measure(setup, args.task, args, cache_dir, ray_address))

    baseline = statistics.median(m.per_hour for m in results[setups[0]])
    reference_work = results[setups[0]][0].fingerprints
    rows = []
    for setup in setups:
        runs = results[setup]
        rates = [m.per_hour for m in runs]
        same = all(m.fingerprints == reference_work for m in runs)
        rows.append([
            setup.label,
            f"{statistics.median(rates):.0f}",
            f"{min(rates):.0f} to {max(rates):.0f}",
            f"{statistics.median(m.elapsed_s for m in runs):.1f} s",
            f"{runs[0].judged} ({runs[0].evaluated} evaluated)",
            "yes" if same else "no",
            f"{statistics.median(rates) / baseline:.2f}",
        ])

    print(f"## Candidates per hour: {args.task}\n")
    print(f"- command: `{command_line()}`")
    for line in machine_lines():
        print(line)
    print(f"- 1-minute load average during the runs: {load.summary()}")
    print(f"- {args.generations} generations of {args.population} candidates per run, offline proposer, process "
          f"sandbox with 1 CPU thread per job, {args.repeats} runs per configuration, seeds judged before timing\n")
    print(table(["configuration", "candidates/hour (median)", "range", "time per run (median)",
                 "candidates judged per run", "same candidates as the first row", "ratio to local, 1 worker"], rows))
    return 0


def prepare(task_name: str, cache_dir: Path) -> None:
    from engine.runner import prepare_task, resolve_settings
    from evaluators.registry import get_task

    task_ref, preset, _ = TASKS[task_name]
    task = get_task(task_ref)
    settings = resolve_settings(task, preset, {})
    with tempfile.TemporaryDirectory(prefix="evolve-prepare-") as job_dir:
        prepare_task(task, settings, cache_dir, Path(job_dir), task_ref=task_ref)


if __name__ == "__main__":
    sys.exit(main())
