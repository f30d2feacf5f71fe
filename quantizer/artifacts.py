"""Artifacts: save and reload converted models without trusting pickles, and prove the reload.

Owns the artifact format: ``model.pt`` (format, version, recipe, the state_dict, the state modules
keep outside it, and an output fingerprint, all loading with ``weights_only=True``),
``recipe.json`` (what rebuilding needs, readable by people) and a TorchScript copy for deployment,
each file written atomically; and ``load_artifact``, which rebuilds the model from its recipe's
factory, loads the weights strictly, restores the rest and checks the fingerprint. Reading,
factories and strict loading come from ``quantizer.checkpoints``; ``quantizer.int8`` is imported
lazily, only to rebuild int8 artifacts. Must not import ray, click, jobs or torch.ao.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any, Collection, Mapping

import pyarrow.fs as pafs
import torch
from torch import nn

from quantizer import fingerprint, module_state, packed
from quantizer.checkpoints import build_model, file_digest, import_factory, load_strict, read_bytes
from quantizer.errors import ArtifactError, CheckpointError, QuantizerError
from quantizer.formats import brief_error, weights_only_load
from quantizer.fp16 import rebuild_fp16
from quantizer.torchscript import torchscript_bytes

ARTIFACT_FORMAT = "quantize-all-artifact"
# 2: module_state and fingerprint beside the state_dict; int8 settings and fp16 adjustments in
# the recipe. Version 1 artifacts (no fingerprint) load only with check_fingerprint=False.
ARTIFACT_FORMAT_VERSION = 2
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


def _json_text(value: Any, folder: str) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder}: recipe must hold only JSON types: {exc}") from exc


def _stored_recipe(model: nn.Module, recipe: Mapping[str, Any], folder: str) -> dict:
    """The caller's recipe plus what the model carries: ``int8`` (its ``int8_settings``) and
    ``fp16_adjustments``; a value the caller also gave must agree with the model's."""
    carried = {key: json.loads(_json_text(getattr(model, attr), folder)) for key, attr in
               (("int8", "int8_settings"), ("fp16_adjustments", "fp16_adjustments"))
               if getattr(model, attr, None) is not None}
    expected = dict(carried)
    for key in ("backend", "observer"):       # top-level copies of the int8 settings' values
        if key in carried.get("int8", {}):
            expected[key] = carried["int8"][key]
    clash = [k for k in expected if k in recipe
             and json.loads(_json_text(recipe[k], folder)) != expected[k]]
    if clash:
        raise ArtifactError(f"{folder}: the recipe's {', '.join(clash)} disagree with the model's "
                            f"({', '.join(f'{k}={expected[k]!r}' for k in clash)})")
    return json.loads(_json_text({**recipe, **carried}, folder))


def forward_kwargs_of(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The fixed ``forward`` arguments an artifact's model is called with (``recipe.forward_kwargs``,
    else the int8 settings' ``forward_kwargs``, else none)."""
    return dict(recipe.get("forward_kwargs") or (recipe.get("int8") or {}).get("forward_kwargs") or {})


def _fingerprint(model: nn.Module, recipe: Mapping[str, Any], folder: str) -> dict | None:
    if not recipe.get("input_shape"):
        return None             # no calibration data: nothing says what input the model takes
    dtype = recipe.get("input_dtype", "float32")
    if dtype not in ("float16", "float32"):
        raise ArtifactError(f"{folder}: input_dtype {dtype!r} is not float16 or float32")
    if recipe.get("precision") == "int8":
        from quantizer import int8     # lazily: only int8 models need the quantized engine
        int8.set_engine((recipe.get("int8") or {}).get("backend", recipe.get("backend", "fbgemm")))
    try:
        return fingerprint.take(model, recipe["input_shape"], getattr(torch, dtype),
                                forward_kwargs_of(recipe))
    except Exception as exc:  # noqa: BLE001  (the model's own code fails on the fixed input)
        raise ArtifactError(f"{folder}: the model fails on its fingerprint input of shape "
                            f"{[fingerprint.ROWS, *recipe['input_shape']]}: {type(exc).__name__}: "
                            f"{exc}") from exc


def _model_bytes(model: nn.Module, folder: str, recipe: dict) -> bytes:
    """``model.pt``'s bytes, checked to reload with ``weights_only=True``."""
    try:
        state, packed_weights = packed.unpack(model.state_dict())
    except ArtifactError as exc:
        raise ArtifactError(f"{folder}: {exc}") from exc
    payload = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION,
               "recipe": recipe, "state_dict": state, "packed_weights": packed_weights,
               "module_state": module_state.extra_state(model),
               "fingerprint": _fingerprint(model, recipe, folder)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        weights_only_load(buf.getvalue())
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{folder}: the state of {type(model).__name__} holds objects that "
                            f"weights_only loading refuses: {brief_error(exc)}") from exc
    return buf.getvalue()


def save_artifact(model: nn.Module, folder, recipe: dict, example_inputs, *,
                  check_rows: torch.Tensor | None = None) -> list[dict]:
    """Write ``model.pt``, ``recipe.json`` and ``model.torchscript.pt`` into a local folder.

    ``model.pt`` holds ``{"format", "format_version", "recipe", "state_dict", "packed_weights",
    "module_state", "fingerprint"}`` and reloads with ``weights_only=True`` (checked before
    anything is written). ``packed_weights`` are the state_dict's packed quantized weights as
    tensors (see ``quantizer.packed``); ``module_state`` is what modules keep outside their
    state_dict (see ``quantizer.module_state``); ``fingerprint`` is the model's outputs on a fixed
    input (see
    ``quantizer.fingerprint``; None when the recipe has no ``input_shape``). The stored recipe
    adds ``int8`` (the model's ``int8_settings``) and ``fp16_adjustments`` when the model carries
    them. The TorchScript copy is for deployment only: if tracing fails, it is skipped and
    ``recipe.json`` says why.

    Args:
        model: the converted model (fp16 or int8 GraphModule).
        folder: a local folder, created if needed.
        recipe: JSON-only dict: precision, factory, kwargs, input_shape, input_dtype, optional
            ``forward_kwargs`` (passed on every call), backend, observer, versions.
        example_inputs: a tensor (or tuple) to trace the TorchScript copy with.
        check_rows: more inputs like the example, as one batch: where the forward branches on
            tensor values, the TorchScript copy must agree with the model on each of (up to 16
            of) them too, or it is not written (``quantizer.torchscript``).

    Returns:
        ``[{"path", "sha256", "bytes"}, ...]`` for every file written, paths relative to folder.

    Raises:
        ArtifactError: the recipe is not plain JSON or disagrees with the model's settings, the
            model fails on the fingerprint input, or its state would need unpickling.
    """
    folder = os.fspath(folder)
    recipe = _stored_recipe(model, recipe, folder)
    model_pt = _model_bytes(model, folder, recipe)
    os.makedirs(folder, exist_ok=True)
    written = ["model.pt"]
    _write_atomic(os.path.join(folder, "model.pt"), model_pt)
    try:
        _write_atomic(os.path.join(folder, TORCHSCRIPT_FILE),
                      torchscript_bytes(model, example_inputs, forward_kwargs_of(recipe),
                                        check_rows))
        written.append(TORCHSCRIPT_FILE)
    except Exception as exc:  # noqa: BLE001  (the TorchScript copy never fails the artifact)
        if os.path.exists(stale := os.path.join(folder, TORCHSCRIPT_FILE)):
            os.remove(stale)        # from an earlier save into this folder: it is not this model
        recipe = {**recipe, "torchscript_error": f"{type(exc).__name__}: {exc}"[:1000]}
    _write_atomic(os.path.join(folder, "recipe.json"), (_json_text(recipe, folder) + "\n").encode())
    written.insert(1, "recipe.json")
    return [dict(zip(("path", "sha256", "bytes"), (name, *file_digest(os.path.join(folder, name)))))
            for name in written]


def _int8_settings(recipe: Mapping[str, Any]) -> dict:
    if isinstance(recipe.get("int8"), Mapping):
        return dict(recipe["int8"])
    return {k: recipe[k] for k in ("backend", "observer") if k in recipe}   # format version 1


def _rebuild(recipe: Mapping[str, Any], name: str) -> nn.Module:
    missing = [k for k in ("precision", "factory", "input_shape") if k not in recipe]
    if missing:
        raise ArtifactError(f"{name}: recipe lacks {', '.join(missing)}")
    if recipe["precision"] not in ("fp16", "int8"):
        raise ArtifactError(f"{name}: unknown precision {recipe['precision']!r} (fp16 or int8)")
    model = build_model(import_factory(recipe["factory"]), recipe.get("kwargs"),
                        repr(recipe["factory"]))
    model = model.float().eval()
    try:
        if recipe["precision"] == "fp16":
            return rebuild_fp16(model, recipe.get("fp16_adjustments") or [])
        dtype = recipe.get("input_dtype", "float32")
        if dtype not in ("float16", "float32"):
            raise ArtifactError(f"{name}: input_dtype {dtype!r} is not float16 or float32")
        from quantizer import int8        # lazily: only int8 artifacts need torch.ao
        example = torch.zeros([1, *recipe["input_shape"]], dtype=getattr(torch, dtype))
        return int8.rebuild_int8(model, (example,), _int8_settings(recipe))
    except ArtifactError:
        raise
    except QuantizerError as exc:      # a recipe this torch cannot rebuild is a bad artifact here
        raise ArtifactError(f"{name}: cannot rebuild the {recipe['precision']} model: {exc}") from exc


def _read_payload(name: str, filesystem: pafs.FileSystem | None, check_fingerprint: bool) -> dict:
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
    version = payload.get("format_version")
    if version == 1 and check_fingerprint:
        raise ArtifactError(f"{name}: artifact format_version 1 has no output fingerprint (and "
                            f"its int8 models may have lost state, e.g. quantized PReLU scales); "
                            f"reconvert it, or load it with check_fingerprint=False")
    if version not in (1, ARTIFACT_FORMAT_VERSION):
        raise ArtifactError(f"{name}: artifact format_version {version!r} is not "
                            f"{ARTIFACT_FORMAT_VERSION}; use the quantize-all that wrote it")
    return payload


def _check_pins(recipe: Mapping[str, Any], name: str, factory, kwargs) -> None:
    if factory is not None:
        allowed = {factory} if isinstance(factory, str) else set(factory)
        if recipe.get("factory") not in allowed:
            raise ArtifactError(f"{name}: the recipe names factory {recipe.get('factory')!r}, not "
                                f"{' or '.join(repr(f) for f in sorted(allowed))}; refusing to "
                                f"import or call it")
    if kwargs is not None:
        wanted = json.loads(json.dumps(dict(kwargs), sort_keys=True))
        if (recipe.get("kwargs") or {}) != wanted:
            raise ArtifactError(f"{name}: the recipe's factory kwargs {recipe.get('kwargs')!r} are "
                                f"not the pinned {wanted!r}; refusing to call the factory")


def load_artifact(path_or_uri, *, filesystem: pafs.FileSystem | None = None,
                  factory: str | Collection[str] | None = None,
                  kwargs: Mapping[str, Any] | None = None,
                  check_fingerprint: bool = True) -> nn.Module:
    """Rebuild a runnable model from an artifact this tool wrote, never unpickling code.

    What an unpinned load trusts: the recipe inside ``model.pt`` names a ``module:callable``
    factory and its kwargs, and rebuilding imports that module and calls that callable with those
    kwargs. Whoever can write the artifact can therefore run code in this process, exactly as
    whoever writes a zoo file can. When the artifact's storage is not as trusted as your code, pin
    ``factory`` (and ``kwargs``) to the values you expect: anything else is refused before any
    import. The weights themselves are only ever loaded with ``weights_only=True``.

    The rebuilt model is checked against the fingerprint stored with the artifact: on its fixed
    input every output must match the stored one to within 40 dB SQNR (``fingerprint.
    MIN_SQNR_DB``; bit-identical on the machine that wrote it), so a reload that lost state fails
    here instead of serving different outputs.

    Args:
        path_or_uri: the artifact's ``model.pt`` (path or URI) or its folder.
        filesystem: a ``pyarrow.fs.FileSystem``; then the path is inside it.
        factory: the allowed factory spec, or a collection of allowed specs.
        kwargs: the only factory kwargs allowed (compared as JSON).
        check_fingerprint: compare with the stored fingerprint (format version 1 artifacts have
            none and load only with False).

    Returns:
        The model in eval mode: fp16 (feed it ``.half()`` inputs) or an int8 ``GraphModule``
        (the process's quantized engine is set to the artifact's backend). Attribute
        ``fingerprint_sqnr_db``: the per-output SQNR of the check (``inf``: bit-identical), or
        None when not checked or the artifact has no fingerprint (no input shape known).

    Raises:
        ArtifactError: missing, unreadable, not this tool's format, a factory or kwargs other
            than the pinned ones, not fitting its recipe, or not reproducing its fingerprint.
        FactoryError: the recipe's factory cannot be imported here.
    """
    name = os.fspath(path_or_uri)
    if not name.split("?")[0].endswith(".pt"):
        base, sep, query = name.partition("?")
        name = f"{base.rstrip('/')}/model.pt{sep}{query}"
    payload = _read_payload(name, filesystem, check_fingerprint)
    recipe = payload.get("recipe") or {}
    _check_pins(recipe, name, factory, kwargs)
    model = _rebuild(recipe, name)
    state = payload.get("state_dict") or {}
    state.update(packed.repack(payload.get("packed_weights") or {}, name))
    load_strict(model, state, name, error=ArtifactError)
    module_state.restore_extra_state(model, payload.get("module_state") or {}, name)
    if recipe["precision"] == "int8":
        from quantizer import int8
        int8.set_engine(_int8_settings(recipe).get("backend", "fbgemm"))
    model.eval()
    stored = payload.get("fingerprint")
    model.fingerprint_sqnr_db = fingerprint.check(model, stored, name) \
        if check_fingerprint and stored is not None else None
    return model
