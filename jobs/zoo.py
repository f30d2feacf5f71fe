"""The zoo file: YAML parsed once, at the edge, into frozen dataclasses.

``load_zoo`` collects *every* problem in the file and raises one ``ZooError`` listing them all
(file, model, key, what was found, what is allowed). Nothing downstream sees a raw dict.

What is checked here is the *shape* of the file: keys, types, allowed values, names that are safe
as path parts of the output store (each key's value rule lives in ``jobs.zoo_rules``). What is not: whether checkpoints or calibration data exist
(URIs may be remote, and a scheduled run must not die on one missing file) and whether a factory
imports (importing user code can be slow, have side effects, or need packages that exist only on
the cluster's workers). Those fail at run time, inside the model's task, as a ``failed`` row
(``CheckpointError``, ``CalibrationError``, ``FactoryError``) while the rest of the batch goes on.
Must not import ray, click or torch (the CLI validates a zoo before Ray or torch start).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from jobs.zoo_rules import (BACKENDS, OBSERVERS, PRECISIONS, RECIPES,  # noqa: F401 (re-exported)
                            SECTIONS, VALUE_CHECKS, choice, positive_int, show)
from jobs.zoo_spec import Calibration, Fidelity, ModelSpec, Tuning  # noqa: F401 (re-exported)

TOP_KEYS = ("defaults", "models")
MODEL_KEYS = ("name", "factory", "kwargs", "checkpoint", "precisions", "backend", "calibration",
              "min_sqnr_db", "min_speedup", "observer", "allow_pickle", "min_quantized_fraction",
              "checkpoint_key", "ignore_keys", "strip_prefix", "forward_kwargs", "fidelity",
              "recipe", "max_top1_drop", "tuning")
DEFAULT_KEYS = tuple(k for k in MODEL_KEYS if k not in ("name", "factory", "kwargs", "checkpoint"))
CALIBRATION_KEYS = SECTIONS["calibration"]


class ZooError(Exception):
    """The zoo file is unusable; ``problems`` holds one line per problem."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s) in the zoo file:\n{lines}")


@dataclass(frozen=True)
class Zoo:
    path: str                           # the zoo file, as given
    models: tuple[ModelSpec, ...]       # the models ``--only`` selected, in file order
    # Every model name in the file, whatever ``--only`` selected: retirement is computed from
    # these (a model outside the selection is still in the zoo). Defaults to the models' names.
    all_names: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.all_names:
            object.__setattr__(self, "all_names", tuple(m.name for m in self.models))


# ---- walking the file -----------------------------------------------------------------------------

class _Report:
    """Problem lines, each naming the file, where in it (model), the key, and what is wrong."""

    def __init__(self, file: str, allow_unsafe_pickle: bool):
        self.file = file
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self.problems: list[str] = []

    def add(self, where: str, key: str | None, msg: str) -> None:
        parts = [self.file] + ([where] if where else []) + ([f"key '{key}'"] if key else [])
        self.problems.append(": ".join(parts + [msg]))


def _check_keys(rep: _Report, where: str, section: dict, allowed: Sequence[str],
                prefix: str = "") -> None:
    """Unknown keys and bad values of a ``defaults`` block, a model or a ``calibration``."""
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            rep.add(where, f"{prefix}{key}", f"unknown key; {hint}allowed: {', '.join(allowed)}")
    for key in (k for k in allowed if k in section):
        value = section[key]
        if key in SECTIONS and not prefix and isinstance(value, dict):
            _check_keys(rep, where, value, SECTIONS[key], prefix=f"{key}.")
        elif key in SECTIONS and not prefix:
            rep.add(where, key, f"{show(value)} is not a mapping; allowed keys: "
                    f"{', '.join(SECTIONS[key])}")
        elif key == "allow_pickle" and value is True and not rep.allow_unsafe_pickle:
            rep.add(where, key, "true, but a pickled checkpoint can run arbitrary code: "
                    "pass --allow-unsafe-pickle as well to permit it")
        for msg in VALUE_CHECKS.get(prefix + key, lambda _: [])(value):
            rep.add(where, prefix + key, msg)


def _check_models(rep: _Report, models: Any) -> list[tuple[str, dict]]:
    """Check every entry of ``models``; return (label, entry) of those that are mappings."""
    if not isinstance(models, list) or not models:
        found = "missing" if models is None else f"{show(models)} is not a non-empty list"
        rep.add("", "models", f"{found}; expected a list of models, each with name, factory "
                "and checkpoint")
        return []
    entries, seen = [], {}
    for i, entry in enumerate(models):
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"models[{i}] (name '{name}')" if isinstance(name, str) else f"models[{i}]"
        if not isinstance(entry, dict):
            rep.add(label, None, f"{show(entry)} is not a mapping with name, factory, checkpoint")
            continue
        for key in ("name", "factory", "checkpoint"):
            if key not in entry:
                rep.add(label, key, "missing; every model needs name, factory and checkpoint")
        _check_keys(rep, label, entry, MODEL_KEYS)
        if isinstance(name, str) and name in seen:
            rep.add(label, "name", f"'{name}' is a duplicate of {seen[name]}; names are unique")
        elif isinstance(name, str):
            seen[name] = f"models[{i}]"
        entries.append((label, entry))
    return entries


def _check_file(rep: _Report, doc: Any) -> tuple[dict, list[tuple[str, dict]]]:
    """The whole document; returns ``defaults`` and the (label, entry) of each model."""
    if not isinstance(doc, dict):
        rep.add("", None, f"the top level is {show(doc)}, not a mapping with 'defaults' "
                "and 'models'")
        return {}, []
    _check_keys(rep, "", {k: v for k, v in doc.items() if k not in TOP_KEYS}, TOP_KEYS)
    defaults = doc.get("defaults") or {}
    if isinstance(defaults, dict):
        _check_keys(rep, "defaults", defaults, DEFAULT_KEYS)
    else:
        rep.add("", "defaults", f"{show(defaults)} is not a mapping")
        defaults = {}
    return defaults, _check_models(rep, doc.get("models"))


# ---- defaults, overrides, resolution -----------------------------------------------------------

def _merge(defaults: dict, entry: dict) -> dict:
    """A model's own keys over ``defaults``; ``calibration``, ``fidelity`` and ``tuning`` merge
    key by key."""
    merged = {**defaults, **entry}
    for section in SECTIONS:
        block_d, block_m = defaults.get(section, {}), entry.get(section, {})
        if isinstance(block_d, dict) and isinstance(block_m, dict):
            merged[section] = {**block_d, **block_m}
    return merged


def _resolve(location: str, base_dir: str) -> str:
    """URIs (``scheme://``, ``file://`` included) stay as written; paths become absolute."""
    if "://" in location:
        return location
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(location)))


def _check_overrides(rep: _Report, precisions: Sequence[str] | None, backend: str | None,
                     calibration_batches: int | None) -> None:
    checks = [("--precision", p, choice("a precision", PRECISIONS)) for p in precisions or ()]
    if backend is not None:
        checks.append(("--backend", backend, choice("a backend", BACKENDS)))
    if calibration_batches is not None:
        checks.append(("--calibration-batches", calibration_batches, positive_int))
    for option, value, check in checks:
        for msg in check(value):
            rep.add(option, None, msg)


def _select(rep: _Report, entries: list[tuple[str, dict]],
            only: Sequence[str] | None) -> list[tuple[str, dict]]:
    """The entries whose name matches at least one ``--only`` glob (all of them without one)."""
    if not only:
        return entries
    names = list(dict.fromkeys(e["name"] for _, e in entries if isinstance(e.get("name"), str)))
    for pattern in only:
        if not fnmatch.filter(names, pattern):
            rep.add("--only", None, f"'{pattern}' matches no model; models: {', '.join(names)}")
    return [(label, e) for label, e in entries if isinstance(e.get("name"), str)
            and any(fnmatch.fnmatchcase(e["name"], p) for p in only)]


def _check_int8_data(rep: _Report, selected: list[tuple[str, dict]],
                     precisions: Sequence[str] | None) -> None:
    for label, merged in selected:
        chosen = precisions or merged.get("precisions", PRECISIONS)
        calib = merged.get("calibration")
        has_data = isinstance(calib, dict) and calib.get("data") is not None
        if isinstance(chosen, (list, tuple)) and "int8" in chosen and not has_data:
            rep.add(label, "calibration.data", "missing; int8 needs calibration data (set it "
                    "here or under defaults), or choose precisions: [fp16]")


def _build(merged: dict, base_dir: str, precisions: Sequence[str] | None,
           backend: str | None, calibration_batches: int | None) -> ModelSpec:
    calib = dict(merged.get("calibration", {}))
    if calibration_batches is not None:
        calib["batches"] = calibration_batches
    if calib.get("data") is not None:
        calib["data"] = _resolve(calib["data"], base_dir)
    if calib.get("shape") is not None:
        calib["shape"] = tuple(calib["shape"])
    chosen = precisions or merged.get("precisions", PRECISIONS)
    optional = {k: merged[k] for k in ("observer", "allow_pickle", "checkpoint_key", "recipe")
                if k in merged}
    optional.update({k: float(merged[k]) for k in ("min_sqnr_db", "min_speedup",
                                                    "min_quantized_fraction", "max_top1_drop")
                     if merged.get(k) is not None})
    optional.update({k: tuple(merged[k]) for k in ("ignore_keys", "strip_prefix") if k in merged})
    tuning = dict(merged.get("tuning") or {})
    if "budget_s" in tuning:
        tuning["budget_s"] = float(tuning["budget_s"])
    return ModelSpec(
        name=merged["name"], factory=merged["factory"],
        checkpoint=_resolve(merged["checkpoint"], base_dir),
        kwargs=dict(merged.get("kwargs", {})),
        precisions=tuple(dict.fromkeys(chosen)),  # order kept, repeats dropped
        backend=backend or merged.get("backend", "fbgemm"),
        calibration=Calibration(**calib), forward_kwargs=dict(merged.get("forward_kwargs") or {}),
        fidelity=Fidelity(**(merged.get("fidelity") or {})), tuning=Tuning(**tuning), **optional)


def _read(rep: _Report, path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        rep.add("", None, f"cannot read the zoo file: {e.strerror or e}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        rep.add("", None, f"not valid YAML{at}: {getattr(e, 'problem', None) or e}")
    return None


def load_zoo(path: str | os.PathLike, *, precisions: Sequence[str] | None = None,
             backend: str | None = None, calibration_batches: int | None = None,
             only: Sequence[str] | None = None, allow_unsafe_pickle: bool = False) -> Zoo:
    """Parse and check a zoo file, apply the command-line overrides, resolve paths.

    Args:
        path: the zoo YAML file. Relative ``checkpoint`` and ``calibration.data`` paths are
            taken relative to its folder; URIs (anything with ``://``) are kept as written.
        precisions: ``--precision`` values; replace every model's ``precisions``.
        backend: ``--backend``; replaces every model's ``backend``.
        calibration_batches: ``--calibration-batches``; replaces ``calibration.batches``.
        only: ``--only`` shell-style globs; keep the models whose name matches any of them.
        allow_unsafe_pickle: ``--allow-unsafe-pickle``; without it ``allow_pickle: true``
            is a problem.

    Returns:
        The ``Zoo`` of the selected models, in file order, with defaults merged in; its
        ``all_names`` lists every model of the file, selected or not.

    Raises:
        ZooError: listing every problem found (file, model, key, found, allowed). Files are
            not opened and factories not imported here: that happens at run time, per model.
    """
    rep = _Report(str(path), allow_unsafe_pickle)
    doc = _read(rep, os.fspath(path))
    if not rep.problems:
        defaults, entries = _check_file(rep, doc)
        _check_overrides(rep, precisions, backend, calibration_batches)
        selected = [(label, _merge(defaults, e)) for label, e in _select(rep, entries, only)]
        _check_int8_data(rep, selected, precisions)
    if rep.problems:
        raise ZooError(str(path), rep.problems)
    base_dir = os.path.dirname(os.path.abspath(os.fspath(path)))
    models = tuple(_build(m, base_dir, precisions, backend, calibration_batches)
                   for _, m in selected)
    return Zoo(path=str(path), models=models, all_names=tuple(e["name"] for _, e in entries))
