"""Shared parts of the benchmark scripts: machine facts, load sampling, medians and Markdown output."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
TOY_TASK = "tests.support.toy_task:ToyTask"


def machine_lines() -> list[str]:
    """Return Markdown lines naming the CPU, core count, memory, Python and date of this run."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {memory_gib:.1f} GiB RAM, {model}",
        f"- Python {platform.python_version()} on {platform.system()} {platform.release()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]


class LoadSampler:
    """Samples the 1-minute load average in a background thread while a measurement runs."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        return (f"{min(self.samples):.1f} to {max(self.samples):.1f} "
                f"(median {statistics.median(self.samples):.1f}, {len(self.samples)} samples)")


@dataclass
class Series:
    """Repeated measurements of one quantity."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self) -> str:
        return f"{min(self.values):.3g} to {max(self.values):.3g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def command_line() -> str:
    """Return the command that started this script, for the results page."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return " ".join([".venv/bin/python", "-m", spec.name, *sys.argv[1:]])
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def vm_hwm_mib(pid: int | str = "self") -> float | None:
    """Return a process's peak resident set size (VmHWM) in MiB, or None when /proc has no entry."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


# Ray keeps a loopback address only when this variable is 0 in every process of the cluster and its drivers.
@contextmanager
def local_ray_cluster(num_cpus: int) -> Iterator[str]:
    """Start a Ray head on 127.0.0.1 for the block and yield its address; set the loopback variable here too.

    Call it before ray is imported, because Ray reads the variable on import.
    """
    from tests.support.ray_cluster import LOOPBACK_VARIABLE
    from tests.support.ray_cluster import local_ray_cluster as start_cluster

    os.environ[LOOPBACK_VARIABLE] = "0"
    with start_cluster(num_cpus) as address:
        yield address
