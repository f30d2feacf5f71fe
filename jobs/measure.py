"""What a task measures: fp32 reference once per model, then each converted copy against it.

- Every forward call (reference, fidelity, latency, the GPU path) passes the zoo's
  ``forward_kwargs``, which the ``Reference`` carries.
- Fidelity: SQNR over all outputs and of each output alone, and top-1 agreement on the
  class-score output only (the zoo's ``fidelity.output``, else ``quantizer.top1_output``'s
  default rule; none: null, and a note says why), on held-out rows (``FIDELITY_ROWS``; fp16 on
  a CPU uses the first ``FP16_CPU_ROWS`` of them). A converted model whose outputs are
  non-finite where fp32's are finite fails (``NonFiniteOutputError``), and no non-finite number
  is ever returned.
- Latency: batch-1 forwards after one untimed forward, at the task's thread count, within a
  budget proportional to the model's cost (``LATENCY_FORWARDS`` times its first forward, at most
  ``LATENCY_BUDGET_S``).
- fp16 is for accelerators: with a GPU assigned to the task, fp16 fidelity and latency (and the
  fp32 latency it is compared with) are measured on it; on a CPU worker fp16 latency is not
  measured (null, with the reason) and fidelity runs in ``channels_last`` memory format: a CPU
  without native fp16 runs fp16 convolutions in aten's reference kernel either way, ~6x faster
  in channels_last here (ResNet-18, 8 rows: 0.10 s against 0.61 s); same weights, results equal
  to a default-format run up to rounding.
- Gates (``check_gates``): int8 only. ``min_quantized_fraction``, ``min_sqnr_db`` (documented as
  the int8 fidelity gate) and ``min_speedup``; an fp16 row fails only on non-finite outputs.
Must not import ray or click.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

import quantizer
from jobs.plan import FIDELITY_ROWS  # noqa: F401  (held-out rows; re-exported for the task)
from quantizer.fidelity import flatten_outputs

FP16_CPU_ROWS = 8             # fp16 on a CPU is still slower than fp32: fewer rows
LATENCY_FORWARDS = 8          # latency budget = this many first forwards ...
LATENCY_BUDGET_S = 0.5        # ... but at most this, per model and precision
LATENCY_MIN_BUDGET_S = 0.02
SQNR_CAP_DB = 300.0           # identical outputs: +300 dB (JSON has no infinity)
FP16_CPU_NOTE = ("fp16 on a CPU (no accelerator assigned to this task): fidelity measured in "
                 "channels_last memory format; latency not measured, fp16 is meant for "
                 "accelerators (CPU fp16 kernels are slower than fp32)")


class NonFiniteOutputError(quantizer.QuantizerError):
    """The converted model gives inf/NaN on held-out rows where fp32 is finite."""


@dataclass
class Reference:
    """The fp32 model's outputs on the held-out rows and its batch-1 latency (CPU), with how the
    model is called (``kwargs``: the zoo's ``forward_kwargs``) and which output holds class
    scores (``top1``: an index, or None when none does)."""

    x: torch.Tensor
    outputs: list[torch.Tensor]
    latency_ms: float
    finite: bool
    kwargs: dict = field(default_factory=dict)
    top1: int | None = None


def fp16_device(gpu_ids, cuda_available: bool) -> str:
    """Where fp16 is measured: the task's GPU if Ray assigned one and torch sees CUDA."""
    return "cuda" if gpu_ids and cuda_available else "cpu"


def reference(name: str, model: torch.nn.Module, x: torch.Tensor, *,
              forward_kwargs: dict | None = None, top1_output: int | None = None) -> Reference:
    """fp32 outputs on the held-out rows ``x`` and batch-1 latency.

    Args:
        forward_kwargs: the zoo's fixed ``forward`` arguments, passed on every call.
        top1_output: the zoo's ``fidelity.output`` (None: the library's default rule).

    Raises:
        InputShapeError: the model rejects rows of this shape (names the model and the shape).
        ConfigError: ``top1_output`` is not the index of one of the model's outputs.
    """
    kwargs = dict(forward_kwargs or {})
    try:
        with torch.inference_mode():
            outputs = [t.float() for t in flatten_outputs(model(x, **kwargs))]
    except RuntimeError as e:
        raise quantizer.InputShapeError(
            f"model {name}: its forward rejects the calibration data's rows of shape "
            f"{list(x.shape[1:])} ({str(e).splitlines()[0][:300]}); check calibration.data "
            f"and calibration.shape in the zoo") from e
    try:
        top1 = quantizer.top1_output(outputs, top1_output)
    except ValueError as e:
        raise quantizer.ConfigError(f"model {name}: zoo key 'fidelity.output': {e}") from None
    return Reference(x, outputs, latency_ms(model, x[:1], kwargs=kwargs),
                     all(bool(torch.isfinite(t).all()) for t in outputs), kwargs, top1)


def latency_ms(model: torch.nn.Module, x1: torch.Tensor, *, sync=None,
               kwargs: dict | None = None) -> float:
    """Median batch-1 latency within a budget proportional to one forward's time."""
    timed = _Bound(model, kwargs or {}, sync)
    start = time.perf_counter()
    with torch.inference_mode():
        timed(x1)                       # warm-up, and what one forward costs
    first = time.perf_counter() - start
    budget = min(LATENCY_BUDGET_S, max(LATENCY_MIN_BUDGET_S, LATENCY_FORWARDS * first))
    return round(quantizer.measure_latency_ms(timed, x1, warmup=0, budget_s=budget), 4)


class _Bound(torch.nn.Module):
    """Calls the model with its fixed ``forward`` arguments, and waits for the device after each
    forward (``sync``), so wall time covers the GPU's work."""

    def __init__(self, model, kwargs: dict, sync=None):
        super().__init__()
        self.model, self.kwargs, self.sync = model, kwargs, sync

    def forward(self, *args):
        out = self.model(*args, **self.kwargs)
        if self.sync:
            self.sync()
        return out


def measure_int8(name: str, ref: Reference, converted, outputs=None) -> dict:
    """Fidelity and latency of an int8 model; ``outputs``: its outputs on ``ref.x`` when the
    caller has them already (``jobs.tune``'s trial), else computed here."""
    if outputs is None:
        with torch.inference_mode():
            outputs = converted(ref.x, **ref.kwargs)
    got = flatten_outputs(outputs)
    out = fidelity(name, "int8", ref, got, ref.x.shape[0])
    lat = latency_ms(converted, ref.x[:1], kwargs=ref.kwargs)
    out.update(latency_fp32_ms=ref.latency_ms, latency_ms=lat,
               speedup=round(ref.latency_ms / lat, 4) if lat else None)
    return out


def measure_fp16(name: str, ref: Reference, fp32, converted, device: str) -> dict:
    """fp16 against the reference; on a GPU, latency too (see the module docstring)."""
    if device == "cpu":
        rows = min(FP16_CPU_ROWS, ref.x.shape[0])
        with torch.inference_mode():
            got = flatten_outputs(converted(ref.x[:rows].half(), **ref.kwargs))
        out = fidelity(name, "fp16", ref, got, rows)
        out.update(latency_fp32_ms=ref.latency_ms, latency_ms=None, speedup=None,
                   latency_note=FP16_CPU_NOTE)
        return out
    return _measure_fp16_gpu(name, ref, fp32, converted, device)


def _measure_fp16_gpu(name, ref, fp32, converted, device) -> dict:   # untested: no GPU here
    sync = torch.cuda.synchronize
    converted.to(device)
    try:
        x = ref.x.to(device)
        with torch.inference_mode():
            got = [t.cpu() for t in flatten_outputs(converted(x.half(), **ref.kwargs))]
        out = fidelity(name, "fp16", ref, got, x.shape[0])
        lat = latency_ms(converted, x[:1].half(), sync=sync, kwargs=ref.kwargs)
        fp32_gpu = copy.deepcopy(fp32).to(device)
        lat32 = latency_ms(fp32_gpu, x[:1], sync=sync, kwargs=ref.kwargs)
        del fp32_gpu
    finally:
        converted.to("cpu")
    out.update(latency_fp32_ms=lat32, latency_ms=lat,
               speedup=round(lat32 / lat, 4) if lat else None,
               latency_note=f"fp16 fidelity and latency measured on {torch.cuda.get_device_name()}")
    return out


def fidelity(name: str, precision: str, ref: Reference, got: list[torch.Tensor],
             rows: int) -> dict:
    """SQNR (all outputs, and each alone) and top-1 agreement (on ``ref.top1`` only) of ``got``,
    the outputs on the first ``rows`` held-out rows.

    Raises:
        NonFiniteOutputError: ``got`` is inf/NaN where the reference is finite.
    """
    want = [t[:rows] for t in ref.outputs]
    for index, (r, g) in enumerate(zip(want, got)):
        bad = torch.isfinite(r) & ~torch.isfinite(g.float())
        if bool(bad.any()):
            raise NonFiniteOutputError(
                f"model {name} {precision}: output {index} is inf/NaN in {int(bad.sum())} of "
                f"{bad.numel()} values on {rows} held-out rows where fp32's are finite (e.g. an "
                f"fp16 overflow); nothing is shipped. Keep this model in fp32 or use int8.")
    out = {"fidelity_rows": rows, "sqnr_db": None, "sqnr_db_outputs": None,
           "top1_agreement": None, "top1_output": ref.top1}
    if not ref.finite:
        out["fidelity_note"] = "fp32 outputs are not finite on the held-out rows: SQNR not measured"
        return out
    out["sqnr_db"] = capped_db(quantizer.sqnr_db(want, got))
    out["sqnr_db_outputs"] = [capped_db(v) for v in quantizer.sqnr_db_per_output(want, got)]
    if ref.top1 is None:
        shapes = ", ".join(str(list(t.shape[1:])) for t in ref.outputs)
        out["fidelity_note"] = (
            f"top-1 agreement not measured: no output is class scores by default ({len(want)} "
            f"output(s), per-row shapes {shapes}; the default needs exactly one [batch, classes] "
            f"output); name the class-score output with fidelity: {{output: N}}")
    else:
        out["top1_agreement"] = float(quantizer.top1_agreement(want, got, output=ref.top1))
    return out


def capped_db(sqnr: float) -> float:
    """An SQNR the manifest can hold: within +-``SQNR_CAP_DB``."""
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, float(sqnr)))


def check_gates(name: str, spec, precision: str, out: dict) -> None:
    """int8 only: the quantized share, ``min_sqnr_db`` (documented as the int8 fidelity gate)
    and ``min_speedup``. An fp16 row fails only on non-finite outputs (``jobs.measure``)."""
    if precision != "int8":
        return
    frac = out["quantized_fraction"]
    if frac < spec.min_quantized_fraction:
        raise quantizer.NotQuantizedError(
            f"model {name}: int8 conversion quantized only {frac:.1%} of the parameters "
            f"(min_quantized_fraction {spec.min_quantized_fraction}); FX static quantization "
            f"leaves modules such as nn.LSTM and nn.TransformerEncoder in float. Nothing is "
            f"shipped as int8; use fp16 for this model, or restructure it.")
    floor, sqnr = spec.min_sqnr_db, out.get("sqnr_db")
    if floor is not None and sqnr is not None and sqnr < floor:
        raise quantizer.FidelityError(
            f"model {name} int8: SQNR {sqnr:.1f} dB is below min_sqnr_db {floor} "
            f"(measured on {out.get('fidelity_rows')} rows); try observer: default, more "
            f"calibration batches, or fp16")
    speedup = out.get("speedup")
    if spec.min_speedup is not None and speedup is not None and speedup < spec.min_speedup:
        raise quantizer.SpeedupError(
            f"model {name} int8: speedup {speedup:.2f}x is below min_speedup "
            f"{spec.min_speedup} ({out['latency_ms']:.2f} ms vs {out['latency_fp32_ms']:.2f} "
            f"ms fp32)")
