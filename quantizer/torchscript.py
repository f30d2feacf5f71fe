"""The TorchScript copy of an artifact: for deployment without the factory's code.

Owns tracing a converted model into TorchScript bytes and checking that the traced copy gives the
module's outputs on the example (a trace freezes Python state and control flow). A model called
with fixed ``forward_kwargs`` is traced through a small wrapper that passes them.

The copy is *flat*: one TorchScript module whose attributes are the model's parameters, buffers and
packed weights, named by their dotted paths with ``_`` for ``.`` (``layer1.0.conv1.weight`` ->
``layer1_0_conv1_weight``), and one graph for the whole forward. ``torch.jit.trace`` of the module
itself builds a script module for every submodule it reaches, which costs 3-5x the forward on the
benchmark zoo (ResNet-18 int8: 0.18 s against 0.035 s flat); the graph and outputs are the same.
A model holding TorchScript submodules, or any the flat trace refuses, is traced as it stands.

A trace keeps the branch the example took wherever the forward turns a tensor into a Python bool
(``if x.mean() > t:``). When the model's own code does that (torch's own shape checks do it too and
are ignored), the copy must also agree with the module on ``check_rows``, one row at a time, or it
is refused: a copy that is right only for inputs like the example is not shipped.
Must not import torch.ao, ray, click or ``jobs``.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import torch
from torch import nn

from quantizer.errors import ArtifactError
from quantizer.fidelity import flatten_outputs

# Rows of ``check_rows`` a copy with a branch on the data is checked on, one at a time: a branch
# each row takes with probability p escapes all of them with p ** 16 (0.55 ** 16 = 7e-5).
BRANCH_CHECK_ROWS = 16
_BOOL_WARNING = "Converting a tensor to a Python boolean"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class _WithKwargs(nn.Module):
    """``model(*inputs, **forward_kwargs)`` as a module of tensors only, for ``jit.trace``."""

    def __init__(self, model: nn.Module, forward_kwargs: dict[str, Any]):
        super().__init__()
        self.model = model
        self.forward_kwargs = dict(forward_kwargs)

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.model(*inputs, **self.forward_kwargs)


class Flattened(nn.Module):
    """``model`` with its tensors and packed weights as this module's own attributes, and no
    submodules: the tracer records each read of one of them as an attribute of this module (it
    finds them by identity), so the trace builds one script module instead of one per submodule.
    """

    def __init__(self, model: nn.Module, forward_kwargs: dict[str, Any]):
        super().__init__()
        object.__setattr__(self, "_model", model)     # not a submodule: the trace must not enter it
        self.forward_kwargs = dict(forward_kwargs)
        seen: set[int] = set()
        for path, module in model.named_modules():
            for name, value in [*module._parameters.items(), *module._buffers.items(),
                                *((n, v) for n, v in vars(module).items()
                                  if torch._C._jit_is_script_object(v))]:
                if value is None or id(value) in seen:
                    continue                           # tied weights: once, where first met
                seen.add(id(value))
                self._add(f"{path}.{name}".lstrip(".").replace(".", "_"), value)
        self.train(model.training)                     # the copy reports the model's mode

    def _add(self, name: str, value: Any) -> None:
        unique, n = name, 0
        while hasattr(self, unique):                   # a clash of joined paths or a Module name
            n += 1
            unique = f"{name}_{n}"
        if isinstance(value, nn.Parameter):
            self.register_parameter(unique, value)
        elif isinstance(value, torch.Tensor):
            self.register_buffer(unique, value)
        else:
            setattr(self, unique, value)               # a packed-weights object, as trace copies it

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self._model(*inputs, **self.forward_kwargs)


def _check_copy(traced: Any, model: nn.Module, example: tuple, what: str = "the example input",
                branches: tuple[str, ...] = ()) -> None:
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
    if not same and branches:
        raise ArtifactError(f"the traced copy's outputs differ from the module's on {what}: the "
                            f"forward branches on tensor values ({', '.join(branches)}), and a "
                            f"trace keeps only the branch the example took")
    if not same:
        raise ArtifactError(f"the traced copy's outputs differ from the module's on {what} "
                            f"(data-dependent control flow?)")


def torchscript_bytes(model: nn.Module, example_inputs: Any,
                      forward_kwargs: dict[str, Any] | None = None,
                      check_rows: torch.Tensor | None = None) -> bytes:
    """``torch.jit.save`` bytes of ``model`` traced on ``example_inputs``.

    Args:
        check_rows: a batch of inputs like the example (a single-input model's). When the forward
            branches on tensor values, the copy is checked on up to ``BRANCH_CHECK_ROWS`` of them,
            each alone (see the module docstring); otherwise not used.

    Raises:
        ArtifactError: no example input, or the traced copy disagrees with the module.
        Whatever ``torch.jit.trace`` raises for a model it cannot trace.
    """
    if example_inputs is None:   # checked first: building the script module alone costs ~14 ms
        raise ArtifactError("no example input to trace with (no calibration data for this model)")
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    target = _WithKwargs(model, forward_kwargs).eval() if forward_kwargs else model
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("ignore")     # torch.jit deprecation notes, other TracerWarnings
        warnings.filterwarnings("always", _BOOL_WARNING, torch.jit.TracerWarning)
        traced = _trace(model, forward_kwargs or {}, target, example)
        branches = _branches(caught)
        _check_copy(traced, target, example, branches=branches)
        if branches and check_rows is not None and len(example) == 1:
            for i in range(min(BRANCH_CHECK_ROWS, len(check_rows))):
                _check_copy(traced, target, (check_rows[i:i + 1],), f"check row {i}", branches)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def _trace(model: nn.Module, forward_kwargs: dict[str, Any], target: nn.Module,
           example: tuple) -> Any:
    """The flat trace of ``model`` (see the module docstring), or the plain one of ``target`` (the
    model with its ``forward_kwargs`` bound) where the flat one cannot be.

    ``check_trace`` is off: it re-traces the whole model only to compare outputs on this same
    example, which ``_check_copy`` does with one forward of each.
    """
    if not any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        try:        # a TorchScript submodule is called as a method of a traced module, not inlined
            return torch.jit.trace(Flattened(model, forward_kwargs), example, check_trace=False)
        except Exception:  # noqa: BLE001  (the plain trace below raises what is wrong, if it is)
            pass
    return torch.jit.trace(target, example, check_trace=False)


def _branches(caught: list) -> tuple[str, ...]:
    """Where the model's own code turned a tensor into a Python bool during the trace."""
    return tuple(dict.fromkeys(
        f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
        if issubclass(w.category, torch.jit.TracerWarning) and str(w.message).startswith(
            _BOOL_WARNING) and not os.path.abspath(w.filename).startswith(_TORCH_DIR)))
