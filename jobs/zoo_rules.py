"""The zoo file's value rules: for each key, what is allowed and how a bad value is described.

Owns the allowed precisions, backends, observers, recipes and sensitivity methods, the name and
factory patterns, the keys of each nested block (``SECTIONS``: ``calibration``, ``fidelity``,
``tuning``), and ``VALUE_CHECKS``: key (``calibration.*`` etc. inside a block) -> a check that
returns what is wrong with a value (what was found and what is allowed), empty when it is fine. Walking the
file, merging defaults and building ``ModelSpec`` stay in ``jobs.zoo``, which imports this module:
so this one must not import it, nor ray, click, torch or quantizer (the CLI checks a zoo before
Ray or torch start).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Sequence

PRECISIONS = ("fp16", "int8")
# Kept equal to quantizer.int8.BACKENDS / OBSERVERS (a test checks it): importing quantizer
# here would pull torch into every `quantize-all --help`.
BACKENDS = ("fbgemm", "qnnpack", "x86")
OBSERVERS = ("default", "minmax")
# Kept equal to quantizer.tuning.RECIPE_CHOICES / quantizer.sensitivity.METHODS /
# quantizer.tuning.DEFAULT_BUDGET_S (a test checks it), for the same reason.
RECIPES = ("static", "dynamic", "auto")
METHODS = ("simulate", "convert")
DEFAULT_BUDGET_S = 120.0

# The nested blocks of a model (or of defaults): their keys; each merges with defaults key by key.
SECTIONS = {
    "calibration": ("data", "batches", "batch_size", "shape"),
    "fidelity": ("output",),
    "tuning": ("budget_s", "method"),
}

# Names become folders of the output store (artifacts/NAME/...), so no separators; and no leading
# "." (so not "." or ".."): the store owns dot-names (.lock, .tmp-* temporaries it sweeps).
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FACTORY = re.compile(rf"{_DOTTED}:{_DOTTED}")

Check = Callable[[Any], list[str]]


def show(value: Any) -> str:
    """A value as the YAML author wrote it (``null``, ``true``), else its ``repr``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rule(ok: Callable[[Any], bool], wanted: str) -> Check:
    return lambda v: [] if ok(v) else [f"{show(v)} is not {wanted}"]


def choice(kind: str, allowed: Sequence[str]) -> Check:
    """A check that a value is one of ``allowed`` (``kind`` names it: "a backend")."""
    return _rule(lambda v: isinstance(v, str) and v in allowed,
                 f"{kind}; allowed: {', '.join(allowed)}")


def _precisions(v: Any) -> list[str]:
    if not isinstance(v, list) or not v:
        return [f"{show(v)} is not a non-empty list of precisions; allowed: "
                f"{', '.join(PRECISIONS)} (e.g. [fp16, int8])"]
    return [msg for item in v for msg in choice("a precision", PRECISIONS)(item)]


def _kwargs(v: Any) -> list[str]:
    if not isinstance(v, dict):
        return [f"{show(v)} is not a mapping of keyword arguments (e.g. {{num_classes: 10}})"]
    bad = [k for k in v if not isinstance(k, str)]
    if bad:
        return [f"keys {', '.join(map(show, bad))} are not strings"]
    try:  # kwargs go into content keys and manifests, so they must survive JSON
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as e:
        return [f"{show(v)} is not JSON-serialisable ({e})"]
    return []


def _globs(what: str, example: str) -> Check:
    """A list of non-empty strings (``what`` names them in the message)."""
    return _rule(lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
                 f"a list of {what} (e.g. [{example}])")


def _forward_kwargs(v: Any) -> list[str]:
    if not isinstance(v, dict):
        return [f"{show(v)} is not a mapping of forward's fixed arguments (e.g. {{embed: false}})"]
    bad = [k for k in v if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        return [f"keys {', '.join(map(show, bad))} are not argument names"]
    odd = [k for k, x in v.items() if not (x is None or isinstance(x, (str, bool, int))
                                           or _is_number(x))]
    return [f"{', '.join(f'{k}: {show(v[k])}' for k in odd)}: not JSON scalars (a string, "
            f"number, true/false or null); tensors and lists cannot be fixed"] if odd else []


positive_int = _rule(lambda v: _is_int(v) and v > 0, "a positive integer")
_location = _rule(lambda v: isinstance(v, str) and v.strip() != "", "a path or URI")
_number_or_null = _rule(lambda v: v is None or _is_number(v), "a number or null")
_name = _rule(lambda v: isinstance(v, str) and bool(_NAME.fullmatch(v)),
              "a valid name; allowed: letters, digits, '.', '_', '-', not starting with '.' "
              "(names become folders of the output store, which keeps dot-names for itself)")

VALUE_CHECKS: dict[str, Check] = {
    "name": _name,
    "factory": _rule(lambda v: isinstance(v, str) and bool(_FACTORY.fullmatch(v)),
                     "of the form 'module:callable' (e.g. mypkg.models:TinyMLP)"),
    "kwargs": _kwargs,
    "checkpoint": _location,
    "precisions": _precisions,
    "backend": choice("a backend", BACKENDS),
    "observer": choice("an observer", OBSERVERS),
    "min_sqnr_db": _number_or_null,
    "min_speedup": _number_or_null,
    "allow_pickle": _rule(lambda v: isinstance(v, bool), "true or false"),
    "min_quantized_fraction": _rule(lambda v: _is_number(v) and 0 <= v <= 1,
                                    "a number in [0, 1]"),
    "checkpoint_key": _rule(lambda v: v is None or (isinstance(v, str) and all(v.split("."))),
                            "a dotted key path (e.g. model_state, or ema.model) or null"),
    "ignore_keys": _globs("glob patterns", "similarity_*"),
    "strip_prefix": _globs("key prefixes", "module."),
    "forward_kwargs": _forward_kwargs,
    "recipe": choice("an int8 recipe", RECIPES),
    "max_top1_drop": _rule(lambda v: v is None or (_is_number(v) and 0 <= v <= 1),
                           "a number in [0, 1] or null"),
    "calibration.data": _location,
    "calibration.batches": positive_int,
    "calibration.batch_size": positive_int,
    "calibration.shape": _rule(lambda v: isinstance(v, list) and bool(v)
                               and all(_is_int(d) and d > 0 for d in v),
                               "a list of positive integers (e.g. [64])"),
    "fidelity.output": _rule(lambda v: v is None or (_is_int(v) and v >= 0),
                             "an output index (an integer >= 0) or null"),
    "tuning.budget_s": _rule(lambda v: _is_number(v) and v > 0, "a number of seconds > 0"),
    "tuning.method": choice("a sensitivity method", METHODS),
}
