"""Which ops int8 quantizes, and how: the versioned FX qconfig mapping and the int8 settings.

Owns ``activation_range`` (full or reduced 8-bit activations: decided from the backend and the
CPU), ``qconfig_mapping`` (version 1: torch.ao's defaults, as quantize-all 0.1 used them; version
2: what torchao's pt2e ``X86InductorQuantizer`` does, as far as FX's int8 kernels allow) and the
``int8_settings`` dict that records a conversion (``new_settings``) and comes back from an
artifact (``checked_settings``). docs/fidelity.md says why each choice. Part of the int8 engine
with ``int8.py``: only these modules import ``torch.ao``. Must not import ray, click or jobs.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from quantizer.errors import ConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import (
        HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver,
    )
    from torch.ao.quantization.qconfig_mapping import QConfigMapping

BACKENDS = ("fbgemm", "qnnpack", "x86")
OBSERVERS = ("default", "minmax")
ACTIVATION_RANGES = ("full", "reduced")
# 1: torch.ao's default mapping, as quantize-all 0.1 used it (artifacts without a version).
# 2: LayerNorm, GELU, softmax and matmul left in float, per-channel symmetric weights, full-range
#    activations where the kernels are exact (activation_range): what torchao's pt2e
#    X86InductorQuantizer does, as far as FX's int8 kernels allow (docs/fidelity.md).
QCONFIG_VERSIONS = (1, 2)
QCONFIG_VERSION = 2
RECIPES = ("static", "dynamic")
# the fields of an int8 settings dict, in order (rebuild_int8 refuses any other: an artifact from
# a newer tool); the first five are what a static conversion's qconfig depends on
SETTINGS_FIELDS = ("recipe", "backend", "observer", "activation_range", "qconfig_version",
                   "float_layers", "forward_kwargs")

# version 1: fbgemm/x86 kernels can overflow 16-bit accumulators with full-range activations
_REDUCE_RANGE = {"fbgemm": True, "qnnpack": False, "x86": True}
# version 2 keeps these in float, as pt2e does: int8 residual adds quantize a transformer's
# residual stream at every block, and the others cost fidelity for little speed (an add between
# two int8 tensors whose sum is quantized again becomes int8 after conversion: int8_adds)
FLOAT_OPS = (nn.LayerNorm, nn.functional.layer_norm, nn.GELU, nn.functional.gelu,
             nn.Softmax, nn.functional.softmax, "softmax", torch.softmax,
             torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm",
             operator.add, torch.add, "add", operator.mul, torch.mul, "mul", torch.mean, "mean")
# fbgemm's depthwise kernels sum pairs of uint8 x int8 products in int16 (vpmaddubsw) even on
# VNNI CPUs: with full-range activations their weights get 7 bits, 255 * 64 * 2 < 2**15
DEPTHWISE_WEIGHT_RANGE = (-64, 63)

def _check(what: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


@lru_cache(maxsize=1)
def _has_avx512_vnni() -> bool:
    """AVX512-VNNI, as fbgemm sees it (both ask the cpuinfo library); /proc/cpuinfo otherwise."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return bool(capabilities().get("avx512_vnni", False))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and "avx512_vnni" in line.split() for line in f)
    except OSError:
        return False


def activation_range(backend: str) -> str:
    """The activation range ``to_int8`` uses with ``backend`` on this CPU: ``full`` or ``reduced``.

    ``full`` (uint8 0..255) only where the backend's kernels are exact for it: qnnpack always
    (int32 accumulation); fbgemm and x86 on CPUs with AVX512-VNNI, whose GEMM kernels (Linear and
    every convolution but depthwise ones, which get 7-bit weights instead) accumulate uint8 x int8
    products in int32 (vpdpbusd). Without VNNI (AVX2 or AVX512 alone, AVX-VNNI alone included)
    fbgemm multiplies with vpmaddubsw, which adds pairs of products in int16 and saturates at
    full range: then ``reduced`` (0..127), as torch.ao's defaults for these backends.

    Args:
        backend: one of ``BACKENDS``.

    Returns:
        ``"full"`` or ``"reduced"``.

    Raises:
        ConfigError: unknown backend.
    """
    _check("backend", backend, BACKENDS)
    return "full" if backend == "qnnpack" or _has_avx512_vnni() else "reduced"


def _observers(observer: str, full: bool, weight_range: tuple[int, int] = (-128, 127)) -> QConfig:
    activation = (HistogramObserver if observer == "default" else MinMaxObserver).with_args(
        dtype=torch.quint8, reduce_range=not full)
    weight = PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
        quant_min=weight_range[0], quant_max=weight_range[1])
    return QConfig(activation=activation, weight=weight)


def _mapping_v1(backend: str, observer: str) -> QConfigMapping:
    mapping = get_default_qconfig_mapping(backend)
    if observer == "minmax":
        # set_global keeps the per-op entries (sigmoid, softmax, ... with fixed qparams).
        mapping.set_global(QConfig(
            activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=_REDUCE_RANGE[backend]),
            weight=PerChannelMinMaxObserver.with_args(
                dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
        ))
    return mapping


def _depthwise(model: nn.Module) -> Iterator[str]:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups == module.in_channels:
            yield name


def _mapping_v2(model: nn.Module, settings: Mapping[str, Any]) -> QConfigMapping:
    full = settings["activation_range"] == "full"
    qconfig = _observers(settings["observer"], full)
    # the defaults' per-op entries: fixed qparams (sigmoid, ...), reshape, ConvTranspose, PReLU
    mapping = get_default_qconfig_mapping(settings["backend"]).set_global(qconfig)
    for op in FLOAT_OPS:
        mapping.set_object_type(op, None)
    if full and settings["backend"] in ("fbgemm", "x86"):
        depthwise = _observers(settings["observer"], full, DEPTHWISE_WEIGHT_RANGE)
        for name in _depthwise(model):
            mapping.set_module_name(name, depthwise)
    return mapping


def qconfig_mapping(model: nn.Module, settings: Mapping[str, Any]) -> QConfigMapping:
    """The FX qconfig mapping of checked ``settings`` for ``model``."""
    if settings["qconfig_version"] == 1:
        return _mapping_v1(settings["backend"], settings["observer"])
    return _mapping_v2(model, settings)


def new_settings(backend: str, observer: str, act_range: str | None, version: int) -> dict:
    """The int8 settings of one conversion, checked: what ``int8_settings`` records."""
    _check("backend", backend, BACKENDS)
    _check("observer", observer, OBSERVERS)
    if version not in QCONFIG_VERSIONS:
        raise ConfigError(f"unknown qconfig_version {version!r}; this quantize-all knows "
                          f"{', '.join(map(str, QCONFIG_VERSIONS))}: use the one that wrote it")
    if version == 1:
        allowed = "reduced" if _REDUCE_RANGE[backend] else "full"
    else:
        allowed = activation_range(backend)
    act_range = allowed if act_range is None else act_range
    if act_range not in ACTIVATION_RANGES:
        raise ConfigError(f"unknown activation_range {act_range!r}; choose full or reduced")
    if act_range == "full" and allowed == "reduced":
        raise ConfigError(
            f"activation_range full is not exact with backend {backend!r} "
            + ("in qconfig_version 1" if version == 1 else "on this CPU (no AVX512-VNNI: fbgemm's "
               "kernels saturate 16-bit sums)") + "; use reduced or leave it unset")
    return {"recipe": "static", "backend": backend, "observer": observer,
            "activation_range": act_range, "qconfig_version": version}


def _stored_range(settings: Mapping[str, Any], backend: str) -> str:
    act_range = settings.get("activation_range")
    if act_range not in (*ACTIVATION_RANGES, None):
        raise ConfigError(f"unknown activation_range {act_range!r}; choose full or reduced")
    if act_range is None:     # written before the range was recorded: version 1's rule
        return "reduced" if _REDUCE_RANGE[backend] else "full"
    # the range changes only the scales, which the state_dict carries: rebuilding a full-range
    # artifact on a CPU where it is not exact is allowed (its outputs may then differ)
    return act_range


def checked_settings(settings: Mapping[str, Any]) -> dict:
    """A stored ``int8_settings`` dict, checked and completed (fields ``SETTINGS_FIELDS``).

    A missing field takes the conversion's default, except ``qconfig_version``: missing means 1
    (settings written before versions were recorded). Dynamic settings carry no qconfig.

    Raises:
        ConfigError: not a dict, unknown fields (written by a newer quantize-all), unknown
            recipe, backend, observer, range or version, float_layers not a list of names.
    """
    if not isinstance(settings, Mapping):
        raise ConfigError(f"int8 settings must be a dict, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(SETTINGS_FIELDS))
    if unknown:
        raise ConfigError(f"int8 settings hold unknown fields {', '.join(unknown)} (known: "
                          f"{', '.join(SETTINGS_FIELDS)}); written by a newer quantize-all? "
                          "Convert the model again with this version")
    recipe = settings.get("recipe", "static")
    _check("int8 recipe", recipe, RECIPES)
    floats = settings.get("float_layers") or []
    if not isinstance(floats, list) or not all(isinstance(n, str) for n in floats):
        raise ConfigError(f"int8 settings: float_layers must be a list of names, got {floats!r}")
    backend = settings.get("backend", "fbgemm")
    _check("backend", backend, BACKENDS)
    rest = {"float_layers": floats, "forward_kwargs": dict(settings.get("forward_kwargs") or {})}
    if recipe == "dynamic":
        return {"recipe": recipe, "backend": backend, "observer": None, "activation_range": None,
                "qconfig_version": None, **rest}
    observer = settings.get("observer") or "default"
    _check("observer", observer, OBSERVERS)
    version = settings.get("qconfig_version", 1)
    if version not in QCONFIG_VERSIONS:   # checked first: a newer mapping may know other ranges
        new_settings(backend, observer, None, version)
    return {"recipe": recipe, "backend": backend, "observer": observer,
            "activation_range": _stored_range(settings, backend),
            "qconfig_version": version, **rest}
