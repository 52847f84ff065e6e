"""Shared parts of the benchmark scripts: machine facts, load sampling, medians and Markdown output."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
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
RAY_LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def local_ray_cluster(num_cpus: int) -> Iterator[str]:
    """Start a Ray head bound to 127.0.0.1 for the duration of the block; yield its GCS address.

    Sets RAY_LOOPBACK_VARIABLE in this process too, so call it before ray is imported.
    """
    os.environ[RAY_LOOPBACK_VARIABLE] = "0"
    # a short path, because Ray's Unix socket paths under it must stay below 108 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="evb", dir="/tmp"))
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port=0",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}",
        "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=100000000",
    ]
    log = open(temp_dir / "ray-start.log", "wb")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address_file = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + 120.0
    try:
        while not address_file.exists() or not address_file.read_text().strip():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {(temp_dir / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield address_file.read_text().strip()
    finally:
        if "ray" in sys.modules:
            import ray

            ray.shutdown()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
