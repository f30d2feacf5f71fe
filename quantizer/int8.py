"""int8 conversion: static quantization in PyTorch FX graph mode, and dynamic quantization.

Owns ``to_int8`` (calibrate, then convert, optionally keeping named layers in float),
``to_int8_dynamic`` (int8 weights, activations quantized per batch at run time), the pieces the
accuracy tuner (``quantizer.tuning``) builds on (``calibrate_int8``, ``prepare_int8``,
``convert_int8``, ``fallback_units``, ``dynamic_units``, ``Int8Simulator``), the settings dict
every int8 result carries (``int8_settings``) and ``rebuild_int8`` (the skeleton a saved int8
state_dict loads into), ``set_engine`` and ``quantized_fraction``; re-exports ``activation_range``
and the settings names of ``int8_qconfig`` (which ops are quantized, and how). With
``int8_qconfig``, ``int8_lowering`` and ``int8_float_outputs`` (passes over the converted graph)
it is the int8 engine: the only modules of the package that import ``torch.ao`` (deprecated in
torch 2.10+, still working through 2.14), so a torchao pt2e engine can sit beside them later.
Must not import ray, click or ``jobs``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import linecache
import os
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
from torch import nn

from quantizer import int8_float_outputs, int8_lowering, rnn, tracing
from quantizer.errors import CalibrationError, ConfigError, InputShapeError, TraceError
from quantizer.int8_qconfig import (  # noqa: F401  (ACTIVATION_RANGES ... re-exported)
    ACTIVATION_RANGES, BACKENDS, FLOAT_OPS, OBSERVERS, QCONFIG_VERSION, QCONFIG_VERSIONS, RECIPES,
    SETTINGS_FIELDS, activation_range, checked_settings, new_settings, qconfig_mapping,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import QConfig, per_channel_dynamic_qconfig, quantize_dynamic
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase
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


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """prepare_fx's tracer records a Python stack trace for every graph node unless
    ``torch.fx.config.do_not_emit_stack_traces`` is set (torch >= 2.11); the first one imports
    torch._dynamo and torch._inductor (~0.9 s in each new process), each one walks the stack.
    Nothing here reads them: errors are located from the exception's own traceback
    (``_user_frame``)."""
    config = getattr(torch.fx, "config", None)
    before = getattr(config, "do_not_emit_stack_traces", None)
    if before is None:
        yield
        return
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


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


def _prepare(fp32: nn.Module, example: tuple, settings: Mapping[str, Any],
             forward_kwargs: dict | None = None) -> torch.fx.GraphModule:
    forward_kwargs = tracing.check_forward_kwargs(fp32, forward_kwargs or {})
    try:
        with _quiet_ao(), _no_stack_traces():
            root = tracing.trace_fixed(fp32, forward_kwargs) if forward_kwargs else fp32
            return prepare_fx(root, qconfig_mapping(fp32, settings), example_inputs=example)
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


def _labelled(module: nn.Module, used: int, settings: dict) -> nn.Module:
    # what produced it travels with the module (state_dict does not carry these)
    module.calibration_batches_used, module.int8_settings = used, settings
    module.backend, module.observer = settings["backend"], settings["observer"]
    return module


def _first_batch(model: nn.Module, calibration_loader: Iterable) -> tuple[tuple, Iterator]:
    batches = iter(calibration_loader)
    first = next(batches, None)
    if first is None:
        raise CalibrationError(
            f"calibration loader for {type(model).__name__} is empty: supply at least one "
            "(inputs, targets) batch of representative data")
    return _as_inputs(first, 1), batches


def calibrate_int8(
    model: nn.Module,
    calibration_loader: Iterable,
    calibration_batches: int = 10,
    backend: str = "fbgemm",
    observer: str = "default",
    *,
    forward_kwargs: dict | None = None,
    activation_range: str | None = None,
    qconfig_version: int = QCONFIG_VERSION,
) -> torch.fx.GraphModule:
    """Trace ``model`` with observers and calibrate them: the half of ``to_int8`` done once.

    ``convert_int8`` turns the result into int8 models as often as asked (with different layers
    kept in float) without calibrating again; ``observer_state(it)`` holds the observers'
    statistics, so ``load_observer_state(prepare_int8(...), that)`` rebuilds it in another process.

    Args: as ``to_int8``.

    Returns:
        The calibrated, prepared ``GraphModule`` with ``calibration_batches_used``, ``backend``,
        ``observer``, ``forward_kwargs``, ``qconfig_settings``; run it only through
        ``convert_int8`` or ``Int8Simulator``.

    Raises: as ``to_int8``.

    Warns:
        CalibrationWarning: the loader held fewer batches than ``calibration_batches``.
    """
    _validate(calibration_batches, backend, observer)
    example, batches = _first_batch(model, calibration_loader)
    one_row = tuple(t[:1] if t.dim() else t for t in example)  # what the graph passes run on
    prepared = prepare_int8(model, one_row, backend, observer, forward_kwargs=forward_kwargs,
                            activation_range=activation_range, qconfig_version=qconfig_version)
    rest = (_as_inputs(batch, index) for index, batch in
            enumerate(itertools.islice(batches, calibration_batches - 1), start=2))
    used = _calibrate(prepared, model, itertools.chain([example], rest), prepared.forward_kwargs)
    if used < calibration_batches:
        warnings.warn(CalibrationWarning(
            f"calibrated {type(model).__name__} on {used} of {calibration_batches} requested "
            "batches: the loader ran out; supply more calibration data for steadier scales"),
            stacklevel=2)
    prepared.calibration_batches_used = used
    return prepared


def prepare_int8(model: nn.Module, example_inputs: Any, backend: str = "fbgemm",
                 observer: str = "default", *, forward_kwargs: dict | None = None,
                 activation_range: str | None = None,
                 qconfig_version: int = QCONFIG_VERSION) -> torch.fx.GraphModule:
    """``model`` (deep-copied) traced with uncalibrated observers, as ``calibrate_int8`` starts.

    Args: as ``to_int8``; ``example_inputs`` (a tensor or tuple of tensors of the model's input
    shape) is also what the graph passes after ``convert_fx`` run once on (one row is enough).

    Raises:
        ConfigError: unknown backend, observer, range or version, full range where it is not
            exact, bad ``forward_kwargs``.
        TraceError: torch.fx cannot trace the model.
    """
    _validate(1, backend, observer)
    settings = new_settings(backend, observer, activation_range, qconfig_version)
    return _prepared(model, example_inputs, settings, forward_kwargs)


def _prepared(model: nn.Module, example_inputs: Any, settings: dict,
              forward_kwargs: dict | None) -> torch.fx.GraphModule:
    """``prepare_int8`` with checked qconfig settings (``new_settings`` / ``checked_settings``)."""
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    set_engine(settings["backend"])
    fixed = tracing.check_forward_kwargs(model, forward_kwargs or {})
    prepared = _prepare(copy.deepcopy(model).eval(), example, settings, fixed)
    prepared.calibration_batches_used = 0
    prepared.backend, prepared.observer = settings["backend"], settings["observer"]
    prepared.forward_kwargs, prepared.qconfig_settings = fixed, dict(settings)
    prepared.example_inputs = example
    return prepared


def _observer_names(prepared: torch.fx.GraphModule) -> list[str]:
    return [name for name, module in prepared.named_modules() if _is_observer(module)]


def observer_state(prepared: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The calibration statistics of a prepared model alone (its weights are the fp32 model's):
    what another process needs, beside the fp32 model, to rebuild it with ``load_observer_state``.
    """
    names = tuple(f"{name}." for name in _observer_names(prepared))
    return {key: value for key, value in prepared.state_dict().items() if key.startswith(names)}


def load_observer_state(prepared: torch.fx.GraphModule, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``observer_state`` of a calibrated copy into ``prepare_int8``'s uncalibrated one.

    Raises:
        ConfigError: the states do not fit (another model, backend or observer).
    """
    want = set(observer_state(prepared))
    if set(state) != want:
        raise ConfigError(f"observer state does not fit this prepared model: missing "
                          f"{sorted(want - set(state))[:5]}, unexpected {sorted(set(state) - want)[:5]}")
    prepared.load_state_dict(dict(state), strict=False)
    prepared.calibration_batches_used = max(1, prepared.calibration_batches_used)


def to_int8(
    model: nn.Module,
    calibration_loader: Iterable,
    calibration_batches: int = 10,
    backend: str = "fbgemm",
    observer: str = "default",
    *,
    float_layers: Collection[str] = (),
    forward_kwargs: dict | None = None,
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
        float_layers: names from ``fallback_units`` to keep in float (see ``convert_int8``).
        forward_kwargs: fixed keyword arguments of ``forward`` (JSON scalars, e.g.
            ``{"embed": False}``): FX traces them as ``concrete_args`` and every calibration call
            passes them. The result still accepts them by name and asserts their value.
        activation_range: ``full`` or ``reduced``; None (the default) takes
            ``activation_range(backend)``, the widest range exact on this CPU.
        qconfig_version: which ops are quantized and how (``QCONFIG_VERSIONS``; 1 is the mapping
            of quantize-all 0.1, kept to compare and to rebuild old artifacts).

    Returns:
        The converted ``GraphModule``, with attributes ``calibration_batches_used``, ``backend``,
        ``observer`` and ``int8_settings`` (the JSON-able dict ``rebuild_int8`` rebuilds it
        from). Run it after ``set_engine(backend)``.

    Raises:
        ConfigError: ``calibration_batches < 1``, unknown backend, observer, range, version or
            float layer, full range asked where it is not exact, a forward_kwargs name forward
            lacks or a value that is not a JSON scalar.
        CalibrationError: empty loader, NaN/Inf inputs, non-finite quantization scales.
        TraceError: torch.fx cannot trace the model (the advice names ``forward_kwargs`` when
            fixing forward's non-tensor arguments would make it traceable).
        InputShapeError: the model rejects the calibration inputs' shape.

    Warns:
        CalibrationWarning: the loader held fewer batches than ``calibration_batches``.
    """
    _validate(calibration_batches, backend, observer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)   # re-raised below, at our caller
        prepared = calibrate_int8(model, calibration_loader, calibration_batches, backend, observer,
                                  forward_kwargs=forward_kwargs, activation_range=activation_range,
                                  qconfig_version=qconfig_version)
    if prepared.calibration_batches_used < calibration_batches:
        warnings.warn(CalibrationWarning(
            f"calibrated {type(model).__name__} on {prepared.calibration_batches_used} of "
            f"{calibration_batches} requested batches: the loader ran out; supply more "
            "calibration data for steadier scales"), stacklevel=2)
    return convert_int8(prepared, float_layers, model_name=type(model).__name__)


# ------------------------------------------------------------- layers kept in float (static)
# A fallback unit is an op of the prepared graph that adds quantization error of its own: a
# module (conv, linear, PReLU, ...: named by its module path; a fused conv-bn-relu by its conv)
# or a function call (add, mul, ...: "SCOPE.NAME#K", the K-th call of NAME inside module SCOPE,
# counted as torch.fx counts them). Ops that only pass quantized values on (max-pool, flatten,
# reshape) share their input's observer and are not units.


def _is_observer(module: nn.Module | None) -> bool:
    return isinstance(module, (ObserverBase, FakeQuantizeBase))


def _op_name(fn: Callable) -> str:
    module, name = getattr(fn, "__module__", "") or "", getattr(fn, "__name__", repr(fn))
    return name if module in ("_operator", "operator") else f"{module}.{name}"


def _function_calls(graph: torch.fx.GraphModule) -> Iterator[tuple[torch.fx.Node, str, int]]:
    """(node, scope, index) of every call_function node: index counts ``node.target`` per scope."""
    scopes = graph.meta["_observed_graph_module_attrs"].node_name_to_scope
    seen: dict[tuple[str, Any], int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_function":
            scope = scopes[node.name][0]
            index = seen.get((scope, node.target), 0)
            seen[(scope, node.target)] = index + 1
            yield node, scope, index


def _units(graph: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Fallback unit name -> its node, in graph order."""
    modules = dict(graph.named_modules(remove_duplicate=False))
    qconfigs = graph.meta["_observed_graph_module_attrs"].node_name_to_qconfig
    names = {node: (f"{scope}." if scope else "") + f"{_op_name(node.target)}#{index}"
             for node, scope, index in _function_calls(graph)}
    units = {}
    for node in graph.graph.nodes:
        if node.op == "call_module" and not _is_observer(modules[node.target]):
            name = node.target
        elif node.op == "call_function":
            name = names[node]
        else:
            continue
        after = {id(modules[u.target]) for u in node.users
                 if u.op == "call_module" and _is_observer(modules[u.target])}
        first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        before = (id(modules[first.target]) if first is not None and first.op == "call_module"
                  and _is_observer(modules[first.target]) else None)
        if qconfigs.get(node.name) is not None and after and after != {before}:
            units[name] = node
    return units


def _unit_params(graph: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    if node.op != "call_module":
        return 0
    return sum(p.numel() for p in graph.get_submodule(node.target).parameters())


def fallback_units(prepared: torch.fx.GraphModule) -> dict[str, int]:
    """The ops of a prepared model that ``float_layers`` may name, with their parameter counts.

    Args:
        prepared: from ``calibrate_int8`` or ``prepare_int8``.

    Returns:
        ``{unit name: parameters it holds}`` in graph order (function units hold none).
    """
    return {name: _unit_params(prepared, node) for name, node in _units(prepared).items()}


def _unknown(names: Collection[str], known: Collection[str], model_name: str, what: str) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        shown = ", ".join(list(known)[:40]) + (", ..." if len(known) > 40 else "")
        raise ConfigError(f"{model_name}: {what} {', '.join(map(repr, unknown))} not in the model; "
                          f"its units are: {shown or '(none)'}")


_FLOAT_CLASSES: dict[type, type] = {}
_FLOAT_OPS: dict[Any, Callable] = {}


def _keep_float_class(cls: type) -> type:
    # convert_fx lowers dequantize -> PReLU/Hardswish/LayerNorm/... -> quantize patterns to int8
    # kernels whatever the qconfig says; those patterns match exact types, so a subclass with the
    # same parameters (and state_dict keys) stays float.
    if cls not in _FLOAT_CLASSES:
        _FLOAT_CLASSES[cls] = type(f"Float{cls.__name__}", (cls,), {"__module__": __name__})
    return _FLOAT_CLASSES[cls]


def _keep_float_op(fn: Callable) -> Callable:
    # the same for function calls (F.hardswish, torch.sigmoid, ...): a wrapper matches no pattern
    if fn not in _FLOAT_OPS:
        def run(*args, **kwargs):
            return fn(*args, **kwargs)
        run.__name__ = run.__qualname__ = f"float_{getattr(fn, '__name__', 'op')}"
        _FLOAT_OPS[fn] = run
    return _FLOAT_OPS[fn]


def _convert(prepared: torch.fx.GraphModule, float_nodes: set[str]) -> torch.fx.GraphModule:
    """Convert a copy of ``prepared`` with the nodes named in ``float_nodes`` kept in float."""
    work = copy.deepcopy(prepared)
    mapping = copy.deepcopy(work.meta["_observed_graph_module_attrs"].qconfig_mapping)
    for node in work.graph.nodes:
        if node.name not in float_nodes:
            continue
        if node.op == "call_module":
            module = work.get_submodule(node.target)
            module.__class__ = _keep_float_class(type(module))
            mapping.set_module_name(node.target, None)
        elif node.op == "call_function":
            node.target = _keep_float_op(node.target)
        elif node.op == "call_method":
            mapping.set_object_type(node.target, None)
    for node, scope, index in _function_calls(work):   # counted after the swaps, as convert will
        if node.name in float_nodes:
            mapping.set_module_name_object_type_order(scope, node.target, index, None)
    work.recompile()
    with _quiet_ao(r".*must run observer"):
        converted = convert_fx(work, qconfig_mapping=mapping)
        return _lowered(converted, prepared.example_inputs, prepared.qconfig_settings)


def _lowered(converted: torch.fx.GraphModule, example: tuple, settings: Mapping[str, Any]):
    """Version 2's passes after convert_fx (docs/fidelity.md): float ops read float tensors, and
    int8 layers whose outputs only float ops read keep them float."""
    if settings["qconfig_version"] >= 2:
        int8_lowering.dequantize_float_inputs(converted, example, FLOAT_OPS)
        int8_lowering.float_layer_norms(converted)
        int8_lowering.int8_adds(converted)
        if settings["backend"] != "qnnpack":      # qnnpack has no float-output int8 Linear
            int8_float_outputs.lower_float_outputs(converted)
        int8_float_outputs.float_output_convs(converted)
        int8_lowering.drop_float_roundtrips(converted)
    return converted


def convert_int8(prepared: torch.fx.GraphModule, float_layers: Collection[str] = (), *,
                 quantized_only: Collection[str] | None = None,
                 model_name: str = "model") -> torch.fx.GraphModule:
    """Convert a copy of a calibrated model to int8, keeping ``float_layers`` in float.

    A float layer's inputs are dequantized and its output is quantized again where an int8 op
    consumes it. ``prepared`` is left as it was, so one calibration serves many conversions.

    Args:
        prepared: from ``calibrate_int8`` (or ``prepare_int8`` + a calibrated state_dict).
        float_layers: names from ``fallback_units(prepared)``.
        quantized_only: instead, keep EVERY op in float except these units (sensitivity checks).
        model_name: for error messages.

    Returns:
        The int8 ``GraphModule``, labelled as ``to_int8``'s result is.

    Raises:
        ConfigError: a name that is not a fallback unit of this model.
    """
    units = _units(prepared)
    _unknown(list(float_layers) + list(quantized_only or ()), units, model_name, "float layer")
    if quantized_only is None:
        float_nodes = {units[name].name for name in float_layers}
    else:
        keep = {units[name].name for name in quantized_only}
        float_nodes = {n.name for n in prepared.graph.nodes if n.name not in keep
                       and n.op in ("call_module", "call_function", "call_method")}
    set_engine(prepared.backend)
    converted = _convert(prepared, float_nodes)
    if prepared.calibration_batches_used:
        _check_scales(converted, model_name)
    settings = {**prepared.qconfig_settings,
                "float_layers": [name for name in units if name in set(float_layers)],
                "forward_kwargs": dict(getattr(prepared, "forward_kwargs", {}))}
    return _labelled(converted, prepared.calibration_batches_used, settings)


# ------------------------------------------------------------------ sensitivity by simulation


class _FakeQuant(nn.Module):
    """One observer's call site, quantizing (or not) with the observer's calibrated qparams
    (activations per tensor; a functional op's weight observer may be per channel)."""

    def __init__(self, observer: nn.Module):
        super().__init__()
        self.enabled, self.quantize = False, None
        dtype, scheme = getattr(observer, "dtype", None), getattr(observer, "qscheme", None)
        if dtype not in _QUANTIZED_DTYPES or getattr(observer, "is_dynamic", False):
            return
        scale, zero_point = observer.calculate_qparams()
        info = torch.iinfo(dtype)  # quantize_per_tensor clamps to the dtype's range
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            qparams = (float(scale), int(zero_point), info.min, info.max)
            self.quantize = lambda x: torch.fake_quantize_per_tensor_affine(x, *qparams)
        elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
            qparams = (scale.float(), zero_point.to(torch.int32), observer.ch_axis, info.min,
                       info.max)
            self.quantize = lambda x: torch.fake_quantize_per_channel_affine(x, *qparams)

    def forward(self, x):
        return self.quantize(x) if self.enabled and self.quantize is not None else x


def _weight_fake_quant(weight: torch.Tensor, qconfig: QConfig) -> Callable:
    """Fake quantization with the qparams ``qconfig``'s weight observer finds for ``weight``."""
    observer = qconfig.weight()
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    low, high = observer.quant_min, observer.quant_max   # a depthwise conv's weights: 7 bits
    if observer.qscheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        return lambda t: torch.fake_quantize_per_channel_affine(
            t, scale.float(), zero_point.to(torch.int32), observer.ch_axis, low, high)
    return lambda t: torch.fake_quantize_per_tensor_affine(t, float(scale), int(zero_point),
                                                           low, high)


class _SimPReLU(nn.Module):
    """What torch's quantized PReLU kernel computes: the slopes AND the positive side's factor
    1.0 go through the slopes' quint8 qparams, so a slope range without 1.0 shrinks positives."""

    def __init__(self, prelu: nn.Module):
        super().__init__()
        weight = prelu.weight.detach()
        fake_quant = _weight_fake_quant(weight, prelu.qconfig)
        self.weight, self.enabled = weight, False
        self.slopes, self.one = fake_quant(weight), fake_quant(torch.ones_like(weight))

    def forward(self, x):
        if not self.enabled:
            return nn.functional.prelu(x, self.weight)
        shape = [1, -1] + [1] * (x.dim() - 2) if x.dim() > 1 and self.weight.numel() > 1 else [-1]
        return torch.where(x >= 0, x * self.one.reshape(shape), x * self.slopes.reshape(shape))


def _weight_holder(module: nn.Module) -> nn.Module | None:
    """The conv/linear whose weight an int8 kernel quantizes (a fused module's first part)."""
    if isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return module if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) else None


def _float_output(module: nn.Module, settings: Mapping[str, Any]) -> bool:
    """Whether version 2's lowering gives this prepared layer's int8 kernel a float output where
    only float ops read it (``int8_float_outputs``: Linear but on qnnpack, dense k x k convs)."""
    if settings["qconfig_version"] < 2:
        return False
    if type(module) is nn.Linear:
        return settings["backend"] != "qnnpack"
    conv = module[0] if isinstance(module, nn.Sequential) and len(module) else module
    return type(conv) is nn.Conv2d and not 1 < conv.groups == conv.in_channels \
        and tuple(conv.kernel_size) != (1, 1)


class Int8Simulator:
    """A calibrated model that runs with any subset of its fallback units fake-quantized.

    Each observer call site becomes a fake-quantizer with the observer's calibrated qparams, and
    each conv/linear weight is fake-quantized as the int8 kernel's weight would be, so one trial
    costs one fp32 forward pass instead of a conversion. An observer is active when an op on
    either side of it is quantized, as ``convert_int8`` decides. int8 kernels differ in their
    rounding of biases and accumulators, so results agree with real conversions closely, not
    bit for bit (docs/tuning.md gives the measured agreement).

    Args:
        prepared: from ``calibrate_int8`` (or ``prepare_int8`` + ``load_observer_state``).
        inplace: rewrite ``prepared`` itself (then spent) instead of a copy of it.
    """

    def __init__(self, prepared: torch.fx.GraphModule, *, inplace: bool = False):
        graph = prepared if inplace else copy.deepcopy(prepared)
        self.graph, self.units, self.params = graph, _units(graph), fallback_units(graph)
        self._quantizable = {name for name, qconfig in
                             graph.meta["_observed_graph_module_attrs"].node_name_to_qconfig.items()
                             if qconfig is not None}
        settings = getattr(prepared, "qconfig_settings", None) or {"qconfig_version": 1}
        self._sites: list[tuple[_FakeQuant, list[str], list[str]]] = []
        for index, node in enumerate(list(graph.graph.nodes)):
            if node.op == "call_module" and _is_observer(graph.get_submodule(node.target)):
                site = _FakeQuant(graph.get_submodule(node.target))
                graph.add_module(f"_sim_site_{index}", site)
                node.target = f"_sim_site_{index}"
                # a producer whose int8 output version 2 keeps float when no int8 op reads it
                # (int8_float_outputs) quantizes nothing here by itself
                producers = [n.name for n in node.args if isinstance(n, torch.fx.Node)
                             and not (n.op == "call_module"
                                      and _float_output(graph.get_submodule(n.target), settings))]
                self._sites.append((site, producers, [n.name for n in node.users]))
        self._weights = [self._simulated(node) for node in self.units.values()
                         if node.op == "call_module"]
        graph.recompile()

    def _simulated(self, node: torch.fx.Node) -> tuple[str, Callable[[bool], None]]:
        module = self.graph.get_submodule(node.target)
        if isinstance(module, nn.PReLU):
            sim = _SimPReLU(module)
            self.graph.add_module(f"_sim_{node.name}", sim)
            node.target = f"_sim_{node.name}"
            return node.name, lambda on: setattr(sim, "enabled", on)
        holder = _weight_holder(module)
        if holder is None or getattr(module, "qconfig", None) is None:
            return node.name, lambda on: None
        weight = holder.weight.detach().clone()
        quantized = _weight_fake_quant(weight, module.qconfig)(weight)
        return node.name, lambda on: setattr(holder.weight, "data", quantized if on else weight)

    def run(self, inputs: Any, *, float_layers: Collection[str] = (),
            quantized_only: Collection[str] | None = None) -> Any:
        """Outputs on ``inputs`` with every unit quantized but ``float_layers``, or with only
        ``quantized_only`` quantized (and everything else in float)."""
        if quantized_only is not None:
            quantized = {self.units[name].name for name in quantized_only} & self._quantizable
        else:
            quantized = self._quantizable - {self.units[name].name for name in float_layers}
        for site, producers, consumers in self._sites:
            site.enabled = any(name in quantized for name in producers + consumers)
        for name, switch in self._weights:
            switch(name in quantized)
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        with torch.no_grad():
            return self.graph(*args)


# --------------------------------------------------------------------------- dynamic recipe
# Units: every nn.Linear (by module name) and every weight matrix of an nn.LSTM/nn.GRU (by its
# parameter name, "lstm.weight_ih_l0"). An RNN whose weights are all int8 runs torch's dynamic
# kernels; one with a weight kept float is split into layers (quantizer.rnn), and each layer
# holding a float weight computes in float with its other weights stored int8 (weight-only).


class _TensorStateRNN:
    """torch's dynamic LSTM/GRU keeps packed weights that torch.save writes as TorchScript
    objects, which ``weights_only`` loading refuses; this writes int8 tensors under nn.LSTM's own
    names and packs them again on load."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for part in self._weight_bias().values():
            for name, tensor in part.items():
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = [n for layer in range(self.num_layers) for n in rnn.layer_weight_names(self, layer)]
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        self.set_weight_bias({n: state_dict[prefix + n] for n in names})

    def set_weight_bias(self, weight_bias_dict):
        super().set_weight_bias(weight_bias_dict)
        self.unregister_packed()

    def unregister_packed(self):
        # a plain list, not child modules: state_dict and load_state_dict must not walk into them
        packed = list(self._all_weight_values)
        del self._modules["_all_weight_values"]
        self._all_weight_values = packed


class _DynamicLSTM(_TensorStateRNN, nnqd.LSTM):
    pass


class _DynamicGRU(_TensorStateRNN, nnqd.GRU):
    pass


_TENSOR_STATE = {nnqd.LSTM: _DynamicLSTM, nnqd.GRU: _DynamicGRU}


def dynamic_units(model: nn.Module) -> dict[str, int]:
    """What ``to_int8_dynamic``'s ``float_layers`` may name, with parameter counts, in order.

    Returns:
        ``{"fc": n, "lstm.weight_ih_l0": n, ...}``: every ``nn.Linear`` and every weight matrix
        of every ``nn.LSTM``/``nn.GRU`` (the bias beside it counted with it).
    """
    units = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            units[name] = sum(p.numel() for p in module.parameters())
        elif type(module) in rnn.RNN_TYPES:
            for layer in range(module.num_layers):
                for weight in rnn.layer_weight_names(module, layer):
                    if weight.startswith("weight"):
                        bias = getattr(module, weight.replace("weight", "bias"), None)
                        units[f"{name}.{weight}"] = getattr(module, weight).numel() + (
                            bias.numel() if bias is not None else 0)
    return units


def _weight_only_layer(module: nn.Module, layer: int, kept: set[str]) -> nn.Module:
    """Layer ``layer`` of ``module`` computing in float; weights not in ``kept`` stored int8."""
    weights = {}
    for name in rnn.layer_weight_names(module, layer):
        tensor = getattr(module, name).detach().clone()
        if name.startswith("weight") and name not in kept:
            observer = per_channel_dynamic_qconfig.weight()
            observer(tensor)
            scale, zero_point = observer.calculate_qparams()
            with _quiet_ao():
                tensor = torch.quantize_per_channel(tensor, scale.double(), zero_point, 0,
                                                    torch.qint8)
        weights[name.replace(f"_l{layer}", "_l0")] = tensor
    return rnn.WeightOnlyRNNLayer(module.mode, module.batch_first, module.bidirectional, weights)


def _split_for_float(module: nn.Module, kept: set[str]) -> rnn.LayeredRNN:
    layered = rnn.split_rnn(module)
    for layer in range(module.num_layers):
        if kept & set(rnn.layer_weight_names(module, layer)):
            layered.layers[layer] = _weight_only_layer(module, layer, kept)
    return layered


def _dynamic_spec(work: nn.Module, floats: set[str]) -> dict[str, Any]:
    """Module name -> qconfig for quantize_dynamic; splits RNNs that keep a weight float."""
    spec = {}
    for name, module in list(work.named_modules()):
        if type(module) is nn.Linear and name not in floats:
            spec[name] = per_channel_dynamic_qconfig
        elif type(module) in rnn.RNN_TYPES:
            kept = {unit[len(name) + 1:] for unit in floats if unit.startswith(f"{name}.weight")}
            if not kept:
                spec[name] = per_channel_dynamic_qconfig
                continue
            layered = _split_for_float(module, kept)
            parent, _, leaf = name.rpartition(".")
            setattr(work.get_submodule(parent) if parent else work, leaf, layered)
            spec.update({f"{name}.layers.{i}": per_channel_dynamic_qconfig
                         for i, layer in enumerate(layered.layers) if type(layer) in rnn.RNN_TYPES})
    return spec


def to_int8_dynamic(model: nn.Module, backend: str = "fbgemm", *,
                    float_layers: Collection[str] = (),
                    forward_kwargs: dict | None = None) -> nn.Module:
    """Dynamic int8: Linear/LSTM/GRU weights int8 per channel, activations quantized per batch.

    No calibration: activation ranges are measured on each batch as it runs. Suits models whose
    weights sit in Linear/LSTM/GRU layers (FX static quantization leaves an LSTM in float).

    Args:
        model: the fp32 model; deep-copied, never modified.
        backend: one of ``BACKENDS``.
        float_layers: names from ``dynamic_units(model)`` to keep in float.
        forward_kwargs: the fixed arguments of ``forward`` the model is called with (recorded in
            the settings; nothing is traced).

    Returns:
        The int8 module, with ``calibration_batches_used = 0`` and ``int8_settings``; run it
        after ``set_engine(backend)``.

    Raises:
        ConfigError: unknown backend or float layer.
    """
    _validate(1, backend, "default")
    set_engine(backend)
    work = copy.deepcopy(model).eval()
    units = dynamic_units(work)
    _unknown(float_layers, units, type(model).__name__, "float layer")
    spec = _dynamic_spec(work, set(float_layers))
    with _quiet_ao():
        quantize_dynamic(work, spec, inplace=True)
    for module in list(work.modules()):
        if type(module) in _TENSOR_STATE:
            module.__class__ = _TENSOR_STATE[type(module)]
            module.unregister_packed()
    # no observer or qconfig: torch's dynamic kernels choose each batch's activation range
    settings = {"recipe": "dynamic", "backend": backend, "observer": None,
                "activation_range": None, "qconfig_version": None,
                "float_layers": [name for name in units if name in set(float_layers)],
                "forward_kwargs": tracing.check_forward_kwargs(model, forward_kwargs or {})}
    return _labelled(work, 0, settings)


# ----------------------------------------------------------------------- settings and rebuild


def int8_settings(converted: nn.Module) -> dict:
    """The JSON-able settings an int8 result was made with (what ``rebuild_int8`` takes).

    Fields (``SETTINGS_FIELDS``): ``recipe`` (``static`` | ``dynamic``), ``backend``,
    ``observer``, ``activation_range`` (``full`` | ``reduced``), ``qconfig_version`` (the last
    three null for dynamic), ``float_layers`` (unit names kept in float, in model order),
    ``forward_kwargs`` (the fixed arguments of ``forward`` it was traced and is called with).
    """
    return copy.deepcopy(converted.int8_settings)


def rebuild_int8(model: nn.Module, example_inputs: Any, settings: Mapping[str, Any]) -> nn.Module:
    """The int8 skeleton of ``model`` that a saved result's state_dict loads into, exactly.

    Builds the same graph and modules as the conversion that ``settings`` describes (recipe,
    backend, observer, activation range, qconfig version, layers kept float, fixed forward
    arguments) but with placeholder scales and weights: only meaningful once the converted
    model's state_dict (and the state it keeps outside it, see ``quantizer.module_state``) is
    loaded into it.

    Args:
        model: an fp32 model of the same architecture (its weights are irrelevant).
        example_inputs: a tensor or tuple of tensors of the model's input shape.
        settings: ``int8_settings(converted)`` of the saved result (a missing field takes the
            conversion's default; a missing ``qconfig_version`` means 1, quantize-all 0.1).

    Returns:
        The int8 module with ``calibration_batches_used = 0``.

    Raises:
        ConfigError: unknown fields, recipe, backend, observer, range, version or float layer.
        TraceError: torch.fx cannot trace the model.
    """
    checked = checked_settings(settings)
    name, fixed = type(model).__name__, checked["forward_kwargs"]
    if checked["recipe"] == "dynamic":
        return to_int8_dynamic(model, checked["backend"], float_layers=checked["float_layers"],
                               forward_kwargs=fixed)
    qconfig = {k: checked[k] for k in SETTINGS_FIELDS if k not in ("float_layers", "forward_kwargs")}
    prepared = _prepared(model, example_inputs, qconfig, fixed)
    return convert_int8(prepared, checked["float_layers"], model_name=name)


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
