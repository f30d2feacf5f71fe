"""Finding the state_dict inside a checkpoint as people save them.

Owns the layout rules of a loaded checkpoint object: the nested key that holds the weights
(``checkpoint_key``, dotted; ``state_dict`` / ``model`` are unwrapped without asking), entries to
drop (``ignore_keys``, fnmatch globs), prefixes to remove (``strip_prefix``; DDP's ``module.`` and
Lightning's ``model.`` also come off by themselves when every key has them and only the stripped
keys fit the model), and keeping a state_dict's ``_metadata`` (the per-module versions that
``_load_from_state_dict`` logic such as torchvision's MNASNet reads) through all of it. Errors
list the keys found and suggest the zoo setting that fits. Pure torch; must not import
``quantizer.artifacts``, torch.ao, ray, click or jobs.
"""

from __future__ import annotations

import fnmatch
import os
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from quantizer.errors import CheckpointError

AUTO_UNWRAP = ("state_dict", "model")       # keys unwrapped when no checkpoint_key is given
AUTO_STRIP = ("module.", "model.")          # prefixes stripped when only that fits the model


def _few(keys: Iterable[str], n: int = 8) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def _with_metadata(items: Iterable[tuple[str, Any]], metadata: Mapping | None) -> OrderedDict:
    state = OrderedDict(items)
    if metadata is not None:
        state._metadata = OrderedDict(metadata)     # read by nn.Module.load_state_dict
    return state


def _weight_paths(obj: Any, prefix: str = "", depth: int = 3) -> list[str]:
    """Dotted paths of nested dicts that hold tensors directly (where weights may be)."""
    if not isinstance(obj, Mapping) or depth == 0:
        return []
    found = [prefix] if prefix and any(isinstance(v, torch.Tensor) for v in obj.values()) else []
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, Mapping):
            found += _weight_paths(value, f"{prefix}{key}." if prefix else f"{key}.", depth - 1)
    return [p.rstrip(".") for p in found]


def _walk(obj: Any, path: str, name: str, full: str | None = None) -> Any:
    """``obj[a][b]...`` for ``path = "a.b"``; a key that itself holds dots is found too."""
    full = full or path
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: checkpoint_key {full!r}: reached a {type(obj).__name__}, "
                              f"not a dict")
    if path in obj:
        return obj[path]
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if isinstance(obj.get(head), Mapping):
            return _walk(obj[head], ".".join(parts[cut:]), name, full)
    raise CheckpointError(f"{name}: checkpoint_key {full!r} not found; this level holds keys "
                          f"{_few([str(k) for k in obj])}")


def _check_is_state_dict(obj: Any, name: str, chosen: str | None) -> None:
    where = f" under checkpoint_key {chosen!r}" if chosen else ""
    if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj) and obj \
            and not any(isinstance(v, Mapping) for v in obj.values()) \
            and any(isinstance(v, torch.Tensor) for v in obj.values()):
        return
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}{where}, not a state_dict (a "
                              f"dict of parameter name -> tensor)")
    paths = sorted(_weight_paths(obj), key=lambda p: -len(_walk(obj, p, name)))
    hint = (f"the weights look to be under {_few(paths, 3)}: set `checkpoint_key: {paths[0]}` on "
            f"this model in the zoo" if paths else
            "name the entry that holds the weights with `checkpoint_key: KEY` (dotted for nested dicts)")
    raise CheckpointError(f"{name}: the checkpoint{where} is a dict of {_few([str(k) for k in obj])}"
                          f", not a state_dict (parameter name -> tensor); {hint}")


def _strip_key(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _strip(state: Mapping[str, Any], prefix: str, name: str) -> OrderedDict:
    """Remove ``prefix`` from every key that has it, and from the ``_metadata`` module paths."""
    items = [(_strip_key(k, prefix), v) for k, v in state.items()]
    seen: dict[str, str] = {}
    for (new, _), old in zip(items, state):
        if new in seen:
            raise CheckpointError(f"{name}: strip_prefix {prefix!r} maps both {seen[new]!r} and "
                                  f"{old!r} to {new!r}; remove one with ignore_keys")
        seen[new] = old
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:        # module paths carry no trailing dot: "module.layers", "module"
        renamed = [(_strip_key(f"{k}.", prefix).rstrip(".") if f"{k}.".startswith(prefix) else k,
                    k, v) for k, v in metadata.items()]
        metadata = OrderedDict((new, v) for new, old, v in renamed if new == old)
        metadata.update((new, v) for new, old, v in renamed if new != old)  # stripped ones win
    return _with_metadata(items, metadata)


def _ignored(key: str, globs: tuple[str, ...], prefixes: tuple[str, ...]) -> bool:
    names = {key} | {_strip_key(key, p) for p in (*prefixes, *AUTO_STRIP)}
    return any(fnmatch.fnmatchcase(n, g) for n in names for g in globs)


def select_state_dict(obj: Any, name: str, *, checkpoint_key: str | None = None,
                      ignore_keys: Iterable[str] = (), strip_prefix: Iterable[str] = ()) -> OrderedDict:
    """The state_dict inside a loaded checkpoint object, laid out as the settings say.

    Args:
        obj: what ``torch.load`` (or the safetensors reader) returned.
        name: the file, for messages.
        checkpoint_key: dotted path of the state_dict inside nested dicts (``model_state``,
            ``ema.model``); None: a dict holding one under ``state_dict`` or ``model`` is
            unwrapped, else ``obj`` itself must be the state_dict.
        ignore_keys: fnmatch globs; matching entries are dropped (a glob matches a key as
            stored or with a ``strip_prefix``/``module.``/``model.`` prefix removed).
        strip_prefix: prefixes removed, in order, from every key that starts with them.

    Returns:
        An ``OrderedDict`` of parameter name -> tensor, with the source's ``_metadata`` kept.

    Raises:
        CheckpointError: the key is missing, or the result is not a state_dict (the message
            lists the keys found and suggests ``checkpoint_key``), or stripping merges two keys.
    """
    if isinstance(obj, nn.Module):          # a whole pickled module (only with allow_pickle)
        obj = obj.state_dict()
    if checkpoint_key:
        obj = _walk(obj, checkpoint_key, name)
    elif isinstance(obj, Mapping):
        obj = next((obj[k] for k in AUTO_UNWRAP if isinstance(obj.get(k), (Mapping, nn.Module))), obj)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    prefixes, globs = tuple(strip_prefix), tuple(ignore_keys)
    if isinstance(obj, Mapping) and globs:
        obj = _with_metadata(((k, v) for k, v in obj.items()
                              if not (isinstance(k, str) and _ignored(k, globs, prefixes))),
                             getattr(obj, "_metadata", None))
    _check_is_state_dict(obj, name, checkpoint_key)
    state = _with_metadata(obj.items(), getattr(obj, "_metadata", None))
    for prefix in prefixes:
        state = _strip(state, prefix, name)
    return state


def strip_to_fit(state: OrderedDict, model_keys: Iterable[str], name: str) -> OrderedDict:
    """``state`` with ``module.`` / ``model.`` stripped, if and only if that alone makes it fit.

    Applied only when ``state``'s keys differ from the model's, every key carries the prefix,
    and the stripped keys equal the model's exactly, so there is one reading that loads.
    """
    own = set(model_keys)
    current = state
    while set(current) != own:
        prefix = next((p for p in AUTO_STRIP if current and all(k.startswith(p) for k in current)),
                      None)
        if prefix is None:
            return state
        current = _strip(current, prefix, name)
    return current


def suggest_settings(missing: list[str], unexpected: list[str]) -> str:
    """A zoo setting that would fix a key mismatch, or "" (for ``load_strict``'s message)."""
    if not unexpected:
        return ""
    for prefix in sorted({k.split(".", 1)[0] + "." for k in unexpected if "." in k}):
        if all(k.startswith(prefix) for k in unexpected) and \
                {k[len(prefix):] for k in unexpected} >= set(missing) and missing:
            return f"; the checkpoint's keys carry a prefix: set `strip_prefix: [{prefix}]`"
    stems = sorted({k.split(".", 1)[0] for k in unexpected})
    common = os.path.commonprefix(stems)
    globs = [f"{common}*"] if len(stems) > 1 and len(common) >= 3 else \
        [s if s in unexpected else f"{s}.*" for s in stems][:4]
    if missing:
        return (f"; if the unexpected entries are not part of this model (e.g. training-loss "
                f"parameters), drop them with `ignore_keys: [{', '.join(globs)}]`")
    return f"; drop the entries this model does not have with `ignore_keys: [{', '.join(globs)}]`"
