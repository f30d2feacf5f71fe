"""One converted model as an artifact folder in DEST: its recipe, its files, published once.

``publish`` writes ``model.pt``, ``recipe.json`` and the TorchScript copy
(``quantizer.save_artifact``) plus, for a tuned int8 row, ``sensitivity.json`` (every unit's
SQNR cost per recipe) into a private folder, then publishes the folder first-writer-wins
(``jobs.publish``): when another attempt at the same key got there first, the row describes the
stored bytes. The recipe names the factory, kwargs, input shape and dtype, the fixed ``forward``
arguments, and for int8 the backend and observer the model was made with (a dynamic model has no
observer). Must not import ray or click.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch

import quantizer
from jobs import layout
from jobs.publish import intact_record, publish_dir, stored_files
from jobs.store import Store
from quantizer.artifacts import TORCHSCRIPT_FILE
from quantizer.torchscript import BRANCH_CHECK_ROWS

PUBLISHED_FIELDS = ("artifact_uri", "artifact_sha256", "artifact_bytes", "size_ratio", "files")
SENSITIVITY_FILE = "sensitivity.json"


def recipe(job, precision: str, key: str, converted, example) -> dict:
    """The JSON recipe stored with the artifact (``quantizer.save_artifact`` adds the model's own
    ``int8`` settings and ``fp16_adjustments``)."""
    settings = getattr(converted, "int8_settings", None) or {}
    out = {
        "name": job.name, "precision": precision, "factory": job.spec.factory,
        "kwargs": dict(job.spec.kwargs),
        "backend": settings.get("backend", job.backend_for(precision)),
        "observer": settings["observer"] if "observer" in settings else job.observer_for(precision),
        "input_shape": list(example.shape[1:]) if example is not None else None,
        "input_dtype": "float16" if precision == "fp16" else "float32",
        "key": key, "torch_version": str(torch.__version__),
        "quantizer_version": quantizer.__version__,
    }
    if job.spec.forward_kwargs:
        out["forward_kwargs"] = dict(job.spec.forward_kwargs)
    return out


def publish(job, pj, key: str, converted, ref, fp32_bytes: int, store: Store,
            sensitivity: dict | None = None) -> dict:
    """Write and publish the artifact of one precision; returns the row's artifact fields, and
    ``copy_note`` when the artifact has no TorchScript copy (saying why) for the row's notes."""
    example = None if ref is None else ref.x[:1]
    stored_recipe = recipe(job, pj.precision, key, converted, example)
    rows = None if ref is None else ref.x[1:1 + BRANCH_CHECK_ROWS]
    if example is not None and pj.precision == "fp16":
        example, rows = example.half(), rows.half()
    folder = layout.artifact_dir(job.name, pj.precision, key)
    replace = pj.replace
    if not replace:
        done = intact_record(store, job.name, pj.precision, key)
        if done:        # another attempt at this key finished meanwhile: what is stored counts
            return {k: done[k] for k in PUBLISHED_FIELDS}
        # a record whose files did not check out (missing or changed): replace that folder
        replace = store.exists(layout.record_path(job.name, pj.precision, key))
    tmp = tempfile.mkdtemp(prefix="quantize-all-")
    try:
        files = quantizer.save_artifact(converted, tmp, stored_recipe, example, check_rows=rows)
        copy_note = _no_copy_note(tmp, files)
        if sensitivity:
            files.append(_write_json(tmp, SENSITIVITY_FILE, sensitivity))
        kept = publish_dir(store, tmp, folder, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if kept:    # another attempt published these first: describe the stored bytes
        stored = {f["path"]: f for f in stored_files(store, folder, kept)}
        files = [stored.get(f["path"], f) for f in files] + \
            [f for p, f in stored.items() if p not in {g["path"] for g in files}]
    main = next(f for f in files if f["path"] == layout.ARTIFACT_FILE)
    return {"artifact_uri": store.uri_of(f"{folder}/{layout.ARTIFACT_FILE}"),
            "artifact_sha256": main["sha256"], "artifact_bytes": main["bytes"],
            "size_ratio": round(main["bytes"] / fp32_bytes, 4), "files": files,
            "copy_note": copy_note}


def _no_copy_note(folder: str, files: list[dict]) -> str | None:
    """Why ``save_artifact`` wrote no TorchScript copy (its recipe says), in a line for the row."""
    if any(f["path"] == TORCHSCRIPT_FILE for f in files):
        return None
    with open(os.path.join(folder, "recipe.json")) as f:
        why = str(json.load(f).get("torchscript_error") or "not recorded")
    return f"no TorchScript copy: {why.splitlines()[0][:300]}"


def _write_json(folder: str, name: str, doc) -> dict:
    data = (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    return {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
