"""The Ray remote functions a run submits; the task side of the only two modules with Ray.

``convert_task`` pins torch's threads to the task's CPUs, counts the attempt in the store, picks
the device fp16 is measured on, and runs ``jobs.convert.convert_model`` with ``map_chunks``, which
fans an int8 sensitivity pass out as ``sensitivity_task`` chunks over the CPUs free at that moment
(the task runs one chunk itself); ``facts_task``
reports what a worker converts with (a joined cluster is asked before planning);
``read_table_task`` reads a remote calibration table once for every job that shares it. Torch is
imported inside the tasks only, so the driver imports this module without importing torch. A
task receives a frozen ``ConversionJob`` (paths and settings), never a model.
"""

from __future__ import annotations

import dataclasses
import socket

import ray

from jobs import layout
from jobs.fanout import cluster_cpus
from jobs.plan import ConversionJob
from jobs.store import Store, StoreError, TransientStoreError

RETRY_EXCEPTIONS = [TransientStoreError, ConnectionError, TimeoutError]


@ray.remote(max_retries=2, retry_exceptions=RETRY_EXCEPTIONS)
def convert_task(job: ConversionJob, table=None) -> dict:
    """Convert one model's precisions; returns ``{"rows": [...], "facts": {...}}``."""
    import torch

    from jobs import convert, measure

    # A reused worker keeps the thread count torch chose first; reset it for this task's CPUs.
    torch.set_num_threads(_assigned_cpus())
    store = Store(job.store_uri)
    node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    device = measure.fp16_device(ray.get_gpu_ids(), torch.cuda.is_available())
    rows = convert.convert_model(job, table, store=store, attempt=count_attempt(store, job),
                                 device=device, node=node, map_chunks=map_chunks)
    for row in rows:
        row["threads"] = torch.get_num_threads()
    return {"rows": rows, "facts": convert.worker_facts()}


def map_chunks(tasks: list) -> list:
    """``quantizer.tune_int8``'s ``map_chunks`` on Ray: the units of ``tasks`` (one sensitivity
    pass cut fine, ``jobs.tune.MAX_CHUNKS``) regrouped into one chunk per CPU that is free now
    plus one for this task, which runs its chunk here, in this process, while each other chunk is
    a ``sensitivity_task``; the task itself (the fp32 model, the calibrated statistics, the
    held-out rows) is put in the object store once. Running a chunk here rather than lending this
    task's CPU to another worker keeps the workers at one per CPU: a worker beyond that is idle
    between passes and Ray stops it, so each pass would start one again (~2 s, its torch import).
    With no CPU free, the whole pass runs here."""
    from quantizer import sensitivity

    units = tuple(unit for task in tasks for unit in task.units)
    whole = dataclasses.replace(tasks[0], units=units)
    # Ray's view of free CPUs lags about a second (this task's own CPU may still show as free):
    # never more chunks than the cluster has CPUs.
    chunks = min(len(units), 1 + _free_cpus(), cluster_cpus())
    if chunks <= 1:
        return [sensitivity.run_sensitivity(whole)]
    own, *others = sensitivity.split_tasks(whole, chunks)
    shared = ray.put(dataclasses.replace(whole, units=()))
    refs = [sensitivity_task.remote(shared, part.units) for part in others]
    mine = sensitivity.run_sensitivity(own)
    try:
        return [mine, *ray.get(refs)]
    except ray.exceptions.RayTaskError as e:     # the chunk's own error, not Ray's wrapper
        raise (e.cause if isinstance(getattr(e, "cause", None), Exception) else e) from None


@ray.remote(num_cpus=1, max_retries=2)
def sensitivity_task(task, units: tuple) -> list:
    """One chunk of a sensitivity pass: ``task`` (shared through the object store) with these
    ``units``; one torch thread, as the CPU it holds."""
    import torch

    from quantizer import sensitivity

    torch.set_num_threads(1)
    return sensitivity.run_sensitivity(dataclasses.replace(task, units=tuple(units)))


def _free_cpus() -> int:
    return max(0, int(ray.available_resources().get("CPU", 0)))


@ray.remote(max_retries=2)
def facts_task() -> dict:
    """The worker facts of the process this lands in (``jobs.keys``); imports torch."""
    from jobs import convert

    return convert.worker_facts()


@ray.remote(max_retries=2, retry_exceptions=RETRY_EXCEPTIONS)
def read_table_task(data: str, shape, max_rows: int):
    """A calibration table read once, for every job that shares it (remote data)."""
    import quantizer

    return quantizer.calibration.read_table(data, shape=list(shape) if shape else None,
                                            max_rows=max_rows)


def _assigned_cpus() -> int:
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, int(round(cpus)))


def count_attempt(store: Store, job: ConversionJob) -> int:
    """This run's attempts at ``job`` so far, this one included (kept in the store, so a retry
    on another node counts too)."""
    rel = layout.attempts_path(job.run_id, job.label)
    try:
        n = int((store.read_bytes(rel) or b"0").decode()) + 1
        store.write_bytes(rel, str(n).encode())
    except (StoreError, ValueError, OSError):
        n = 1
    return n


def attempts_so_far(store: Store, job: ConversionJob) -> int:
    """How many attempts at ``job`` this run started (0: none started)."""
    try:
        return int((store.read_bytes(layout.attempts_path(job.run_id, job.label)) or b"0").decode())
    except (StoreError, ValueError, OSError):
        return 0
