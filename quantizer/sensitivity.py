"""Per-layer sensitivity: how much fidelity each quantizable unit costs when quantized alone.

For every fallback unit (``quantizer.int8.fallback_units`` for the static recipe,
``dynamic_units`` for the dynamic one) the pass measures the SQNR of the model's outputs, on
held-out rows, with ONLY that unit quantized and everything else in float. Its noise power
``10 ** (-sqnr / 10)`` is what that unit adds; noises of units far apart add up roughly, so the
tuner can rank units and predict how many to keep in float (docs/tuning.md).

The pass is split into chunks (subsets of units) that run anywhere: a ``SensitivityTask`` holds
the fp32 model, the calibrated observers' state_dict (static: no chunk calibrates again), the
held-out inputs and its units, and ``run_sensitivity`` needs nothing else. ``merge_sensitivity``
puts chunk results back in one deterministic order whatever order they finished in. Static
units are measured on ``Int8Simulator`` (fake quantization, one fp32 forward per unit) or with a
real conversion per unit (``method="convert"``); dynamic units always with a real conversion
(no calibration to reuse, and dynamic conversion is cheap). Must not import torch.ao, ray,
click or ``jobs``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from quantizer import int8
from quantizer.errors import ConfigError
from quantizer.fidelity import sqnr_db

METHODS = ("simulate", "convert")


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One unit's cost: ``sqnr_db`` of the outputs with only this unit quantized (``None``:
    not measured, the time budget ran out first), its parameter count and measuring time."""

    name: str
    sqnr_db: float | None
    params: int
    seconds: float

    @property
    def noise(self) -> float:
        """Relative noise power this unit adds (0 when not measured)."""
        return 0.0 if self.sqnr_db is None else 10.0 ** (-self.sqnr_db / 10.0)

    def to_json(self) -> dict:
        """JSON-safe: an infinite SQNR (no error at all) is written as 300 dB."""
        finite = None if self.sqnr_db is None else min(300.0, float(self.sqnr_db))
        return {"name": self.name, "sqnr_db": finite, "params": self.params,
                "seconds": round(self.seconds, 4)}


@dataclasses.dataclass(frozen=True)
class SensitivityTask:
    """Everything one chunk of the pass needs, cheap to ship to another process.

    Attributes:
        recipe: ``static`` or ``dynamic``.
        model: the fp32 model.
        backend, observer: as the conversion uses them.
        example_inputs: positional inputs to trace with (static).
        observer_state: ``int8.observer_state`` of the calibrated model (static).
        inputs: held-out positional inputs the SQNR is measured on.
        units: the unit names this chunk measures.
        reference: the fp32 model's outputs on ``inputs`` (``None``: each chunk computes them).
        method: ``simulate`` or ``convert`` (static; dynamic always converts).
        budget_s: stop starting new units after this many seconds (unmeasured: ``None``).
        forward_kwargs: fixed keyword arguments of ``forward`` (see ``to_int8``).
        activation_range, qconfig_version: the calibrated model's (static; see ``to_int8``).
    """

    recipe: str
    model: nn.Module
    backend: str
    observer: str | None
    example_inputs: tuple
    observer_state: dict | None
    inputs: tuple
    units: tuple[str, ...]
    reference: Any = None
    method: str = "simulate"
    budget_s: float = math.inf
    forward_kwargs: dict = dataclasses.field(default_factory=dict)
    activation_range: str | None = None
    qconfig_version: int = int8.QCONFIG_VERSION


def split_tasks(task: SensitivityTask, chunks: int) -> list[SensitivityTask]:
    """``task`` as at most ``chunks`` tasks over contiguous, near-equal runs of its units.

    Raises:
        ConfigError: ``chunks < 1``.
    """
    if not isinstance(chunks, int) or chunks < 1:
        raise ConfigError(f"sensitivity chunks must be an integer >= 1, got {chunks!r}")
    units, count = task.units, min(chunks, max(1, len(task.units)))
    bounds = [round(i * len(units) / count) for i in range(count + 1)]
    return [dataclasses.replace(task, units=units[bounds[i]:bounds[i + 1]]) for i in range(count)]


def _static_runner(task: SensitivityTask):
    """(unit -> parameters, unit -> outputs with only that unit quantized)"""
    prepared = int8.prepare_int8(task.model, task.example_inputs, task.backend, task.observer,
                                 forward_kwargs=task.forward_kwargs,
                                 activation_range=task.activation_range,
                                 qconfig_version=task.qconfig_version)
    int8.load_observer_state(prepared, task.observer_state)
    if task.method == "simulate":
        simulator = int8.Int8Simulator(prepared, inplace=True)
        return simulator.params, lambda unit: simulator.run(task.inputs, quantized_only=[unit])

    def convert(unit):
        with torch.no_grad():
            return int8.convert_int8(prepared, quantized_only=[unit])(*task.inputs)
    return int8.fallback_units(prepared), convert


def _dynamic_runner(task: SensitivityTask):
    units = int8.dynamic_units(task.model)

    def convert(unit):
        others = [name for name in units if name != unit]
        converted = int8.to_int8_dynamic(task.model, task.backend, float_layers=others)
        with torch.no_grad():
            return converted(*task.inputs, **task.forward_kwargs)
    return units, convert


def run_sensitivity(task: SensitivityTask) -> list[LayerSensitivity]:
    """Measure the units of one task (in this process; the caller picks the process).

    Returns:
        One ``LayerSensitivity`` per unit of the task, in the task's order.

    Raises:
        ConfigError: unknown recipe or method, or a unit the model does not have.
    """
    if task.method not in METHODS:
        raise ConfigError(f"unknown sensitivity method {task.method!r}; choose one of "
                          f"{', '.join(METHODS)}")
    start = time.perf_counter()
    if task.recipe == "static":
        params, run = _static_runner(task)
    elif task.recipe == "dynamic":
        params, run = _dynamic_runner(task)
    else:
        raise ConfigError(f"unknown recipe {task.recipe!r} for sensitivity (static or dynamic)")
    unknown = [unit for unit in task.units if unit not in params]
    if unknown:
        raise ConfigError(f"{type(task.model).__name__} has no {task.recipe} unit(s) "
                          f"{', '.join(map(repr, unknown))}")
    reference = task.reference
    if reference is None:
        with torch.no_grad():
            reference = task.model(*task.inputs, **task.forward_kwargs)
    results = []
    for unit in task.units:
        began = time.perf_counter()
        if began - start > task.budget_s:
            results.append(LayerSensitivity(unit, None, params.get(unit, 0), 0.0))
            continue
        sqnr = sqnr_db(reference, run(unit))
        results.append(LayerSensitivity(unit, sqnr, params.get(unit, 0),
                                        time.perf_counter() - began))
    return results


def merge_sensitivity(parts: Iterable[Sequence[LayerSensitivity]],
                      order: Sequence[str]) -> list[LayerSensitivity]:
    """Chunk results as one list in ``order`` (the model's unit order), whatever order the
    chunks finished in; a unit measured twice keeps its first measured result.

    Raises:
        ConfigError: a unit outside ``order``.
    """
    found: dict[str, LayerSensitivity] = {}
    known = set(order)
    for part in parts:
        for item in part:
            if item.name not in known:
                raise ConfigError(f"sensitivity result for unknown unit {item.name!r}")
            if item.name not in found or found[item.name].sqnr_db is None:
                found[item.name] = item
    return [found[name] for name in order if name in found]


def ranked(results: Sequence[LayerSensitivity]) -> list[LayerSensitivity]:
    """Most costly first (largest noise), unmeasured units last; ties keep model order."""
    return sorted(results, key=lambda item: (item.sqnr_db is None, -item.noise))


def predicted_sqnr_db(results: Sequence[LayerSensitivity], float_layers: Iterable[str]) -> float:
    """SQNR predicted with ``float_layers`` in float, adding the other units' noise powers."""
    kept = set(float_layers)
    noise = sum(item.noise for item in results if item.name not in kept)
    return math.inf if noise == 0 else -10.0 * math.log10(noise)


def task_for(recipe: str, model: nn.Module, inputs: Any, *, prepared=None, backend: str = "fbgemm",
             method: str = "simulate", budget_s: float = math.inf,
             forward_kwargs: dict | None = None) -> SensitivityTask:
    """The whole pass as one task (``split_tasks`` cuts it into chunks).

    Args:
        recipe: ``static`` (then ``prepared`` is the calibrated model) or ``dynamic``.
        model: the fp32 model.
        inputs: held-out positional inputs (a tensor or a tuple of tensors).
        prepared: ``int8.calibrate_int8``'s result (static; its ``forward_kwargs`` are used).
        backend: the dynamic recipe's backend (static takes the prepared model's).
        method, budget_s: as ``SensitivityTask``.
        forward_kwargs: the dynamic recipe's fixed ``forward`` arguments.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    fixed = dict(getattr(prepared, "forward_kwargs", None) or forward_kwargs or {})
    with torch.no_grad():
        reference = model(*args, **fixed)
    if recipe == "static":
        example = tuple(t[:1] for t in args)
        qconfig = prepared.qconfig_settings
        return SensitivityTask("static", model, prepared.backend, prepared.observer, example,
                               int8.observer_state(prepared), args,
                               tuple(int8.fallback_units(prepared)), reference, method, budget_s,
                               fixed, qconfig["activation_range"], qconfig["qconfig_version"])
    return SensitivityTask("dynamic", model, backend, None, (), None, args,
                           tuple(int8.dynamic_units(model)), reference, "convert", budget_s, fixed)
