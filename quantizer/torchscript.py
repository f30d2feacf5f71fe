"""The TorchScript copy of an artifact: for deployment without the factory's code.

Owns tracing a converted model into TorchScript bytes and checking that the traced copy gives the
module's outputs on the example (a trace freezes Python state and control flow). A model called
with fixed ``forward_kwargs`` is traced through a small wrapper that passes them. Must not import
torch.ao, ray, click or ``jobs``.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

from quantizer.errors import ArtifactError
from quantizer.fidelity import flatten_outputs


class _WithKwargs(nn.Module):
    """``model(*inputs, **forward_kwargs)`` as a module of tensors only, for ``jit.trace``."""

    def __init__(self, model: nn.Module, forward_kwargs: dict[str, Any]):
        super().__init__()
        self.model = model
        self.forward_kwargs = dict(forward_kwargs)

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.model(*inputs, **self.forward_kwargs)


def _check_copy(traced: Any, model: nn.Module, example: tuple) -> None:
    """The traced copy must give the module's outputs on the example (fp16 within 1e-3). The
    copy's graph runs as traced: the executor's first-run profiling, which only pays off over
    many calls, would double the check's cost."""
    with torch.jit.optimized_execution(False):
        got = flatten_outputs(traced(*example))
    want = flatten_outputs(model(*example))
    same = len(got) == len(want) and all(
        g.shape == w.shape and g.dtype == w.dtype and torch.allclose(
            g, w, rtol=0, atol=1e-3 if w.dtype == torch.float16 else 0, equal_nan=True)
        for g, w in zip(got, want))
    if not same:
        raise ArtifactError("the traced copy's outputs differ from the module's on the example "
                            "input (data-dependent control flow?)")


def torchscript_bytes(model: nn.Module, example_inputs: Any,
                      forward_kwargs: dict[str, Any] | None = None) -> bytes:
    """``torch.jit.save`` bytes of ``model`` traced on ``example_inputs``.

    Raises:
        ArtifactError: no example input, or the traced copy disagrees with the module.
        Whatever ``torch.jit.trace`` raises for a model it cannot trace.
    """
    if example_inputs is None:   # checked first: building the script module alone costs ~14 ms
        raise ArtifactError("no example input to trace with (no calibration data for this model)")
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    target = _WithKwargs(model, forward_kwargs).eval() if forward_kwargs else model
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")     # TracerWarnings and torch.jit deprecation notes
        # check_trace re-traces the whole model (most of the tracing time of an int8 graph) only
        # to compare outputs on this same example: _check_copy does that with one forward each
        traced = torch.jit.trace(target, example, check_trace=False)
        _check_copy(traced, target, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()
