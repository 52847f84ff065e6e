"""Ray executor: runs each sandbox job as a Ray task on an existing Ray cluster.

RayBackend wraps the process or Docker backend: a Ray task on some node
builds that backend there and runs the job with it (see sandbox/ray_node.py),
so the sandbox applies on the node exactly as it does locally. The job goes
to the node in the task's arguments, and the result and the job directory's
files come back in the task's output, so no shared job directory is needed.
The cache of prepared models and data must be at the same path on every node.

A job whose Ray worker or node dies (WorkerCrashedError, NodeDiedError,
OutOfMemoryError from Ray's memory monitor, a lost object) is submitted again,
up to `retries` times, so that the candidate is judged and not lost.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import RayError, RayTaskError, TaskCancelledError

from sandbox.backend import BackendKind, Limits, SandboxBackend, SandboxUnavailable
from sandbox.protocol import LOG_FILE, Job, Stage, StageResult
from sandbox.ray_node import (
    InnerBackendSpec,
    NodeFinished,
    NodeProbe,
    NodeProgress,
    NodeStarted,
    NodeUnavailable,
    probe_node,
    run_job_on_node,
    write_files,
)

logger = logging.getLogger(__name__)

# Seconds a connection attempt to the cluster's GCS port may take.
_CONNECT_TIMEOUT_S = 5.0
# Seconds a node may take beyond the job's own timeout to return its result:
# the inner backend's kill, reading the job's files and sending them.
_NODE_GRACE_S = 120.0
# Seconds the probe task may take, including a Ray worker's start.
_PROBE_TIMEOUT_S = 120.0
_POLL_S = 0.5
# Ray reads this variable when it picks the address of this machine. With "0"
# it keeps 127.0.0.1, so a cluster bound to loopback is reachable.
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_run_remote = ray.remote(run_job_on_node)
_probe_remote = ray.remote(probe_node)
_connect_lock = threading.Lock()


class _JobLost(Exception):
    """The Ray worker or node running a job died before the job returned its result."""


class RayBackend(SandboxBackend):
    """Runs jobs as Ray tasks, each in the node's process or Docker sandbox."""

    def __init__(
        self,
        inner_kind: BackendKind | None,
        address: str,
        *,
        run_id: str = "",
        image: str = "evolve-sandbox:cpu",
        allow_network: bool = False,
        gpu: bool = False,
        retries: int = 1,
        warm_start: bool = True,
    ) -> None:
        """Connect to the cluster at `address` and probe a node for its sandbox.

        Args:
            inner_kind: the sandbox each node uses; None picks Docker when the
                probed node has a Docker engine and `image`, else the process backend.
            address: the cluster's GCS address "host:port", or "auto" for the
                cluster that `ray start` started on this machine (or RAY_ADDRESS).
            gpu: evaluations ask for one GPU, so the probe runs on a GPU node
                and the process backend, which assigns no GPUs, is not accepted.
            retries: how many times a job is submitted again after its Ray
                worker or node died.
            warm_start: in the process backend, fork jobs from a warm worker.

        Raises:
            SandboxUnavailable: the cluster is unreachable, or the probed node
                cannot run sandbox jobs.
        """
        if retries < 0:
            raise ValueError(f"retries = {retries}: expected 0 or more")
        self.address = address or "auto"
        self.retries = retries
        self.gpu = gpu
        self._checked_requests: set[tuple[float, bool]] = set()
        connect(self.address)

        probe_spec = InnerBackendSpec(kind=inner_kind, run_id=run_id, image=image, allow_network=allow_network,
                                      warm_start=warm_start)
        probe = self._probe(probe_spec)
        if probe.kind is None:
            raise SandboxUnavailable(f"the Ray cluster at {self.address} cannot run sandbox jobs: {probe.problem}")
        if gpu and probe.kind is BackendKind.PROCESS:
            raise SandboxUnavailable(
                f"a GPU was requested but node {probe.node} of the Ray cluster at {self.address} has no usable "
                "Docker sandbox, and only the Docker backend assigns GPUs; install Docker and the sandbox image there"
            )
        # every job uses the backend the probe found, so that one run never mixes sandboxes
        self.spec = InnerBackendSpec(kind=probe.kind, run_id=run_id, image=image, allow_network=allow_network,
                                     warm_start=warm_start)
        self.kind = probe.kind
        self._probe_result = probe

    def _probe(self, spec: InnerBackendSpec) -> NodeProbe:
        options: dict[str, Any] = {"num_cpus": 0, "max_retries": 1}
        if self.gpu:
            options["num_gpus"] = 1
            self._check_resources(0.0, gpu=True)
        reference = _probe_remote.options(**options).remote(spec)
        try:
            return ray.get(reference, timeout=_PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(reference, force=True)
            raise SandboxUnavailable(
                f"the Ray cluster at {self.address} did not run a probe task within {_PROBE_TIMEOUT_S:.0f} s; "
                "check `ray status` for free resources and live nodes"
            ) from None
        except RayError as error:
            raise SandboxUnavailable(f"the probe task on the Ray cluster at {self.address} failed: {error}") from None

    def describe(self) -> str:
        resources = ray.cluster_resources()
        cpus = resources.get("CPU", 0.0)
        gpus = resources.get("GPU", 0.0)
        return (
            f"Ray cluster at {self.address} ({cpus:g} CPUs, {gpus:g} GPUs), one Ray task per job, "
            f"in the node's sandbox (probed on {self._probe_result.node}: {self._probe_result.description})"
        )

    def run(
        self,
        job: Job,
        job_dir: Path,
        limits: Limits,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> StageResult:
        """Run `job` on the cluster, as SandboxBackend.run describes, and write its files into `job_dir`."""
        self._check_resources(limits.cpus, limits.gpu)
        job_dir.mkdir(parents=True, exist_ok=True)
        # the engine's copy of what the node ran; the node's own copy comes back with the other files
        job.write(job_dir)
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._run_once(job, job_dir, limits, on_progress)
            except _JobLost as lost:
                if attempt == attempts:
                    logger.error("candidate %s: %s job lost on the Ray cluster %d time(s), giving up: %s",
                                 job.candidate_id, job.kind.value, attempts, lost)
                    return StageResult(
                        ok=False,
                        stage=Stage.SANDBOX,
                        category="executor_crash",
                        reason=f"the Ray worker running this job died {attempts} time(s), last with: {lost}. "
                        "The sandbox reported no fault of the candidate. Check the cluster's nodes (`ray status`), "
                        "then judge the candidate again with `evolve rerun`.",
                    )
                logger.warning("candidate %s: %s job lost on the Ray cluster (%s); submitting it again (retry %d of %d)",
                               job.candidate_id, job.kind.value, lost, attempt, self.retries)
        raise AssertionError("unreachable: the loop returns on its last attempt")

    def _run_once(
        self, job: Job, job_dir: Path, limits: Limits, on_progress: Callable[[dict[str, Any]], None] | None
    ) -> StageResult:
        options: dict[str, Any] = {
            "num_cpus": limits.cpus,
            "num_gpus": 1 if limits.gpu else 0,
            # this backend retries, so that each retry is logged with the candidate's id
            "max_retries": 0,
            "name": f"evolve:{job.candidate_id or 'job'}:{job.kind.value}",
        }
        stream = _run_remote.options(**options).remote(self.spec, job, limits, cache_prepared(job))
        deadline: float | None = None
        try:
            while True:
                ready, _ = ray.wait([stream], timeout=_POLL_S)
                if not ready:
                    if deadline is not None and time.monotonic() > deadline:
                        _cancel(stream)
                        return self._node_timeout(limits)
                    continue
                try:
                    message = ray.get(next(stream))
                except StopIteration:
                    raise _JobLost("the task ended without a result") from None
                except RayTaskError as error:
                    return StageResult(
                        ok=False,
                        stage=Stage.SANDBOX,
                        category="executor_error",
                        reason=f"the Ray task failed on the node before the job finished: {error.cause!r}",
                        log_tail=str(error)[-4000:],
                    )
                except TaskCancelledError:
                    raise _JobLost("the task was cancelled on the cluster") from None
                except RayError as error:
                    raise _JobLost(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None

                if isinstance(message, NodeStarted):
                    # the job's own deadline starts on the node, after any wait for free resources
                    deadline = time.monotonic() + limits.timeout_s + _NODE_GRACE_S
                    logger.debug("candidate %s: %s job started on node %s in Ray worker %d",
                                 job.candidate_id, job.kind.value, message.node, message.pid)
                elif isinstance(message, NodeProgress):
                    if on_progress is not None:
                        for event in message.events:
                            on_progress(event)
                elif isinstance(message, NodeUnavailable):
                    raise SandboxUnavailable(f"the Ray cluster at {self.address} cannot run sandbox jobs: {message.reason}")
                elif isinstance(message, NodeFinished):
                    return self._finish(job, job_dir, message)
        except BaseException:
            # an interrupted engine (Ctrl-C) must not leave the job running on the cluster
            _cancel(stream)
            raise

    def _finish(self, job: Job, job_dir: Path, message: NodeFinished) -> StageResult:
        write_files(job_dir, message.files)
        result = StageResult.from_dict(message.result)
        if message.left_out:
            note = "files left on the node (not returned): " + "; ".join(message.left_out)
            logger.info("candidate %s: %s", job.candidate_id, note)
            with open(job_dir / LOG_FILE, "a") as log:
                log.write(f"\n[evolve ray executor] {note}\n")
        return result

    def _node_timeout(self, limits: Limits) -> StageResult:
        waited = limits.timeout_s + _NODE_GRACE_S
        return StageResult(
            ok=False,
            stage=Stage.SANDBOX,
            category="timeout",
            reason=f"the Ray task returned no result within {waited:.0f} s of its start (job limit "
            f"{limits.timeout_s:.0f} s); the task was cancelled. Check the node, or raise the stage's timeout.",
            wall_s=waited,
        )

    def _check_resources(self, cpus: float, gpu: bool) -> None:
        """Raise SandboxUnavailable when no live node has the resources of a job, because Ray would queue it forever."""
        if (cpus, gpu) in self._checked_requests:
            return
        # NOTE: an autoscaling cluster with no node of this size running is rejected too.
        fits = False
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            resources = node.get("Resources", {})
            if resources.get("CPU", 0.0) >= cpus and (not gpu or resources.get("GPU", 0.0) >= 1):
                fits = True
                break
        if not fits:
            total = ray.cluster_resources()
            wanted = f"{cpus:g} CPU(s)" + (" and 1 GPU" if gpu else "")
            raise SandboxUnavailable(
                f"no node of the Ray cluster at {self.address} has {wanted} for one job (cluster total: "
                f"{total.get('CPU', 0.0):g} CPUs, {total.get('GPU', 0.0):g} GPUs); lower sandbox.cpus or add a node"
            )
        self._checked_requests.add((cpus, gpu))


def cache_prepared(job: Job) -> bool:
    """Return whether the job's cache directory exists here, on the engine machine."""
    return bool(job.cache_dir) and Path(job.cache_dir).is_dir()


def _cancel(stream: Any) -> None:
    """Kill the task's Ray worker.

    A process-backend job dies with it because PDEATHSIG is set. A Docker
    container does not, and only a later try of the same job on that node removes it.
    """
    try:
        ray.cancel(stream, force=True)
    except (RayError, ValueError, TypeError) as error:
        logger.debug("cancelling a Ray task failed: %s", error)


def connect(address: str) -> None:
    """Connect this process to the Ray cluster at `address` unless it is connected already.

    Raises:
        SandboxUnavailable: the cluster is unreachable, or this process is connected to another one.
    """
    if address != "auto":
        _check_reachable(address)
    with _connect_lock:
        if ray.is_initialized():
            connected = ray.get_runtime_context().gcs_address
            if address not in ("auto", connected):
                raise SandboxUnavailable(
                    f"this process is already connected to the Ray cluster at {connected}, not {address}; "
                    "use one cluster per engine process"
                )
            return

        # ray.init installs a SIGTERM handler that exits, so the engine's handler, which stops the run
        # resumably, is restored after it
        handler = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, namespace="evolve")
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise SandboxUnavailable(
                f"could not connect to the Ray cluster at {address}: {error}. Start one with `ray start --head` "
                "and pass the address it prints to --ray-address"
            ) from None
        finally:
            if handler is not None:
                signal.signal(signal.SIGTERM, handler)
        logger.info("connected to the Ray cluster at %s", ray.get_runtime_context().gcs_address)


def _check_reachable(address: str) -> None:
    """Try the GCS port first, because ray.init retries an unreachable address without end."""
    host, port = _split_address(address)
    try:
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise SandboxUnavailable(
            f"the Ray cluster at {address} is unreachable ({error.strerror or error}); start it with "
            "`ray start --head --port=PORT` on the head node, or pass the address that `ray start` printed "
            "to --ray-address"
        ) from None
    if not _is_loopback(host):
        return
    # Ray dials this machine's routable address in place of a loopback one, unless LOOPBACK_VARIABLE is 0
    routable = ray.util.get_node_ip_address()
    if _is_loopback(routable):
        return
    try:
        socket.create_connection((routable, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError:
        raise SandboxUnavailable(
            f"the Ray cluster at {address} accepts connections on loopback only, but Ray connects to {routable}:{port} "
            f"for a loopback address; set {LOOPBACK_VARIABLE}=0 in the engine's environment, as in the "
            "environment of the `ray start` that started the cluster"
        ) from None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SandboxUnavailable(f"Ray address {address!r} is invalid; expected HOST:PORT such as 10.0.0.5:6379, or auto")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
