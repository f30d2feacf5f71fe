"""``--verify``: check every ``ok`` artifact in DEST against the manifest and the zoo file.

For each row: every file listed in ``files`` exists with its sha256 and size; the model is in the
zoo and the artifact's recipe (``recipe.json`` and the one inside ``model.pt``, read as data) names
exactly the zoo's ``factory`` and ``kwargs`` for it; only then does the artifact reload with
``quantizer.load_artifact`` and run on a sample input (with the zoo's ``forward_kwargs``) with
finite outputs. Whoever can write DEST
can write a recipe and the manifest too, so the zoo (trusted like code) decides what may be
imported: an artifact naming anything else is refused before anything it names is imported, and
what is loaded is the very bytes that were checked (copied to a private folder first). Converts
nothing, writes nothing to DEST. Must not import ray or click.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile

from jobs.manifest import Manifest
from jobs.plan import ARTIFACT_FILE
from jobs.store import Store
from jobs.zoo import ModelSpec, Zoo

RECIPE_FILE = "recipe.json"


def verify_store(zoo: Zoo, out: str, only: tuple[str, ...] = ()) -> list[dict]:
    """Check DEST against its manifest and ``zoo``; one ``{name, precision, ok, problem}`` per row.

    Args:
        zoo: the zoo file the artifacts were converted from (``load_zoo`` without ``only``):
            the only source of the factories and kwargs an artifact may be rebuilt with.
        out: DEST.
        only: shell-style globs over model names; rows of other models are not checked.

    Raises:
        StoreError: DEST cannot be read.
    """
    store = Store(out)
    store.check_reachable()
    specs = {m.name: m for m in zoo.models}
    results = []
    for row in Manifest.load(store).sorted_rows():
        if row.get("status") != "ok" or not row.get("artifact_uri"):
            continue
        if only and not any(fnmatch.fnmatchcase(row["name"], g) for g in only):
            continue
        problem = _check_row(store, row, specs.get(row["name"]), zoo.path)
        results.append({"name": row["name"], "precision": row["precision"],
                        "ok": problem is None, "problem": problem})
    return results


def _check_row(store: Store, row: dict, spec: ModelSpec | None, zoo_path: str) -> str | None:
    folder = f"artifacts/{row['name']}/{row['precision']}/{row['key']}"
    files, problem = _read_checked(store, folder, row)
    if problem:
        return problem
    if spec is None:
        return (f"{folder}: model {row['name']!r} is not in the zoo file {zoo_path} (retired, "
                f"or another zoo?): an artifact is rebuilt only with the factory its zoo names, "
                f"so it was not loaded (its files match the manifest)")
    if ARTIFACT_FILE not in files:
        return f"{folder}: the manifest lists no {ARTIFACT_FILE} for this artifact"
    problem = _recipe_problem(folder, files, spec, zoo_path)
    if problem:
        return problem
    try:
        return _run_sample(folder, files, spec)
    except Exception as e:  # any reload failure is this row's problem, not the run's
        return f"{folder}/{ARTIFACT_FILE} does not reload: {type(e).__name__}: {e}"


def _read_checked(store: Store, folder: str, row: dict) -> tuple[dict[str, bytes], str | None]:
    """The bytes of every file the row lists, each matching its recorded sha256 and size."""
    files = {}
    for f in row.get("files") or []:
        if not _inside(f.get("path") if isinstance(f, dict) else None):
            return files, f"{folder}: the manifest lists {f!r}, not a file inside this folder"
        data = store.read_bytes(f"{folder}/{f['path']}")
        if data is None:
            return files, f"{folder}/{f['path']} is missing"
        digest, want = hashlib.sha256(data).hexdigest(), str(f.get("sha256"))
        if digest != want or len(data) != f.get("bytes"):
            return files, (f"{folder}/{f['path']}: sha256 {digest[:12]}… ({len(data)} bytes) "
                           f"does not match the manifest's {want[:12]}… ({f.get('bytes')} "
                           f"bytes)")
        files[f["path"]] = data
    return files, None


def _inside(path) -> bool:
    """True for a relative path that stays inside its folder (the manifest is data, not trusted)."""
    return isinstance(path, str) and all(p not in ("", ".", "..") and "\\" not in p
                                         for p in path.split("/"))


def _recipe_problem(folder: str, files: dict[str, bytes], spec: ModelSpec,
                    zoo_path: str) -> str | None:
    """Why the artifact's recipes may not be rebuilt with ``spec``'s factory; None if they may."""
    try:
        recipes = {ARTIFACT_FILE: _embedded_recipe(files[ARTIFACT_FILE])}
        if RECIPE_FILE in files:
            recipes[RECIPE_FILE] = json.loads(files[RECIPE_FILE])
    except Exception as e:  # noqa: BLE001  (unreadable bytes: this row's problem)
        return f"{folder}: the recipe cannot be read as data: {type(e).__name__}: {e}"
    want = (spec.factory, _canonical(spec.kwargs))
    for name, recipe in recipes.items():
        recipe = recipe if isinstance(recipe, dict) else {}
        got = (recipe.get("factory"), _canonical(recipe.get("kwargs") or {}))
        if got != want:
            return (f"{folder}/{name}: refused without importing anything: its recipe names "
                    f"factory {got[0]!r} with kwargs {got[1]}, but {zoo_path} names "
                    f"{want[0]!r} with kwargs {want[1]} for model {spec.name!r}. An artifact "
                    f"must not choose the code that rebuilds it: reconvert it (--force --only "
                    f"{spec.name}), or find out who wrote it")
    return None


def _embedded_recipe(model_pt: bytes):
    """The recipe inside ``model.pt``: what ``load_artifact`` would rebuild from (weights only)."""
    from quantizer.formats import weights_only_load

    payload = weights_only_load(model_pt)
    return payload.get("recipe") if isinstance(payload, dict) else None


def _canonical(kwargs) -> str:
    return json.dumps(kwargs, sort_keys=True, default=repr)


def _run_sample(folder: str, files: dict[str, bytes], spec: ModelSpec) -> str | None:
    import torch

    import quantizer
    from quantizer.fidelity import flatten_outputs

    with tempfile.TemporaryDirectory(prefix="quantize-all-verify-") as private:
        for path, data in files.items():   # the checked bytes, not a second read of DEST
            target = os.path.join(private, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
        # pinned: the library refuses another factory or kwargs too, before importing them
        model = quantizer.load_artifact(private, factory=spec.factory, kwargs=dict(spec.kwargs))
    recipe = json.loads(files.get(RECIPE_FILE) or b"{}")
    shape = recipe.get("input_shape")
    if not shape:
        return None  # converted without calibration data: nothing says what input it takes
    dtype = {"float16": torch.float16, "float32": torch.float32}.get(
        recipe.get("input_dtype") or "float32")
    if dtype is None:
        return (f"{folder}/{RECIPE_FILE}: input_dtype {recipe.get('input_dtype')!r} is not "
                f"float16 or float32")
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model(torch.rand(2, *shape).to(dtype), **dict(spec.forward_kwargs))
    if not all(torch.isfinite(t.float()).all() for t in flatten_outputs(out)):
        return f"{folder}: the reloaded model gives non-finite outputs on a sample input"
    return None
