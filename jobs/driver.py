"""The driver: lock DEST, plan, fan the units out over Ray, collect rows, write the manifest.

Fan-out follows Ray's own patterns: a bounded window of tasks in flight refilled with
``ray.wait``, results handled in completion order, one CPU per task, a calibration table shared by
several tasks put in the object store once. Rows are recorded as they finish: the manifest is
flushed every few seconds and each finished task also leaves a completion record beside its
artifact, so a killed driver loses nothing that finished. Must not import click.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from jobs.lock import StoreLock
from jobs.manifest import Manifest, blank_row, now_iso
from jobs.plan import SourceHasher, Unit, make_plan
from jobs.progress import Progress
from jobs.store import LOCK_EXPIRY_S, Store, redact_uri
from jobs.zoo import Zoo

FLUSH_EVERY_S = 2.0
SHARE_MAX_BYTES = 256 << 20     # calibration data up to this size is put in the object store
CONNECT_TIMEOUT_S = 10.0


class RayUnavailableError(Exception):
    """The Ray cluster at --address / RAY_ADDRESS cannot be reached (CLI exit 4)."""


@dataclass(frozen=True)
class RunOptions:
    out: str
    address: str | None = None
    num_cpus: int | None = None
    max_retries: int = 2
    force: bool = False
    task_cpus: float = 1.0


@dataclass
class RunResult:
    run_id: str
    store: str
    rows: list[dict] = field(default_factory=list)   # what this run did, one per unit
    ray_mode: str | None = None   # "local" (started here), "joined" (a cluster), "existing",
                                  # or None: nothing to do, so no Ray at all
    duration_s: float = 0.0

    @property
    def ray_used(self) -> bool:
        """There was work, so it ran on Ray (started here or not)."""
        return self.ray_mode is not None

    @property
    def ray_started(self) -> bool:
        """This run started or joined Ray itself (and so shuts its connection down)."""
        return self.ray_mode in ("local", "joined")

    @property
    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "failed": 0, "skipped": 0}
        for row in self.rows:
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        return 1 if self.counts["failed"] else 0


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def plan_only(zoo: Zoo, out: str, *, force: bool = False) -> list[Unit]:
    """The plan for ``--dry-run``: reads the store, writes nothing."""
    store = Store(out)
    store.check_reachable()
    return make_plan(zoo, Manifest.load(store), store, SourceHasher(store), force=force)


def run(zoo: Zoo, opts: RunOptions, *, progress: Progress | None = None) -> RunResult:
    """Convert what the plan says to convert; record everything. See the module docstring.

    Raises:
        LockHeldError: another live run holds DEST's lock.
        StoreError: DEST cannot be written.
        RayUnavailableError: the Ray cluster cannot be reached.
    """
    t0 = time.perf_counter()
    store = Store(opts.out)
    result = RunResult(run_id=new_run_id(), store=store.display)
    lock = StoreLock(store, result.run_id)
    lock.acquire()
    stop = _start_heartbeat(lock)
    manifest = None
    try:
        store.sweep_temporaries()
        manifest = Manifest.load(store)
        hasher = SourceHasher(store)
        units = make_plan(zoo, manifest, store, hasher, force=opts.force)
        hasher.save()
        todo = _adopt_finished(units, manifest, store, result)
        if todo:
            _fan_out(todo, store, opts, manifest, result, progress or Progress(len(todo)),
                     os.path.dirname(os.path.abspath(zoo.path)))
        manifest.mark_retired({m.name for m in zoo.models})
        _finish(store, manifest, result, zoo, t0)
    except KeyboardInterrupt:
        if manifest is not None and result.rows:
            manifest.write(store)   # keep what finished; the next run converts the rest
        raise
    finally:
        stop.set()
        lock.release()
    return result


def _adopt_finished(units: list[Unit], manifest: Manifest, store: Store,
                    result: RunResult) -> list[Unit]:
    """Record skipped units and units a killed run finished; return the ones left to convert."""
    todo = []
    for unit in units:
        if unit.action == "skip":
            row = dict(manifest.get(unit.spec.name, unit.precision))
            result.rows.append(dict(row, status="skipped", reason=unit.reason))
            continue
        record = store.read_json(unit.record_path) if not unit.reason == "--force" else None
        if record and record.get("status") == "ok":
            manifest.record(record)
            reason = f"finished by run {record.get('run_id')}, which was interrupted"
            result.rows.append(dict(record, status="skipped", reason=reason))
            continue
        todo.append(unit)
    return todo


def payload_of(unit: Unit, store: Store, run_id: str) -> dict:
    """The small, picklable description of a unit that a task receives."""
    s, cal = unit.spec, unit.spec.calibration
    return {
        "name": s.name, "precision": unit.precision, "key": unit.key, "run_id": run_id,
        "factory": s.factory, "kwargs": dict(s.kwargs), "checkpoint": s.checkpoint,
        # backend and observer only shape int8 results; an fp16 row does not claim one
        "allow_pickle": s.allow_pickle, "backend": s.backend if unit.precision == "int8" else None,
        "observer": s.observer if unit.precision == "int8" else None,
        "calibration": {"data": cal.data, "batches": cal.batches, "batch_size": cal.batch_size,
                        "shape": list(cal.shape) if cal.shape else None},
        "min_sqnr_db": s.min_sqnr_db, "min_speedup": s.min_speedup,
        "min_quantized_fraction": s.min_quantized_fraction,
        "source_sha256": unit.source and unit.source.sha256,
        "source_bytes": unit.source and unit.source.bytes,
        "store_uri": store.uri, "artifact_dir": unit.artifact_dir,
        "record_path": unit.record_path,
    }


def _fan_out(todo, store, opts, manifest, result, progress, zoo_dir) -> None:
    import importlib

    import ray

    # Importing torch (through jobs.task) takes a second or two; ray.init mostly waits for the
    # processes it starts. Overlap them.
    preload = threading.Thread(target=importlib.import_module, args=("jobs.task",), daemon=True)
    preload.start()
    result.ray_mode = _connect(opts, zoo_dir)
    preload.join()
    from jobs.task import convert_task

    try:
        tables = _share_tables(todo)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        largest = _largest_node_memory()
        queue, pending, last_flush = list(todo), {}, time.monotonic()
        while queue or pending:
            while queue and len(pending) < window:
                unit = queue.pop(0)
                oversized = _oversized(unit, result.run_id, largest)
                if oversized:   # Ray would keep an infeasible task pending forever
                    _record(oversized, unit, manifest, result, progress, len(pending))
                    continue
                pending[_submit(convert_task, unit, store, opts, result, tables)] = unit
            progress.update(running=len(pending))
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                unit = pending.pop(ref)
                row = _collect(ref, unit, result.run_id, opts)
                _record(row, unit, manifest, result, progress, len(pending))
            if time.monotonic() - last_flush > FLUSH_EVERY_S:
                manifest.write(store)
                last_flush = time.monotonic()
    finally:
        progress.close()
        if result.ray_started:
            ray.shutdown()


def _record(row, unit, manifest, result, progress, running: int) -> None:
    manifest.record(row)
    result.rows.append(dict(row, reason=unit.reason))
    progress.advance(failed=row["status"] == "failed", running=running)


# What a task asks Ray for: a loaded model and its converted copy are a few times its file.
TASK_MEMORY_BASE = 256 * 2**20
TASK_MEMORY_PER_CHECKPOINT_BYTE = 8


def _memory_request(unit: Unit) -> int:
    size = unit.source.bytes if unit.source else 0
    return int(TASK_MEMORY_BASE + TASK_MEMORY_PER_CHECKPOINT_BYTE * size)


def _largest_node_memory() -> float:
    import ray

    return max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")),
               default=0)


def _oversized(unit: Unit, run_id: str, largest: float) -> dict | None:
    """A failed row when no live node offers the memory the unit's task asks for, else None."""
    need = _memory_request(unit)
    if need <= largest:
        return None
    size = unit.source.bytes if unit.source else 0
    msg = (f"model {unit.spec.name} needs about {need / 2**20:.0f} MiB of memory "
           f"({TASK_MEMORY_PER_CHECKPOINT_BYTE} x its {size / 2**20:.0f} MiB checkpoint + "
           f"{TASK_MEMORY_BASE / 2**20:.0f} MiB) and the largest node "
           f"of the cluster offers {largest / 2**20:.0f} MiB; it was not started. Run it on a "
           f"cluster with a larger node.")
    return _failed_row(unit, run_id, "OutOfMemory", msg, attempts=0)


def _submit(task, unit, store, opts, result, tables):
    options = task.options(num_cpus=opts.task_cpus, memory=_memory_request(unit),
                           max_retries=opts.max_retries)
    cal = unit.spec.calibration
    table = tables.get((cal.data, cal.shape))
    return options.remote(payload_of(unit, store, result.run_id), table)


def _collect(ref, unit: Unit, run_id: str, opts: RunOptions) -> dict:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.OutOfMemoryError as e:
        kind, msg = "OutOfMemory", f"the task ran out of memory and was killed by Ray: {e}"
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
            ray.exceptions.ObjectLostError) as e:
        kind, msg = type(e).__name__, f"the worker or node died {opts.max_retries + 1} times: {e}"
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        kind, msg = type(cause).__name__, str(cause)
    except ray.exceptions.RayError as e:
        kind, msg = type(e).__name__, str(e)
    return _failed_row(unit, run_id, kind, msg, attempts=opts.max_retries + 1)


def _failed_row(unit: Unit, run_id: str, kind: str, msg: str, attempts: int) -> dict:
    return blank_row(
        name=unit.spec.name, precision=unit.precision,
        backend=unit.spec.backend if unit.precision == "int8" else None,
        status="failed", key=unit.key, run_id=run_id, source_uri=redact_uri(unit.spec.checkpoint),
        source_sha256=unit.source and unit.source.sha256,
        source_bytes=unit.source and unit.source.bytes, error_type=kind,
        error_message=msg.strip().splitlines()[0][:2000] if msg.strip() else kind,
        attempts=attempts, finished_at=now_iso(), factory=unit.spec.factory)


def _share_tables(todo: list[Unit]) -> dict:
    """Put each calibration table that several tasks use, and that is small, in the store once."""
    import ray

    from quantizer.calibration import read_table

    users: dict[tuple, list[Unit]] = {}
    for unit in todo:
        cal = unit.spec.calibration
        if cal.data:
            users.setdefault((cal.data, cal.shape), []).append(unit)
    shared = {}
    for (data, shape), units in users.items():
        if len(units) < 2:
            continue  # one user: its task streams just the rows it needs from the store
        rows = max(u.spec.calibration.batches * u.spec.calibration.batch_size for u in units)
        try:
            table = read_table(data, shape=list(shape) if shape else None, max_rows=rows + 64)
        except Exception:
            continue  # each task reads it itself and reports the problem in its own row
        if table.nbytes <= SHARE_MAX_BYTES:
            shared[(data, shape)] = ray.put(table)
    return shared


def _connect(opts: RunOptions, zoo_dir: str) -> str:
    """Join --address / RAY_ADDRESS ("joined"), or start a local Ray ("local")."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("local",):
        _probe(address)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return "joined"
    # Factories next to the zoo file or in the current folder import in workers as they would
    # in the user's shell.
    paths = [os.getcwd(), zoo_dir, os.environ.get("PYTHONPATH", "")]
    pythonpath = os.pathsep.join(p for p in paths if p)
    # address="local": a Ray of our own, even if `ray start` registered one on this machine
    ray.init(address="local", num_cpus=opts.num_cpus, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return "local"


def _probe(address: str) -> None:
    """Fail fast when the head is unreachable: ray.init itself would retry for minutes."""
    if address.startswith("ray://") or "://" in address:
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


def _start_heartbeat(lock: StoreLock) -> threading.Event:
    stop = threading.Event()

    def beat():
        while not stop.wait(LOCK_EXPIRY_S / 6):
            try:
                lock.heartbeat()
            except OSError:
                pass

    threading.Thread(target=beat, name="quantize-all-lock", daemon=True).start()
    return stop


def _finish(store: Store, manifest: Manifest, result: RunResult, zoo: Zoo, t0: float) -> None:
    from jobs.report import render_report

    result.duration_s = round(time.perf_counter() - t0, 3)
    manifest.write(store)
    if result.ray_used:
        store.delete(f".attempts/{result.run_id}")   # per-run retry counters: no longer needed
    store.write_json(f"runs/{result.run_id}.json", {
        "run_id": result.run_id, "zoo": os.path.abspath(zoo.path), "store": store.display,
        "host": socket.gethostname(), "finished_at": now_iso(), "duration_s": result.duration_s,
        "ray_used": result.ray_used, "ray_mode": result.ray_mode, "counts": result.counts, "rows": result.rows,
        "argv": [redact_uri(a) for a in sys.argv],
    })
    html = render_report(manifest.sorted_rows(), run={
        "run_id": result.run_id, "updated_at": manifest.updated_at, "counts": result.counts})
    store.write_bytes("report.html", html.encode())
