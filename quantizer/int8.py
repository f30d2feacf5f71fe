"""int8 conversion: post-training static quantization in PyTorch FX graph mode.

Owns ``to_int8``, ``rebuild_int8`` (the uncalibrated skeleton a saved int8 state_dict loads into),
``set_engine`` and ``quantized_fraction``; re-exports ``activation_range`` and the settings names
of ``int8_qconfig`` (which ops are quantized, and how). With ``int8_qconfig``, ``int8_lowering``
and ``int8_float_outputs`` (passes over the converted graph) it is the int8 engine: the only
modules of the package that import ``torch.ao`` (deprecated in torch 2.10+, still working
through 2.14), so a torchao pt2e engine can sit beside them later. Must not import ray, click or
``jobs``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import linecache
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from quantizer import int8_float_outputs, int8_lowering
from quantizer.errors import CalibrationError, ConfigError, InputShapeError, TraceError
from quantizer.int8_qconfig import (  # noqa: F401  (ACTIVATION_RANGES ... re-exported)
    ACTIVATION_RANGES, BACKENDS, FLOAT_OPS, OBSERVERS, QCONFIG_VERSION, QCONFIG_VERSIONS,
    SETTINGS_FIELDS, activation_range, checked_settings, new_settings, qconfig_mapping,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

_QUANTIZED_DTYPES = (torch.qint8, torch.quint8)
_TORCH_DIR = os.path.dirname(torch.__file__)


class CalibrationWarning(UserWarning):
    """Calibration ran on fewer batches than asked; the model was converted anyway."""


@contextlib.contextmanager
def _quiet_ao(*also: str) -> Iterator[None]:
    # Users asked for int8, not for torch.ao's deprecation notices and per-observer chatter.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        for message in also:
            warnings.filterwarnings("ignore", message=message)
        yield


def _validate(calibration_batches: int, backend: str, observer: str) -> None:
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) \
            or calibration_batches < 1:
        raise ConfigError(f"calibration_batches must be an integer >= 1, got {calibration_batches!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if observer not in OBSERVERS:
        raise ConfigError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")


def set_engine(backend: str) -> None:
    """Select the quantized kernels of ``backend`` for this process (before running a result).

    Args:
        backend: one of ``BACKENDS``.

    Raises:
        ConfigError: unknown backend, or this torch build lacks its kernels.
    """
    _validate(1, backend, "default")
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"backend {backend!r} is not supported by this torch build "
                          f"(supported: {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = backend


def _user_frame(root: nn.Module, tb: Any) -> str:
    """Describe the innermost traceback frame in the user's code: module name, file:line, source."""
    names = {id(module): name for name, module in root.named_modules()}
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith((_TORCH_DIR, "<")) and filename != __file__:
            found = (tb.tb_frame, tb.tb_lineno)
        tb = tb.tb_next
    if found is None:
        return ""
    frame, line = found
    owner = frame.f_locals.get("self")
    where = f"{frame.f_code.co_filename}:{line}"
    if id(owner) in names:
        name = names[id(owner)] or "<root>"
        where = f"module '{name}' ({type(owner).__name__}) at {where}"
    source = linecache.getline(frame.f_code.co_filename, line).strip()
    return f" at {where}: `{source}`" if source else f" at {where}"


def _prepare(fp32: nn.Module, example: tuple, settings: Mapping[str, Any]) -> torch.fx.GraphModule:
    try:
        with _quiet_ao():
            return prepare_fx(fp32, qconfig_mapping(fp32, settings), example_inputs=example)
    except Exception as exc:  # torch.fx raises many types while tracing; all mean "cannot trace"
        where = _user_frame(fp32, exc.__traceback__)
        raise TraceError(
            f"torch.fx cannot trace {type(fp32).__name__} for int8 quantization{where} "
            f"({type(exc).__name__}: {exc}). Restructure the model so forward has no "
            "data-dependent control flow (no if/for/while on tensor values), or convert it to "
            "fp16 instead."
        ) from exc


def _as_inputs(batch: Any, index: int) -> tuple[torch.Tensor, ...]:
    """Positional model inputs of one ``(inputs, targets)`` batch, checked for NaN/Inf."""
    inputs = batch
    if isinstance(batch, (tuple, list)) and batch:
        inputs = batch[0]
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    for arg in args:
        if not isinstance(arg, torch.Tensor):
            raise CalibrationError(f"calibration batch {index}: expected (inputs, targets) with "
                                   f"tensor inputs, got {type(batch).__name__} holding {type(arg).__name__}")
        if arg.is_floating_point() and not bool(torch.isfinite(arg).all()):
            raise CalibrationError(f"calibration batch {index} holds NaN or Inf inputs "
                                   f"(shape {tuple(arg.shape)}); clean the calibration data")
    return args


def _expected_input(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return (f"; its first layer '{name}' ({type(module).__name__}) expects "
                    f"in_channels={module.in_channels} (dim 1 of the input)")
        if isinstance(module, nn.Linear):
            return (f"; its first layer '{name}' (Linear) expects "
                    f"in_features={module.in_features} (last dim of the input)")
    return ""


def _forward_error(exc: RuntimeError, model: nn.Module, inputs: tuple, index: int) -> Exception:
    """The typed error for a calibration forward that failed, or ``exc`` itself if unrecognized."""
    text = str(exc).lower()
    name = type(model).__name__
    if "not finite" in text:  # HistogramObserver meeting activations that overflowed
        return CalibrationError(
            f"{name}'s activations overflowed to NaN/Inf on calibration batch {index} "
            f"({str(exc).splitlines()[0]}); check the model's weights and the data's range")
    if not any(word in text for word in ("shape", "size", "channel", "dimension")):
        return exc
    got = ", ".join(str(tuple(t.shape)) for t in inputs)
    return InputShapeError(
        f"{name} rejects calibration inputs of shape {got} (batch {index})"
        f"{_expected_input(model)}: {str(exc).splitlines()[0]}. "
        "Supply inputs shaped as the model expects (the zoo's calibration shape).")


def _calibrate(prepared: nn.Module, model: nn.Module, batches: Iterable[tuple]) -> int:
    used = 0
    with torch.no_grad():
        for inputs in batches:
            try:
                prepared(*inputs)
            except RuntimeError as exc:
                error = _forward_error(exc, model, inputs, used + 1)
                if error is exc:
                    raise
                raise error from exc
            used += 1
    return used


def _walk_tensors(state: dict) -> Iterator[tuple[str, torch.Tensor]]:
    # Quantized Linear keeps (weight, bias) in one tuple entry: '..._packed_params._packed_params'.
    for key, value in state.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                yield key, item


def _check_scales(converted: nn.Module, model_name: str) -> None:
    bad = []
    for key, tensor in _walk_tensors(converted.state_dict()):
        if tensor.dtype in _QUANTIZED_DTYPES:
            scheme = tensor.qscheme()
            per_tensor = scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric)
            scales = torch.tensor(tensor.q_scale()) if per_tensor else tensor.q_per_channel_scales()
        elif tensor.is_floating_point() and "scale" in key.rsplit(".", 1)[-1]:
            scales = tensor
        else:
            continue
        if not bool(torch.isfinite(scales).all()):
            bad.append(key)
    if bad:
        raise CalibrationError(f"int8 conversion of {model_name} produced NaN/Inf quantization "
                               f"scales in {', '.join(bad)}; check the calibration data's range")


def _lowered(converted: torch.fx.GraphModule, example: tuple, settings: Mapping[str, Any]):
    """Version 2's passes after convert_fx: float ops read float tensors, and int8 layers whose
    outputs only float ops read keep them float."""
    if settings["qconfig_version"] >= 2:
        int8_lowering.dequantize_float_inputs(converted, example, FLOAT_OPS)
        int8_lowering.float_layer_norms(converted)
        int8_lowering.int8_adds(converted)
        if settings["backend"] != "qnnpack":      # qnnpack has no float-output int8 Linear
            int8_float_outputs.lower_float_outputs(converted)
        int8_float_outputs.float_output_convs(converted)
        int8_lowering.drop_float_roundtrips(converted)
    return converted


def _labelled(graph: torch.fx.GraphModule, used: int, settings: dict):
    # what produced it travels with the module (state_dict does not carry these)
    graph.calibration_batches_used, graph.int8_settings = used, dict(settings)
    graph.backend, graph.observer = settings["backend"], settings["observer"]
    return graph


def to_int8(
    model: nn.Module,
    calibration_loader: Iterable,
    calibration_batches: int = 10,
    backend: str = "fbgemm",
    observer: str = "default",
    *,
    activation_range: str | None = None,
    qconfig_version: int = QCONFIG_VERSION,
) -> torch.fx.GraphModule:
    """Post-training static int8 quantization in FX graph mode, calibrated on real data.

    Args:
        model: the fp32 model; it is deep-copied and never modified.
        calibration_loader: iterable of ``(inputs, targets)`` batches (``inputs`` a tensor); the
            first batch is also the example input for tracing. It is iterated once.
        calibration_batches: how many batches to calibrate on (at most).
        backend: ``fbgemm`` (x86 servers), ``qnnpack`` (ARM) or ``x86``.
        observer: ``default`` (histogram activations) or ``minmax`` (min/max activations:
            faster calibration); weights are per-channel symmetric either way.
        activation_range: ``full`` or ``reduced``; None (the default) takes
            ``activation_range(backend)``, the widest range exact on this CPU.
        qconfig_version: which ops are quantized and how (``QCONFIG_VERSIONS``; 1 is the mapping
            of quantize-all 0.1, kept to compare and to rebuild old artifacts).

    Returns:
        The converted ``GraphModule``, with attributes ``calibration_batches_used``,
        ``int8_settings`` (the JSON-able dict ``rebuild_int8`` takes), ``backend`` and
        ``observer``. Run it after ``set_engine(backend)``.

    Raises:
        ConfigError: ``calibration_batches < 1``, unknown backend, observer or version, or full
            range asked where it is not exact.
        CalibrationError: empty loader, NaN/Inf inputs, non-finite quantization scales.
        TraceError: torch.fx cannot trace the model.
        InputShapeError: the model rejects the calibration inputs' shape.

    Warns:
        CalibrationWarning: the loader held fewer batches than ``calibration_batches``.
    """
    _validate(calibration_batches, backend, observer)
    settings = new_settings(backend, observer, activation_range, qconfig_version)
    batches = _batches(model, calibration_loader, calibration_batches)
    set_engine(backend)
    converted = _convert(copy.deepcopy(model).eval(), batches, settings)
    if len(batches) < calibration_batches:
        warnings.warn(CalibrationWarning(
            f"calibrated {type(model).__name__} on {len(batches)} of {calibration_batches} "
            "requested batches: the loader ran out; supply more calibration data for steadier "
            "scales"), stacklevel=2)
    return _labelled(converted, len(batches), settings)


def _batches(model: nn.Module, loader: Iterable, wanted: int) -> list[tuple[torch.Tensor, ...]]:
    """Up to ``wanted`` calibration batches as input tuples, read once from ``loader``: the first
    one is also the example input of tracing and of the graph passes."""
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        raise CalibrationError(
            f"calibration loader for {type(model).__name__} is empty: supply at least one "
            "(inputs, targets) batch of representative data")
    return [_as_inputs(first, 1)] + [_as_inputs(batch, index) for index, batch in
                                     enumerate(itertools.islice(batches, wanted - 1), start=2)]


def _convert(fp32: nn.Module, batches: list[tuple], settings: Mapping[str, Any]) -> torch.fx.GraphModule:
    prepared = _prepare(copy.deepcopy(fp32), batches[0], settings)
    _calibrate(prepared, fp32, batches)
    with _quiet_ao():
        converted = _lowered(convert_fx(prepared), batches[0], settings)
    _check_scales(converted, type(fp32).__name__)
    return converted


def rebuild_int8(
    model: nn.Module,
    example_inputs: Any,
    settings: Mapping[str, Any],
) -> torch.fx.GraphModule:
    """The uncalibrated int8 skeleton of ``model``, ready to ``load_state_dict`` a saved result.

    Same graph as ``to_int8`` built with these settings, but with placeholder scales: only
    meaningful once a converted model's state_dict is loaded into it.

    Args:
        model: an fp32 model of the same architecture (its weights are irrelevant).
        example_inputs: a tensor or tuple of tensors of the model's input shape.
        settings: the converted model's ``int8_settings`` (fields ``SETTINGS_FIELDS``); a dict
            without ``qconfig_version`` is from quantize-all 0.1 and rebuilds with version 1.

    Returns:
        The converted ``GraphModule`` with ``calibration_batches_used = 0``.

    Raises:
        ConfigError: unknown field, backend, observer, range or version.
        TraceError: torch.fx cannot trace the model.
    """
    checked = checked_settings(settings)
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    set_engine(checked["backend"])
    prepared = _prepare(copy.deepcopy(model).eval(), example, checked)
    with _quiet_ao(r".*must run observer"):
        skeleton = _lowered(convert_fx(prepared), example, checked)
    return _labelled(skeleton, 0, checked)


def quantized_fraction(converted: nn.Module, fp32_model: nn.Module) -> float:
    """Share of ``fp32_model``'s parameter elements stored as qint8/quint8 in ``converted``.

    Counts quantized tensors in the converted state_dict, including packed Linear weights. Biases
    stay float, so a fully quantized conv/linear net scores just under 1.0; FX leaves ``nn.LSTM``
    in float, so an LSTM classifier scores near 0.0.

    Args:
        converted: the int8 model.
        fp32_model: the fp32 model it came from.

    Returns:
        A fraction in [0, 1] (0.0 for a model without parameters).
    """
    total = sum(p.numel() for p in fp32_model.parameters())
    if total == 0:
        return 0.0
    quantized = sum(t.numel() for _, t in _walk_tensors(converted.state_dict())
                    if t.dtype in _QUANTIZED_DTYPES)
    return min(1.0, quantized / total)
