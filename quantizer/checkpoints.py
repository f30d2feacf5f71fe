"""Checkpoints in, artifacts out: safe loading, atomic artifact writing, pickle-free reload.

Owns factory import (``module:callable``), byte reads through ``pyarrow.fs``, ``state_dict``
loading with ``torch.load(weights_only=True)`` (a whole pickled module is refused unless the caller
opts in, because unpickling can run code), strict key/shape checks, and the artifact format
(``model.pt`` + ``recipe.json`` + a TorchScript copy) with its reload. ``quantizer.int8`` is
imported lazily, only to rebuild int8 artifacts. Must not import ray, click, jobs or torch.ao.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import pickletools
import re
import uuid
import warnings
import zipfile
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch import nn

from quantizer.errors import (ArtifactError, CheckpointError, CheckpointKeysError, FactoryError,
                              QuantizerError, UnsafePickleError)

ARTIFACT_FORMAT = "quantize-all-artifact"
ARTIFACT_FORMAT_VERSION = 1
_CHUNK = 1 << 20
_OPT_IN = ("set `allow_pickle: true` on this model in the zoo AND pass --allow-unsafe-pickle "
           "(only for a file you trust); better, re-save it as `torch.save(model.state_dict(), ...)`")


def import_factory(spec: str) -> Callable:
    """Import the callable named by ``"package.module:callable"`` (``callable`` may be dotted).

    Raises:
        FactoryError: bad format, the module cannot be imported, or it lacks the attribute.
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise FactoryError(f"factory {spec!r}: expected 'package.module:callable', "
                           f"e.g. 'torch.nn:Linear'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # an import can fail in any way the imported code likes
        raise FactoryError(f"factory {spec!r}: cannot import module {module_name!r} "
                           f"({type(exc).__name__}: {exc}); install the package that provides it "
                           f"or add its folder to PYTHONPATH") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"factory {spec!r}: module {module_name!r} has no attribute "
                               f"{attr!r}; check the spelling")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"factory {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def _open_stream(name: str, filesystem: pafs.FileSystem | None):
    if filesystem is None and "://" not in name:
        return open(name, "rb")
    fs, path = (filesystem, name) if filesystem is not None else pafs.FileSystem.from_uri(name)
    return fs.open_input_stream(path)


def read_bytes(path_or_uri, filesystem: pafs.FileSystem | None = None) -> bytes:
    """All bytes of a local file, a ``scheme://`` URI, or a path inside ``filesystem``.

    Raises:
        CheckpointError: not found, a folder, or unreadable (names the path).
    """
    name = os.fspath(path_or_uri)
    try:
        with _open_stream(name, filesystem) as stream:
            return stream.read()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{name}: not found") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{name}: is a folder, not a file") from exc
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise CheckpointError(f"{name}: cannot be read: {exc}") from exc


def file_digest(path, filesystem: pafs.FileSystem | None = None) -> tuple[str, int]:
    """``(sha256 hex, size in bytes)`` of a file, read in 1 MiB chunks.

    Raises:
        CheckpointError: not found or unreadable.
    """
    name = os.fspath(path)
    digest, size = hashlib.sha256(), 0
    try:
        with _open_stream(name, filesystem) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{name}: not found") from exc
    except (OSError, pa.ArrowException) as exc:
        raise CheckpointError(f"{name}: cannot be read: {exc}") from exc
    return digest.hexdigest(), size


def _pickle_globals(data: bytes) -> list[str]:
    """Globals (``module.name``) that the complete pickles in ``data`` would import.

    Only scanned with ``pickletools`` (never executed), to tell a pickle that needs code apart
    from bytes that are simply corrupt; a pickle that does not parse to its STOP counts for nothing.
    """
    streams = [data]
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            streams = [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
    found: list[str] = []
    for stream in streams:
        buf = io.BytesIO(stream)
        while buf.tell() < len(stream):     # legacy torch files hold several pickles in a row
            names, strings = [], []
            try:
                for op, arg, _ in pickletools.genops(buf):
                    if op.name == "GLOBAL":
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(".".join(strings[-2:]))
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:   # noqa: BLE001  (any parse failure means: not a complete pickle)
                break
            found += names
    return found


def _brief(exc: Exception) -> str:
    """The telling line of a torch.load error (its full text is a page of advice)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _safe_load(data: bytes) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # protocol and storage notes from the unpickler
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _torch_load(data: bytes, name: str, allow_pickle: bool) -> Any:
    try:
        return _safe_load(data)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for bad bytes)
        needed = _pickle_globals(data) if isinstance(exc, pickle.UnpicklingError) else []
        if not needed:
            raise CheckpointError(f"{name}: truncated or corrupt checkpoint, not a readable torch "
                                  f"file ({_brief(exc)})") from exc
        if not allow_pickle:
            # torch names the first global it refused; the scan lists every global otherwise
            refused = re.findall(r"GLOBAL ([\w.]+)", str(exc))
            shown = ", ".join(refused or sorted(set(needed))[:5])
            raise UnsafePickleError(
                f"{name}: this checkpoint is not a plain state_dict; loading it needs full "
                f"unpickling of {shown}, and full unpickling can run arbitrary code from the "
                f"file. To opt in, {_OPT_IN}") from exc
    try:
        return torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{name}: full unpickling failed ({type(exc).__name__}: {exc}); "
                              f"is the code that defined its classes importable?") from exc


def _as_state_dict(obj: Any, name: str) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), (Mapping, nn.Module)):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):      # reachable only with allow_pickle
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a state_dict (a dict "
                              f"of parameter name -> tensor, possibly under 'state_dict' or 'model')")
    return dict(obj)


def load_state_dict(path_or_uri, *, allow_pickle: bool = False,
                    filesystem: pafs.FileSystem | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint's ``state_dict`` with ``torch.load(weights_only=True)`` on CPU.

    Args:
        path_or_uri: local path, ``scheme://`` URI, or a path inside ``filesystem``.
        allow_pickle: fall back to full unpickling (``weights_only=False``) when the file needs
            it, e.g. a whole pickled ``nn.Module`` (its ``state_dict()`` is returned).
        filesystem: a ``pyarrow.fs.FileSystem``.

    Returns:
        The state_dict; a dict wrapping it under ``"state_dict"`` or ``"model"`` is unwrapped.

    Raises:
        CheckpointError: not found, empty, truncated/corrupt, or not a state_dict.
        UnsafePickleError: the file needs full unpickling and ``allow_pickle`` is False.
    """
    name = os.fspath(path_or_uri)
    data = read_bytes(name, filesystem)
    if not data:
        raise CheckpointError(f"{name}: checkpoint is empty (0 bytes); was it written completely?")
    return _as_state_dict(_torch_load(data, name, allow_pickle), name)


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_strict(model: nn.Module, state: Mapping[str, Any], name: str, error=CheckpointKeysError):
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (checkpoint {list(v.shape)}, model {list(own[k].shape)})"
              for k, v in state.items() if k in own and isinstance(v, torch.Tensor)
              and isinstance(own[k], torch.Tensor) and v.shape != own[k].shape]
    problems = [f"{label}: {_few(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches", shapes)) if keys]
    if problems:
        raise error(f"{name}: state_dict does not fit {type(model).__name__}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001  (dtype/packing problems surface as RuntimeError)
        raise error(f"{name}: state_dict does not load into {type(model).__name__}: {exc}") from exc


def _build(factory: Callable, kwargs: Mapping[str, Any] | None, label: str) -> nn.Module:
    try:
        model = factory(**dict(kwargs or {}))
    except Exception as exc:  # noqa: BLE001  (user code)
        raise FactoryError(f"factory {label}: calling it with kwargs {dict(kwargs or {})} failed "
                           f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(f"factory {label}: returned a {type(model).__name__}, not an nn.Module")
    return model


def load_model(factory: str | Callable, checkpoint, *, kwargs: Mapping[str, Any] | None = None,
               allow_pickle: bool = False, filesystem: pafs.FileSystem | None = None) -> nn.Module:
    """Build ``factory(**kwargs)`` and load ``checkpoint`` into it strictly.

    Args:
        factory: a ``"module:callable"`` spec or the callable itself.
        checkpoint: path or URI of a file holding a state_dict (see ``load_state_dict``).
        kwargs: keyword arguments of the factory.
        allow_pickle: see ``load_state_dict``.
        filesystem: a ``pyarrow.fs.FileSystem`` for ``checkpoint``.

    Returns:
        The model in eval mode with float32 parameters.

    Raises:
        FactoryError: the factory cannot be imported or called, or returns no nn.Module.
        CheckpointError: see ``load_state_dict``.
        CheckpointKeysError: missing/unexpected keys or shape mismatches (a few of each named).
    """
    label = factory if isinstance(factory, str) else getattr(factory, "__qualname__", repr(factory))
    build = import_factory(factory) if isinstance(factory, str) else factory
    model = _build(build, kwargs, repr(label))
    state = load_state_dict(checkpoint, allow_pickle=allow_pickle, filesystem=filesystem)
    _load_strict(model, state, os.fspath(checkpoint))
    return model.float().eval()


# ----------------------------------------------------------------------------- artifacts


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


def _torchscript_bytes(model: nn.Module, example_inputs) -> bytes:
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")     # TracerWarnings and torch.jit deprecation notes
        traced = torch.jit.trace(model, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


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
    try:
        recipe_text = json.dumps(recipe, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder}: recipe must hold only JSON types: {exc}") from exc
    payload = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION,
               "recipe": json.loads(recipe_text), "state_dict": model.state_dict()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        _safe_load(buf.getvalue())
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{folder}: the state_dict of {type(model).__name__} holds objects "
                            f"that weights_only loading refuses: {_brief(exc)}") from exc
    os.makedirs(folder, exist_ok=True)
    written = ["model.pt"]
    _write_atomic(os.path.join(folder, "model.pt"), buf.getvalue())
    try:
        _write_atomic(os.path.join(folder, "model.torchscript.pt"),
                      _torchscript_bytes(model, example_inputs))
        written.append("model.torchscript.pt")
    except Exception as exc:  # noqa: BLE001  (the TorchScript copy never fails the artifact)
        if os.path.exists(stale := os.path.join(folder, "model.torchscript.pt")):
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
    model = _build(import_factory(recipe["factory"]), recipe.get("kwargs"), repr(recipe["factory"]))
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
        return int8.rebuild_int8(model, (example,), recipe.get("backend", "fbgemm"),
                                 recipe.get("observer", "default"))
    except QuantizerError as exc:      # a recipe this torch cannot rebuild is a bad artifact here
        raise ArtifactError(f"{name}: cannot rebuild the int8 graph: {exc}") from exc


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
    try:
        data = read_bytes(name, filesystem)
    except CheckpointError as exc:
        raise ArtifactError(str(exc)) from exc
    try:
        payload = _safe_load(data)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{name}: not a readable artifact (truncated, corrupt, or holding "
                            f"objects beyond weights, which are never unpickled): {_brief(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{name}: not a quantize-all artifact (no format {ARTIFACT_FORMAT!r})")
    if payload.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{name}: artifact format_version {payload.get('format_version')!r} "
                            f"is not {ARTIFACT_FORMAT_VERSION}; use the quantize-all that wrote it")
    recipe = payload.get("recipe") or {}
    model = _rebuild(recipe, name)
    _load_strict(model, payload.get("state_dict") or {}, name, error=ArtifactError)
    if recipe["precision"] == "int8":
        from quantizer import int8
        int8.set_engine(recipe.get("backend", "fbgemm"))
    return model.eval()
