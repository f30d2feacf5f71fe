"""The int8 path of a task: ``quantizer.tune_int8`` driven by the model's zoo entry.

From the ``ModelSpec``: the gate (``min_sqnr_db``, ``max_top1_drop`` on the class-score output
``fidelity.output``), the recipe (``static`` | ``dynamic`` | ``auto``), the budget and the
sensitivity method (``tuning``), ``min_quantized_fraction``, ``min_speedup`` (``auto`` keeps the
fastest that passes), the backend, observer, calibration batches and ``forward_kwargs``. The
held-out rows' integer ``target`` column, when there is one, makes ``max_top1_drop`` an accuracy
drop. Without a gate this is one plain conversion. The sensitivity pass runs through
``map_chunks`` when the task gives one (``jobs.task`` fans it out over the cluster's free CPUs),
else in this process. Plain Python: must not import ray or click.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

import quantizer
from jobs.measure import capped_db
from quantizer.tuning import Gate, TuningConfig

# With a map_chunks, the pass is cut this fine; map_chunks regroups the pieces for the CPUs
# that are free when it runs (the result does not depend on the grouping).
MAX_CHUNKS = 64


@dataclass
class Tuned:
    """An int8 model, the row fields that say how it was found, and the sensitivity ranking."""

    model: torch.nn.Module
    fields: dict
    sensitivity: dict        # recipe -> [{name, sqnr_db, params, seconds}]; {} when none ran
    outputs: object = None   # the model's outputs on the held-out rows (its trial's), if known


def gate_of(spec) -> Gate:
    return Gate(min_sqnr_db=spec.min_sqnr_db, max_top1_drop=spec.max_top1_drop,
                top1_output=spec.fidelity.output)


def config_of(spec, map_chunks) -> TuningConfig:
    return TuningConfig(recipe=spec.recipe, budget_s=spec.tuning.budget_s,
                        chunks=MAX_CHUNKS if map_chunks else 1, method=spec.tuning.method,
                        min_quantized_fraction=spec.min_quantized_fraction,
                        min_speedup=spec.min_speedup if spec.recipe == "auto" else None)


def class_ids(targets) -> torch.Tensor | None:
    """The held-out rows' targets when they are integer class ids (else None: top-1 agreement
    with fp32 stands in for accuracy)."""
    if isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point():
        return targets
    return None


def tune(name: str, spec, model, calib, held_out, targets, map_chunks=None,
         reference=None) -> Tuned:
    """The int8 model for ``spec`` (see the module docstring); ``reference``: the fp32 outputs
    on ``held_out`` the task already has (saves tune_int8 a forward).

    Raises:
        GateNotMetError: a gate is set and no candidate met it (names the best found).
        NotQuantizedError: not even the plain conversion stores ``min_quantized_fraction`` of
            the parameters in int8 (e.g. FX static leaves an LSTM float).
        CalibrationError, TraceError, InputShapeError, ConfigError: as ``quantizer.to_int8``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", quantizer.int8.CalibrationWarning)
            result = quantizer.tune_int8(
                model, calib, held_out, gate=gate_of(spec), config=config_of(spec, map_chunks),
                targets=class_ids(targets), calibration_batches=spec.calibration.batches,
                backend=spec.backend, observer=spec.observer,
                forward_kwargs=dict(spec.forward_kwargs), map_chunks=map_chunks,
                reference=reference)
    except quantizer.GateNotMetError as e:
        raise _named(name, spec, e) from None
    fields = result.manifest_fields()
    fields["sensitivity_top"] = [{"name": n, "sqnr_db": _finite(v)}
                                 for n, v in fields["sensitivity_top"]]
    fields["top1_drop"] = _finite(fields["top1_drop"])
    sensitivity = {recipe: [dict(item, sqnr_db=_finite(item["sqnr_db"])) for item in items]
                   for recipe, items in result.sensitivity_json().items()}
    return Tuned(result.model, fields, sensitivity, result.outputs)


def _named(name: str, spec, error: quantizer.GateNotMetError) -> Exception:
    best = error.best or {}
    fraction = best.get("quantized_fraction")
    if fraction is not None and fraction < spec.min_quantized_fraction:
        return quantizer.NotQuantizedError(
            f"model {name}: int8 conversion ({best.get('recipe')}) quantized only "
            f"{fraction:.1%} of the parameters (min_quantized_fraction "
            f"{spec.min_quantized_fraction}); FX static quantization leaves modules such as "
            f"nn.LSTM and nn.TransformerEncoder in float. Nothing is shipped as int8; use "
            f"recipe: dynamic (or auto) for Linear/LSTM/GRU models, or fp16. ({error})")
    return quantizer.GateNotMetError(f"model {name} int8: {error}", best)


def _finite(value):
    """A number the manifest can hold: capped as ``jobs.measure`` caps SQNR; None stays None."""
    if value is None or not isinstance(value, (int, float)):
        return value
    if math.isnan(value):
        return None
    return capped_db(value)
