"""Artifacts: save and reload converted models without trusting pickles.

Owns the artifact format: ``model.pt`` (format, version, recipe and a state_dict that loads with
``weights_only=True``), ``recipe.json`` (what rebuilding needs, readable by people) and a
TorchScript copy for deployment, each file written atomically; and ``load_artifact``, which
rebuilds the model from its recipe's factory and loads the weights strictly, never unpickling
code. Reading, factories and strict loading come from ``quantizer.checkpoints``;
``quantizer.int8`` is imported lazily, only to rebuild int8 artifacts. Must not import ray,
click, jobs or torch.ao.
"""

from __future__ import annotations

import io
import json
import os
import uuid
import warnings
from typing import Any, Mapping

import pyarrow.fs as pafs
import torch
from torch import nn

from quantizer.checkpoints import build_model, file_digest, import_factory, load_strict, read_bytes
from quantizer.formats import brief_error, weights_only_load
from quantizer.errors import ArtifactError, CheckpointError, QuantizerError
from quantizer.fidelity import flatten_outputs

ARTIFACT_FORMAT = "quantize-all-artifact"
ARTIFACT_FORMAT_VERSION = 1
TORCHSCRIPT_FILE = "model.torchscript.pt"


def _write_atomic(path: str, data: bytes) -> None:
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_copy(traced: Any, model: nn.Module, example: tuple) -> None:
    """The traced copy must give the module's outputs on the example (fp16 within 1e-3)."""
    got, want = flatten_outputs(traced(*example)), flatten_outputs(model(*example))
    same = len(got) == len(want) and all(
        g.shape == w.shape and g.dtype == w.dtype and torch.allclose(
            g, w, rtol=0, atol=1e-3 if w.dtype == torch.float16 else 0, equal_nan=True)
        for g, w in zip(got, want))
    if not same:
        raise ArtifactError("the traced copy's outputs differ from the module's on the example "
                            "input (data-dependent control flow?)")


def _torchscript_bytes(model: nn.Module, example_inputs) -> bytes:
    if example_inputs is None:   # checked first: building the script module alone costs ~14 ms
        raise ArtifactError("no example input to trace with (no calibration data for this model)")
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")     # TracerWarnings and torch.jit deprecation notes
        # check_trace re-traces the whole model (most of the tracing time of an int8 graph) only
        # to compare outputs on this same example: _check_copy does that with one forward each
        traced = torch.jit.trace(model, example, check_trace=False)
        _check_copy(traced, model, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def _model_bytes(model: nn.Module, folder: str, recipe: dict) -> tuple[bytes, str]:
    """``model.pt``'s bytes, checked to reload with ``weights_only=True``, and the recipe's JSON."""
    try:
        recipe_text = json.dumps(recipe, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder}: recipe must hold only JSON types: {exc}") from exc
    payload = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION,
               "recipe": json.loads(recipe_text), "state_dict": model.state_dict()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        weights_only_load(buf.getvalue())
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{folder}: the state_dict of {type(model).__name__} holds objects "
                            f"that weights_only loading refuses: {brief_error(exc)}") from exc
    return buf.getvalue(), recipe_text


def save_artifact(model: nn.Module, folder, recipe: dict, example_inputs) -> list[dict]:
    """Write ``model.pt``, ``recipe.json`` and ``model.torchscript.pt`` into a local folder.

    ``model.pt`` holds ``{"format", "format_version", "recipe", "state_dict"}`` and reloads with
    ``weights_only=True`` (checked before anything is written). The TorchScript copy is for
    deployment only: if tracing fails, it is skipped and ``recipe.json`` says why.

    Args:
        model: the converted model (fp16 or int8 GraphModule).
        folder: a local folder, created if needed.
        recipe: JSON-only dict: precision, factory, kwargs, backend, observer, input_shape,
            input_dtype, versions (what ``load_artifact`` needs to rebuild the model).
        example_inputs: a tensor (or tuple) to trace the TorchScript copy with.

    Returns:
        ``[{"path", "sha256", "bytes"}, ...]`` for every file written, paths relative to folder.

    Raises:
        ArtifactError: the recipe is not plain JSON or the state_dict would need unpickling.
    """
    folder = os.fspath(folder)
    model_pt, recipe_text = _model_bytes(model, folder, recipe)
    os.makedirs(folder, exist_ok=True)
    written = ["model.pt"]
    _write_atomic(os.path.join(folder, "model.pt"), model_pt)
    try:
        _write_atomic(os.path.join(folder, TORCHSCRIPT_FILE),
                      _torchscript_bytes(model, example_inputs))
        written.append(TORCHSCRIPT_FILE)
    except Exception as exc:  # noqa: BLE001  (the TorchScript copy never fails the artifact)
        if os.path.exists(stale := os.path.join(folder, TORCHSCRIPT_FILE)):
            os.remove(stale)        # from an earlier save into this folder: it is not this model
        recipe_text = json.dumps({**recipe, "torchscript_error": f"{type(exc).__name__}: {exc}"[:1000]},
                                 indent=2, sort_keys=True)
    _write_atomic(os.path.join(folder, "recipe.json"), (recipe_text + "\n").encode())
    written.insert(1, "recipe.json")
    return [dict(zip(("path", "sha256", "bytes"), (name, *file_digest(os.path.join(folder, name)))))
            for name in written]


def _rebuild(recipe: Mapping[str, Any], name: str) -> nn.Module:
    missing = [k for k in ("precision", "factory", "input_shape") if k not in recipe]
    if missing:
        raise ArtifactError(f"{name}: recipe lacks {', '.join(missing)}")
    model = build_model(import_factory(recipe["factory"]), recipe.get("kwargs"),
                        repr(recipe["factory"]))
    model = model.float().eval()
    if recipe["precision"] == "fp16":
        return model.half()
    if recipe["precision"] != "int8":
        raise ArtifactError(f"{name}: unknown precision {recipe['precision']!r} (fp16 or int8)")
    dtype = recipe.get("input_dtype", "float32")
    if dtype not in ("float16", "float32"):
        raise ArtifactError(f"{name}: input_dtype {dtype!r} is not float16 or float32")
    from quantizer import int8        # lazily: only int8 artifacts need torch.ao
    example = torch.zeros([1, *recipe["input_shape"]], dtype=getattr(torch, dtype))
    try:
        settings = recipe.get("int8") or {k: recipe[k] for k in ("backend", "observer") if k in recipe}
        return int8.rebuild_int8(model, (example,), settings)
    except QuantizerError as exc:      # a recipe this torch cannot rebuild is a bad artifact here
        raise ArtifactError(f"{name}: cannot rebuild the int8 graph: {exc}") from exc


def _read_payload(name: str, filesystem: pafs.FileSystem | None) -> dict:
    try:
        data = read_bytes(name, filesystem)
    except CheckpointError as exc:
        raise ArtifactError(str(exc)) from exc
    try:
        payload = weights_only_load(data)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{name}: not a readable artifact (truncated, corrupt, or holding "
                            f"objects beyond weights, which are never unpickled): "
                            f"{brief_error(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{name}: not a quantize-all artifact (no format {ARTIFACT_FORMAT!r})")
    if payload.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{name}: artifact format_version {payload.get('format_version')!r} "
                            f"is not {ARTIFACT_FORMAT_VERSION}; use the quantize-all that wrote it")
    return payload


def load_artifact(path_or_uri, *, filesystem: pafs.FileSystem | None = None) -> nn.Module:
    """Rebuild a runnable model from an artifact this tool wrote, never unpickling code.

    Args:
        path_or_uri: the artifact's ``model.pt`` (path or URI) or its folder.
        filesystem: a ``pyarrow.fs.FileSystem``; then the path is inside it.

    Returns:
        The model in eval mode: fp16 (feed it ``.half()`` inputs) or an int8 ``GraphModule``
        (the process's quantized engine is set to the artifact's backend).

    Raises:
        ArtifactError: missing, unreadable, not this tool's format, or not fitting its recipe.
        FactoryError: the recipe's factory cannot be imported here.
    """
    name = os.fspath(path_or_uri)
    if not name.split("?")[0].endswith(".pt"):
        base, sep, query = name.partition("?")
        name = f"{base.rstrip('/')}/model.pt{sep}{query}"
    payload = _read_payload(name, filesystem)
    recipe = payload.get("recipe") or {}
    model = _rebuild(recipe, name)
    load_strict(model, payload.get("state_dict") or {}, name, error=ArtifactError)
    if recipe["precision"] == "int8":
        from quantizer import int8
        int8.set_engine(recipe.get("backend", "fbgemm"))
    return model.eval()
