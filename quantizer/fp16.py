"""fp16 conversion: an independent half-precision copy of an fp32 model.

Owns ``to_fp16``. Pure torch: must not import torch.ao.quantization, ray, click or ``jobs``.
"""

from __future__ import annotations

import copy

from torch import nn


def to_fp16(model: nn.Module) -> nn.Module:
    """Return a half-precision copy of ``model`` for inference.

    The copy is independent (``deepcopy``), in eval mode, and every floating parameter and buffer
    is ``torch.float16``; integer buffers such as BatchNorm's ``num_batches_tracked`` keep their
    dtype. The original model is not touched. Feed the copy ``.half()`` inputs.

    Args:
        model: an fp32 ``nn.Module``.

    Returns:
        The fp16 copy.
    """
    return copy.deepcopy(model).half().eval()
