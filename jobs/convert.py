"""One task's work: one model, each of its precisions converted, measured and published.

``convert_model`` is plain Python (tests call it directly; ``jobs.task`` runs it on Ray). The
checkpoint is read once and must hash to the sha256 the plan keyed on (a file rewritten since the
plan is refused, never published under the old key); the model, its held-out rows and the fp32
reference (outputs, latency) are made once; then each precision converts, measures, passes its
gates and publishes on its own, so one failing precision never sinks the other. Each row is keyed
on what this worker runs (``worker_facts``, ``jobs.keys``). Errors become ``failed`` rows, except
transient store errors, which are raised so Ray retries the task (what was already published is
then adopted, not redone). The library is called at five places (``_load``, ``_data``,
``_convert``, ``_measure``, and ``jobs.artifact.publish``), so new options wire in there; the
int8 conversion is ``jobs.tune`` (``quantizer.tune_int8``: the zoo's gate, recipe and budget;
its sensitivity pass through the ``map_chunks`` the task gives). Must not import ray or click.
"""

from __future__ import annotations

import hashlib
import io
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

import quantizer
from jobs import artifact, flags, layout, measure, tune
from jobs.keys import content_key
from jobs.manifest import blank_row, now_iso
from jobs.plan import ConversionJob, PrecisionJob
from jobs.publish import intact_record
from jobs.sources import one_file_filesystem
from jobs.store import (Store, TransientStoreError, is_transient, redact_text, redact_uri,
                         with_backoff)


class SourceChangedError(Exception):
    """The checkpoint's bytes no longer hash to the sha256 the plan keyed the row on."""


@lru_cache(maxsize=1)
def worker_facts() -> dict:
    """What this process converts with: the worker part of every key (``jobs.keys``). Plain
    strings: ``torch.__version__`` is a ``TorchVersion``, and unpickling one in the driver would
    import torch there (~1 s with every CPU idle, at the first result)."""
    return {"torch": str(torch.__version__), "quantizer": quantizer.__version__,
            "int8_qconfig": quantizer.int8.QCONFIG_VERSION,
            "activation_range": {b: quantizer.int8.activation_range(b)
                                 for b in quantizer.BACKENDS}}


def convert_model(job: ConversionJob, table=None, *, store: Store | None = None,
                  attempt: int = 1, device: str = "cpu", node: str | None = None,
                  map_chunks: Callable | None = None) -> list[dict]:
    """Convert every precision of ``job``; return one manifest row per precision.

    Args:
        table: the calibration ``pyarrow.Table`` when the driver shared it, else None (the
            rows needed are read from ``job.spec.calibration.data``).
        attempt: which attempt at this job this is (for the rows' ``attempts``).
        device: where fp16 is measured (``measure.fp16_device``).
        node: the worker's name for the rows (default: this host's name).
        map_chunks: runs int8 sensitivity chunks (``quantizer.tune_int8``'s argument; the Ray
            task fans them out); None: in this process.

    Raises:
        TransientStoreError: the store failed in a way worth retrying (Ray retries the task).
    """
    store = store or Store(job.store_uri)
    facts, t0 = worker_facts(), time.perf_counter()
    rows, todo = [], []
    for pj in job.precisions:
        key = content_key(pj.inputs, pj.precision, job.backend_for(pj.precision), facts)
        record = None if pj.replace else intact_record(store, job.name, pj.precision, key)
        if record:
            rows.append(dict(record, attempts=attempt,
                             notes=f"published by run {record.get('run_id')}: adopted"))
        else:
            todo.append((pj, key))
    if todo:
        where = _Where(store, facts, attempt, device, node or socket.gethostname(), now_iso(),
                       map_chunks)
        rows += _convert_all(job, todo, table, where, t0)
    return rows


@dataclass(frozen=True)
class _Where:
    """Where and how this attempt runs: the same for every precision of the job."""

    store: Store
    facts: dict
    attempt: int
    device: str
    node: str
    started: str
    map_chunks: Callable | None = None


def _convert_all(job, todo, table, where: _Where, t0: float) -> list[dict]:
    try:
        model = _load(job)
        calib, held_out, note = _data(job, table)
        ref = None if held_out is None else measure.reference(
            job.name, model, held_out[0], forward_kwargs=dict(job.spec.forward_kwargs),
            top1_output=job.spec.fidelity.output)
        sizes = {"params": sum(t.numel() for t in model.parameters()),
                 "fp32_bytes": _state_bytes(model)}
    except Exception as e:  # noqa: BLE001  (one bad model never sinks the batch)
        _reraise_transient(e)
        shared = time.perf_counter() - t0
        return [_finish(_row(job, pj, key, where), error=e, seconds=shared / len(todo))
                for pj, key in todo]
    shared = (time.perf_counter() - t0) / len(todo)
    rows = []
    for pj, key in todo:
        row = _row(job, pj, key, where)
        t1 = time.perf_counter()
        try:
            out = _one(job, pj, key, model, (calib, held_out), ref, dict(sizes), where)
            notes = [row["notes"], note, *out.pop("notes")]
            row.update(out, notes="; ".join(n for n in notes if n) or None)
            error = None
        except Exception as e:  # noqa: BLE001
            _reraise_transient(e)
            error = e
        rows.append(_finish(row, error=error, seconds=shared + time.perf_counter() - t1))
        rows[-1]["shared_s"] = round(shared * len(todo), 3)    # load + reference, for the job
        if error is None:
            where.store.write_json(layout.record_path(job.name, pj.precision, key), rows[-1])
    return rows


def _row(job: ConversionJob, pj: PrecisionJob, key: str, where: _Where) -> dict:
    facts = where.facts
    note = None if pj.planned_key in (None, key) else (
        f"keyed on this worker's torch {facts['torch']} / quantizer {facts['quantizer']}, "
        f"not the facts the driver planned with (key {pj.planned_key})")
    return blank_row(
        name=job.name, precision=pj.precision, backend=job.backend_for(pj.precision), key=key,
        run_id=job.run_id, source_uri=redact_uri(job.spec.checkpoint),
        source_sha256=job.source.sha256, source_bytes=job.source.bytes,
        factory=job.spec.factory, observer=job.observer_for(pj.precision), node=where.node,
        started_at=where.started, torch_version=facts["torch"],
        quantizer_version=facts["quantizer"], attempts=where.attempt, notes=note)


def _finish(row: dict, *, error: Exception | None, seconds: float) -> dict:
    if error is None:
        row["status"] = "ok"
    elif isinstance(error, MemoryError):
        row.update(status="failed", error_type="OutOfMemory",
                   error_message=f"ran out of memory converting {row['name']}: {error}")
    else:
        row.update(status="failed", error_type=type(error).__name__,
                   error_message=redact_text(str(error)) or repr(error))
    row.update(finished_at=now_iso(), duration_s=round(seconds, 3))
    return row


def _reraise_transient(error: BaseException) -> None:
    """Still failing after local retries, an I/O error worth retrying: let Ray retry the task.

    Only OSErrors in the chain count: a model's own message that happens to say "500" does not.
    """
    if isinstance(error, (TransientStoreError, ConnectionError, TimeoutError)):
        raise error
    if _transient_io(error):
        raise TransientStoreError(redact_text(str(error))) from None


def _transient_io(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and is_transient(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _retrying(fn, *args, **kwargs):
    """Reads through quantizer (no jobs there) retried here when a transient I/O error caused
    the failure, with the store's backoff."""
    return with_backoff(fn, *args, retryable=_transient_io, **kwargs)


# -- the five calls into the library --------------------------------------------------------

def _load(job: ConversionJob):
    """Read the checkpoint once, check its sha256 against the plan's, load those very bytes."""
    name = redact_uri(job.spec.checkpoint)
    data = _retrying(quantizer.checkpoints.read_bytes, job.spec.checkpoint)
    sha = hashlib.sha256(data).hexdigest()
    if sha != job.source.sha256:
        raise SourceChangedError(
            f"model {job.name}: checkpoint {name} changed since this run planned it (sha256 "
            f"{job.source.sha256[:12]}… planned, {sha[:12]}… read now); it is not converted "
            f"under the old key. Run again to convert the new file.")
    spec = job.spec
    return quantizer.load_model(spec.factory, name, kwargs=dict(spec.kwargs),
                                allow_pickle=spec.allow_pickle,
                                filesystem=one_file_filesystem(data),
                                checkpoint_key=spec.checkpoint_key,
                                ignore_keys=spec.ignore_keys, strip_prefix=spec.strip_prefix)


def _data(job: ConversionJob, table):
    """Calibration batches first, then held-out ``(inputs, targets)`` for fidelity (or a note
    saying why not; ``targets`` is None without a ``target`` column)."""
    cal = job.spec.calibration
    if not cal.data:
        return None, None, "no calibration data: fidelity and latency not measured"
    n_cal = cal.batches * cal.batch_size
    shape = list(cal.shape) if cal.shape else None
    if table is None:
        table = _retrying(quantizer.calibration.read_table, cal.data, shape=shape,
                          max_rows=n_cal + measure.FIDELITY_ROWS)
    if table.num_rows > n_cal:
        eval_table, note = table.slice(n_cal, measure.FIDELITY_ROWS), None
    else:
        eval_table = table.slice(0, measure.FIDELITY_ROWS)
        note = (f"only {table.num_rows} calibration rows: fidelity measured on calibration "
                f"rows, not held-out ones")
    source = redact_uri(cal.data)
    calib = quantizer.CalibrationData.from_table(table.slice(0, n_cal), cal.batch_size,
                                                 source=source)
    held_out = next(iter(quantizer.CalibrationData.from_table(
        eval_table, measure.FIDELITY_ROWS, source=source)))
    return calib, held_out, note


def _convert(job: ConversionJob, precision: str, model, data, map_chunks,
             ref: measure.Reference | None = None) -> tune.Tuned:
    """fp16, or int8 through ``jobs.tune``; the row fields say the recipe (and how it was
    found)."""
    if precision == "fp16":
        return tune.Tuned(quantizer.to_fp16(model), {"recipe": "fp16"}, {})
    calib, held_out = data
    if calib is None:
        raise quantizer.CalibrationError(
            f"model {job.name}: int8 needs calibration data; set calibration.data in the zoo")
    return tune.tune(job.name, job.spec, model, calib, held_out[0], held_out[1], map_chunks,
                     reference=None if ref is None else ref.outputs)


def _measure(job, precision, ref, model, converted, device, outputs=None) -> dict:
    if precision == "int8":     # ``outputs``: the tuner ran the chosen model on these rows
        return measure.measure_int8(job.name, ref, converted, outputs=outputs)
    return measure.measure_fp16(job.name, ref, model, converted, device)


# -- one precision --------------------------------------------------------------------------

def _one(job, pj, key, model, data, ref, out: dict, where: _Where) -> dict:
    """Convert, measure, gate and publish one precision; ``out`` starts with the model's sizes.
    Returns the row's fields, with ``notes`` as a list."""
    made = _convert(job, pj.precision, model, data, where.map_chunks, ref)
    converted = made.model
    if pj.precision == "fp16" and where.device == "cpu":
        converted = converted.to(memory_format=torch.channels_last)   # see jobs.measure
    settings = getattr(converted, "int8_settings", None) or {}
    out.update(made.fields, calibration_batches=int(getattr(converted,
                                                            "calibration_batches_used", 0)),
               quantized_fraction=_quantized_fraction(pj.precision, converted, model))
    if "observer" in settings:      # a dynamic model has none (null); the row says what ran
        out["observer"] = settings["observer"]
    if ref is not None:
        out.update(_measure(job, pj.precision, ref, model, converted, where.device,
                            outputs=made.outputs))
    out["notes"] = [out.pop("fidelity_note", None), out.pop("latency_note", None)]
    measure.check_gates(job.name, job.spec, pj.precision, out)
    out["notes"] += flags.flag_texts(dict(out, precision=pj.precision))
    out.update(artifact.publish(job, pj, key, converted, ref, out["fp32_bytes"], where.store,
                                made.sensitivity))
    out["notes"].append(out.pop("copy_note", None))
    return out


def _quantized_fraction(precision: str, converted, fp32) -> float:
    if precision == "int8":
        return float(quantizer.quantized_fraction(converted, fp32))
    total = sum(t.numel() for t in converted.parameters())
    half = sum(t.numel() for t in converted.parameters() if t.dtype == torch.float16)
    return half / total if total else 0.0


def _state_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
