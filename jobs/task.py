"""One unit of work: load a checkpoint, convert it, measure it, publish the artifact.

``convert_unit`` is plain Python (tests call it directly); ``convert_task`` is the Ray remote
wrapper that pins torch's threads to the task's CPUs and counts attempts. A task receives paths and
small settings, never a model; a calibration table shared by many tasks arrives as an object-store
reference. Any error becomes a ``failed`` row, except transient store errors, which are raised so
Ray retries the task.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import tempfile
import time
import warnings

import ray
import torch

import quantizer
from jobs.manifest import blank_row, now_iso
from jobs.plan import ARTIFACT_FILE
from jobs.store import (Store, StoreError, TransientStoreError, is_transient, redact_text,
                         redact_uri, with_backoff)

FIDELITY_ROWS = 64            # held-out rows for SQNR / top-1 agreement
FP16_FIDELITY_ROWS = 8        # fp16 kernels on a CPU are ~10x slower than fp32: fewer rows
LATENCY_BUDGET_S = 0.5        # per model and precision, at batch 1
SLOW_FORWARD_S = 0.5          # one batch-1 fp16 forward slower than this: latency not measured
RETRY_EXCEPTIONS = [TransientStoreError, ConnectionError, TimeoutError]
PUBLISHED_FIELDS = ("artifact_uri", "artifact_sha256", "artifact_bytes", "size_ratio", "files")


def convert_unit(payload: dict, table=None, *, store: Store | None = None) -> dict:
    """Convert one (model, precision) and publish it; return its manifest row.

    Args:
        payload: the unit's settings (see ``jobs.driver.payload_of``).
        table: the calibration ``pyarrow.Table`` when the driver shared it, else None (the
            task reads only the rows it needs from ``payload["calibration"]["data"]``).
        store: the output store, if the caller has it open already.

    Raises:
        TransientStoreError: the store failed in a way worth retrying (Ray retries the task).
    """
    started, t0 = now_iso(), time.perf_counter()
    row = blank_row(
        name=payload["name"], precision=payload["precision"], backend=payload["backend"],
        key=payload["key"], run_id=payload["run_id"], source_uri=redact_uri(payload["checkpoint"]),
        source_sha256=payload.get("source_sha256"), source_bytes=payload.get("source_bytes"),
        factory=payload["factory"], observer=payload["observer"], node=socket.gethostname(),
        started_at=started, torch_version=torch.__version__,
        quantizer_version=quantizer.__version__, attempts=payload.get("attempt", 1))
    try:
        row.update(_convert_and_publish(payload, table, store or Store(payload["store_uri"])))
        row["status"] = "ok"
    except (TransientStoreError, ConnectionError, TimeoutError):
        raise
    except MemoryError as e:
        row.update(status="failed", error_type="OutOfMemory",
                   error_message=f"ran out of memory converting {payload['name']}: {e}")
    except Exception as e:  # one bad model never sinks the batch
        if _transient_io(e):   # still failing after local retries: let Ray retry the task
            raise TransientStoreError(redact_text(str(e))) from None
        row.update(status="failed", error_type=type(e).__name__,
                   error_message=redact_text(str(e)) or repr(e))
    row.update(finished_at=now_iso(), duration_s=round(time.perf_counter() - t0, 3))
    return row


def _transient_io(error: BaseException) -> bool:
    """True when an I/O error worth retrying (timeout, 5xx) caused ``error``.

    Only OSErrors in the chain count: a model's own message that happens to say "500" does not.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and is_transient(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _retrying(fn, *args, **kwargs):
    """Reads from a remote store go through quantizer (no jobs there): retry them here when
    an I/O error worth retrying caused the failure, with the store's backoff."""
    return with_backoff(fn, *args, retryable=_transient_io, **kwargs)


def _convert_and_publish(p: dict, table, store: Store) -> dict:
    model = _retrying(quantizer.load_model, p["factory"], p["checkpoint"], kwargs=p["kwargs"],
                      allow_pickle=p["allow_pickle"])
    calib, held_out, heldout_note = _split_data(p, table)
    out: dict = {"params": sum(t.numel() for t in model.parameters())}
    out["fp32_bytes"] = _state_bytes(model)
    if p["precision"] == "fp16":
        converted = quantizer.to_fp16(model)
        out["calibration_batches"] = 0
    else:
        converted, used = _to_int8(model, calib, p)
        out["calibration_batches"] = used
    out["quantized_fraction"] = _quantized_fraction(p["precision"], converted, model)
    if held_out is not None:
        out.update(_measure(model, converted, held_out, p["precision"]))
    notes = [heldout_note, out.pop("latency_note", None)]
    out["notes"] = "; ".join(n for n in notes if n) or None
    _check_gates(p, out)
    out.update(_publish(p, converted, held_out, out, store))
    return out


def _split_data(p: dict, table):
    """Calibration batches first, then held-out rows for fidelity (or a note saying why not)."""
    cal = p["calibration"]
    if not cal.get("data"):
        return None, None, "no calibration data: fidelity and latency not measured"
    n_cal = cal["batches"] * cal["batch_size"]
    if table is None:
        table = _retrying(quantizer.calibration.read_table, cal["data"],
                          shape=cal.get("shape"), max_rows=n_cal + FIDELITY_ROWS)
    if table.num_rows > n_cal:
        eval_table, note = table.slice(n_cal, FIDELITY_ROWS), None
    else:
        eval_table = table.slice(0, FIDELITY_ROWS)
        note = (f"only {table.num_rows} calibration rows: fidelity measured on calibration "
                f"rows, not held-out ones")
    calib = quantizer.CalibrationData.from_table(table.slice(0, n_cal), cal["batch_size"],
                                                 source=redact_uri(cal["data"]))
    held_out = next(iter(quantizer.CalibrationData.from_table(
        eval_table, FIDELITY_ROWS, source=redact_uri(cal["data"]))))[0]
    return calib, held_out, note


def _to_int8(model, calib, p: dict):
    if calib is None:
        raise quantizer.CalibrationError(
            f"model {p['name']}: int8 needs calibration data; set calibration.data in the zoo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", quantizer.int8.CalibrationWarning)
        converted = quantizer.to_int8(model, calib, calibration_batches=p["calibration"]["batches"],
                                      backend=p["backend"], observer=p["observer"])
    return converted, int(converted.calibration_batches_used)


def _quantized_fraction(precision: str, converted, fp32) -> float:
    if precision == "int8":
        return float(quantizer.quantized_fraction(converted, fp32))
    total = sum(t.numel() for t in converted.parameters())
    half = sum(t.numel() for t in converted.parameters() if t.dtype == torch.float16)
    return half / total if total else 0.0


def _measure(fp32, converted, x: torch.Tensor, precision: str) -> dict:
    if precision == "fp16":
        x = x[:FP16_FIDELITY_ROWS]
    xc = x.half() if precision == "fp16" else x
    with torch.inference_mode():
        ref, got = fp32(x), converted(xc)
    out = {
        "sqnr_db": _finite(quantizer.sqnr_db(ref, got)),
        "top1_agreement": float(quantizer.top1_agreement(
            ref, got, output=quantizer.top1_output(ref) or 0)),
        "fidelity_rows": int(x.shape[0]),
    }
    out.update(_latencies(fp32, converted, x[:1], xc[:1]))
    return out


def _latencies(fp32, converted, x1: torch.Tensor, xc1: torch.Tensor) -> dict:
    """Batch-1 latency of both models with the task's thread count, within a time budget."""
    lat32 = quantizer.measure_latency_ms(fp32, x1, budget_s=LATENCY_BUDGET_S)
    start = time.perf_counter()
    with torch.inference_mode():
        converted(xc1)   # also the warm-up
    first = time.perf_counter() - start
    if xc1.dtype == torch.float16 and first > SLOW_FORWARD_S:
        return {"latency_fp32_ms": round(lat32, 4), "latency_ms": None, "speedup": None,
                "latency_note": f"fp16 latency not measured: one batch-1 forward took "
                                f"{first * 1000:.0f} ms ({lat32:.1f} ms in fp32); CPU fp16 "
                                f"kernels are slow, fp16 is meant for accelerators"}
    lat = quantizer.measure_latency_ms(converted, xc1, warmup=1, budget_s=LATENCY_BUDGET_S)
    return {"latency_fp32_ms": round(lat32, 4), "latency_ms": round(lat, 4),
            "speedup": round(lat32 / lat, 4) if lat else None}


def _finite(value: float) -> float | None:
    # JSON has no infinity: an output identical to fp32 is recorded as 300 dB.
    return 300.0 if value == float("inf") else float(value)


def _check_gates(p: dict, out: dict) -> None:
    name, frac = p["name"], out["quantized_fraction"]
    if p["precision"] == "int8" and frac < p["min_quantized_fraction"]:
        raise quantizer.NotQuantizedError(
            f"model {name}: int8 conversion quantized only {frac:.1%} of the parameters "
            f"(min_quantized_fraction {p['min_quantized_fraction']}); FX static quantization "
            f"leaves modules such as nn.LSTM and nn.TransformerEncoder in float. Nothing is "
            f"shipped as int8; use fp16 for this model, or restructure it.")
    floor, sqnr = p.get("min_sqnr_db"), out.get("sqnr_db")
    if floor is not None and sqnr is not None and sqnr < floor:
        raise quantizer.FidelityError(
            f"model {name} {p['precision']}: SQNR {sqnr:.1f} dB is below min_sqnr_db {floor} "
            f"(measured on {out.get('fidelity_rows')} rows); try observer: default, more "
            f"calibration batches, or fp16")
    min_speedup, speedup = p.get("min_speedup"), out.get("speedup")
    if p["precision"] == "int8" and min_speedup is not None and speedup is not None \
            and speedup < min_speedup:
        raise quantizer.SpeedupError(
            f"model {name} int8: speedup {speedup:.2f}x is below min_speedup {min_speedup} "
            f"({out['latency_ms']:.2f} ms vs {out['latency_fp32_ms']:.2f} ms fp32)")


def _publish(p: dict, converted, example, out: dict, store: Store) -> dict:
    recipe = {
        "name": p["name"], "precision": p["precision"], "factory": p["factory"],
        "kwargs": p["kwargs"], "backend": p["backend"], "observer": p["observer"],
        "input_shape": list(example.shape[1:]) if example is not None else None,
        "input_dtype": "float16" if p["precision"] == "fp16" else "float32",
        "key": p["key"], "torch_version": torch.__version__,
        "quantizer_version": quantizer.__version__,
    }
    example_in = None if example is None else example[:1]
    if example_in is not None and p["precision"] == "fp16":
        example_in = example_in.half()
    done = store.read_json(p["record_path"])
    if done and done.get("status") == "ok" and done.get("files") and \
            store.exists(f"{p['artifact_dir']}/{ARTIFACT_FILE}"):
        # Another attempt at this key (a retry, or a task of a killed run) finished first. The
        # TorchScript copy is not byte-stable across saves, so record what is in the store.
        return {k: done[k] for k in PUBLISHED_FIELDS}
    tmp = tempfile.mkdtemp(prefix="quantize-all-")
    try:
        files = quantizer.save_artifact(converted, tmp, recipe, example_in)
        if not store.put_dir(tmp, p["artifact_dir"]):   # published meanwhile (local stores)
            files = _stored_files(store, p["artifact_dir"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    main = next(f for f in files if f["path"] == ARTIFACT_FILE)
    return {
        "artifact_uri": store.uri_of(f"{p['artifact_dir']}/{ARTIFACT_FILE}"),
        "artifact_sha256": main["sha256"], "artifact_bytes": main["bytes"],
        "size_ratio": round(main["bytes"] / out["fp32_bytes"], 4), "files": files,
    }


def _stored_files(store: Store, rel: str) -> list[dict]:
    """``{path, sha256, bytes}`` of every file of a published artifact folder, as stored."""
    files = []
    for name in store.list_files(rel):
        data = store.read_bytes(f"{rel}/{name}")
        files.append({"path": name, "sha256": hashlib.sha256(data).hexdigest(),
                      "bytes": len(data)})
    return files


def _state_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _assigned_cpus() -> int:
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, int(round(cpus)))


@ray.remote(max_retries=2, retry_exceptions=RETRY_EXCEPTIONS)
def convert_task(payload: dict, table=None) -> dict:
    """Ray entry point: pin threads, count the attempt, convert, write the completion record."""
    # A reused worker keeps the thread count torch chose first; reset it for this task's CPUs.
    torch.set_num_threads(_assigned_cpus())
    store = Store(payload["store_uri"])
    payload = dict(payload, attempt=_count_attempt(store, payload))
    row = convert_unit(payload, table, store=store)
    row["node"] = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    row["threads"] = torch.get_num_threads()
    if row["status"] == "ok":
        store.write_json(payload["record_path"], row)
    return row


def _count_attempt(store: Store, payload: dict) -> int:
    rel = f".attempts/{payload['run_id']}/{payload['name']}.{payload['precision']}"
    try:
        n = int((store.read_bytes(rel) or b"0").decode()) + 1
        store.write_bytes(rel, str(n).encode())
    except (StoreError, ValueError, OSError):
        n = 1
    return n
