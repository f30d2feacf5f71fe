"""Checkpoint file formats: the object inside a checkpoint's bytes, read without running code.

Owns format detection (safetensors by its header, whatever the file is called; anything else is a
torch file), ``torch.load(weights_only=True)`` onto the CPU (CUDA-saved files included), the opt-in
fallback to full unpickling, and telling a pickle that needs code apart from corrupt bytes by
scanning it (never executing it). Must not import ray, click, jobs, torch.ao or other quantizer
modules except ``quantizer.errors``.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Any

import torch

from quantizer.errors import CheckpointError, UnsafePickleError

_OPT_IN = ("set `allow_pickle: true` on this model in the zoo AND pass --allow-unsafe-pickle "
           "(only for a file you trust); better, re-save it as `torch.save(model.state_dict(), ...)`")


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


def _safetensors_header(data: bytes) -> bool:
    """True for the safetensors layout: a little-endian u64 length, then that much JSON header."""
    if len(data) < 10:
        return False
    size = int.from_bytes(data[:8], "little")
    if not 2 <= size <= len(data) - 8 or data[8:9] != b"{":
        return False
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        return False
    return isinstance(header, dict) and all(
        key == "__metadata__" or (isinstance(v, dict) and "data_offsets" in v)
        for key, v in header.items())


def _safetensors_load(data: bytes, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors   # lazily: a plain dependency

    try:
        return load_safetensors(data)
    except Exception as exc:  # noqa: BLE001  (the Rust reader raises its own types)
        raise CheckpointError(f"{name}: truncated or corrupt safetensors file "
                              f"({type(exc).__name__}: {exc})") from exc


def read_checkpoint(data: bytes, name: str, allow_pickle: bool = False) -> Any:
    """The object in a checkpoint's bytes: a safetensors file (recognized by its content, never
    unpickled) or a torch file loaded with ``weights_only=True`` on CPU (CUDA storages too).

    Raises:
        CheckpointError: empty, truncated or corrupt.
        UnsafePickleError: the file needs full unpickling and ``allow_pickle`` is False.
    """
    if not data:
        raise CheckpointError(f"{name}: checkpoint is empty (0 bytes); was it written completely?")
    if _safetensors_header(data):
        return _safetensors_load(data, name)
    return _torch_load(data, name, allow_pickle)
