"""fp16 conversion: an independent half-precision copy of an fp32 model, with nothing turned inf.

Owns ``to_fp16`` and ``rebuild_fp16`` (the skeleton an fp16 artifact's state_dict loads into).
A finite fp32 parameter or buffer beyond fp16's range (|x| > 65504) would silently become
``inf``; ``to_fp16`` never lets that happen. Per module holding such a tensor, in this order:

1. an eval BatchNorm with affine weights (``batchnorm_stats_to_affine``): its running statistics
   are rewritten as mean 0 / var 1 and absorbed into weight and bias, an exactly equivalent affine
   (``y = x * w / sqrt(var + eps) + b - mean * w / sqrt(var + eps)``); works wherever the BN sits,
   e.g. after a ReLU where folding into the preceding conv is impossible;
2. a BatchNorm without affine weights to absorb them: batch_norm takes an fp16 input with fp32
   statistics, so the module's tensors stay float32 (``kept_float32``). Not InstanceNorm: its
   mixed-dtype CPU path loses accuracy on large inputs (errors of 25 % measured); nor LayerNorm
   or GroupNorm, whose weights beyond fp16's range would overflow their fp16 outputs anyway;
3. anything else: ``ConversionError`` naming the tensor.

What was done is recorded on the returned module as ``fp16_adjustments`` (a JSON-able list; the
artifact recipe carries it so ``rebuild_fp16`` can give a reloaded model the same dtypes).
Pure torch: must not import torch.ao.quantization, ray, click or ``jobs``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from torch import nn

from quantizer.errors import ConfigError, ConversionError

FP16_MAX = float(torch.finfo(torch.float16).max)       # 65504
BATCHNORM_TO_AFFINE = "batchnorm_stats_to_affine"
KEPT_FLOAT32 = "kept_float32"
ACTIONS = (BATCHNORM_TO_AFFINE, KEPT_FLOAT32)
# its kernels take a float16 input with float32 weights and statistics (measured accurate on CPU;
# CUDA's batch_norm has the same mixed-type path, not measured here: no GPU in this project's CI)
_MIXED_DTYPE_OK = (nn.modules.batchnorm._BatchNorm,)


def _overflowing(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The module's own floating tensors holding finite values that float16 turns into inf."""
    own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    return {f"{prefix}{key}": t for key, t in own.items() if t is not None and t.is_floating_point()
            and bool((torch.isinf(t.detach().half()) & torch.isfinite(t.detach())).any())}


def _fits_fp16(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t.detach().half()).all()) for t in tensors)


def _batchnorm_to_affine(bn: nn.Module) -> bool:
    """Rewrite an eval BatchNorm's statistics into its affine; False (untouched) if impossible."""
    if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine and not bn.training
            and bn.track_running_stats and bn.running_var is not None):
        return False
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = bn.weight.double() / torch.sqrt(var + bn.eps)
    weight = (scale * math.sqrt(1.0 + bn.eps)).float()     # var 1 divides by sqrt(1 + eps)
    bias = (bn.bias.double() - mean * scale).float()
    if not (_fits_fp16(weight, bias) and bool(torch.isfinite(var).all())):
        return False
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    return True


def _entry(name: str, module: nn.Module, over: dict[str, torch.Tensor]) -> dict:
    worst = max(float(t.detach()[torch.isfinite(t.detach())].abs().max()) for t in over.values())
    return {"module": name, "type": type(module).__name__, "tensors": sorted(over), "max_abs": worst}


def _refuse(model: nn.Module, module: nn.Module, over: dict[str, torch.Tensor]) -> ConversionError:
    key, tensor = next(iter(sorted(over.items())))
    finite = tensor.detach()[torch.isfinite(tensor.detach())]
    count = int((finite.abs() > FP16_MAX).sum())
    return ConversionError(
        f"fp16 conversion of {type(model).__name__}: tensor '{key}' ({type(module).__name__}) "
        f"holds {count} of {tensor.numel()} values beyond float16's range (max |x| "
        f"{float(finite.abs().max()):.4g} > {FP16_MAX:.0f}); they would become inf. Only BatchNorm "
        f"statistics can be rewritten or kept float32 in an fp16 model: rescale this layer's "
        f"weights in the fp32 model, or convert it to int8 instead")


def to_fp16(model: nn.Module) -> nn.Module:
    """Return a half-precision copy of ``model`` for inference, with no tensor turned inf.

    The copy is independent (``deepcopy``), in eval mode, and every floating parameter and buffer
    is ``torch.float16`` except those ``fp16_adjustments`` says stayed float32; integer buffers
    such as BatchNorm's ``num_batches_tracked`` keep their dtype. The original is not touched.
    Feed the copy ``.half()`` inputs.

    Args:
        model: an fp32 ``nn.Module``.

    Returns:
        The fp16 copy, with attribute ``fp16_adjustments``: one dict per module changed
        (``module``, ``type``, ``action`` in ``ACTIONS``, ``tensors``, ``max_abs`` of the values
        that did not fit), ``[]`` when none was needed.

    Raises:
        ConversionError: a finite tensor beyond float16's range that can be neither rewritten
            nor kept float32 (the message names it).
    """
    work = copy.deepcopy(model).float().eval()
    adjustments, kept = [], {}
    for name, module in work.named_modules():
        over = _overflowing(module, f"{name}." if name else "")
        if not over:
            continue
        entry = _entry(name, module, over)       # before a rewrite changes the values
        if _batchnorm_to_affine(module):
            adjustments.append({**entry, "action": BATCHNORM_TO_AFFINE})
        elif isinstance(module, _MIXED_DTYPE_OK):
            adjustments.append({**entry, "action": KEPT_FLOAT32})
            kept[name] = copy.deepcopy(module.state_dict())
        else:
            raise _refuse(model, module, over)
    half = work.half()
    for name, state in kept.items():
        half.get_submodule(name).float().load_state_dict(state)
    half.fp16_adjustments = adjustments
    return half


def rebuild_fp16(model: nn.Module, adjustments: Iterable[dict[str, Any]]) -> nn.Module:
    """Cast a freshly built fp32 ``model`` to the dtypes of an fp16 result, for its state_dict.

    Args:
        model: the fp32 model (its weights are irrelevant); changed in place.
        adjustments: the result's ``fp16_adjustments``: modules marked ``kept_float32`` stay
            float32, so their stored values load without passing through float16.

    Returns:
        ``model``, in eval mode.

    Raises:
        ConfigError: an entry names an unknown action or a module the model lacks.
    """
    model = model.half().eval()
    for entry in adjustments:
        action, name = entry.get("action"), entry.get("module")
        if action not in ACTIONS:
            raise ConfigError(f"fp16 adjustment {entry!r}: unknown action {action!r} (known: "
                              f"{', '.join(ACTIONS)}); written by a newer quantize-all?")
        try:
            module = model.get_submodule(str(name))
        except AttributeError as exc:
            raise ConfigError(f"fp16 adjustment {entry!r}: {type(model).__name__} has no module "
                              f"{name!r}") from exc
        if action == KEPT_FLOAT32:
            module.float()
    return model
