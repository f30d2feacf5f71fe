"""Checkpoints in: factories, byte reads and state_dicts loaded without trusting pickles.

Owns factory import (``module:callable``) and building, byte reads and digests through
``pyarrow.fs``, ``state_dict`` loading with ``torch.load(weights_only=True)`` (a whole pickled
module is refused unless the caller opts in, because unpickling can run code) and strict
key/shape checks. ``quantizer.artifacts`` reuses these to reload what this tool wrote; this module
must not import it (nor ray, click, jobs, torch.ao or quantizer.int8).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch import nn

from quantizer.errors import CheckpointError, CheckpointKeysError, FactoryError, UnsafePickleError

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


def brief_error(exc: Exception) -> str:
    """``"Type: first line"`` of a ``torch.load`` error (its full text is a page of advice)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {first[:300]}"


def weights_only_load(data: bytes) -> Any:
    """``torch.load(weights_only=True)`` of in-memory bytes onto the CPU, quietly.

    Raises:
        Whatever ``torch.load`` raises (``pickle.UnpicklingError`` for refused globals); callers
        turn it into their own typed error.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # protocol and storage notes from the unpickler
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _torch_load(data: bytes, name: str, allow_pickle: bool) -> Any:
    try:
        return weights_only_load(data)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for bad bytes)
        needed = _pickle_globals(data) if isinstance(exc, pickle.UnpicklingError) else []
        if not needed:
            raise CheckpointError(f"{name}: truncated or corrupt checkpoint, not a readable torch "
                                  f"file ({brief_error(exc)})") from exc
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


def load_strict(model: nn.Module, state: Mapping[str, Any], name: str,
                error: type[Exception] = CheckpointKeysError) -> None:
    """Load ``state`` into ``model`` strictly, naming every missing, unexpected or misshapen key.

    Args:
        model: the module to fill in place.
        state: its state_dict.
        name: the file, for messages.
        error: the exception type to raise.

    Raises:
        error: keys or shapes do not fit, or ``load_state_dict`` refuses the values.
    """
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


def build_model(factory: Callable, kwargs: Mapping[str, Any] | None, label: str) -> nn.Module:
    """``factory(**kwargs)``, checked to be an ``nn.Module``.

    Raises:
        FactoryError: the call fails or returns something else (``label`` names the factory).
    """
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
    model = build_model(build, kwargs, repr(label))
    state = load_state_dict(checkpoint, allow_pickle=allow_pickle, filesystem=filesystem)
    load_strict(model, state, os.fspath(checkpoint))
    return model.float().eval()
