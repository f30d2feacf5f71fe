"""What one model of the zoo file says, once checked: frozen dataclasses, nothing else.

``jobs.zoo`` reads and checks the file and builds these (and re-exports them); every other module
reads a model's settings from a ``ModelSpec``. Every field that shapes a result is in the model's
content key (``jobs.keys``). Must not import ray, click or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from jobs.zoo_rules import DEFAULT_BUDGET_S, PRECISIONS


@dataclass(frozen=True)
class Calibration:
    data: str | None = None            # resolved URI/path of a file or folder of shards
    batches: int = 10
    batch_size: int = 8
    shape: tuple[int, ...] | None = None   # per-row shape for plain fixed-size-list columns


@dataclass(frozen=True)
class Fidelity:
    output: int | None = None          # flatten_outputs index of the class scores (top-1)


@dataclass(frozen=True)
class Tuning:
    budget_s: float = DEFAULT_BUDGET_S  # no sensitivity unit or trial starts after this
    method: str = "simulate"           # static sensitivity: simulate | convert


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: str                        # "module:callable"
    checkpoint: str                     # resolved: absolute local path or URI
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    precisions: tuple[str, ...] = PRECISIONS
    backend: str = "fbgemm"
    calibration: Calibration = Calibration()
    min_sqnr_db: float | None = None
    min_speedup: float | None = None
    observer: str = "default"
    allow_pickle: bool = False
    min_quantized_fraction: float = 0.5
    # where the weights sit in the checkpoint (quantizer.load_model)
    checkpoint_key: str | None = None
    ignore_keys: tuple[str, ...] = ()
    strip_prefix: tuple[str, ...] = ()
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)   # on every forward call
    fidelity: Fidelity = Fidelity()
    # int8 tuning (quantizer.tune_int8): recipe, top-1 gate, budget and sensitivity method
    recipe: str = "static"
    max_top1_drop: float | None = None
    tuning: Tuning = Tuning()
