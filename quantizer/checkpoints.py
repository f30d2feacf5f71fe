"""Checkpoints in: factories, byte reads and state_dicts loaded without trusting pickles.

Owns factory import (``module:callable``) and building, byte reads and digests through
``pyarrow.fs``, ``load_state_dict`` / ``load_model`` (the file's object from
``quantizer.formats``, where the weights sit from ``quantizer.state_dicts``) and strict key/shape
checks. ``quantizer.artifacts`` reuses these to reload what this tool wrote; this module must not
import it (nor ray, click, jobs, torch.ao or quantizer.int8).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from typing import Any, Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch import nn

from quantizer.errors import CheckpointError, CheckpointKeysError, FactoryError
from quantizer.formats import read_checkpoint
from quantizer.state_dicts import select_state_dict, strip_to_fit, suggest_settings

_CHUNK = 1 << 20


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


def load_state_dict(path_or_uri, *, allow_pickle: bool = False,
                    filesystem: pafs.FileSystem | None = None, checkpoint_key: str | None = None,
                    ignore_keys: Iterable[str] = (), strip_prefix: Iterable[str] = ()
                    ) -> dict[str, torch.Tensor]:
    """Load a checkpoint's ``state_dict`` without running code from it, onto the CPU.

    A safetensors file is recognized by its content (whatever its name) and read without pickle;
    anything else goes through ``torch.load(weights_only=True, map_location="cpu")``, so files
    saved from GPU tensors load on CPU-only machines.

    Args:
        path_or_uri: local path, ``scheme://`` URI, or a path inside ``filesystem``.
        allow_pickle: fall back to full unpickling (``weights_only=False``) when the file needs
            it, e.g. a whole pickled ``nn.Module`` (its ``state_dict()`` is returned).
        filesystem: a ``pyarrow.fs.FileSystem``.
        checkpoint_key, ignore_keys, strip_prefix: where the weights sit in the file and which
            entries or key prefixes to drop; see ``quantizer.state_dicts.select_state_dict``.

    Returns:
        The state_dict (an ``OrderedDict`` keeping the file's ``_metadata``).

    Raises:
        CheckpointError: not found, empty, truncated/corrupt, or not a state_dict (the message
            lists the keys found and suggests ``checkpoint_key``).
        UnsafePickleError: the file needs full unpickling and ``allow_pickle`` is False.
    """
    name = os.fspath(path_or_uri)
    obj = read_checkpoint(read_bytes(name, filesystem), name, allow_pickle)
    return select_state_dict(obj, name, checkpoint_key=checkpoint_key, ignore_keys=ignore_keys,
                             strip_prefix=strip_prefix)


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(model: nn.Module, state: Mapping[str, Any], name: str,
                error: type[Exception] = CheckpointKeysError, hint: bool = False) -> None:
    """Load ``state`` into ``model`` strictly, naming every missing, unexpected or misshapen key.

    The module's own loading logic runs first (it may adapt to the state's ``_metadata``
    versions); only when that fails are the keys and shapes compared, for the message.

    Args:
        model: the module to fill in place.
        state: its state_dict.
        name: the file, for messages.
        error: the exception type to raise.
        hint: suggest the zoo setting (``strip_prefix``, ``ignore_keys``) that would fit.

    Raises:
        error: keys or shapes do not fit, or ``load_state_dict`` refuses the values.
    """
    try:    # first: a module's own _load_from_state_dict may reshape it (MNASNet's version 1)
        model.load_state_dict(state, strict=True)
        return
    except Exception as exc:  # noqa: BLE001  (torch raises RuntimeError, modules anything)
        failure = exc
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
        advice = suggest_settings(missing, unexpected) if hint else ""
        own_words = "" if str(failure).startswith("Error(s) in loading state_dict") else \
            f" ({type(failure).__name__}: {str(failure).splitlines()[0][:300]})"
        raise error(f"{name}: state_dict does not fit {type(model).__name__}: "
                    + "; ".join(problems) + own_words + advice) from failure
    raise error(f"{name}: state_dict does not load into {type(model).__name__}: "
                f"{failure}") from failure


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
               allow_pickle: bool = False, filesystem: pafs.FileSystem | None = None,
               checkpoint_key: str | None = None, ignore_keys: Iterable[str] = (),
               strip_prefix: Iterable[str] = ()) -> nn.Module:
    """Build ``factory(**kwargs)`` and load ``checkpoint`` into it strictly.

    When the keys do not fit as stored but every key carries ``module.`` (DDP) or ``model.``
    (Lightning) and the keys without it fit the model exactly, the prefix is stripped without
    being asked: that is the only reading under which the file loads.

    Args:
        factory: a ``"module:callable"`` spec or the callable itself.
        checkpoint: path or URI of a checkpoint (see ``load_state_dict``).
        kwargs: keyword arguments of the factory.
        allow_pickle: see ``load_state_dict``.
        filesystem: a ``pyarrow.fs.FileSystem`` for ``checkpoint``.
        checkpoint_key, ignore_keys, strip_prefix: see ``load_state_dict``.

    Returns:
        The model in eval mode with float32 parameters.

    Raises:
        FactoryError: the factory cannot be imported or called, or returns no nn.Module.
        CheckpointError: see ``load_state_dict``.
        CheckpointKeysError: missing/unexpected keys or shape mismatches (a few of each named,
            with the ``strip_prefix`` / ``ignore_keys`` setting that would fit, if one would).
    """
    label = factory if isinstance(factory, str) else getattr(factory, "__qualname__", repr(factory))
    build = import_factory(factory) if isinstance(factory, str) else factory
    model = build_model(build, kwargs, repr(label))
    name = os.fspath(checkpoint)
    state = load_state_dict(name, allow_pickle=allow_pickle, filesystem=filesystem,
                            checkpoint_key=checkpoint_key, ignore_keys=ignore_keys,
                            strip_prefix=strip_prefix)
    load_strict(model, strip_to_fit(state, model.state_dict().keys(), name), name, hint=True)
    return model.float().eval()
