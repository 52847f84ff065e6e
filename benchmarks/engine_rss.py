"""Peak resident memory (VmHWM) of the `evolve` engine process itself during a run.

Each configuration runs `evolve` in a child process whose exit hook reads
VmHWM from /proc/self/status, so the figure covers the engine process alone:
its sandbox jobs are other processes and do not count. The peer in the same
run is the largest peak RSS that one of the run's sandbox jobs reported. The
process sandbox's warm fork server is a process of its own too. The same hook
reads its VmHWM before the engine stops it, and the table reports it apart.

Usage: .venv/bin/python -m benchmarks.engine_rss [--ray] [--preference]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    ROOT,
    TOY_TASK,
    LoadSampler,
    command_line,
    local_ray_cluster,
    machine_lines,
    table,
)

TARGET_MIB = 500.0
# Runs the evolve command line and, at exit, writes this process's VmHWM and VmRSS, and the VmHWM of its
# fork servers, to the file in argv[1]. The hook is registered after the backend's own exit hook, so it runs
# first, while the fork servers still live.
PROBE = """
import atexit, json, os, sys
from pathlib import Path
import sandbox.process_backend

def status(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "PPid"):
            fields[key] = int(value.split()[0]) / (1 if key == "PPid" else 1024.0)
    return fields

def record(path=Path(sys.argv[1])):
    fields = status("self")
    servers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"sandbox.forkserver" in cmdline.read_bytes() and status(cmdline.parent.name)["PPid"] == os.getpid():
                servers.append(status(cmdline.parent.name)["VmHWM"])
        except (OSError, KeyError):
            pass
    fields["servers"] = servers
    path.write_text(json.dumps(fields))

atexit.register(record)
sys.argv = ["evolve", *sys.argv[2:]]
from engine.cli import main
sys.exit(main())
"""


def run_evolve(label: str, evolve_args: list[str], scratch: Path) -> list[str]:
    """Run one `evolve` process and return its table row."""
    out = scratch / f"{label}.json"
    run_dir = scratch / label
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", PROBE, str(out), *evolve_args, "--run-dir", str(run_dir)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"evolve failed ({label}, exit {completed.returncode}):\n{completed.stdout[-3000:]}\n"
                           f"{completed.stderr[-3000:]}")
    memory = json.loads(out.read_text())
    with sqlite3.connect(run_dir / "archive.sqlite") as archive:
        rows = archive.execute("SELECT metrics FROM candidates").fetchall()
    job_peaks = [json.loads(metrics or "{}").get("peak_rss_mb") for (metrics,) in rows]
    job_peaks = [peak for peak in job_peaks if isinstance(peak, (int, float))]
    largest_job = max(job_peaks, default=None)
    return [
        label,
        f"{memory['VmHWM']:.0f} MiB",
        f"{memory['VmRSS']:.0f} MiB",
        f"{len(rows)}",
        f"{largest_job:.0f} MiB" if largest_job is not None else "n/a",
        f"{memory['VmHWM'] / largest_job:.2f}" if largest_job else "n/a",
        "met" if memory["VmHWM"] < TARGET_MIB else "not met",
        f"{max(memory['servers']):.0f} MiB" if memory["servers"] else "none",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=3, help="generations of the toy runs (default: 3)")
    parser.add_argument("--ray", action="store_true", help="add a toy run with --executor ray on a local Ray cluster")
    parser.add_argument("--preference", action="store_true",
                        help="add a run of the preference task's tiny preset (uses the user's evolve cache)")
    args = parser.parse_args(argv)

    common = ["--proposer", "offline", "--sandbox", "process", "--population", "2", "--workers", "2"]
    toy = ["--task", TOY_TASK, "--generations", str(args.generations), *common]
    rows = []
    with ExitStack() as stack, LoadSampler() as load:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evolve-rss-")))
        toy_cache = ["--cache-dir", str(scratch / "toy-cache")]
        rows.append(run_evolve("toy task, local executor", [*toy, *toy_cache], scratch))
        if args.ray:
            address = stack.enter_context(local_ray_cluster(num_cpus=2))
            rows.append(run_evolve("toy task, --executor ray",
                                   [*toy, *toy_cache, "--executor", "ray", "--ray-address", address], scratch))
        if args.preference:
            rows.append(run_evolve("preference task, tiny preset",
                                   ["--task", "preference", "--preset", "tiny", "--generations", "1", *common], scratch))

    print("## Peak memory of the engine process\n")
    print(f"- command: `{command_line()}`")
    for line in machine_lines():
        print(line)
    print(f"- 1-minute load average during the runs: {load.summary()}")
    print(f"- each run: offline proposer, process sandbox, population 2, 2 workers; the toy runs have "
          f"{args.generations} generations, the preference run 1\n")
    print(table(["run", "engine VmHWM", "engine VmRSS at exit", "candidates (seeds included)",
                 "largest sandbox job's peak RSS", "ratio engine / job", f"target < {TARGET_MIB:.0f} MiB",
                 "fork server VmHWM"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
