"""Accuracy-gated int8: the int8 model with the fewest layers in float that meets a gate.

``tune_int8`` converts once; if the result misses the gate (``Gate``: ``min_sqnr_db`` and/or
``max_top1_drop``), it measures every unit's sensitivity (``quantizer.sensitivity``, split in
chunks that a caller may run in parallel through ``map_chunks``), then keeps the fewest most
costly units in float that pass (``quantizer.search``: every candidate a real conversion). The ``static``
recipe calibrates once for all of it; ``dynamic`` needs no calibration; ``auto`` tunes both and
keeps the smallest artifact that passes (the fastest when ``min_speedup`` is set). A time budget
bounds the work; the result records the trials, the time and the sensitivity ranking, and when
nothing passes, ``GateNotMetError`` names the best model found. Semantics in docs/tuning.md.
Must not import torch.ao, ray, click or ``jobs``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from quantizer import int8, sensitivity
from quantizer.errors import ConfigError, GateNotMetError, TraceError
from quantizer.fidelity import measure_latency_ms
from quantizer.search import Search, Trial, missed_key, prefix_search, top1_drop  # noqa: F401
from quantizer.sensitivity import LayerSensitivity, SensitivityTask

RECIPE_CHOICES = ("static", "dynamic", "auto")
DEFAULT_BUDGET_S = 120.0

MapChunks = Callable[[list[SensitivityTask]], Iterable[Sequence[LayerSensitivity]]]


@dataclasses.dataclass(frozen=True)
class Gate:
    """What an int8 model must meet on the held-out rows.

    Attributes:
        min_sqnr_db: SQNR floor over all outputs (``quantizer.sqnr_db``).
        max_top1_drop: with labels, ``accuracy(fp32) - accuracy(int8)``; without, the share of
            rows whose int8 argmax differs from fp32's (``1 - top1_agreement``). Measured on
            the class-score output only.
        top1_output: index of that output in ``flatten_outputs`` order; ``None``: the model's
            only output, which must be ``[B, C]``.
    """

    min_sqnr_db: float | None = None
    max_top1_drop: float | None = None
    top1_output: int | None = None

    def __post_init__(self):
        if self.max_top1_drop is not None and not 0.0 <= self.max_top1_drop <= 1.0:
            raise ConfigError(f"max_top1_drop must be within [0, 1], got {self.max_top1_drop!r}")
        if self.min_sqnr_db is not None and not math.isfinite(self.min_sqnr_db):
            raise ConfigError(f"min_sqnr_db must be a finite number, got {self.min_sqnr_db!r}")

    @property
    def active(self) -> bool:
        return self.min_sqnr_db is not None or self.max_top1_drop is not None

    def describe(self) -> str:
        parts = [f"min_sqnr_db {self.min_sqnr_db:g}" if self.min_sqnr_db is not None else "",
                 f"max_top1_drop {self.max_top1_drop:g}" if self.max_top1_drop is not None else ""]
        return " and ".join(p for p in parts if p) or "no gate"


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """How to search (the zoo's ``recipe`` and ``tuning: {...}``).

    Attributes:
        recipe: ``static``, ``dynamic`` or ``auto``.
        budget_s: no sensitivity unit or trial starts after this many seconds (the first
            conversion always completes).
        chunks: sensitivity chunks handed to ``map_chunks`` at once.
        method: static sensitivity by ``simulate`` (fake quantization) or ``convert``.
        min_quantized_fraction: a candidate keeping more parameters in float is not admissible.
        min_speedup: ``auto`` keeps only candidates at least this much faster than fp32, and
            then the fastest.
    """

    recipe: str = "static"
    budget_s: float = DEFAULT_BUDGET_S
    chunks: int = 1
    method: str = "simulate"
    min_quantized_fraction: float = 0.5
    min_speedup: float | None = None

    def __post_init__(self):
        if self.recipe not in RECIPE_CHOICES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of "
                              f"{', '.join(RECIPE_CHOICES)}")
        if not (isinstance(self.budget_s, (int, float)) and self.budget_s > 0):
            raise ConfigError(f"tuning budget_s must be a number > 0, got {self.budget_s!r}")
        if self.method not in sensitivity.METHODS:
            raise ConfigError(f"unknown sensitivity method {self.method!r}; choose one of "
                              f"{', '.join(sensitivity.METHODS)}")


@dataclasses.dataclass
class TuningResult:
    """The chosen int8 model and how it was found."""

    model: nn.Module
    chosen: Trial
    trials: list[Trial]
    tuning_s: float
    reason: str
    sensitivity: dict[str, list[LayerSensitivity]]
    outputs: Any = None      # ``model``'s outputs on the held-out rows, as its trial measured them

    @property
    def settings(self) -> dict:
        return int8.int8_settings(self.model)

    def manifest_fields(self) -> dict:
        """The row fields (JSON-safe): recipe, float_layers, tuning_trials, tuning_s, ..."""
        top = [[item.name, item.to_json()["sqnr_db"]] for item in
               sensitivity.ranked(self.sensitivity.get(self.chosen.recipe, []))[:5]]
        return {"recipe": self.chosen.recipe, "float_layers": list(self.chosen.float_layers),
                "tuning_trials": len(self.trials), "tuning_s": round(self.tuning_s, 3),
                "recipe_reason": self.reason, "top1_drop": self.chosen.top1_drop,
                "sensitivity_top": top}

    def sensitivity_json(self) -> dict:
        """Every measured unit per recipe, in model order (a file beside the artifact)."""
        return {recipe: [item.to_json() for item in items]
                for recipe, items in self.sensitivity.items()}


def _sensitivity(task: SensitivityTask, config: TuningConfig,
                 map_chunks: MapChunks | None) -> list[LayerSensitivity]:
    tasks = sensitivity.split_tasks(task, config.chunks)
    parts = (map_chunks or _in_process)(tasks)
    return sensitivity.merge_sensitivity(parts, task.units)


def _in_process(tasks: list[SensitivityTask]) -> list[list[LayerSensitivity]]:
    return [sensitivity.run_sensitivity(task) for task in tasks]


def _tune_recipe(search: Search, task_of: Callable[[float], SensitivityTask],
                 config: TuningConfig, map_chunks: MapChunks | None) -> list[LayerSensitivity]:
    """Plain conversion first; on a miss, sensitivity then the prefix search. Returns the
    sensitivity measured (empty when the plain conversion passed or no gate is set)."""
    base = search.trial(())
    too_few = base.quantized_fraction < search.config.min_quantized_fraction  # float won't help
    if base.met or not search.gate.active or too_few or search.out_of_time():
        return []
    remaining = search.deadline - time.perf_counter()
    results = _sensitivity(task_of(remaining), config, map_chunks)
    prefix_search(search, results, base)
    return results


def _static(model, calibration_loader, calibration_batches, backend, observer, make_search,
            config, map_chunks, inputs, kwargs):
    prepared = int8.calibrate_int8(model, calibration_loader, calibration_batches, backend,
                                   observer, forward_kwargs=kwargs)
    name = type(model).__name__
    search = make_search("static", lambda floats: int8.convert_int8(prepared, floats,
                                                                     model_name=name))
    results = _tune_recipe(search, lambda budget: sensitivity.task_for(
        "static", model, inputs, prepared=prepared, method=config.method, budget_s=budget),
        config, map_chunks)
    return search, results


def _dynamic(model, backend, make_search, config, map_chunks, inputs, kwargs):
    search = make_search("dynamic", lambda floats: int8.to_int8_dynamic(
        model, backend, float_layers=floats, forward_kwargs=kwargs))
    results = _tune_recipe(search, lambda budget: sensitivity.task_for(
        "dynamic", model, inputs, backend=backend, budget_s=budget, forward_kwargs=kwargs),
        config, map_chunks)
    return search, results


def _speedup(fp32: nn.Module, model: nn.Module, inputs: tuple) -> float:
    one = tuple(t[:1] for t in inputs)
    return measure_latency_ms(fp32, one) / measure_latency_ms(model, one)


def _choose(searches: list[Search], skipped: list[str], config: TuningConfig, fp32, inputs):
    """The admissible best of each recipe, then the smallest (or the fastest, speed gated)."""
    passing = [s for s in searches if s.best is not None and s.best[0].met]
    notes = list(skipped)
    if config.min_speedup is not None and passing:
        speeds = {id(s): _speedup(fp32, s.best[1], inputs) for s in passing}
        notes += [f"{s.recipe} {speeds[id(s)]:.2f}x faster than fp32" for s in passing]
        passing = sorted((s for s in passing if speeds[id(s)] >= config.min_speedup),
                         key=lambda s: -speeds[id(s)])
        rule = f"the fastest meeting min_speedup {config.min_speedup:g}"
    else:
        passing = sorted(passing, key=lambda s: s.best[0].state_bytes)
        rule = "the smallest"
    for s in searches:
        trial = s.best[0] if s.best else None
        if trial is not None:
            notes.append(f"{s.recipe}: {trial.sqnr_db:.1f} dB, {len(trial.float_layers)} "
                         f"float layer(s), {trial.state_bytes} bytes, " + _verdict(trial, config))
    return (passing[0] if passing else None), rule, notes


def _verdict(trial: Trial, config: TuningConfig) -> str:
    if trial.met:
        return "passed"
    if trial.quantized_fraction < config.min_quantized_fraction:
        return (f"only {trial.quantized_fraction:.0%} of parameters int8 (min_quantized_fraction "
                f"{config.min_quantized_fraction:g})")
    return "missed the gate"


def _not_met(searches: list[Search], gate: Gate, config: TuningConfig, skipped: list[str]):
    found = [s.best[0] for s in searches if s.best is not None]
    if not found:
        return GateNotMetError(f"no int8 recipe could convert the model: {'; '.join(skipped)}")
    best = max(found, key=lambda t: missed_key(t, config.min_quantized_fraction))
    layers = ", ".join(best.float_layers) or "none"
    spent = any(s.out_of_time() for s in searches)
    how = (f"before the {config.budget_s:g} s tuning budget ran out" if spent else
           f"in {sum(len(s.trials) for s in searches)} trials")
    return GateNotMetError(
        f"no int8 model met {gate.describe()} (min_quantized_fraction "
        f"{config.min_quantized_fraction:g}) {how}: best {best.recipe} reached SQNR {best.sqnr_db:.1f} dB"
        + (f", top-1 drop {best.top1_drop:.3f}" if best.top1_drop is not None else "")
        + f" with float layers [{layers}] (quantized fraction {best.quantized_fraction:.2f}). "
        f"Raise tuning.budget_s, lower the gate, or convert this model to fp16."
        + "".join(f" Skipped {note}." for note in skipped), best.to_json())


def _reason(winner: Search, config: TuningConfig, gate: Gate, rule: str, notes: list[str]) -> str:
    trial = winner.best[0]
    if not gate.active:
        how = "no gate set: plain conversion"
    elif not trial.float_layers:
        how = f"plain conversion met {gate.describe()}"
    else:
        how = (f"{len(trial.float_layers)} layer(s) kept float to meet {gate.describe()} "
               f"({len(winner.trials)} trials)")
    if config.recipe != "auto":
        return f"{trial.recipe}: {how}"
    return f"auto chose {trial.recipe} ({how}), {rule} of the recipes that passed; " + "; ".join(notes)


def tune_int8(
    model: nn.Module,
    calibration_loader: Iterable,
    held_out: Any,
    *,
    gate: Gate = Gate(),
    config: TuningConfig = TuningConfig(),
    targets: torch.Tensor | None = None,
    calibration_batches: int = 10,
    backend: str = "fbgemm",
    observer: str = "default",
    forward_kwargs: dict | None = None,
    map_chunks: MapChunks | None = None,
    reference: Any = None,
) -> TuningResult:
    """The int8 model with the fewest layers in float that meets ``gate`` on ``held_out``.

    Args:
        model: the fp32 model; never modified (in training mode: copied, then set to eval).
        calibration_loader: ``(inputs, targets)`` batches, as ``to_int8`` takes (static only).
        held_out: held-out inputs (a tensor or tuple of positional tensors), not calibrated on.
        gate: the fidelity gate; inactive: one plain conversion (``auto``: of each recipe).
        config: recipe, time budget, chunks, sensitivity method, admissibility.
        targets: labels of ``held_out`` rows (integer class ids) for ``max_top1_drop``.
        calibration_batches, backend, observer, forward_kwargs: as ``to_int8``.
        map_chunks: runs a list of ``SensitivityTask`` and returns their results in any order
            (default: one after the other, in this process; the orchestrator fans them out).
        reference: the fp32 model's outputs on ``held_out`` when the caller has them already
            (any structure ``flatten_outputs`` takes); None: computed here (one more forward).

    Returns:
        A ``TuningResult``: the int8 model (with ``int8_settings``), the chosen trial, all
        trials, time spent, why this recipe, and the sensitivity measured.

    Raises:
        GateNotMetError: the gate is set and no candidate met it (the message names the best).
        ConfigError, CalibrationError, TraceError, InputShapeError: as ``to_int8``.
    """
    start = time.perf_counter()
    # every conversion copies the model itself: a copy here is only needed to put one in eval
    # mode without touching the caller's
    fp32 = copy.deepcopy(model).eval() if any(m.training for m in model.modules()) else model
    inputs = tuple(held_out) if isinstance(held_out, (tuple, list)) else (held_out,)

    kwargs = dict(forward_kwargs or {})

    def make_search(recipe, convert):
        return Search(recipe, convert, fp32, inputs, gate, config, targets,
                       start + config.budget_s, kwargs, reference)

    def run(recipe):
        if recipe == "static":
            return _static(fp32, calibration_loader, calibration_batches, backend, observer,
                           make_search, config, map_chunks, inputs, kwargs)
        return _dynamic(fp32, backend, make_search, config, map_chunks, inputs, kwargs)

    searches, skipped, measured = _run_recipes(run, fp32, config)
    winner, rule, notes = _choose(searches, skipped, config, fp32, inputs)
    if winner is None and config.recipe != "auto" and not gate.active:
        winner = searches[0]   # nothing to meet: the quantized-fraction check is the caller's
    if winner is None:
        raise _not_met(searches, gate, config, skipped)
    trials = [t for s in searches for t in s.trials]
    return TuningResult(winner.best[1], winner.best[0], trials, time.perf_counter() - start,
                        _reason(winner, config, gate, rule, notes), measured, winner.best[2])


def _run_recipes(run: Callable, fp32: nn.Module, config: TuningConfig):
    """Tune each recipe ``config.recipe`` asks for; ``auto`` skips (and says why) a recipe the
    model cannot take: no Linear/LSTM/GRU for dynamic, a model FX cannot trace for static."""
    searches, skipped, measured = [], [], {}
    for recipe in (("static", "dynamic") if config.recipe == "auto" else (config.recipe,)):
        if recipe == "dynamic" and config.recipe == "auto" and not int8.dynamic_units(fp32):
            skipped.append("dynamic: no Linear/LSTM/GRU layer")
            continue
        try:
            search, results = run(recipe)
        except TraceError as exc:
            if config.recipe != "auto":
                raise
            skipped.append(f"static: {str(exc).splitlines()[0][:200]}")
            continue
        searches.append(search)
        if results:
            measured[recipe] = results
    return searches, skipped, measured
