"""int8 conversion: post-training static quantization in PyTorch FX graph mode.

Owns ``to_int8``, ``rebuild_int8`` (the uncalibrated skeleton a saved int8 state_dict loads into),
``set_engine`` and ``quantized_fraction``. This is the ONLY module of the package that imports
``torch.ao.quantization`` (deprecated in torch 2.10+, still working through 2.14), so a torchao
pt2e engine can sit beside it later. Must not import ray, click or ``jobs``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import linecache
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from quantizer import tracing
from quantizer.errors import CalibrationError, ConfigError, InputShapeError, TraceError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.qconfig_mapping import QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

BACKENDS = ("fbgemm", "qnnpack", "x86")
OBSERVERS = ("default", "minmax")

# fbgemm/x86 kernels can overflow 16-bit accumulators with full-range activations; qnnpack cannot.
_REDUCE_RANGE = {"fbgemm": True, "qnnpack": False, "x86": True}
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


def _qconfig_mapping(backend: str, observer: str) -> QConfigMapping:
    mapping = get_default_qconfig_mapping(backend)
    if observer == "minmax":
        # set_global keeps the per-op entries (sigmoid, softmax, ... with fixed qparams).
        mapping.set_global(QConfig(
            activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=_REDUCE_RANGE[backend]),
            weight=PerChannelMinMaxObserver.with_args(
                dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
        ))
    return mapping


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


def _prepare(fp32: nn.Module, example: tuple, backend: str, observer: str,
             forward_kwargs: dict | None = None) -> torch.fx.GraphModule:
    forward_kwargs = tracing.check_forward_kwargs(fp32, forward_kwargs or {})
    try:
        with _quiet_ao():
            root = tracing.trace_fixed(fp32, forward_kwargs) if forward_kwargs else fp32
            return prepare_fx(root, _qconfig_mapping(backend, observer), example_inputs=example)
    except Exception as exc:  # torch.fx raises many types while tracing; all mean "cannot trace"
        where = _user_frame(fp32, exc.__traceback__)
        cause = tracing.fixed_kwargs_advice(fp32, len(example), forward_kwargs)
        advice = cause or (". Restructure the model so forward has no data-dependent control "
                           "flow (no if/for/while on tensor values), or convert it to fp16 instead")
        raise TraceError(
            f"torch.fx cannot trace {type(fp32).__name__} for int8 quantization{where} "
            f"({type(exc).__name__}: {exc}){advice}."
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


def _calibrate(prepared: nn.Module, model: nn.Module, batches: Iterable[tuple],
               forward_kwargs: dict | None = None) -> int:
    used = 0
    with torch.no_grad():
        for inputs in batches:
            try:
                prepared(*inputs, **(forward_kwargs or {}))
            except (AttributeError, TypeError) as exc:   # an observer met a Python scalar
                cause = tracing.fixed_kwargs_advice(model, len(inputs), forward_kwargs or {})
                if not cause:
                    raise
                raise TraceError(f"{type(model).__name__} traced for int8, but calibration failed "
                                 f"({type(exc).__name__}: {exc}){cause}.") from exc
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


SETTINGS_FIELDS = ("recipe", "backend", "observer", "forward_kwargs")


def _labelled(graph: torch.fx.GraphModule, used: int, backend: str, observer: str,
              forward_kwargs: dict | None = None):
    # what produced it travels with the module (state_dict does not carry these)
    graph.calibration_batches_used, graph.backend, graph.observer = used, backend, observer
    graph.int8_settings = {"recipe": "static", "backend": backend, "observer": observer,
                           "forward_kwargs": dict(forward_kwargs or {})}
    return graph


def to_int8(
    model: nn.Module,
    calibration_loader: Iterable,
    calibration_batches: int = 10,
    backend: str = "fbgemm",
    observer: str = "default",
    *,
    forward_kwargs: dict | None = None,
) -> torch.fx.GraphModule:
    """Post-training static int8 quantization in FX graph mode, calibrated on real data.

    Args:
        model: the fp32 model; it is deep-copied and never modified.
        calibration_loader: iterable of ``(inputs, targets)`` batches (``inputs`` a tensor); the
            first batch is also the example input for tracing. It is iterated once.
        calibration_batches: how many batches to calibrate on (at most).
        backend: ``fbgemm`` (x86 servers), ``qnnpack`` (ARM) or ``x86``.
        observer: ``default`` (the backend's default qconfig, histogram activations) or
            ``minmax`` (min/max activations, per-channel weights: faster calibration).
        forward_kwargs: fixed keyword arguments of ``forward`` (JSON scalars, e.g.
            ``{"embed": False}``): FX traces them as ``concrete_args`` and every calibration call
            passes them. The result still accepts them by name and asserts their value.

    Returns:
        The converted ``GraphModule``, with attributes ``calibration_batches_used``, ``backend``,
        ``observer`` and ``int8_settings`` (the JSON-able dict ``rebuild_int8`` rebuilds it
        from). Run it after ``set_engine(backend)``.

    Raises:
        ConfigError: ``calibration_batches < 1``, unknown backend or observer, a forward_kwargs
            name forward lacks or a value that is not a JSON scalar.
        CalibrationError: empty loader, NaN/Inf inputs, non-finite quantization scales.
        TraceError: torch.fx cannot trace the model (the advice names ``forward_kwargs`` when
            fixing forward's non-tensor arguments would make it traceable).
        InputShapeError: the model rejects the calibration inputs' shape.

    Warns:
        CalibrationWarning: the loader held fewer batches than ``calibration_batches``.
    """
    _validate(calibration_batches, backend, observer)
    batches = iter(calibration_loader)
    first = next(batches, None)
    if first is None:
        raise CalibrationError(
            f"calibration loader for {type(model).__name__} is empty: supply at least one "
            "(inputs, targets) batch of representative data")
    example = _as_inputs(first, 1)
    set_engine(backend)
    prepared = _prepare(copy.deepcopy(model).eval(), example, backend, observer, forward_kwargs)
    rest = (_as_inputs(batch, index) for index, batch in
            enumerate(itertools.islice(batches, calibration_batches - 1), start=2))
    used = _calibrate(prepared, model, itertools.chain([example], rest), forward_kwargs)
    if used < calibration_batches:
        warnings.warn(CalibrationWarning(
            f"calibrated {type(model).__name__} on {used} of {calibration_batches} requested "
            "batches: the loader ran out; supply more calibration data for steadier scales"),
            stacklevel=2)
    with _quiet_ao():
        converted = convert_fx(prepared)
    _check_scales(converted, type(model).__name__)
    return _labelled(converted, used, backend, observer, forward_kwargs)


def _settings(settings: dict) -> tuple[str, str, dict]:
    unknown = sorted(set(settings) - set(SETTINGS_FIELDS))
    if unknown:
        raise ConfigError(f"int8 settings hold unknown fields {', '.join(unknown)} (known: "
                          f"{', '.join(SETTINGS_FIELDS)}); written by a newer quantize-all?")
    if settings.get("recipe", "static") != "static":
        raise ConfigError(f"int8 recipe {settings['recipe']!r} is not supported here (static)")
    return (settings.get("backend", "fbgemm"), settings.get("observer", "default"),
            dict(settings.get("forward_kwargs") or {}))


def rebuild_int8(model: nn.Module, example_inputs: Any, settings: dict) -> torch.fx.GraphModule:
    """The uncalibrated int8 skeleton of ``model``, ready to ``load_state_dict`` a saved result.

    Same graph as ``to_int8`` builds from the same settings, but with placeholder scales: only
    meaningful once a converted model's state_dict (and the state it keeps outside it, see
    ``quantizer.module_state``) is loaded into it.

    Args:
        model: an fp32 model of the same architecture (its weights are irrelevant).
        example_inputs: a tensor or tuple of tensors of the model's input shape.
        settings: the result's ``int8_settings`` (``recipe``, ``backend``, ``observer``,
            ``forward_kwargs``; a missing field takes ``to_int8``'s default).

    Returns:
        The converted ``GraphModule`` with ``calibration_batches_used = 0``.

    Raises:
        ConfigError: unknown fields, recipe, backend or observer.
        TraceError: torch.fx cannot trace the model.
    """
    backend, observer, forward_kwargs = _settings(settings)
    _validate(1, backend, observer)
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    set_engine(backend)
    prepared = _prepare(copy.deepcopy(model).eval(), example, backend, observer, forward_kwargs)
    with _quiet_ao(r".*must run observer"):
        skeleton = convert_fx(prepared)
    return _labelled(skeleton, 0, backend, observer, forward_kwargs)


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
