"""A single-machine Ray cluster on 127.0.0.1, started with `ray start --head --block` for tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Ray reads this when it is first imported, and "0" keeps a local cluster on 127.0.0.1, not the routable address
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
START_TIMEOUT_S = 120.0


@contextmanager
def local_ray_cluster(num_cpus: int) -> Iterator[str]:
    """Start a Ray head bound to 127.0.0.1 for the duration of the block and yield its GCS address.

    Raises RuntimeError with the end of `ray start`'s log when the head does not come up.
    """
    # a short path, because Ray's Unix socket paths under it must stay below 108 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="evr", dir="/tmp"))
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port=0",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}",
        "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=100000000",
    ]
    log = open(temp_dir / "ray-start.log", "wb")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, LOOPBACK_VARIABLE: "0"})
    address_file = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        # `ray start` writes the address file once the head is up
        while not address_file.exists() or not address_file.read_text().strip():
            if head.poll() is not None or time.monotonic() > deadline:
                log_tail = (temp_dir / "ray-start.log").read_text()[-2000:]
                raise RuntimeError(f"ray start failed (exit {head.poll()}): {log_tail}")
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
