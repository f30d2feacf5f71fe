"""The driver's side of Ray: start or join it, ask the workers' facts, fan jobs out, collect.

Scheduling only, the way ``ActorPool.map_unordered`` does it: ``Fanout.results()`` keeps the
CPUs busy with the longest jobs first, gives each job the CPUs it can use (one, or more once fewer
jobs wait than CPUs are free: the tail of a run does not leave cores idle), refills with
``ray.wait`` and yields results in completion order. What a result means (rows, manifest
flushes, progress) is the driver's business. A calibration table on a remote store that several
jobs use is read once by a task and shared through the object store. Must not import torch or
click; with ``jobs.task``, the only module that imports Ray.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from jobs.plan import FIDELITY_ROWS, ConversionJob
from jobs.store import Store

CONNECT_TIMEOUT_S = 10.0
MAX_TASK_CPUS = 8               # more threads barely speed up one conversion
WAIT_TICK_S = 0.5               # results() yields None this often while nothing finishes
# What a task asks Ray for: a loaded model and its converted copies are a few times its file.
TASK_MEMORY_BASE = 256 * 2**20
TASK_MEMORY_PER_CHECKPOINT_BYTE = 8


class RayUnavailableError(Exception):
    """The Ray cluster at --address / RAY_ADDRESS cannot be reached (CLI exit 4)."""


@dataclass
class Done:
    """One job's outcome: its rows and the facts its worker reported, or why it never ran."""

    job: ConversionJob
    rows: list[dict] | None = None
    facts: dict | None = None
    error: tuple[str, str, int] | None = None     # (error_type, message, attempts)


def connect(address: str | None, num_cpus: int | None, zoo_dir: str) -> str:
    """Join ``address`` or ``$RAY_ADDRESS`` ("joined"), reuse this process's Ray ("existing"),
    or start a local Ray ("local"). Raises RayUnavailableError when the address does not
    answer."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        _probe(address)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return "joined"
    # Factories next to the zoo file or in the current folder import in workers as they would
    # in the user's shell (jobs.sources.search_path looks in the same order). Ray's processes
    # inherit the environment they start in: passed that way rather than as a runtime_env, the
    # workers Ray prestarts while the driver connects serve this run (a runtime_env would make
    # Ray start new ones for it, ~1 s later).
    saved = os.environ.get("PYTHONPATH")
    paths = [os.getcwd(), zoo_dir, saved or ""]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    try:
        # address="local": a Ray of our own, even if `ray start` registered one on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return "local"


def _probe(address: str) -> None:
    """Fail fast when the head is unreachable: ray.init itself would retry for minutes."""
    if "://" in address:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port or 10001
    else:
        host, _, port_s = address.rpartition(":") if ":" in address else (address, "", "6379")
        port = int(port_s or 6379)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RayUnavailableError(
            f"cannot reach the Ray cluster at {address} within {CONNECT_TIMEOUT_S:.0f} s ({e}); "
            f"check --address / RAY_ADDRESS, or omit both to start a local Ray") from None


def worker_facts() -> dict:
    """What a worker of the connected cluster converts with (one small task)."""
    import ray

    from jobs.task import facts_task

    return ray.get(facts_task.remote())


def cluster_cpus() -> int:
    """CPUs of the connected cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def shutdown() -> None:
    """Stop the local Ray this process started."""
    import ray

    _stop_monitor()
    ray.shutdown()


def _stop_monitor() -> None:
    """Kill the local Ray's autoscaler monitor first: it outlasts the 1 s ``ray.shutdown`` gives
    each process after SIGTERM before it kills it, and it keeps nothing a single node needs.
    Only a Ray this process started has it (a joined cluster's node handle lists no process)."""
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
        if info.process.poll() is None:
            info.process.kill()
            try:
                info.process.wait(timeout=5)
            except subprocess.TimeoutExpired:   # stuck in the kernel: ray.shutdown reports it
                pass


def cpus_for(free: int, waiting: int, cap: int) -> int:
    """CPUs for the next job: one each while jobs outnumber free CPUs, else a fair share."""
    if waiting <= 0 or free <= waiting:
        return 1
    return max(1, min(cap, free // waiting))


def memory_request(job: ConversionJob) -> int:
    return int(TASK_MEMORY_BASE + TASK_MEMORY_PER_CHECKPOINT_BYTE * job.source.bytes)


class Fanout:
    """Run ``jobs`` (longest first) on the connected Ray; see the module docstring."""

    def __init__(self, jobs: list[ConversionJob], store: Store, *, max_retries: int):
        import ray

        self.jobs, self.store, self.max_retries = list(jobs), store, max_retries
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.total_cpus = cluster_cpus()
        self.cap = max(1, min(MAX_TASK_CPUS, max((int(r.get("CPU", 1)) for r in nodes),
                                                 default=1)))
        self.largest_memory = max((r.get("memory", 0) for r in nodes), default=0)
        self.gpu_share = _gpu_share(ray.cluster_resources())
        self.running = 0

    def results(self) -> Iterator[Done | None]:
        """Each job's ``Done`` in completion order; None every ``WAIT_TICK_S`` without one."""
        import ray

        tables = _share_tables(self.jobs)
        queue, pending, free = list(self.jobs), {}, self.total_cpus
        try:
            while queue or pending:
                finished = []
                if pending:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_TICK_S)
                    if ready:   # and every other one done by now: the CPUs are shared out once
                        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                    for ref in ready:
                        job, cpus = pending.pop(ref)
                        free += cpus
                        finished.append((ref, job))
                # the freed CPUs get their next jobs before anything is read or recorded
                refused = []
                while queue and free >= 1:
                    job = queue.pop(0)
                    if memory_request(job) > self.largest_memory:
                        refused.append(Done(job, error=_oversized(job, self.largest_memory)))
                        continue
                    cpus = cpus_for(free, len(queue) + 1, self.cap)
                    pending[self._submit(job, cpus, tables)] = (job, cpus)
                    free -= cpus
                self.running = len(pending)
                yield from refused
                for ref, job in finished:
                    yield self._collect(ref, job)
                if pending and not finished and not refused:
                    yield None
        finally:
            # Stopped early (Ctrl-C, a lost lock): the tasks still running are not cancelled.
            # ray.cancel races a task whose reply is arriving and aborts this process in Ray
            # 2.60 ("Tried to complete task that was not pending", ray-project/ray#54785), which
            # would skip the manifest write and the lock release. A local Ray is shut down in
            # the driver's close(); on a cluster, the CLI's exit ends its Ray job, and Ray kills
            # the workers of a finished job. A task that finishes first leaves a completion
            # record, which the next run adopts.
            self.running = 0

    def _submit(self, job: ConversionJob, cpus: int, tables: dict):
        from jobs.task import convert_task

        gpus = self.gpu_share if "fp16" in {p.precision for p in job.precisions} else 0
        options = convert_task.options(num_cpus=cpus, num_gpus=gpus,
                                       memory=memory_request(job), max_retries=self.max_retries)
        cal = job.spec.calibration
        return options.remote(job, tables.get((cal.data, cal.shape)))

    def _collect(self, ref, job: ConversionJob) -> Done:
        import ray

        from jobs.task import attempts_so_far

        try:
            result = ray.get(ref)
            return Done(job, rows=result["rows"], facts=result["facts"])
        except ray.exceptions.OutOfMemoryError as e:
            kind, msg = "OutOfMemory", f"the task ran out of memory and was killed by Ray: {e}"
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as e:
            kind, msg = type(e).__name__, f"the worker or node died: {e}"
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            kind, msg = type(cause).__name__, str(cause)
        except ray.exceptions.RayError as e:
            kind, msg = type(e).__name__, str(e)
        return Done(job, error=(kind, msg, attempts_so_far(self.store, job)))


def _gpu_share(resources: dict) -> float:
    """GPUs per task when the cluster has any: tasks share them evenly with the CPUs."""
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
    return 0 if not gpus else min(1.0, round(gpus / max(cpus, 1), 4))


def _oversized(job: ConversionJob, largest: float) -> tuple[str, str, int]:
    need = memory_request(job)
    return ("OutOfMemory",
            f"model {job.name} needs about {need / 2**20:.0f} MiB of memory "
            f"({TASK_MEMORY_PER_CHECKPOINT_BYTE} x its {job.source.bytes / 2**20:.0f} MiB "
            f"checkpoint + {TASK_MEMORY_BASE / 2**20:.0f} MiB) and the largest node of the "
            f"cluster offers {largest / 2**20:.0f} MiB; it was not started. Run it on a "
            f"cluster with a larger node.", 0)


def _share_tables(jobs: list[ConversionJob]) -> dict:
    """Remote calibration data that several jobs use: read once by a task, shared by reference.
    Local data is memory-mapped by each task itself, reading only the rows it needs."""
    from jobs.task import read_table_task

    users: dict[tuple, list[ConversionJob]] = {}
    for job in jobs:
        cal = job.spec.calibration
        if cal.data and "://" in cal.data and not cal.data.startswith("file://"):
            users.setdefault((cal.data, cal.shape), []).append(job)
    shared = {}
    for (data, shape), group in users.items():
        if len(group) >= 2:
            rows = max(j.spec.calibration.batches * j.spec.calibration.batch_size for j in group)
            shared[(data, shape)] = read_table_task.remote(data, shape, rows + FIDELITY_ROWS)
    return shared
