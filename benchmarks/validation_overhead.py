"""Validation cost per candidate: in-engine parse and static checks, then the unit-test job in a sandbox.

The candidates are the preference task's 11 seed programs, sent as the JSON
reply a model would write. Each round runs the unit-test job of one
candidate in the process backend twice: forked from the warm fork server (the
default) and in a fresh interpreter (`--no-warm-start`, the peer). Peers that
split the fresh interpreter's cost run in the same round: a bare interpreter
start in the same sandbox (`python -c pass` under `unshare -rn`), `import
torch` alone, and the imports the worker needs for this task. The fork
server's one-time start and its first job are reported on their own. When the
Docker engine and the sandbox image are available, the same job runs in a
container too, next to a container that only runs `python -c pass`.

Usage: .venv/bin/python -m benchmarks.validation_overhead [--runs 7] [--docker auto|skip]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LoadSampler, Series, command_line, machine_lines, table  # noqa: E402
from engine.fingerprint import canonical_fingerprint  # noqa: E402
from engine.reply import parse_reply  # noqa: E402
from evaluators.registry import get_task  # noqa: E402
from sandbox.backend import Limits, SandboxUnavailable  # noqa: E402
from sandbox.process_backend import ProcessBackend, build_environment  # noqa: E402
from sandbox.protocol import Job, JobKind  # noqa: E402
from sandbox.static_check import check_source  # noqa: E402
from seeds import load_seed_programs  # noqa: E402

TARGET_S = 1.0
# the modules a preference unit-test job imports before it runs the candidate
WORKER_IMPORTS = "import torch, RestrictedPython, sandbox.loader, sandbox.static_check, evaluators.preference.unit_tests"
LIMITS = Limits(timeout_s=120, memory_mb=4096, cpus=1)


def candidate_replies() -> list[tuple[str, str]]:
    """Return (name, reply text) for every preference seed, written as a model's JSON reply."""
    replies = []
    for group in ("baselines", "discovered"):
        for seed in load_seed_programs("preference", group):
            body = json.dumps({"thought": seed.thought, "name": seed.name, "code": seed.code})
            replies.append((seed.name, f"Here is my proposal.\n```json\n{body}\n```"))
    return replies


def engine_checks(replies: list[tuple[str, str]], repeats: int) -> Series:
    """Time parse_reply, check_source and canonical_fingerprint per candidate; return the per-candidate medians."""
    task = get_task("preference")
    params = task.interface.params
    hyperparameters = tuple(task.interface.hyperparameters)
    medians = Series("parse + static checks + fingerprint (in-engine)", "ms")
    for _, text in replies:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            proposal = parse_reply(text)
            check_source(proposal.code, params, hyperparameters)
            canonical_fingerprint(proposal.code, hyperparameters)
            times.append((time.perf_counter() - start) * 1000.0)
        medians.values.append(statistics.median(times))
    return medians


def timed_child(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def docker_backends(run_id: str):
    """Return a Docker backend for the real worker and one whose containers only start Python, or None."""
    try:
        from sandbox.docker_backend import DockerBackend

        worker = DockerBackend(run_id)
        bare = DockerBackend(run_id)
    except (SandboxUnavailable, ImportError) as error:
        return None, str(error)
    bare.worker_command = ("python", "-c", "pass")
    return (worker, bare), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds of sandbox jobs (default: 7)")
    parser.add_argument("--engine-repeats", type=int, default=50,
                        help="repeats of the in-engine checks per candidate (default: 50)")
    parser.add_argument("--docker", choices=("auto", "skip"), default="auto",
                        help="also run the job in the Docker backend when it is usable (default: auto)")
    args = parser.parse_args(argv)

    replies = candidate_replies()
    task = get_task("preference")
    settings = task.settings_to_dict(task.presets()["cpu"])
    warm = ProcessBackend(warm=True)
    cold = ProcessBackend(warm=False)
    docker, docker_problem = (None, "skipped with --docker skip")
    if args.docker == "auto":
        docker, docker_problem = docker_backends(f"bench-{int(time.time())}")

    series = {
        "job": Series("unit-test job, process backend, forked from the warm server (default)", "s"),
        "cold": Series("unit-test job, process backend, fresh interpreter (`--no-warm-start`)", "s"),
        "spawn": Series("`python -c pass` in the process sandbox", "s"),
        "torch": Series("`python -c 'import torch'` in the process sandbox", "s"),
        "imports": Series("the worker's imports for this task, in the process sandbox", "s"),
        "docker_job": Series("unit-test job, Docker backend", "s"),
        "docker_bare": Series("container that runs `python -c pass`, Docker backend", "s"),
    }
    rejected = []
    with tempfile.TemporaryDirectory(prefix="evolve-bench-") as scratch, LoadSampler() as load:
        scratch_dir = Path(scratch)
        (scratch_dir / "cache").mkdir()
        (scratch_dir / "home").mkdir()
        env = build_environment(scratch_dir / "home", threads=1)
        sandbox_prefix = cold.command(scratch_dir)[:-4]  # ["unshare", "-rn"], or [] without isolation
        engine = engine_checks(replies, args.engine_repeats)
        # the server starts on the first job and imports this task's modules for it: a cost paid once per run
        first_job = Job(kind=JobKind.UNIT_TEST, task="preference", settings=settings,
                        cache_dir=str(scratch_dir / "cache"), code=parse_reply(replies[0][1]).code)
        start = time.perf_counter()
        first = warm.run(first_job, scratch_dir / "first-job", LIMITS)
        first_s = time.perf_counter() - start
        if not first.ok:
            rejected.append(f"first warm job: {first.reason}")
        server_s = warm.fork_server().ready_seconds or 0.0

        for round_index in range(args.runs):
            name, text = replies[round_index % len(replies)]
            code = parse_reply(text).code
            job = Job(kind=JobKind.UNIT_TEST, task="preference", settings=settings,
                      cache_dir=str(scratch_dir / "cache"), code=code, candidate_id=name)
            result = warm.run(job, scratch_dir / f"job-{round_index}", LIMITS)
            if not result.ok:
                rejected.append(f"{name}: {result.reason}")
            series["job"].values.append(result.wall_s)
            result = cold.run(job, scratch_dir / f"cold-job-{round_index}", LIMITS)
            if not result.ok:
                rejected.append(f"{name} (fresh interpreter): {result.reason}")
            series["cold"].values.append(result.wall_s)
            series["spawn"].values.append(timed_child([*sandbox_prefix, sys.executable, "-c", "pass"], env))
            series["torch"].values.append(timed_child([*sandbox_prefix, sys.executable, "-c", "import torch"], env))
            series["imports"].values.append(timed_child([*sandbox_prefix, sys.executable, "-c", WORKER_IMPORTS], env))
            if docker is not None:
                worker, bare = docker
                result = worker.run(job, scratch_dir / f"docker-job-{round_index}", LIMITS)
                if not result.ok:
                    rejected.append(f"{name} (docker): {result.reason}")
                series["docker_job"].values.append(result.wall_s)
                start = time.perf_counter()
                bare.run(job, scratch_dir / f"docker-bare-{round_index}", LIMITS)
                series["docker_bare"].values.append(time.perf_counter() - start)

    job_s = series["job"].median
    cold_s = series["cold"].median
    rows = [[engine.name, f"{engine.median:.2f} ms", f"{min(engine.values):.2f} to {max(engine.values):.2f} ms "
             f"over {len(engine.values)} candidates", f"{engine.median / 1000.0 / cold_s:.4f}"]]
    for key in ("job", "cold", "spawn", "torch", "imports", "docker_job", "docker_bare"):
        measured = series[key]
        if not measured.values:
            continue
        rows.append([measured.name, f"{measured.median:.2f} s", f"{measured.spread()} s over {len(measured.values)} runs",
                     f"{measured.median / cold_s:.2f}"])
    rows.append(["once per run: fork server start (base imports)", f"{server_s:.2f} s", "1 run", f"{server_s / cold_s:.2f}"])
    rows.append(["once per run: first warm job (server start and the task's imports included)", f"{first_s:.2f} s", "1 run",
                 f"{first_s / cold_s:.2f}"])

    print("## Validation overhead per candidate\n")
    print(f"- command: `{command_line()}`")
    for line in machine_lines():
        print(line)
    print(f"- 1-minute load average during the run: {load.summary()}")
    print("- candidates: the 11 preference seed programs; sandbox jobs use 1 CPU thread each\n")
    print(table(["step", "median", "range", "ratio to the fresh-interpreter job"], rows))
    print()
    met = "met" if job_s + engine.median / 1000.0 < TARGET_S else "not met"
    print(f"Target: under {TARGET_S:.0f} s per candidate in the process backend: {met} "
          f"({job_s + engine.median / 1000.0:.2f} s, median).")
    print(f"The warm job takes {job_s / cold_s:.0%} of the fresh-interpreter job ({cold_s / job_s:.1f}x faster). "
          f"In the fresh interpreter the worker's imports alone take {series['imports'].median / cold_s:.0%} "
          f"of the job (`import torch` alone {series['torch'].median / cold_s:.0%}).")
    if docker is None:
        print(f"Docker rows skipped: {docker_problem}")
    if rejected:
        print("\nJobs that did not pass (they still count as timings): " + "; ".join(rejected))
    return 0


if __name__ == "__main__":
    sys.exit(main())
