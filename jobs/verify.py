"""``--verify``: check every ``ok`` artifact in DEST against the manifest.

For each row: every file listed in ``files`` exists with its sha256 and size, the artifact reloads
with ``quantizer.load_artifact`` (never trusting a pickle), and it runs on a sample input with
finite outputs. Converts nothing, writes nothing. Must not import ray or click.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json

from jobs.manifest import Manifest
from jobs.plan import ARTIFACT_FILE
from jobs.store import Store


def verify_store(out: str, only: tuple[str, ...] = ()) -> list[dict]:
    """Check DEST; return one ``{name, precision, ok, problem}`` per checked row.

    Raises:
        StoreError: DEST cannot be read.
    """
    store = Store(out)
    store.check_reachable()
    results = []
    for row in Manifest.load(store).sorted_rows():
        if row.get("status") != "ok" or not row.get("artifact_uri"):
            continue
        if only and not any(fnmatch.fnmatchcase(row["name"], g) for g in only):
            continue
        problem = _check_row(store, row)
        results.append({"name": row["name"], "precision": row["precision"],
                        "ok": problem is None, "problem": problem})
    return results


def _check_row(store: Store, row: dict) -> str | None:
    folder = f"artifacts/{row['name']}/{row['precision']}/{row['key']}"
    for f in row.get("files") or []:
        data = store.read_bytes(f"{folder}/{f['path']}")
        if data is None:
            return f"{folder}/{f['path']} is missing"
        digest = hashlib.sha256(data).hexdigest()
        if digest != f["sha256"] or len(data) != f["bytes"]:
            return (f"{folder}/{f['path']}: sha256 {digest[:12]}… ({len(data)} bytes) does not "
                    f"match the manifest's {f['sha256'][:12]}… ({f['bytes']} bytes)")
    try:
        return _run_sample(store, folder)
    except Exception as e:  # any reload failure is this row's problem, not the run's
        return f"{folder}/{ARTIFACT_FILE} does not reload: {type(e).__name__}: {e}"


def _run_sample(store: Store, folder: str) -> str | None:
    import torch

    import quantizer
    from quantizer.fidelity import flatten_outputs

    model = quantizer.load_artifact(store.open_uri(f"{folder}/{ARTIFACT_FILE}"))
    recipe = json.loads(store.read_bytes(f"{folder}/recipe.json") or b"{}")
    shape = recipe.get("input_shape")
    if not shape:
        return None  # converted without calibration data: nothing says what input it takes
    dtype = getattr(torch, recipe.get("input_dtype") or "float32")
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model(torch.rand(2, *shape).to(dtype))
    if not all(torch.isfinite(t.float()).all() for t in flatten_outputs(out)):
        return f"{folder}: the reloaded model gives non-finite outputs on a sample input"
    return None
