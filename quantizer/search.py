"""One recipe's trials and the search over a sensitivity ranking (``quantizer.tuning`` drives it).

Owns ``Trial`` (one real conversion, measured), ``Search`` (convert with some units in float,
measure on the held-out rows, remember the best), ``top1_drop`` (the ``max_top1_drop`` measure)
and ``prefix_search`` (the fewest most costly units that pass: galloping from the predicted
size, bisection, then pruning). The gate and the admissibility rule come in as the tuner's
``Gate`` and ``TuningConfig``. Must not import torch.ao, ray, click or ``jobs``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from quantizer import int8, sensitivity
from quantizer.errors import ConfigError
from quantizer.fidelity import flatten_outputs, sqnr_db, top1_agreement
from quantizer.sensitivity import LayerSensitivity


@dataclasses.dataclass(frozen=True)
class Trial:
    """One real conversion, measured."""

    recipe: str
    float_layers: tuple[str, ...]
    sqnr_db: float
    top1_drop: float | None
    quantized_fraction: float
    state_bytes: int
    met: bool
    seconds: float

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "float_layers": list(self.float_layers),
                "sqnr_db": min(300.0, self.sqnr_db) if not math.isnan(self.sqnr_db) else None,
                "top1_drop": self.top1_drop, "quantized_fraction": round(self.quantized_fraction, 6),
                "state_bytes": self.state_bytes, "met": self.met, "seconds": round(self.seconds, 3)}


def _class_scores(outputs: Any, gate) -> torch.Tensor:
    tensors = flatten_outputs(outputs)
    if gate.top1_output is None:
        if len(tensors) != 1 or tensors[0].dim() != 2:
            raise ConfigError("max_top1_drop needs a class-score output: the model has "
                              f"{len(tensors)} output tensor(s); name one with fidelity.output")
        return tensors[0]
    if not 0 <= gate.top1_output < len(tensors):
        raise ConfigError(f"fidelity output {gate.top1_output} does not exist: the model has "
                          f"{len(tensors)} output tensor(s)")
    return tensors[gate.top1_output]


def top1_drop(reference: Any, outputs: Any, gate, targets: torch.Tensor | None) -> float:
    """``Gate.max_top1_drop``'s measure (see ``Gate``)."""
    ref, out = _class_scores(reference, gate), _class_scores(outputs, gate)
    if targets is not None and targets.dim() == 1 and len(targets) == len(ref) \
            and not targets.is_floating_point():
        hits = [float((t.float().argmax(dim=-1) == targets).float().mean()) for t in (ref, out)]
        return hits[0] - hits[1]
    return 1.0 - top1_agreement(ref, out)


def _state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


class Search:
    """Trials of one recipe: convert with some layers float, measure, remember the best."""

    def __init__(self, recipe: str, convert: Callable, fp32: nn.Module, inputs: tuple,
                 gate, config, targets, deadline: float, kwargs: dict, reference: Any = None):
        self.recipe, self.convert, self.fp32, self.inputs = recipe, convert, fp32, inputs
        self.gate, self.config, self.targets, self.deadline = gate, config, targets, deadline
        self.kwargs = kwargs
        if reference is None:
            with torch.no_grad():
                reference = fp32(*inputs, **kwargs)
        self.reference = reference
        self.trials: list[Trial] = []
        # the best trial, its model and the model's outputs on ``inputs``
        self.best: tuple[Trial, nn.Module, Any] | None = None

    def out_of_time(self) -> bool:
        return time.perf_counter() >= self.deadline

    def trial(self, float_layers: Iterable[str]) -> Trial:
        key = frozenset(float_layers)
        done = next((t for t in self.trials if frozenset(t.float_layers) == key), None)
        if done is not None:
            return done
        start = time.perf_counter()
        model = self.convert(tuple(float_layers))
        with torch.no_grad():
            outputs = model(*self.inputs, **self.kwargs)
        sqnr = sqnr_db(self.reference, outputs)
        drop = (top1_drop(self.reference, outputs, self.gate, self.targets)
                if self.gate.max_top1_drop is not None else None)
        fraction = int8.quantized_fraction(model, self.fp32)
        met = ((self.gate.min_sqnr_db is None or sqnr >= self.gate.min_sqnr_db)
               and (drop is None or drop <= self.gate.max_top1_drop)
               and fraction >= self.config.min_quantized_fraction)
        trial = Trial(self.recipe, tuple(model.int8_settings["float_layers"]), sqnr, drop,
                      fraction, _state_bytes(model), met, time.perf_counter() - start)
        self.trials.append(trial)
        if self.best is None or _better(trial, self.best[0], self.config.min_quantized_fraction):
            self.best = (trial, model, outputs)
        return trial


def _better(a: Trial, b: Trial, min_fraction: float) -> bool:
    """Met beats missed; among met, fewer float layers, then higher SQNR; among missed, enough
    parameters quantized, then higher SQNR, then the smaller top-1 drop."""
    if a.met != b.met:
        return a.met
    if a.met:
        return (len(a.float_layers), -a.sqnr_db) < (len(b.float_layers), -b.sqnr_db)
    return missed_key(a, min_fraction) > missed_key(b, min_fraction)


def missed_key(t: Trial, min_fraction: float) -> tuple:
    return (t.quantized_fraction >= min_fraction, t.sqnr_db,
            -(t.top1_drop if t.top1_drop is not None else 0.0))


def _order(results: Sequence[LayerSensitivity]) -> list[LayerSensitivity]:
    """Units worth keeping float, most costly first; unmeasured ones after; error-free dropped."""
    return [r for r in sensitivity.ranked(results) if r.sqnr_db is None or r.noise > 0]


def _prefix_bound(order: list[LayerSensitivity], search: Search, base: Trial) -> int:
    """Longest prefix whose parameters, kept float, still leave the quantized fraction."""
    total = sum(p.numel() for p in search.fp32.parameters()) or 1
    fraction, bound = base.quantized_fraction, 0
    for item in order:
        fraction -= item.params / total
        if fraction < search.config.min_quantized_fraction:
            break
        bound += 1
    return bound


def _first_guess(order: list[LayerSensitivity], gate, bound: int) -> int:
    if gate.min_sqnr_db is None:
        return min(1, bound)
    names = [item.name for item in order]
    for k in range(1, bound + 1):
        if sensitivity.predicted_sqnr_db(order, names[:k]) >= gate.min_sqnr_db:
            return k
    return bound


def prefix_search(search: Search, results: Sequence[LayerSensitivity], base: Trial) -> None:
    """Smallest prefix of ``order`` that passes: from the predicted size, double until one
    passes, then bisect down to the last that failed; finally prune. ``base`` is the plain
    conversion (no unit in float), which missed."""
    order = _order(results)
    names = [item.name for item in order]
    bound = _prefix_bound(order, search, base)
    failed, passed, k = 0, None, max(1, _first_guess(order, search.gate, bound))
    while bound and not search.out_of_time():
        if search.trial(names[:k]).met:
            passed = k
            break
        failed = k
        if k == bound:
            break
        k = min(bound, 2 * k)
    while passed is not None and passed - failed > 1 and not search.out_of_time():
        middle = (failed + passed) // 2
        if search.trial(names[:middle]).met:
            passed = middle
        else:
            failed = middle
    if passed is not None:
        _prune(search, names[:passed])


def _prune(search: Search, kept: list[str]) -> None:
    """Try dropping each kept unit, least costly first; keep every drop that still passes."""
    for name in reversed(list(kept)):
        if search.out_of_time() or len(kept) <= 1:
            return
        rest = [n for n in kept if n != name]
        if search.trial(rest).met:
            kept = rest
